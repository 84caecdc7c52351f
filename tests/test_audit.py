"""The data audit finds what we plant: copied files, altered copies across splits, a source/label confound."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from respiscan.data.audit import audit, check_strict, format_audit
from respiscan.data.samples import discover
from respiscan.errors import RespiscanError

FIELDS = ["path", "modality", "label", "split", "group", "source"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Synthetic data whose manifest gives two sources, each with both classes (no confound)."""
    from respiscan.data.synth import generate

    root = generate(tmp_path_factory.mktemp("audit") / "data", n_per_class=6, size=64, seed=3, progress=False)
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["source"] = "site_a" if i % 2 else "site_b"
    return root, rows


def _write(root: Path, rows: list[dict], name: str) -> Path:
    path = root / name
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _train_row(rows: list[dict], modality: str) -> dict:
    return next(r for r in rows if r["split"] == "train" and r["modality"] == modality)


def _pairs(result: dict, kind: str) -> set[frozenset[str]]:
    return {frozenset((p["a"], p["b"])) for p in result[f"{kind}_duplicates"]}


def test_finds_planted_duplicates_across_and_within_splits(clean):
    root, rows = clean
    planted = root / "planted"
    planted.mkdir(exist_ok=True)
    xray, ct = _train_row(rows, "xray"), _train_row(rows, "ct")
    # exact copy of a train X-ray in test, and another one inside train
    shutil.copy(root / xray["path"], planted / "copy_test.png")
    shutil.copy(root / xray["path"], planted / "copy_train.png")
    # near copy of a train CT in test: brighter, noisy, rescaled and re-encoded as JPEG
    image = cv2.imread(str(root / ct["path"]), cv2.IMREAD_GRAYSCALE).astype(float)
    noisy = image + 12 + np.random.default_rng(0).normal(0, 2, image.shape)
    cv2.imwrite(str(planted / "near_test.jpg"), cv2.resize(np.clip(noisy, 0, 255).astype(np.uint8), (80, 80)))
    (planted / "broken.png").write_bytes(b"not an image")
    extra = [{**xray, "path": "planted/copy_test.png", "split": "test", "group": "x1"},
             {**xray, "path": "planted/copy_train.png", "group": "x2"},
             {**ct, "path": "planted/near_test.jpg", "split": "test", "group": "x3"},
             {**ct, "path": "planted/broken.png", "group": "x4"}]
    result = audit(discover(_write(root, rows + extra, "planted.csv")), progress=False)

    assert result["n_images"] == len(rows) + 4
    assert [u["id"] for u in result["unreadable"]] == ["planted/broken.png"]
    exact = _pairs(result, "exact")
    assert frozenset((xray["path"], "planted/copy_test.png")) in exact
    assert frozenset((xray["path"], "planted/copy_train.png")) in exact
    assert frozenset((ct["path"], "planted/near_test.jpg")) in _pairs(result, "near")
    within = next(p for p in result["exact_duplicates"] if {p["a"], p["b"]} == {xray["path"], "planted/copy_train.png"})
    assert not within["cross_split"]
    assert result["exact_duplicates"][0]["cross_split"]  # cross-split pairs are listed first
    assert result["cross_split_duplicates"] >= 3  # copy_test with the original and with copy_train, near_test
    assert any("across splits" in w for w in result["warnings"])
    assert any("within one split" in w for w in result["warnings"])
    with pytest.raises(RespiscanError, match="across splits; first: .*exact duplicate") as err:
        check_strict(result)
    assert "\n" not in str(err.value)
    text = format_audit(result)
    assert "exact duplicate pairs: 3" in text and "warning:" in text


def test_clean_data_passes(clean):
    root, rows = clean
    result = audit(discover(_write(root, rows, "clean.csv")), near_threshold=2, progress=False)
    assert result["exact_duplicates"] == result["near_duplicates"] == [] and result["cross_split_duplicates"] == 0
    assert result["confounds"] == [] and result["cramers_v"] < 0.5
    check_strict(result)
    by_split = result["balance"]["by_split"]
    assert sum(c["n"] for c in by_split.values()) == len(rows)
    assert all(c["COVID"] + c["Non_COVID"] == c["n"] for c in by_split.values())
    assert set(result["balance"]["by_source"]) == {"site_a", "site_b"}


def test_flags_source_label_confound(clean):
    root, rows = clean
    confounded = [{**r, "source": "covid_hospital" if r["label"] == "COVID" else "clinic"} for r in rows]
    result = audit(discover(_write(root, confounded, "confounded.csv")), near_threshold=0, progress=False)
    kinds = {(c["kind"], c.get("source")) for c in result["confounds"]}
    assert {("single_class_source", "covid_hospital"), ("single_class_source", "clinic"), ("cramers_v", None)} == kinds
    assert result["cramers_v"] == pytest.approx(1.0)
    assert any("contributes only COVID images" in w for w in result["warnings"])
    assert any("Cramer's V" in w for w in result["warnings"])
