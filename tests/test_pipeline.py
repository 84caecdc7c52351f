"""The whole pipeline on synthetic images: train -> bundle -> load -> predict / evaluate."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from respiscan.bundle import Bundle
from respiscan.data.samples import discover
from respiscan.errors import RespiscanError
from respiscan.evaluation.evaluate import evaluate, pair_cases
from respiscan.metrics import binary_metrics
from respiscan.runtime import bf16_supported
from respiscan.serving.torch_engine import Pipeline
from respiscan.training.trainer import train


def test_bundle_is_self_contained(bundle):
    names = {p.name for p in bundle.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json", "splits.csv", "validation_predictions.csv",
            "logs"} <= names
    assert ".stages" not in names
    config = Bundle.open(bundle).config
    assert config.model.modalities == ["xray", "ct"]
    assert config.preprocess.size == 64 and config.preprocess.clahe_clip == 4.0
    assert config.class_names == ["Non_COVID", "COVID"]
    assert set(config.thresholds) == {"xray", "ct", "fused"}
    assert config.data.fingerprint.n_samples == 48
    assert "torch" in config.versions
    logs = {p.stem for p in (bundle / "logs").iterdir()}
    assert {"embedding_task_xray", "embedding_task_ct", "task_mlp_xray", "task_mlp_ct", "shared_plain",
            "head_xray", "head_ct"} <= logs


def test_validation_split_is_carved_from_train_grouped(bundle, synth_data):
    rows = list(csv.DictReader(open(bundle / "splits.csv")))
    original = {s.id: s.split for s in discover(synth_data)}
    val = [r for r in rows if r["split"] == "val"]
    assert val and all(original[r["id"]] == "train" for r in val)
    assert [r["id"] for r in rows if r["split"] == "test"] == [i for i, s in original.items() if s == "test"]
    for m in ("xray", "ct"):
        train_groups = {r["group"] for r in rows if r["split"] == "train" and r["modality"] == m}
        assert not train_groups & {r["group"] for r in val if r["modality"] == m}


def test_round_trip_gives_the_training_probabilities(bundle, synth_data):
    """Probabilities from the loaded bundle equal those the trainer computed before saving."""
    saved = {r["id"]: float(r["probability"]) for r in csv.DictReader(open(bundle / "validation_predictions.csv"))}
    pipe = Pipeline(bundle, bf16=bf16_supported())
    samples = [s for s in discover(synth_data) if s.id in saved]
    rows, skipped = pipe.predict_samples(samples)
    assert not skipped and len(rows) == len(saved)
    tol = 2e-2 if pipe.bf16 else 1e-5
    for r in rows:
        assert r["probability"] == pytest.approx(saved[r["id"]], abs=tol)


def test_predict_one_case_each_way(bundle, synth_data):
    pipe = Pipeline(bundle, bf16=False)
    xray = synth_data / "X_Ray_Test" / "COVID"
    name = sorted(p.name for p in xray.iterdir())[0]
    ct = synth_data / "CT_Scan_Test" / "COVID" / name
    both = pipe.predict(xray=xray / name, ct=ct)
    only_x = pipe.predict(xray=xray / name)
    only_ct = pipe.predict(ct=ct)
    assert only_x["ct_probability"] is None and only_ct["xray_probability"] is None
    assert both["xray_probability"] == pytest.approx(only_x["probability"])
    assert both["probability"] == pytest.approx((only_x["probability"] + only_ct["probability"]) / 2)
    assert both["label"] in ("COVID", "Non_COVID")
    import cv2

    array = cv2.imread(str(xray / name), cv2.IMREAD_GRAYSCALE)
    assert pipe.predict(xray=array)["probability"] == pytest.approx(only_x["probability"], abs=1e-6)


def test_evaluate_writes_consistent_metrics(bundle, synth_data, tmp_path):
    results = evaluate(bundle, synth_data, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    assert len(rows) == sum(1 for s in discover(synth_data) if s.split == "test")
    for m in ("xray", "ct"):
        mine = [r for r in rows if r["modality"] == m]
        y = np.array([r["label"] == "COVID" for r in mine], int)
        p = np.array([float(r["probability"]) for r in mine])
        expected = binary_metrics(y, p, Bundle.open(bundle).config.thresholds[m])
        assert saved["modalities"][m]["confusion_matrix"] == expected["confusion_matrix"]
        assert saved["modalities"][m]["roc_auc"] == pytest.approx(expected["roc_auc"])
    assert results["fused"]["pairing"].startswith("patient") and results["fused"]["n_pairs"] == 6


def test_pseudo_pairs_when_no_patient_link(synth_data):
    from dataclasses import replace

    samples = [replace(s, group=None) for s in discover(synth_data) if s.split == "test"]
    pairs, how = pair_cases([s for s in samples if s.modality == "xray"], [s for s in samples if s.modality == "ct"])
    assert "pseudo" in how and all(x.label == c.label for x, c in pairs) and len(pairs) == 6


def test_same_seed_same_weights(synth_data, tmp_path):
    a = train(synth_data, tmp_path / "a", tiny_config(shared="adversarial", seed=5))
    b = train(synth_data, tmp_path / "b", tiny_config(shared="adversarial", seed=5))
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "logs" / "shared_adversarial.csv").read_text().startswith("epoch,gen_loss,disc_loss")
    assert (a / "logs" / "shared_finetune.csv").is_file()


def test_bf16_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RESPISCAN_BF16", "0")
    assert not bf16_supported() and not bf16_supported("cpu")
    monkeypatch.setenv("RESPISCAN_BF16", "")
    assert bf16_supported() == bool(torch.backends.mkldnn.is_available()
                                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_bf16_is_the_default_only_where_training_measured_it_harmless(bundle, tmp_path):
    """The trainer records how far bf16 moves the validation probabilities; the torch engine follows it."""
    import shutil

    config = json.loads((bundle / "config.json").read_text())
    check = config["bf16_check"]
    if not bf16_supported():
        assert check is None and not Pipeline(bundle).bf16
        pytest.skip("no bf16 on this CPU")
    assert 0 < check["max_abs_difference"] < 0.2 and check["tolerance"] == 1e-2
    assert Pipeline(bundle).bf16 == (check["max_abs_difference"] <= 1e-2)
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    for diff, want in ((0.5, False), (0.001, True)):
        config["bf16_check"]["max_abs_difference"] = diff
        (copy / "config.json").write_text(json.dumps(config))
        assert Pipeline(copy).bf16 is want
        assert Pipeline(copy, bf16=not want).bf16 is (not want)  # an explicit choice wins
    del config["bf16_check"]
    (copy / "config.json").write_text(json.dumps(config))
    assert Pipeline(copy).bf16 is False  # bundles without the measurement run fp32


def test_train_leaves_the_callers_config_unchanged(synth_data, tmp_path):
    cfg = tiny_config()
    before = cfg.to_dict()
    train(synth_data, tmp_path / "b", cfg)
    assert cfg.to_dict() == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_with_overrides_rebuilds_like_the_cli():
    from respiscan.training.config import preset

    base = preset("seed")
    cfg = base.with_overrides(seed=4, shared="none", backbone="resnet34", image_size=128, epochs=3, pretrained=False)
    assert (cfg.seed, cfg.model.shared, cfg.preprocess.size, cfg.backbone_fit.epochs) == (4, "none", 128, 3)
    assert cfg.model.task_backbones == {"xray": "resnet34", "ct": "resnet34"} and cfg.model.shared_backbones is None
    assert base == preset("seed") and base.model.shared_backbones  # the preset itself is untouched
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(RespiscanError, match="unknown shared kind"):
        base.with_overrides(shared="wavy")


def test_train_config_records_are_type_checked_by_key():
    from respiscan.training.config import TrainConfig

    with pytest.raises(RespiscanError, match=r"TrainConfig: 'mlp_fit.lr' should be a finite number"):
        TrainConfig.from_dict({"mlp_fit": {"lr": "fast"}})
    with pytest.raises(RespiscanError, match=r"'backbone_fit.select' is 'first'; accepted: best, last"):
        TrainConfig.from_dict({"backbone_fit": {"select": "first"}})
    assert TrainConfig.from_dict({"seed": 3, "from_a_newer_version": 1}).seed == 3
