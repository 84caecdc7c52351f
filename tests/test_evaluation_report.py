"""evaluate() writes CIs, figures and a self-contained report; a two-source manifest gets a per-source breakdown."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import pytest
from PIL import Image

from respiscan.bundle import Bundle
from respiscan.data.audit import audit, shortcut_warnings
from respiscan.data.samples import discover
from respiscan.evaluation.evaluate import evaluate
from respiscan.evaluation.report import KIND_NAMES
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
        assert m["ci"]["ece"] is None and m["ci_method"]["ece"] is None, kind  # no valid bootstrap interval
        for name in SCALAR_METRICS:
            if m[name] is not None and m["ci"][name] is not None:
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


def _write_manifest(root: Path, rows: list[dict]) -> Path:
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


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
    return _write_manifest(root, rows)


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


def _framed_with_conflict(synth_data: Path, root: Path) -> Path:
    """A copy of the data whose COVID images carry a white frame (a shortcut the border baseline sees), plus a
    copy of a train X-ray given the opposite label (a label conflict), as the audit tests plant them."""
    with open(synth_data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        image = cv2.imread(str(synth_data / row["path"]), cv2.IMREAD_GRAYSCALE)
        if row["label"] == "COVID":
            image = cv2.copyMakeBorder(image[2:-2, 2:-2], 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=255)
        (root / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / row["path"]), image)
    original = next(r for r in rows if r["split"] == "train" and r["modality"] == "xray")
    (root / "planted").mkdir()
    shutil.copy(root / original["path"], root / "planted" / "relabelled.png")
    flipped = "Non_COVID" if original["label"] == "COVID" else "COVID"
    rows.append({**original, "path": "planted/relabelled.png", "label": flipped, "group": "planted"})
    return _write_manifest(root, rows)


def test_report_shows_the_audit_beside_the_model(bundle, synth_data, tmp_path):
    """The audit of a bundle's data (run here as train runs it) shows up in the report: the planted label
    conflict as an error naming the pair, and each shortcut baseline next to the test AUC evaluate measured."""
    data = _framed_with_conflict(synth_data, tmp_path / "data")
    found = audit(discover(data), progress=False)
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    opened = Bundle.open(copy)
    opened.save_config(replace(opened.config, audit=found))
    with open(copy / "splits.csv", newline="") as f:  # the bundle as if trained on `data`
        rows = list(csv.DictReader(f))
    with open(copy / "splits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "path": str(data / r["id"])} for r in rows)
    results = evaluate(copy, data, tmp_path / "eval", figures=False, n_resamples=200)
    md = (tmp_path / "eval" / "report.md").read_text()
    section = md[md.index("\n## Audit"):md.index("\n## Warnings")]

    (error,) = found["errors"]
    assert "planted/relabelled.png" in error and section.index(error) < section.index("### Warnings")
    assert results["audit"]["compared_with_model"] == ["ct", "xray"]
    for m in ("xray", "ct"):
        model = results["modalities"][m]["roc_auc"]
        border = max(found["shortcuts"][m]["border"].values())
        assert border >= model - 0.1  # the framed images give the border baseline the label
        sentence = next(w for w in results["audit"]["warnings"] if w.startswith(f"{m}: the outer 5 %"))
        assert f"against the model's {model:.2f}" in sentence and sentence in section
        row = next(line for line in section.splitlines() if line.startswith(f"| {KIND_NAMES[m]}: border"))
        assert f"| {border:.3f} | {model:.3f} | yes |" in row
    shortcut_rows = [line for line in section.splitlines() if line.startswith(("| X-ray: ", "| CT: "))]
    assert len(shortcut_rows) == 6  # two modalities x three feature sets
    # train's wording without the model is replaced, not repeated
    assert not any(w in results["audit"]["warnings"] for w in shortcut_warnings(found["shortcuts"]))
    assert "1 error(s)" in md[md.index("\n## Warnings"):]


def test_report_does_not_compare_baselines_scored_on_other_images(bundle, tmp_path):
    """Evaluated on other test images than the audit scored its baselines on, the model's AUC is not set beside
    them (n/a), so no 'near the model' warning can come from comparing two different test sets."""
    from respiscan.data.synth import generate

    other = generate(tmp_path / "other", n_per_class=6, size=64, seed=7, progress=False)
    results = evaluate(bundle, other, tmp_path / "eval", figures=False, n_resamples=200)
    assert results["audit"]["compared_with_model"] == []
    assert all(b["model_auc"] is None for b in results["audit"]["shortcuts"])
    assert not any("against the model's" in w for w in results["audit"]["warnings"])


def test_methods_table_names_the_crop_and_where_its_outline_was_found(bundle):
    from respiscan.data.preprocess import PreprocessConfig
    from respiscan.evaluation.report import _configuration

    config = Bundle.open(bundle).config

    def preprocessing(pre: PreprocessConfig) -> str:
        rows = [row for kind, *rest in _configuration(replace(config, preprocess=pre)) if kind == "table"
                for row in rest[1]]
        return next(text for name, text in rows if name == "Preprocessing")

    assert preprocessing(PreprocessConfig()).startswith("grey; CLAHE")
    assert "CT cropped to the body outline (found at 128 px); CLAHE" in preprocessing(
        PreprocessConfig(crop="ct_body", outline_side=128))
    assert "CT cropped to the box around the lungs; CLAHE" in preprocessing(PreprocessConfig(crop="ct_lungs"))
