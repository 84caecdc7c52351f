"""Calibration, operating points and the model card: fitted on data that chose nothing else, applied the same way
by every engine, stored compactly enough that another operating point can be chosen at prediction time."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from respiscan.bundle import Bundle
from respiscan.calibration import Calibration, OperatingPoint, ScoreCounts
from respiscan.card import CARD_FILE, build_card, crossval_results, record_crossval, render_card, setting_of
from respiscan.errors import RespiscanError
from respiscan.metrics import (
    at_prevalence,
    binary_metrics,
    choose_threshold,
    fit_calibration,
    log_loss,
    operating_threshold,
)
from respiscan.serving.torch_engine import Pipeline

FORMAT1 = Path(__file__).parent / "data" / "config_format1.json"


def _cli(argv, capsys, monkeypatch) -> str:
    """Run `respiscan ARGV`; its stdout (exit code 0 asserted)."""
    from respiscan.cli import main

    monkeypatch.setattr("sys.argv", ["respiscan", *map(str, argv)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code in (0, None)
    return capsys.readouterr().out


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities q, and a model that reports q with its logit stretched 4x and shifted."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.03, 0.97, n)
    y = (rng.uniform(size=n) < q).astype(int)
    return y, 1 / (1 + np.exp(-(4 * np.log(q / (1 - q)) + 1.0)))


@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_calibration_lowers_held_out_log_loss_of_an_overconfident_model(method):
    y, p = _overconfident(1200, seed=0)
    calibration = fit_calibration(y[:600], p[:600], method)
    before, after = log_loss(y[600:], p[600:]), log_loss(y[600:], calibration.apply(p[600:]))
    assert after < before - 0.2
    assert calibration.method == method and 0 < calibration.slope < 0.5  # it undoes most of the 4x stretch
    held_out = calibration.apply(p[600:])
    assert binary_metrics(y[600:], held_out)["roc_auc"] == pytest.approx(binary_metrics(y[600:], p[600:])["roc_auc"])


def test_calibration_survives_a_separable_calibration_set():
    """Platt's smoothed targets keep a perfectly separated set from driving the map to infinite confidence."""
    y = np.array([0] * 10 + [1] * 10)
    p = np.r_[np.linspace(0.01, 0.3, 10), np.linspace(0.7, 0.99, 10)]
    calibration = fit_calibration(y, p)
    assert 0 < calibration.slope < 3  # hard 0/1 targets have no finite maximum-likelihood slope here
    assert calibration.apply(p[9:11]).tolist() == pytest.approx([0.3, 0.7], abs=0.08)


def test_calibration_refuses_bad_maps_and_one_class():
    with pytest.raises(RespiscanError, match="slope must be positive"):
        Calibration("platt", slope=-1.0)
    with pytest.raises(RespiscanError, match="both COVID and Non_COVID"):
        fit_calibration([1, 1, 1], [0.2, 0.5, 0.9])


def test_operating_point_hits_its_target_sensitivity_on_held_out_data():
    rng = np.random.default_rng(1)
    n = 4000
    y = (rng.uniform(size=n) < 0.4).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.8 * y - 0.9)))
    chosen = operating_threshold(y[:2000], p[:2000], OperatingPoint.parse("sensitivity=0.90"), n_resamples=300)
    held_out = binary_metrics(y[2000:], p[2000:], chosen.threshold)
    assert held_out["sensitivity"] == pytest.approx(0.90, abs=0.03)
    assert chosen.sensitivity >= 0.90 and chosen.ci[0] <= chosen.threshold <= chosen.ci[1]
    spec = operating_threshold(y[:2000], p[:2000], OperatingPoint.parse("specificity=0.90"), n_resamples=300)
    assert binary_metrics(y[2000:], p[2000:], spec.threshold)["specificity"] == pytest.approx(0.90, abs=0.03)
    assert spec.specificity >= 0.90


def test_stored_scores_give_the_thresholds_of_the_full_data():
    """A bundle keeps only the ROC (distinct floored scores and counts); it must choose as the scores would."""
    y, p = _overconfident(500, seed=2)
    counts = ScoreCounts.of(y, p)
    assert len(counts.scores) <= 500 and sum(counts.positives) == y.sum()
    for point in ("youden", "sensitivity=0.9", "sensitivity=0.95"):
        threshold = counts.threshold(OperatingPoint.parse(point))
        rule = OperatingPoint.parse(point)
        want = choose_threshold(y, p, rule.rule, rule.target)
        assert binary_metrics(y, p, threshold)["confusion_matrix"] == binary_metrics(y, p, want)["confusion_matrix"]


@pytest.mark.parametrize("text, message", [("youden=0.5", "takes no target"), ("sensitivity", "needs a target"),
                                           ("sensitivity=1.5", "must lie in"), ("cost=2", "unknown operating"),
                                           ("specificity=high", "not a number")])
def test_operating_point_text_is_checked(text, message):
    with pytest.raises(RespiscanError, match=message):
        OperatingPoint.parse(text)


def test_ppv_npv_at_prevalence_follow_bayes_rule():
    got = at_prevalence(0.9, 0.8, 0.05)
    assert got["ppv"] == pytest.approx(0.9 * 0.05 / (0.9 * 0.05 + 0.2 * 0.95))
    assert got["npv"] == pytest.approx(0.8 * 0.95 / (0.8 * 0.95 + 0.1 * 0.05))
    with pytest.raises(RespiscanError, match="prevalence"):
        at_prevalence(0.9, 0.8, 1.0)


def test_bundle_records_calibration_split_and_operating_points(bundle):
    config = Bundle.open(bundle).config
    rows = list(csv.DictReader(open(bundle / "splits.csv")))
    calib = [r for r in rows if r["split"] == "calib"]
    fitted = {r["group"] or r["id"] for r in rows if r["split"] in ("train", "val")}
    assert calib and not {r["group"] or r["id"] for r in calib} & fitted  # whole groups, kept from the stages
    for kind, record in config.operating_points.items():
        assert record.threshold == config.thresholds[kind]
        assert record.point == OperatingPoint.parse(config.training["operating_point"]) == OperatingPoint(
            "sensitivity", 0.9)
        assert record.scores.threshold(record.point) == record.threshold
    predictions = list(csv.DictReader(open(bundle / "calibration_predictions.csv")))
    for m in config.model.modalities:
        mine = [r for r in predictions if r["modality"] == m]
        assert len(mine) == sum(r["modality"] == m for r in calib)
        c = config.calibration_of(m)
        raw = np.array([float(r["uncalibrated_probability"]) for r in mine])
        assert np.allclose(c.apply(raw), [float(r["probability"]) for r in mine])


def test_pipeline_applies_the_bundle_calibration(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    opened = Bundle.open(copy)
    steep = Calibration("platt", slope=2.5, intercept=-0.7, fitted_on="a test's map")
    opened.save_config(replace(opened.config, calibration={"xray": steep, "ct": steep}))
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    pipe = Pipeline(copy, bf16=False)
    raw = pipe.outputs(images, "ct").probability
    assert np.allclose(pipe.probabilities(images, "ct"), steep.apply(raw))
    assert not np.allclose(steep.apply(raw), raw)


def test_torch_and_onnx_agree_on_calibrated_probabilities(bundle, tmp_path):
    from respiscan.serving.export import export_onnx
    from respiscan.serving.onnx_engine import OnnxPipeline

    copy = shutil.copytree(bundle, tmp_path / "b")
    opened = Bundle.open(copy)
    steep = Calibration("platt", slope=3.0, intercept=0.4, fitted_on="a test's map")
    opened.save_config(replace(opened.config, calibration={"xray": steep, "ct": steep}))
    export_onnx(copy)
    images = np.random.default_rng(1).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    torch_pipe, onnx_pipe = Pipeline(copy, bf16=False), OnnxPipeline(copy, threads=1)
    for m in ("xray", "ct"):
        assert np.abs(onnx_pipe.score(images, m).probability - torch_pipe.score(images, m).probability).max() < 1e-3


def test_predict_operating_point_overrides_for_one_run(bundle, synth_data, capsys, monkeypatch):
    from respiscan.data.samples import discover

    pipe = Pipeline(bundle, bf16=False)
    rows = list(csv.DictReader(open(bundle / "calibration_predictions.csv")))
    pipe.use_operating_point("sensitivity=1.0")
    for m in pipe.modalities:
        mine = [r for r in rows if r["modality"] == m]
        y = [int(r["label"] == "COVID") for r in mine]
        p = [float(r["probability"]) for r in mine]
        if 0 < sum(y) < len(y):  # the tiny split may hold one class; then the bundle records no scores for it
            assert pipe.thresholds[m] == pytest.approx(choose_threshold(y, p, "sensitivity", 1.0), abs=1e-5)
    assert pipe.operating_point == "sensitivity=1"
    image = next(s.path for s in discover(synth_data) if s.modality == "xray" and s.split == "test")
    out = _cli(["predict", bundle, "--xray", image, "--json", "--operating-point", "youden"], capsys, monkeypatch)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["operating_point"] == "youden"
    assert result["threshold"] == pytest.approx(Bundle.open(bundle).config.thresholds_at(
        OperatingPoint("youden"))["xray"])


def test_a_bundle_before_calibration_loads_and_predicts_uncalibrated(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    document = json.loads(FORMAT1.read_text())
    document["weights_sha256"] = json.loads((copy / "config.json").read_text())["weights_sha256"]
    document.pop("onnx")
    (copy / "config.json").write_text(json.dumps(document))
    config = Bundle.open(copy).config
    assert config.calibration is None and config.operating_points is None and config.model_card is None
    assert config.calibration_of("ct").method == "identity"
    pipe = Pipeline(copy, bf16=False)
    images = np.random.default_rng(2).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    assert np.array_equal(pipe.probabilities(images, "ct"), pipe.outputs(images, "ct").probability)
    with pytest.raises(RespiscanError, match="no calibration scores for xray"):
        pipe.use_operating_point("sensitivity=0.95")
    card = render_card(build_card(Bundle.open(copy)), config)
    assert "bundle predates calibration" in card and "Not measured yet" in card


def test_evaluate_reports_calibration_fixed_sensitivities_and_prevalence(bundle, synth_data, tmp_path):
    from respiscan.evaluation.evaluate import evaluate

    copy = shutil.copytree(bundle, tmp_path / "b")
    results = evaluate(copy, synth_data, tmp_path / "eval", n_resamples=200, figures=False, prevalence=0.1)
    config = Bundle.open(copy).config
    for m, metrics in results["modalities"].items():
        cal = metrics["calibration"]
        assert set(cal["before"]) == set(cal["after"]) == {"ece", "brier", "log_loss", "ece_if_calibrated"}
        assert 0 < cal["after"]["ece_if_calibrated"]["mean"] <= cal["after"]["ece_if_calibrated"]["q95"]
        assert cal["after"]["ece"] == pytest.approx(metrics["ece"])
        assert metrics["operating_point"] == "sensitivity=0.9"
        if m in config.operating_points:
            assert set(metrics["at_sensitivity"]) == {"0.90", "0.95"}
            at90 = metrics["at_sensitivity"]["0.90"]
            assert at90["threshold"] == config.thresholds_at(OperatingPoint("sensitivity", 0.9))[m]
        prev = metrics["at_prevalence"]
        assert prev["ppv"] == pytest.approx(at_prevalence(metrics["sensitivity"], metrics["specificity"], 0.1)["ppv"])
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## Calibration and operating points" in md and "| Prediction | Calibration | ECE |" in md
    assert "PPV (bounds)" in md
    predictions = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    assert {"probability", "uncalibrated_probability"} <= set(predictions[0])
    card = config.model_card
    mine = [r for r in card.results if r.data == str(synth_data)]  # the session bundle may hold other results
    assert {r.kind for r in mine} >= {"xray", "ct"}
    assert all(r.setting == "in-source" and r.method == "evaluate" for r in mine)
    again = evaluate(copy, synth_data, tmp_path / "eval2", n_resamples=200, figures=False)
    assert len(Bundle.open(copy).config.model_card.results) == len(card.results)  # replaced, not duplicated
    assert again["modalities"]["xray"]["roc_auc"] == results["modalities"]["xray"]["roc_auc"]


def test_card_names_the_training_sources(bundle, capsys, monkeypatch):
    out = _cli(["card", bundle], capsys, monkeypatch)
    config = Bundle.open(bundle).config
    for source in config.data.sources:
        assert source in out
    assert "## Intended use" in out and "not a medical device" in out
    assert "transfer to other sites is unverified" in out  # one synthetic source per modality
    assert "## Operating points" in out and "sensitivity=0.9" in out and "## Known limitations" in out
    assert out == (bundle / CARD_FILE).read_text() + "\n"  # the card train wrote is the one printed


def test_card_labels_results_external_by_source(bundle, tmp_path):
    config = Bundle.open(bundle).config
    trained = config.data.sources_by_modality()
    assert setting_of(config, "xray", trained["xray"][0]) == "in-source"
    assert setting_of(config, "xray", "another_hospital") == "external"
    assert setting_of(config, "fused", f"{trained['xray'][0]} + another_hospital") == "external"
    copy = shutil.copytree(bundle, tmp_path / "b")
    crossval = {"by": "source", "folds": [{"fold": "another_hospital", "held_out": "source another_hospital",
                                           "modality": "ct", "n": 40, "auc": 0.61, "auc_low": 0.5, "auc_high": 0.7,
                                           "threshold": 0.4, "sensitivity": 0.7, "specificity": 0.5, "ece": 0.2,
                                           "border_baseline_auc": 0.55, "intensity_baseline_auc": 0.58}]}
    assert crossval_results(crossval)[0].setting == "external"
    saved = record_crossval(copy, crossval)
    assert saved.config.model_card.results[-1].source == "another_hospital"
    card = (copy / CARD_FILE).read_text()
    assert "## Cross-validation" in card and "another_hospital" in card and "0.610 (0.500-0.700)" in card
    assert "network-free baselines on the same images: border 0.550, intensity 0.580" in card


def test_card_takes_crossval_only_from_the_same_settings(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    training = Bundle.open(copy).config.training
    fold = {"fold": "h", "held_out": "source h", "modality": "ct", "n": 40, "auc": 0.61, "sensitivity": 0.7,
            "specificity": 0.5}
    same = {**training, "seed": training["seed"] + 1, "model": {**training["model"], "modalities": ["ct"]}}
    assert record_crossval(copy, {"by": "source", "folds": [fold], "config": same}).config.model_card.results
    other = {**training, "preprocess": {**training["preprocess"], "size": training["preprocess"]["size"] * 2}}
    with pytest.raises(RespiscanError, match=r"other settings than the crossval folds \(preprocess\.size\)"):
        record_crossval(copy, {"by": "source", "folds": [fold], "config": other})


def test_cross_fitted_calibration_adds_the_validation_split_scored_by_a_twin(tmp_path):
    """Backbones that select no epoch on validation (`select="last"`): the validation split, scored by a twin of the
    MLP stages that selected its epochs on the calibration split, joins the calibration split; the map and the
    threshold are fitted on both, and turning it off leaves the calibration split alone."""
    from conftest import tiny_config
    from respiscan.data.samples import discover
    from respiscan.data.synth import generate
    from respiscan.training.trainer import train

    data = generate(tmp_path / "data", n_per_class=48, size=64, seed=3, progress=False)
    samples = [s for s in discover(data) if s.modality == "ct"]
    base = tiny_config()
    cfg = replace(base, calibration_fraction=0.4, backbone_fit=replace(base.backbone_fit, select="last"))
    crossed = train(data, tmp_path / "crossed", cfg, samples=samples, stages_dir=tmp_path / "stages")
    alone = train(data, tmp_path / "alone", replace(cfg, calibrate_on="calibration"), samples=samples,
                  stages_dir=tmp_path / "stages")
    splits = {r["id"]: r["split"] for r in csv.DictReader(open(crossed / "splits.csv")) if r["modality"] == "ct"}
    val_rows = {r["id"]: r for r in csv.DictReader(open(crossed / "validation_predictions.csv"))}

    rows = list(csv.DictReader(open(crossed / "calibration_predictions.csv")))
    assert {(r["split"], r["scored_by"]) for r in rows} == {("calib", "model"), ("val", "cross-fitted twin")}
    assert sorted(r["id"] for r in rows) == sorted(i for i, sp in splits.items() if sp in ("calib", "val"))
    twin = np.array([float(r["uncalibrated_probability"]) for r in rows if r["split"] == "val"])
    model = np.array([float(val_rows[r["id"]]["uncalibrated_probability"]) for r in rows if r["split"] == "val"])
    assert np.abs(twin - model).max() > 1e-3  # another fit, not the model's own validation scores
    assert (crossed / "logs" / "cross-fitted" / "head_ct.csv").is_file()

    config = Bundle.open(crossed).config
    y = np.array([r["label"] == "COVID" for r in rows], dtype=float)
    raw = np.array([float(r["uncalibrated_probability"]) for r in rows])
    refit = fit_calibration(y, raw, "platt", fitted_on="")
    fitted = config.calibration_of("ct")
    assert (fitted.slope, fitted.intercept) == pytest.approx((refit.slope, refit.intercept), rel=1e-6)
    assert fitted.n == len(rows) and "twin" in fitted.fitted_on
    assert config.operating_points["ct"].n == len(rows)
    assert "Cross-fitted" in (crossed / CARD_FILE).read_text()

    alone_rows = list(csv.DictReader(open(alone / "calibration_predictions.csv")))
    assert {r["split"] for r in alone_rows} == {"calib"}
    assert Bundle.open(alone).config.calibration_of("ct").n == len(alone_rows) < len(rows)
