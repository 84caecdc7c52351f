"""The bootstrap behind every evaluation CI: stratified by class, whole groups resampled, BCa where defined
(checked against scipy.stats.bootstrap), percentile otherwise, and the fused cases' clusters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit

from respiscan.data.samples import Sample
from respiscan.evaluation.evaluate import fused_clusters, patient_pairs
from respiscan.metrics import SCALAR_METRICS, binary_metrics, bootstrap_ci


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, expit(1.2 * (2 * y - 1) + 1.5 * rng.normal(size=n))


def _auc(positives: np.ndarray, negatives: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC of two samples for scipy.stats.bootstrap: resampling them separately is stratified resampling."""
    x, z = np.moveaxis(positives, axis, -1), np.moveaxis(negatives, axis, -1)
    wins = (x[..., :, None] > z[..., None, :]) + 0.5 * (x[..., :, None] == z[..., None, :])
    return wins.mean(axis=(-2, -1))


def test_bca_interval_matches_scipy_for_the_auc():
    y, p = _data(80, 3)
    ours = bootstrap_ci(y, p, n_resamples=8000, seed=1)
    expected, percentile = (
        stats.bootstrap((p[y == 1], p[y == 0]), _auc, n_resamples=8000, method=method, batch=500,
                        rng=np.random.default_rng(2)).confidence_interval for method in ("BCa", "percentile"))
    assert ours.methods["roc_auc"] == "BCa"
    assert ours.intervals["roc_auc"] == pytest.approx((expected.low, expected.high), abs=0.005)
    # the correction matters here: the AUC's bootstrap distribution is skewed towards 0.5
    assert abs(ours.intervals["roc_auc"][0] - percentile.low) > 0.01


def test_resampling_keeps_each_class_count():
    # A model that calls everything Non_COVID is right on exactly the Non_COVID share: with the class counts
    # fixed in every resample, accuracy never moves; resampling cases freely would spread it.
    y = np.r_[np.ones(10, dtype=int), np.zeros(40, dtype=int)]
    ci = bootstrap_ci(y, np.full(50, 0.1), n_resamples=500)
    assert ci.intervals["accuracy"] == pytest.approx((0.8, 0.8))
    assert ci.intervals["sensitivity"] == (0.0, 0.0) and ci.intervals["specificity"] == (1.0, 1.0)


def test_groups_are_resampled_and_left_out_whole():
    # Every patient's image copied 5 times: resampling and leaving out patients must give exactly the interval
    # of the original one-image-per-patient data, BCa acceleration included.
    y, p = _data(150, 4)
    copies = bootstrap_ci(np.repeat(y, 5), np.repeat(p, 5), groups=np.repeat(np.arange(150), 5), n_resamples=400)
    original = bootstrap_ci(y, p, n_resamples=400)
    assert copies.methods == original.methods
    for name in SCALAR_METRICS:
        assert copies.intervals[name] == pytest.approx(original.intervals[name]), name


def test_percentile_where_bca_is_undefined():
    # Perfect separation: every resample has AUC 1 and leaving a case out changes nothing: no BCa.
    y = np.r_[np.ones(20, dtype=int), np.zeros(20, dtype=int)]
    p = np.r_[np.linspace(0.6, 0.9, 20), np.linspace(0.1, 0.4, 20)]
    ci = bootstrap_ci(y, p, n_resamples=300)
    assert ci.intervals["roc_auc"] == (1.0, 1.0) and ci.methods["roc_auc"] == "percentile"
    # One case predicted COVID: PPV is undefined in resamples that miss it and when it is left out.
    p = np.r_[0.9, np.full(19, 0.2), np.full(20, 0.1)]
    ci = bootstrap_ci(y, p, n_resamples=300)
    assert ci.methods["ppv"] == "percentile" and ci.intervals["ppv"] == (1.0, 1.0)
    assert ci.methods["accuracy"] == "BCa"
    point = binary_metrics(y, p)["accuracy"]
    assert ci.intervals["accuracy"][0] <= point <= ci.intervals["accuracy"][1]


def test_many_groups_use_blocks_of_groups_for_the_acceleration():
    y, p = _data(1500, 5)
    ci = bootstrap_ci(y, p, n_resamples=300)
    assert ci.methods["roc_auc"] == "BCa"
    low, high = ci.intervals["roc_auc"]
    assert low < binary_metrics(y, p)["roc_auc"] < high and high - low < 0.08


def _sample(i: str, modality: str, group: str | None, label: int = 1) -> Sample:
    return Sample(i, Path(f"{i}.png"), modality, label, "test", group)


def test_fused_cases_cluster_on_connected_patients():
    # X-ray a pairs with CT slices of groups g1 and g2, X-ray b with g2: one cluster; c with g3: another.
    xa, xb, xc = _sample("xa", "xray", "a"), _sample("xb", "xray", "b"), _sample("xc", "xray", "c")
    pairs = [(xa, _sample("c1", "ct", "g1")), (xa, _sample("c2", "ct", "g2")), (xb, _sample("c3", "ct", "g2")),
             (xc, _sample("c4", "ct", "g3"))]
    clusters = fused_clusters(pairs)
    assert clusters[0] == clusters[1] == clusters[2] != clusters[3]


def test_only_patients_pair():
    xray = [_sample("x1", "xray", "p1"), _sample("x2", "xray", "p2", 0), _sample("x3", "xray", None)]
    ct = [_sample("c1", "ct", "p1"), _sample("c2", "ct", "q2", 0), _sample("c3", "ct", None)]
    assert [(x.id, c.id) for x, c in patient_pairs(xray, ct)] == [("x1", "c1")]
    assert patient_pairs(xray[1:], ct[1:]) == []  # no shared id: no pairs, however the labels match


def test_ece_gets_no_bootstrap_interval_because_resampling_inflates_it():
    # Labels drawn from the predicted probabilities: a calibrated model. Its resamples' ECEs lie above the
    # estimate nearly always, so any bootstrap interval would sit beside the estimate, not around it.
    rng = np.random.default_rng(3)
    p = rng.uniform(0.02, 0.98, 200)
    y = (rng.random(200) < p).astype(int)
    ci = bootstrap_ci(y, p, n_resamples=500)
    assert ci.intervals["ece"] is None and ci.methods["ece"] is None
    assert ci.intervals["brier"] is not None
    point = binary_metrics(y, p)["ece"]
    resampled = [binary_metrics(y[i], p[i])["ece"] for i in rng.integers(0, 200, (200, 200))]
    assert np.mean(np.array(resampled) > point) > 0.8
