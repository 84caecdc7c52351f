"""Metrics against confusion matrices and curves worked out by hand (COVID = 1 is the positive class)."""

import json
import math
import time

import numpy as np
import pytest
from scipy.special import expit
from sklearn import metrics as skm

from respiscan.errors import RespiscanError
from respiscan.metrics import (
    SCALAR_METRICS,
    _weighted_metrics,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    ece_if_calibrated,
    expected_calibration_error,
    reliability_curve,
)

pytestmark = pytest.mark.filterwarnings("error")  # no sklearn UndefinedMetricWarning or RuntimeWarning

# Hand example. At threshold 0.5 the predictions are [1, 1, 0, 1, 0, 0, 0, 1, 0, 0]:
#   COVID cases (y=1) at 0, 1, 2, 7, 8 are predicted 1, 1, 0, 1, 0 -> TP = 3, FN = 2
#   Non_COVID (y=0) at 3, 4, 5, 6, 9 are predicted 1, 0, 0, 0, 0 -> FP = 1, TN = 4
Y = [1, 1, 1, 0, 0, 0, 0, 1, 1, 0]
P = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4, 0.7, 0.45, 0.05]


def _assert_clean(result: dict) -> None:
    """No NaN anywhere and strictly JSON-serialisable."""
    json.dumps(result, allow_nan=False)
    for key in SCALAR_METRICS:
        assert result[key] is None or (isinstance(result[key], float) and math.isfinite(result[key]))


def test_hand_confusion_matrix_and_count_metrics():
    m = binary_metrics(Y, P)
    assert m["confusion_matrix"] == {"tn": 4, "fp": 1, "fn": 2, "tp": 3}
    assert (m["n"], m["n_positive"], m["threshold"]) == (10, 5, 0.5)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 5)  # TP / (TP + FN): COVID cases caught
    assert m["specificity"] == pytest.approx(4 / 5)  # TN / (TN + FP): Non_COVID cases cleared
    assert m["balanced_accuracy"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert m["ppv"] == pytest.approx(3 / 4)  # TP / (TP + FP)
    assert m["npv"] == pytest.approx(4 / 6)  # TN / (TN + FN)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert m["mcc"] == pytest.approx((3 * 4 - 1 * 2) / math.sqrt(4 * 5 * 5 * 6))
    assert m["warnings"] == []
    _assert_clean(m)


def test_sensitivity_specificity_orientation_not_swapped():
    # A model that flags everyone as COVID catches every COVID case (sensitivity 1) and clears no
    # Non_COVID case (specificity 0): the reference code reported these the other way round.
    m = binary_metrics([1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.95])
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.0)
    y, p = np.array(Y), np.array(P)
    pred = (p >= 0.5).astype(int)
    m = binary_metrics(Y, P)
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))


def test_hand_ranking_and_calibration_metrics():
    m = binary_metrics(Y, P)
    # COVID scores .9 .8 .7 .45 .3 beat 5, 5, 5, 4 (not .6), 3 of the Non_COVID scores: 22 of 25 pairs.
    assert m["roc_auc"] == pytest.approx(22 / 25)
    # Descending: .9P .8P .7P .6N .45P .4N .3P ... precision at each COVID case: 1, 1, 1, 4/5, 5/7.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 1 + 4 / 5 + 5 / 7) / 5)
    # Squared errors: .01 .04 .49 .36 .04 .01 .16 .09 .3025 .0025, sum 1.505.
    assert m["brier"] == pytest.approx(1.505 / 10)
    # Bins (width .1) and |sum prob - sum y|: b0 .05, b1 .1, b2 .2, b3 |.3-1| = .7, b4 |.4+.45-1| = .15,
    # b6 .6, b7 |.7-1| = .3, b8 |.8-1| = .2, b9 |.9-1| = .1; total 2.4 over 10 cases.
    assert m["ece"] == pytest.approx(0.24)
    assert expected_calibration_error(Y, P) == pytest.approx(0.24)


def test_threshold_is_inclusive():
    # At 0.45 the COVID case scored exactly 0.45 is predicted COVID: TP 4 (.9 .8 .7 .45), FP 1 (.6).
    m = binary_metrics(Y, P, threshold=0.45)
    assert m["confusion_matrix"] == {"tn": 4, "fp": 1, "fn": 1, "tp": 4}
    assert m["threshold"] == 0.45


def test_matches_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.35 * y + 0.65 * rng.random(300), 0, 1), 2)  # rounding creates ties
    pred = (p >= 0.4).astype(int)
    m = binary_metrics(y, p, threshold=0.4)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_one_class_gives_none_and_warnings():
    m = binary_metrics([0, 0, 0, 0], [0.1, 0.6, 0.3, 0.2])
    for key in ("sensitivity", "balanced_accuracy", "mcc", "roc_auc", "pr_auc"):
        assert m[key] is None
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["ppv"] == 0.0 and m["f1"] == 0.0  # one false positive, nothing to find
    assert len(m["warnings"]) == 1
    assert "ROC AUC" in m["warnings"][0] and "no COVID" in m["warnings"][0]
    _assert_clean(m)

    m = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert m["specificity"] is None and m["roc_auc"] is None and m["sensitivity"] == pytest.approx(2 / 3)
    assert "no Non_COVID" in m["warnings"][0]
    _assert_clean(m)


def test_all_predictions_equal():
    m = binary_metrics([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5])  # all predicted COVID
    assert m["confusion_matrix"] == {"tn": 0, "fp": 2, "fn": 0, "tp": 2}
    assert m["npv"] is None and m["mcc"] is None
    assert m["roc_auc"] == 0.5 and m["sensitivity"] == 1.0 and m["specificity"] == 0.0
    assert m["warnings"] == ["NPV and MCC are undefined (reported as None): every case is predicted COVID "
                             "at threshold 0.5."]
    _assert_clean(m)


def test_all_predicted_negative():
    m = binary_metrics([1, 0, 1, 0, 0], [0.1, 0.2, 0.3, 0.05, 0.4])
    assert m["confusion_matrix"] == {"tn": 3, "fp": 0, "fn": 2, "tp": 0}
    assert m["ppv"] is None and m["mcc"] is None
    assert m["f1"] == 0.0 and m["sensitivity"] == 0.0 and m["npv"] == pytest.approx(3 / 5)
    assert m["warnings"] == ["PPV and MCC are undefined (reported as None): no case is predicted COVID at "
                             "threshold 0.5."]
    # No COVID cases and none predicted: F1 = 2TP / (2TP + FP + FN) = 0/0 as well.
    m = binary_metrics([0, 0], [0.1, 0.2])
    assert m["f1"] is None and m["ppv"] is None
    assert all(m[k] is not None for k in ("accuracy", "specificity", "npv", "brier", "ece"))
    assert any("F1" in w for w in m["warnings"]) and any("PPV" in w for w in m["warnings"])
    _assert_clean(m)


@pytest.mark.parametrize("y, p", [([], []), ([0, 1], [0.5]), ([0, 2], [0.1, 0.2]), ([0, 1], [0.1, 1.2]),
                                  ([0, 1], [0.1, np.nan])])
def test_bad_inputs_raise(y, p):
    with pytest.raises(RespiscanError):
        binary_metrics(y, p)


def test_reliability_curve_hand_example():
    curve = reliability_curve([0, 1, 1, 0, 1], [0.05, 0.15, 0.12, 0.95, 1.0], n_bins=10)
    assert len(curve["bin_edges"]) == 11
    assert curve["bin_centre"] == pytest.approx([0.05, 0.15, 0.95])  # empty bins are left out
    assert curve["mean_prob"] == pytest.approx([0.05, 0.135, 0.975])  # prob 1.0 is in the last bin
    assert curve["frequency"] == pytest.approx([0.0, 1.0, 0.5])
    assert curve["count"] == [1, 2, 2]
    # ECE = (1 * .05 + 2 * |.135 - 1| + 2 * |.975 - .5|) / 5
    assert expected_calibration_error([0, 1, 1, 0, 1], [0.05, 0.15, 0.12, 0.95, 1.0]) == pytest.approx(
        (0.05 + 2 * 0.865 + 2 * 0.475) / 5)


def test_bootstrap_engine_matches_point_estimates_on_expanded_data():
    # A resample is a weighting of the original cases; weights k must equal repeating a case k times.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.round(rng.random(60) * 0.6 + 0.3 * y, 1)
    counts = rng.integers(0, 4, 60)
    weights = np.vstack([np.ones(60), counts]).astype(float)
    engine = _weighted_metrics(y, p, (p >= 0.5).astype(float), weights)
    for row, (yy, pp) in enumerate([(y, p), (np.repeat(y, counts), np.repeat(p, counts))]):
        expected = binary_metrics(yy, pp)
        for key in SCALAR_METRICS:
            assert engine[key][row] == pytest.approx(expected[key]), key


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = expit(2.0 * (2 * y - 1) + 1.5 * rng.normal(size=n))  # informative, overconfident
    return y, p


def test_bootstrap_contains_point_estimate_and_narrows_with_more_data():
    y, p = _data(400, 1)
    small = bootstrap_ci(y, p, n_resamples=500).intervals
    point = binary_metrics(y, p)
    assert set(small) == set(SCALAR_METRICS) and small["ece"] is None
    bootstrapped = [key for key in SCALAR_METRICS if key != "ece"]
    for key in bootstrapped:
        low, high = small[key]
        assert low <= point[key] <= high, key
    y, p = _data(4000, 2)
    large = bootstrap_ci(y, p, n_resamples=500).intervals
    for key in bootstrapped:
        assert large[key][1] - large[key][0] < 0.6 * (small[key][1] - small[key][0]), key


def test_bootstrap_is_seeded():
    y, p = _data(200, 4)
    assert bootstrap_ci(y, p, n_resamples=200, seed=5) == bootstrap_ci(y, p, n_resamples=200, seed=5)
    assert bootstrap_ci(y, p, n_resamples=200, seed=5) != bootstrap_ci(y, p, n_resamples=200, seed=6)


def test_group_bootstrap_resamples_whole_groups():
    # Every case copied 5 times (e.g. 5 slices of one patient): treating copies as independent makes the
    # CI about sqrt(5) too narrow; resampling patients gives the width of the original 300 cases.
    y, p = _data(300, 7)
    y5, p5, patient = np.repeat(y, 5), np.repeat(p, 5), np.repeat(np.arange(300), 5)
    naive = bootstrap_ci(y5, p5, n_resamples=500).intervals
    grouped = bootstrap_ci(y5, p5, groups=patient, n_resamples=500).intervals
    original = bootstrap_ci(y, p, n_resamples=500).intervals
    for key in ("accuracy", "sensitivity", "roc_auc", "brier"):
        width = {name: ci[key][1] - ci[key][0] for name, ci in
                 (("naive", naive), ("grouped", grouped), ("original", original))}
        assert width["grouped"] > 1.6 * width["naive"], key
        assert width["grouped"] == pytest.approx(width["original"], rel=0.25), key


def test_bootstrap_undefined_metric_gives_none():
    ci = bootstrap_ci([0, 0, 0, 0, 0, 0], [0.1, 0.2, 0.6, 0.3, 0.7, 0.1], n_resamples=100).intervals
    assert ci["roc_auc"] is None and ci["sensitivity"] is None
    assert ci["accuracy"] is not None and ci["specificity"] is not None
    # One COVID case among 40: resampling within each class keeps it in every resample, so the AUC CI is defined.
    y = np.r_[1, np.zeros(39, dtype=int)]
    assert bootstrap_ci(y, np.linspace(1, 0, 40), n_resamples=200).intervals["roc_auc"] is not None


def test_bootstrap_speed():
    y, p = _data(2000, 8)
    start = time.perf_counter()
    bootstrap_ci(y, p, n_resamples=1000)
    assert time.perf_counter() - start < 5


def test_youden_threshold_hand_example():
    # Descending: .9P .8P .5P .4N .35P .3N .1N with 4 COVID and 3 Non_COVID cases.
    # J = TPR - FPR: .9 -> .25, .8 -> .5, .5 -> .75, .4 -> .75 - 1/3, .35 -> 1 - 1/3, .3 -> 1/3, .1 -> 0.
    y = [0, 0, 1, 0, 1, 1, 1]
    p = [0.1, 0.3, 0.35, 0.4, 0.8, 0.9, 0.5]
    assert choose_threshold(y, p) == 0.5
    assert choose_threshold(y, p, "sensitivity", target_sensitivity=1.0) == 0.35
    assert choose_threshold(y, p, "sensitivity", target_sensitivity=0.6) == 0.5
    assert choose_threshold(y, p, "sensitivity", target_sensitivity=0.5) == 0.8


def test_youden_tie_takes_largest_threshold():
    # In the main hand example J = .6 at thresholds .7, .45 and .3: the largest is chosen.
    assert choose_threshold(Y, P) == 0.7


@pytest.mark.parametrize("kwargs", [{"method": "sensitivity"}, {"method": "youden", "target_sensitivity": 0.9},
                                    {"method": "sensitivity", "target_sensitivity": 1.5}, {"method": "cost"}])
def test_choose_threshold_rejects_bad_requests(kwargs):
    with pytest.raises(RespiscanError):
        choose_threshold(Y, P, **kwargs)


def test_choose_threshold_needs_both_classes():
    with pytest.raises(RespiscanError):
        choose_threshold([1, 1], [0.2, 0.3])


def test_ece_floor_of_a_calibrated_model_and_its_p_value():
    """Labels drawn from the probabilities themselves are calibrated by construction: their ECE is what the
    floor says (its p-value spread over (0, 1), rarely below 0.05), and it shrinks with the sample size; labels
    from a model that is 0.15 too confident everywhere get a small p-value."""
    rng = np.random.default_rng(3)
    p_values, means = [], {}
    for n in (150, 1500):
        for trial in range(40):
            p = rng.uniform(0.02, 0.98, n)
            y = (rng.random(n) < p).astype(int)
            floor = ece_if_calibrated(y, p, seed=trial)
            means.setdefault(n, []).append(floor["mean"])
            if n == 150:
                p_values.append(floor["p_value"])
                assert floor["mean"] <= floor["q95"]
    assert 0.04 < np.mean(means[150]) < 0.09 and np.mean(means[1500]) < 0.5 * np.mean(means[150])
    assert np.mean(np.array(p_values) < 0.05) <= 0.15 and 0.3 < np.mean(p_values) < 0.7
    p = rng.uniform(0.02, 0.98, 400)
    y = (rng.random(400) < np.clip(p - 0.15 * np.sign(p - 0.5), 0, 1)).astype(int)  # over-confident by 0.15
    assert expected_calibration_error(y, p) > 0.1 and ece_if_calibrated(y, p)["p_value"] < 0.01
