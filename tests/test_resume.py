"""Interrupted training: kill it mid-way (SIGTERM, SIGKILL), resume, and get the uninterrupted result."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

ARGS = ["--preset", "tiny", "--backbone", "test_resnet", "--image-size", "48", "--epochs", "3", "--seed", "3"]


def _train(data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "respiscan", "train", str(data), "--out", str(out), *ARGS, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "bundle"
    assert _train(synth_data, out).wait(timeout=600) == 0
    return out


@pytest.mark.parametrize("sig, kill_when", [
    (signal.SIGTERM, "task_mlp_xray-*.safetensors"),  # between stages
    (signal.SIGKILL, "task_xray-*.epoch.safetensors"),  # inside the backbone stage, after its first epoch
])
def test_killed_run_resumes_to_the_same_bundle(sig, kill_when, synth_data, reference, tmp_path):
    interrupted = tmp_path / "interrupted"
    proc = _train(synth_data, interrupted)
    stages = interrupted / ".stages"
    deadline = time.time() + 300
    while time.time() < deadline and not any(stages.glob(kill_when)) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
    assert not (interrupted / "config.json").exists()
    assert not any(stages.glob("head_*"))

    assert _train(synth_data, interrupted, "--resume").wait(timeout=600) == 0
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(interrupted / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), [k for k in a if not (a[k] == b[k]).all()][:3]
    # identical weights; the predictions agree to float32 rounding (a cached embedding read back from disk can
    # take another vectorised kernel path than the in-memory one, which moves the 9th digit)
    ref, got = (list(csv.DictReader((b / "validation_predictions.csv").open())) for b in (reference, interrupted))
    assert [(r["id"], r["label"]) for r in ref] == [(r["id"], r["label"]) for r in got]
    for column in ("probability", "uncalibrated_probability"):
        np.testing.assert_allclose([float(r[column]) for r in got], [float(r[column]) for r in ref], atol=1e-6)


def test_nan_in_cached_embeddings_is_a_clear_error(synth_data, tmp_path):
    from safetensors.torch import save_file

    from conftest import tiny_config
    from respiscan.errors import RespiscanError
    from respiscan.training.trainer import train

    stages = tmp_path / "stages"
    train(synth_data, tmp_path / "a", tiny_config(), stages_dir=stages)
    cached = next(stages.glob("embeddings_task_ct-*.safetensors"))
    tensors = load_file(str(cached))
    tensors["train"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(cached))
    with pytest.raises(RespiscanError, match="contain NaN"):
        train(synth_data, tmp_path / "b", tiny_config(), stages_dir=stages)
