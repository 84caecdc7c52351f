"""Safe bundles: never unpickled, config validated, weights' hash checked; each problem is one clear line.

tests/data/config_format1.json is a config.json as the trainer and `respiscan export` wrote it before
BundleConfig existed (format version 1): it must keep loading, and writing it back must change nothing.
"""

import json
import shutil
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from respiscan.bundle import Bundle, BundleConfig, save_bundle
from respiscan.data.samples import discover
from respiscan.errors import RespiscanError
from respiscan.serving.torch_engine import Pipeline

FORMAT1 = Path(__file__).parent / "data" / "config_format1.json"


@pytest.fixture
def copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "b")


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _set(path, key: str, value):
    """Set a dotted key of config.json, as a person editing it by hand would."""
    config = json.loads((path / "config.json").read_text())
    *parents, last = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[last] = value
    (path / "config.json").write_text(json.dumps(config))


def test_missing_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(RespiscanError, match="model.safetensors: missing weights file"):
        Pipeline(copy)


def test_truncated_weights(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RespiscanError, match="do not match the hash"):
        Pipeline(copy)


def test_tampered_weights_same_size(copy):
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RespiscanError, match="do not match the hash"):
        Pipeline(copy)


def test_newer_format_version(copy):
    _edit_config(copy, format_version=99, model="a newer layout")  # the version is reported, not the layout
    with pytest.raises(RespiscanError, match="format version 99 is newer"):
        Bundle.open(copy)


@pytest.mark.parametrize("changes, message", [
    ({"thresholds": None}, "missing key 'thresholds'"),
    ({"weights_sha256": None}, "missing key 'weights_sha256'"),
    ({"model": "resnet"}, "'model' should be an object, got str"),
    ({"format": "keras-h5"}, "'format' is 'keras-h5', not 'respiscan-bundle'"),
    ({"format": None}, "missing key 'format'"),
    ({"format_version": "1"}, "'format_version' should be a positive integer"),
    ({"class_names": ["healthy", "sick"]}, "'class_names' is"),
])
def test_config_schema(copy, changes, message):
    _edit_config(copy, **changes)
    with pytest.raises(RespiscanError, match=f"^{copy / 'config.json'}: {message}"):
        Bundle.open(copy)


@pytest.mark.parametrize("key, value, message", [
    ("thresholds.ct", 1.5, "'thresholds.ct' is 1.5; a threshold must lie in [0, 1]"),
    ("thresholds.ct", -0.1, "'thresholds.ct' is -0.1; a threshold must lie in [0, 1]"),
    ("thresholds.xray", "high", "'thresholds.xray' should be a finite number, got str"),
    ("thresholds.xray", True, "'thresholds.xray' should be a finite number, got bool"),
    ("thresholds.lung", 0.5, "'thresholds' has an unknown key 'lung'"),
    ("preprocess.dicom_ct_width", 0, "'preprocess.dicom_ct_width' is 0; the CT window width must be positive"),
    ("preprocess.dicom_ct_width", -400, "'preprocess.dicom_ct_width' is -400"),
    ("preprocess.dicom_ct_center", float("nan"), "'preprocess.dicom_ct_center' should be a finite number"),
    ("preprocess.dicom_ct_center", "lung", "'preprocess.dicom_ct_center' should be a finite number"),
    ("preprocess.size", 8, "'preprocess.size' is 8; accepted: 16 to 2048"),
    ("preprocess.size", 100000, "'preprocess.size' is 100000"),
    ("preprocess.size", 64.5, "'preprocess.size' should be an integer"),
    ("preprocess.clahe_clip", 0, "'preprocess.clahe_clip' is 0; the CLAHE clip limit must be positive"),
    ("preprocess.clahe_tiles", 0, "'preprocess.clahe_tiles' is 0"),
    ("preprocess.ct_opening", -1, "'preprocess.ct_opening' is -1"),
    ("model.modalities", ["xray", "mri"], "'model.modalities' has an unknown modality 'mri'"),
    ("model.modalities", [], "'model.modalities' should list each modality once"),
    ("model.shared", "adversarail",
     "'model.shared' is 'adversarail'; accepted: plain, adversarial, source_adversarial, none"),
    ("model.task_backbones", {"xray": "resnet18"}, "'model.task_backbones' has no backbone for ct"),
    ("data.fingerprint", None, "'data.fingerprint' should be an object"),
    ("bf16_check", {"max_abs_difference": 0.1, "tolerance": 0.01, "images": "validation split",
                    "prediction_default": "fp16"}, "'bf16_check.prediction_default' is 'fp16'"),
])
def test_hand_edited_values_are_refused_by_key(copy, key, value, message):
    _set(copy, key, value)
    with pytest.raises(RespiscanError) as caught:
        Bundle.open(copy)
    assert str(caught.value).startswith(f"{copy / 'config.json'}: {message}"), caught.value
    assert "\n" not in str(caught.value)


def test_a_missing_threshold_is_refused(copy):
    config = json.loads((copy / "config.json").read_text())
    del config["thresholds"]["fused"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(RespiscanError, match="'thresholds' has no threshold for fused"):
        Bundle.open(copy)


def test_not_json_and_not_a_bundle(copy, tmp_path):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(RespiscanError, match="not valid JSON"):
        Bundle.open(copy)
    (copy / "config.json").write_text("[1, 2]")
    with pytest.raises(RespiscanError, match="expected a JSON object, got list"):
        Bundle.open(copy)
    with pytest.raises(RespiscanError, match="not a bundle folder"):
        Bundle.open(tmp_path / "nothing")


def test_weights_that_do_not_fit_the_model(copy):
    _set(copy, "model.shared", "none")
    with pytest.raises(RespiscanError, match="weights do not fit the model"):
        Pipeline(copy)


def test_an_earlier_bundle_with_discriminator_weights_still_loads(bundle, copy, synth_data):
    """Earlier releases shipped the adversarial discriminator in model.safetensors; it is dropped on load."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    weights = copy / "model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "shared.discriminator.net.0.weight": torch.ones(4, 4)}, str(weights))
    _set(copy, "weights_sha256", hashlib.sha256(weights.read_bytes()).hexdigest())
    image = next(s.path for s in discover(synth_data) if s.modality == "ct")
    assert Pipeline(copy).predict(ct=image) == Pipeline(bundle).predict(ct=image)


def test_format1_config_loads_and_writes_back_unchanged(bundle, copy):
    """A config.json in the format written before BundleConfig: typed on load, byte-for-byte JSON on save."""
    document = json.loads(FORMAT1.read_text())
    document["weights_sha256"] = json.loads((copy / "config.json").read_text())["weights_sha256"]
    (copy / "config.json").write_text(json.dumps(document))
    opened = Bundle.open(copy)
    config = opened.config
    assert config.to_dict() == document and list(config.to_dict()) == list(document)
    assert config.model.shared == "plain" and config.preprocess.size == 64
    assert config.thresholds["fused"] == 0.5 and config.data.fingerprint.n_samples == 48
    assert config.data.skipped[0].reason.startswith("xray/train/COVID/broken.png")
    assert config.bf16_check.prediction_default == "fp32" and not config.bf16_check.allows_bf16
    assert opened.has_onnx and config.onnx.graphs["ct"].file == "model_ct.onnx"
    assert config.training["seed"] == 0 and config.audit["n_images"] == 48
    opened.save_config(config)
    assert json.loads((copy / "config.json").read_text()) == document
    # the torch engine runs on it: same network, so the same network probabilities as with the bundle's own config
    # (format 1 has no calibration, so these are also what it predicts)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    got = Pipeline(copy, bf16=False).probabilities(images, "ct")
    assert got.shape == (3,) and np.array_equal(got, Pipeline(bundle, bf16=False).outputs(images, "ct").probability)


def test_new_bundles_write_the_format1_layout(bundle):
    """Today's trainer writes the keys, order and nesting of the format-1 file."""
    written = json.loads((bundle / "config.json").read_text())
    known = json.loads(FORMAT1.read_text())
    later = {f.name for f in fields(BundleConfig)} - set(known)  # fields added since format 1, all optional
    assert [k for k in written if k not in later] == [k for k in known if k != "onnx"]
    for section in ("model", "preprocess"):
        assert list(written[section]) == list(known[section]), section
    assert {"n_images", "cross_split_duplicates", "warnings"} <= set(written["audit"])  # the audit grew since
    assert list(written["data"]) == [*known["data"], "paths", "sources"]  # the sources came after format 1's
    assert list(written["data"]["fingerprint"]) == list(known["data"]["fingerprint"])
    assert Bundle.open(bundle).config.to_dict() == written


def test_unknown_keys_are_kept_when_the_config_is_written_back(copy):
    config = json.loads((copy / "config.json").read_text())
    config["conformal"] = {"method": "split"}  # a newer minor version's additions, at two levels
    config["preprocess"]["body_crop"] = True
    (copy / "config.json").write_text(json.dumps(config))
    opened = Bundle.open(copy)
    assert opened.config.unknown == {"conformal": {"method": "split"}, "preprocess": {"body_crop": True}}
    opened.save_config(replace(opened.config, thresholds={**opened.config.thresholds, "fused": 0.4}))
    again = json.loads((copy / "config.json").read_text())
    assert again == {**config, "thresholds": {**config["thresholds"], "fused": 0.4}}


def test_save_config_refuses_an_invalid_config_and_keeps_the_file(copy):
    opened = Bundle.open(copy)
    before = (copy / "config.json").read_bytes()
    with pytest.raises(RespiscanError, match="'thresholds.ct' is 2; a threshold must lie in"):
        opened.save_config(replace(opened.config, thresholds={**opened.config.thresholds, "ct": 2.0}))
    assert (copy / "config.json").read_bytes() == before


def test_save_bundle_checks_the_trainers_dict_before_writing(bundle, tmp_path):
    pipe = Pipeline(bundle, bf16=False)
    trainer_dict = {k: v for k, v in pipe.config.to_dict().items()
                    if k not in ("format", "format_version", "respiscan_version", "weights_sha256")}
    with pytest.raises(RespiscanError, match="'thresholds.xray' is 7; a threshold must lie in"):
        save_bundle(tmp_path / "bad", pipe.net, {**trainer_dict, "thresholds": {"xray": 7, "ct": 0.5, "fused": 0.5}})
    assert not (tmp_path / "bad").exists()
    for out, config in ((tmp_path / "from_dict", trainer_dict), (tmp_path / "from_config", pipe.config)):
        save_bundle(out, pipe.net, config)
        again = Bundle.open(out)
        assert again.config == pipe.config and again.weights().keys() == pipe.net.state_dict().keys()


def test_config_from_dict_names_where_it_came_from():
    with pytest.raises(RespiscanError, match=r"^somewhere/config.json: missing key 'model'"):
        BundleConfig.from_dict({"format": "respiscan-bundle", "format_version": 1}, "somewhere/config.json")


@pytest.mark.parametrize("command", ["predict", "info"])
@pytest.mark.parametrize("key, value, message", [
    ("preprocess.dicom_ct_width", 0, "'preprocess.dicom_ct_width' is 0"),
    ("thresholds.ct", 1.7, "'thresholds.ct' is 1.7"),
])
def test_cli_hand_edited_config_is_one_line_exit_2(copy, synth_data, command, key, value, message):
    """The installed command, in its own process: exit code 2 and one `error:` line, never a traceback."""
    _set(copy, key, value)
    image = min((synth_data / "CT_Scan_Test" / "COVID").iterdir())
    argv = [str(copy), "--ct", str(image)] if command == "predict" else [str(copy)]
    done = subprocess.run([sys.executable, "-m", "respiscan", command, *argv], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {copy / 'config.json'}: {message}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_cuda_asked_where_there_is_none(synth_data, tmp_path):
    import torch

    from conftest import tiny_config
    from respiscan.training.trainer import train

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RespiscanError, match="no such CUDA device"):
        train(synth_data, tmp_path / "b", tiny_config(), device="cuda")
