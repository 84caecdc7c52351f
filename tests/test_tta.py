"""Test-time augmentation: view 0 is the image itself, the others are small seeded changes without flips, and
`predict --tta N` reports the mean of the N views' probabilities and their spread."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from respiscan.data.samples import discover
from respiscan.errors import RespiscanError
from respiscan.serving.pipeline import write_predictions
from respiscan.serving.torch_engine import Pipeline
from respiscan.serving.tta import tta_views


@pytest.fixture(scope="module")
def pipe(bundle):
    return Pipeline(bundle, bf16=False)


@pytest.fixture(scope="module")
def xray(synth_data):
    return next(s.path for s in discover(synth_data) if s.modality == "xray" and s.split == "test")


def test_views_are_small_seeded_changes_without_flips():
    ramp = np.tile(np.linspace(230, 20, 64), (64, 1)).astype(np.uint8)  # bright left, dark right: shows a flip
    images = np.stack([ramp, ramp.T])
    views = tta_views(images, 6)
    assert views.shape == (6, 2, 64, 64) and views.dtype == np.uint8
    assert np.array_equal(views[0], images) and np.array_equal(tta_views(images, 6), views)
    for view in views[1:, 0].astype(float):
        assert not np.array_equal(view, ramp)
        assert view[16:48, 8:24].mean() > view[16:48, 40:56].mean() + 60  # left still brighter: no flip
        assert np.median(np.abs(view - ramp)[8:56, 8:56]) < 20  # small: a few degrees, pixels and per cent


def test_predict_averages_the_views_and_reports_their_spread(pipe, xray):
    plain = pipe.predict(xray=xray)
    assert "xray_tta_std" not in plain and plain["tta"] == 1
    result = pipe.predict(xray=xray, tta=5)
    p = pipe.probabilities(tta_views(pipe.prepare(xray, "xray")[None], 5)[:, 0], "xray")
    assert result["xray_probability"] == pytest.approx(p.mean()) and result["probability"] == pytest.approx(p.mean())
    assert result["xray_tta_std"] == pytest.approx(p.std()) and result["tta"] == 5
    assert result["xray_ood_score"] == pytest.approx(plain["xray_ood_score"])  # scored on the unaugmented view
    with pytest.raises(RespiscanError, match="--tta must be at least 1"):
        pipe.predict(xray=xray, tta=0)


def test_batch_rows_gain_the_spread(pipe, synth_data, tmp_path):
    samples = [s for s in discover(synth_data) if s.split == "test"][:4]
    rows, _ = pipe.predict_samples(samples, tta=3)
    assert all(r["tta_std"] >= 0 for r in rows)
    write_predictions(tmp_path / "p.csv", rows)
    with open(tmp_path / "p.csv", newline="") as f:
        assert "tta_std" in csv.DictReader(f).fieldnames
