"""ONNX export and the torch-free ONNX engine: same probabilities as torch, integrity checks, no torch import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from respiscan.bundle import Bundle
from respiscan.data.images import load_dataset_images
from respiscan.data.samples import discover
from respiscan.errors import RespiscanError
from respiscan.serving import load as open_pipeline
from respiscan.serving.export import export_onnx
from respiscan.serving.onnx_engine import OnnxPipeline
from respiscan.serving.torch_engine import Pipeline


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory):
    """An exported copy of the session bundle (other tests keep using the original, without graphs)."""
    out = tmp_path_factory.mktemp("onnx") / "bundle"
    shutil.copytree(bundle, out)
    export_onnx(out)
    return out


@pytest.fixture(scope="module")
def pair(synth_data):
    samples = discover(synth_data)
    return {m: next(s.path for s in samples if s.modality == m and s.split == "test") for m in ("xray", "ct")}


def test_export_records_graphs_and_keeps_the_config(bundle, exported):
    before = json.loads((bundle / "config.json").read_text())
    after = json.loads((exported / "config.json").read_text())
    assert list(after) == [*before, "onnx"] and {k: v for k, v in after.items() if k != "onnx"} == before
    opened = Bundle.open(exported)
    onnx = opened.config.onnx
    assert opened.has_onnx and not Bundle.open(bundle).has_onnx
    assert onnx.opset == 17 and onnx.weights_sha256 == before["weights_sha256"]
    for m in ("xray", "ct"):
        assert (exported / onnx.graphs[m].file).is_file()
        assert onnx.graphs[m].max_abs_diff <= 1e-3
    assert not list(exported.glob(".*.tmp"))


def test_onnx_matches_torch_fp32(exported, synth_data):
    torch_pipe, onnx_pipe = Pipeline(exported, bf16=False), OnnxPipeline(exported, threads=1)
    samples = discover(synth_data)
    for m in ("xray", "ct"):
        images, kept, _ = load_dataset_images([s for s in samples if s.modality == m], onnx_pipe.preprocess_config)
        got, want = onnx_pipe.probabilities(images, m), torch_pipe.probabilities(images, m)
        assert got.shape == (len(kept),) and np.abs(got - want).max() < 1e-3


def test_predict_gives_the_same_fused_result(exported, pair):
    want = Pipeline(exported, bf16=False).predict(xray=pair["xray"], ct=pair["ct"])
    got = OnnxPipeline(exported, threads=1).predict(xray=pair["xray"], ct=pair["ct"])
    for key in ("xray_probability", "ct_probability", "probability", "threshold"):
        assert got[key] == pytest.approx(want[key], abs=1e-3)
    if abs(want["probability"] - want["threshold"]) > 1e-3:  # the tiny model sits near its threshold
        assert got["label"] == want["label"]


def test_one_modality_loads_one_graph_and_the_other_on_first_use(exported, pair):
    both = OnnxPipeline(exported, threads=1)
    pipe = OnnxPipeline(exported, threads=1, modalities=["xray"])
    assert list(pipe.sessions) == ["xray"] and sorted(both.sessions) == ["ct", "xray"]
    assert pipe.predict(xray=pair["xray"])["probability"] == pytest.approx(
        both.predict(xray=pair["xray"])["probability"], abs=1e-6)
    few = OnnxPipeline(exported, threads=1, few_images=True, modalities=["xray"])  # the cold-start set-up
    assert few.predict(xray=pair["xray"])["probability"] == pytest.approx(
        both.predict(xray=pair["xray"])["probability"], abs=1e-5)
    got = pipe.predict(ct=pair["ct"])  # the CT graph is built now, checked against its hash like the first
    assert sorted(pipe.sessions) == ["ct", "xray"]
    assert got["probability"] == pytest.approx(both.predict(ct=pair["ct"])["probability"], abs=1e-6)


def test_onnx_engine_does_not_import_torch(exported, pair):
    code = ("import json, sys\n"
            "from respiscan.serving import load as open_pipeline\n"
            f"r = open_pipeline({str(exported)!r}).predict(xray={str(pair['xray'])!r}, ct={str(pair['ct'])!r})\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
            "print(json.dumps({'heavy': heavy, 'result': r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert 0.0 <= out["result"]["probability"] <= 1.0


def test_auto_engine(bundle, exported):
    assert isinstance(open_pipeline(exported), OnnxPipeline)
    assert isinstance(open_pipeline(bundle), Pipeline)
    with pytest.raises(RespiscanError, match="unknown engine"):
        open_pipeline(bundle, engine="tensorrt")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_graph_is_refused(exported, tmp_path, damage):
    """A flipped byte still builds a session, a truncated graph does not: both are named as a hash mismatch
    (the hash is checked beside building the session, and wins over the build's own error)."""
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    graph = copy / "model_xray.onnx"
    data = bytearray(graph.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 3:]
    graph.write_bytes(bytes(data))
    with pytest.raises(RespiscanError, match="model_xray.onnx: does not match the hash"):
        OnnxPipeline(copy)


def test_graph_from_other_weights_is_refused(exported, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    config = json.loads((copy / "config.json").read_text())
    config["onnx"]["weights_sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(RespiscanError, match="exported from other weights"):
        OnnxPipeline(copy)


def test_missing_graph_says_to_export(bundle):
    with pytest.raises(RespiscanError, match=r"no ONNX graph; run `respiscan export .*` first"):
        OnnxPipeline(bundle)
    with pytest.raises(RespiscanError, match="no ONNX graph"):
        open_pipeline(bundle, engine="onnx")


def test_export_refuses_a_graph_that_disagrees(bundle, tmp_path, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    monkeypatch.setattr("respiscan.serving.export.TOLERANCE", -1.0)
    with pytest.raises(RespiscanError, match="differs from the torch model"):
        export_onnx(copy)
    assert Bundle.open(copy).config.onnx is None
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in bundle.iterdir())


def test_auto_engine_falls_back_to_torch_without_onnxruntime(exported, pair):
    code = ("import json, sys\n"
            "sys.modules['onnxruntime'] = None\n"
            "from respiscan.serving import load\n"
            f"pipe = load({str(exported)!r})\n"
            f"print(json.dumps([type(pipe).__name__, pipe.predict(ct={str(pair['ct'])!r})['probability']]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name, probability = json.loads(proc.stdout.strip().splitlines()[-1])
    assert name == "Pipeline" and probability == pytest.approx(OnnxPipeline(exported).predict(ct=pair["ct"])[
        "probability"], abs=1e-3)
