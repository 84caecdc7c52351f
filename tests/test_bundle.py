"""Safe bundles: never unpickled, config validated, weights' hash checked; each problem is one clear line."""

import json
import shutil

import pytest

from respiscan.bundle import read_config
from respiscan.errors import RespiscanError
from respiscan.serving.torch_engine import Pipeline


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
    _edit_config(copy, format_version=99)
    with pytest.raises(RespiscanError, match="format version 99 is newer"):
        read_config(copy)


@pytest.mark.parametrize("changes, message", [
    ({"thresholds": None}, "missing key 'thresholds'"),
    ({"model": "resnet"}, "'model' should be dict"),
    ({"format": "keras-h5"}, "is not 'respiscan-bundle'"),
])
def test_config_schema(copy, changes, message):
    _edit_config(copy, **changes)
    with pytest.raises(RespiscanError, match=message):
        read_config(copy)


def test_not_json_and_not_a_bundle(copy, tmp_path):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(RespiscanError, match="not valid JSON"):
        read_config(copy)
    with pytest.raises(RespiscanError, match="not a bundle folder"):
        read_config(tmp_path / "nothing")


def test_weights_that_do_not_fit_the_model(copy):
    _edit_config(copy, model={**json.loads((copy / "config.json").read_text())["model"], "shared": "none"})
    with pytest.raises(RespiscanError, match="weights do not fit the model"):
        Pipeline(copy)


def test_cuda_asked_where_there_is_none(synth_data, tmp_path):
    import torch

    from respiscan.training.trainer import train

    from conftest import tiny_config

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RespiscanError, match="no such CUDA device"):
        train(synth_data, tmp_path / "b", tiny_config(), device="cuda")
