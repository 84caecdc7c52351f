"""evaluate() writes CIs, figures and a self-contained report; a two-source manifest gets a per-source breakdown."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from respiscan.evaluation.evaluate import evaluate
from respiscan.metrics import N_RESAMPLES, SCALAR_METRICS

PLOTS = ("roc", "pr", "confusion", "reliability", "training_curves")


@pytest.fixture(scope="module")
def evaluation(bundle, synth_data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("evaluation")
    return evaluate(bundle, synth_data, out), out


def _kinds(results: dict) -> dict[str, dict]:
    return {**results["modalities"], "fused": results["fused"]}


def test_writes_every_plot(evaluation):
    results, out = evaluation
    assert set(results["plots"]) == set(PLOTS)
    for name in PLOTS:
        path = out / f"{name}.png"
        assert path.stat().st_size > 1000
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100


def test_cis_contain_the_point_estimates(evaluation):
    results, out = evaluation
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["ci"]["n_resamples"] == N_RESAMPLES >= 2000 and saved["ci"]["resampled"] == "patients (group ids)"
    checked = 0
    for kind, m in _kinds(saved).items():
        assert set(m["ci"]) == set(SCALAR_METRICS), kind
        assert {how for name, how in m["ci_method"].items() if m["ci"][name]} <= {"BCa", "percentile"}, kind
        for name in SCALAR_METRICS:
            # ECE is left out: resampling inflates it (empty bins are not averaged away), so its percentile
            # interval can lie above the point estimate
            if name != "ece" and m[name] is not None and m["ci"][name] is not None:
                low, high = m["ci"][name]
                assert low - 1e-9 <= m[name] <= high + 1e-9, (kind, name)
                checked += 1
    assert checked >= 20
    again = evaluate(results["bundle"], results["data"], out / "again", figures=False)
    assert again["modalities"]["xray"]["ci"] == results["modalities"]["xray"]["ci"]  # seeded bootstrap


def test_report_embeds_images_and_tabulates_metrics(evaluation):
    results, out = evaluation
    assert results["report"] == {"markdown": "report.md", "html": "report.html"}
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(PLOTS)
    assert base64.b64decode(embedded[0]) == (out / "roc.png").read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external assets
    md = (out / "report.md").read_text()
    assert "| Metric | X-ray | CT | Fused |" in md
    auc_row = next(line for line in md.splitlines() if line.startswith("| ROC AUC |"))
    assert auc_row.count(" to ") == 3  # every column carries its CI
    for heading in ("## Data", "## Configuration", "## Metrics on the test split", "## Figures",
                    "## Fused prediction", "## Warnings"):
        assert heading in md and heading[3:] in page
    assert "the largest threshold reaching sensitivity 0.90" in md and "calibration split" in md
    assert "splits.csv" in md and "![roc.png](roc.png)" in md
    assert "Data audit of 48 images: 0 duplicate pair(s) across splits" in md  # recorded by train


def _two_source_copy(synth_data: Path, root: Path, groups: bool = True) -> Path:
    """The test images copied under `root` with a manifest naming two hospitals (by patient), and the
    patients only when `groups`."""
    rows = []
    with open(synth_data / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "test":
                (root / row["path"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(synth_data / row["path"], root / row["path"])
                row["source"] = "hospital_a" if int(row["group"][-1]) % 2 else "hospital_b"
                row["group"] = row["group"] if groups else ""
                rows.append(row)
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_per_source_breakdown(bundle, synth_data, tmp_path):
    data = _two_source_copy(synth_data, tmp_path / "data")
    results = evaluate(bundle, data, tmp_path / "eval", figures=False)
    for kind, m in _kinds(results).items():
        assert set(m["by_source"]) == {"hospital_a", "hospital_b"}, kind
        assert sum(s["n"] for s in m["by_source"].values()) == m["n"]
        assert set(m["by_source"]["hospital_a"]["ci"]) == set(SCALAR_METRICS)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "### X-ray by source" in md and "| Metric | hospital_a | hospital_b |" in md
    assert "No figures were drawn" in md
    assert not results["warnings"]


def test_without_patients_there_is_no_fused_result(bundle, synth_data, tmp_path):
    data = _two_source_copy(synth_data, tmp_path / "data", groups=False)
    results = evaluate(bundle, data, tmp_path / "eval", figures=False, n_resamples=200)
    assert "fused" not in results and results["fusion"]["n_pairs"] == 0
    assert results["ci"]["resampled"] == "images"
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "No fused (patient-level) result" in md and "resamples of images" in md
    assert "| Metric | X-ray | CT |" in md and "| Metric | X-ray | CT | Fused |" not in md


def test_warns_when_test_images_were_trained_on(bundle, synth_data, tmp_path):
    """A bundle whose splits.csv has today's test images in train is caught (its scores would be memory)."""
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    with open(copy / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(copy / "splits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "split": "train"} for r in rows)
    results = evaluate(copy, synth_data, tmp_path / "eval", figures=False)
    n_test = results["modalities"]["xray"]["n"] + results["modalities"]["ct"]["n"]
    assert f"{n_test} test image(s) were in the bundle's training or validation split" in results["warnings"][0]
    assert results["warnings"][0] in (tmp_path / "eval" / "report.md").read_text()
