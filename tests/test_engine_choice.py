"""The engine choice: the fastest engine that agrees with torch fp32, per modality, recorded in the bundle and
run by `auto`; it falls back when OpenVINO is absent and never picks an engine that disagrees."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest

from respiscan.bundle import Bundle, EngineChoice
from respiscan.serving import engine_choice, load
from respiscan.serving.engine_choice import CheckImages, PerModalityPipeline, choose_engines, record_engine_choice
from respiscan.serving.export import export_onnx
from respiscan.serving.onnx_engine import OnnxPipeline
from respiscan.serving.torch_engine import Pipeline


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("choice") / "bundle"
    shutil.copytree(bundle, out)
    export_onnx(out)
    return out


@pytest.fixture()
def copy(exported, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(exported, out)
    return out


def _check(bundle) -> CheckImages:
    """The bundle's own validation images, few of them: the test is about the rule, not the timing."""
    return engine_choice.check_images(Bundle.open(bundle), n=8)


def _speeds(monkeypatch, by_engine: dict[type, float]) -> None:
    """Timing made deterministic: each engine class its own speed."""
    monkeypatch.setattr(engine_choice, "img_s", lambda pipe, images, m, repeats: by_engine.get(type(pipe), 1.0))


def test_the_fastest_agreeing_engine_is_chosen_and_recorded(copy, monkeypatch):
    _speeds(monkeypatch, {Pipeline: 10.0, OnnxPipeline: 50.0})
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    check = _check(copy)
    assert all(len(a) == 8 for a in check.images.values()) and "validation images" in check.description
    choices = record_engine_choice(copy, check)
    stored = Bundle.open(copy).config.engines
    assert stored == choices and set(stored) == {"xray", "ct"}
    for choice in stored.values():
        assert (choice.engine, choice.precision) == ("onnx", "fp32")
        trials = {t.engine: t for t in choice.trials}
        assert trials["onnx"].status == "agrees" and trials["onnx"].max_abs_difference < 1e-3
        assert trials["openvino"].status == "unavailable" and "openvino" in trials["openvino"].note
    assert isinstance(load(copy), OnnxPipeline)


def test_an_engine_that_disagrees_is_never_chosen_even_when_fastest(copy, monkeypatch):
    _speeds(monkeypatch, {Pipeline: 10.0, OnnxPipeline: 1000.0})
    monkeypatch.setitem(sys.modules, "openvino", None)
    plain = OnnxPipeline.outputs

    def off(self, images, modality):  # an engine whose probabilities drift by 0.05
        out = plain(self, images, modality)
        return replace(out, probability=np.clip(out.probability + 0.05, 0, 1))

    monkeypatch.setattr(OnnxPipeline, "outputs", off)
    for choice in choose_engines(copy, _check(copy)).values():
        trials = {t.engine: t for t in choice.trials}
        assert trials["onnx"].status == "disagrees" and trials["onnx"].max_abs_difference > 1e-2
        assert choice.engine == "torch"


def test_openvino_engine_agrees_with_torch_when_installed(copy):
    pytest.importorskip("openvino")
    from respiscan.serving.openvino_engine import OpenVinoPipeline

    check = _check(copy)
    ov, ref = OpenVinoPipeline(copy), Pipeline(copy, bf16=False)
    for m, images in check.images.items():
        assert np.abs(ov.outputs(images, m).probability - ref.outputs(images, m).probability).max() < 1e-2


def test_auto_runs_each_modality_on_its_recorded_engine_and_falls_back_without_openvino(copy, monkeypatch):
    opened = Bundle.open(copy)

    def choice(engine):
        return EngineChoice(engine, "fp32", 1e-2, "test", [])

    opened.save_config(replace(opened.config, engines={"xray": choice("onnx"), "ct": choice("torch")}))
    pipe = load(copy)
    assert isinstance(pipe, PerModalityPipeline)
    assert isinstance(pipe.engines["xray"], OnnxPipeline) and isinstance(pipe.engines["ct"], Pipeline)
    images = _check(copy).images
    ref = Pipeline(copy, bf16=False)
    for m, arr in images.items():
        assert np.abs(pipe.probabilities(arr, m) - ref.probabilities(arr, m)).max() < 1e-3

    opened = Bundle.open(copy)
    opened.save_config(replace(opened.config, engines={"xray": choice("openvino"), "ct": choice("openvino")}))
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert isinstance(load(copy), OnnxPipeline)  # the plain `auto` rule: the bundle has graphs


def test_without_validation_images_the_check_uses_phantoms(copy):
    (copy / "splits.csv").unlink()
    check = engine_choice.check_images(Bundle.open(copy), n=4)
    assert "synthetic" in check.description
    assert {m: a.shape for m, a in check.images.items()} == {m: (4, 64, 64) for m in ("xray", "ct")}
