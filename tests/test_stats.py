"""DeLong, McNemar and run-level tests against slow reference implementations, statsmodels/scipy and
hand-worked examples."""

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar

from respiscan.errors import RespiscanError
from respiscan.evaluation.stats import anova_over_runs, delong_test, mcnemar_test, paired_runs_test

pytestmark = pytest.mark.filterwarnings("error")


def _slow_delong_covariance(y: np.ndarray, *scores: np.ndarray) -> np.ndarray:
    """DeLong et al. (1988) structural components by brute force over all (COVID, Non_COVID) pairs."""
    pos_parts, neg_parts = [], []
    for s in scores:
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        pos_parts.append(psi.mean(axis=1))  # V10: one per COVID case
        neg_parts.append(psi.mean(axis=0))  # V01: one per Non_COVID case
    m, n = len(pos_parts[0]), len(neg_parts[0])
    return np.atleast_2d(np.cov(pos_parts)) / m + np.atleast_2d(np.cov(neg_parts)) / n


def _random_scores(seed: int, n: int = 150) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.round(y + rng.normal(size=n), 1)  # rounding creates ties
    b = np.round(0.5 * y + rng.normal(size=n) + 0.3 * a, 1)  # correlated with a
    return y, a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_variance_matches_slow_reference(seed):
    y, a, b = _random_scores(seed)
    cov = _slow_delong_covariance(y, a, b)
    result = delong_test(y, a, b)
    assert result["se"] ** 2 == pytest.approx(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert result["difference"] == pytest.approx(result["auc_a"] - result["auc_b"])
    assert result["z"] == pytest.approx(result["difference"] / result["se"])
    assert result["p_value"] == pytest.approx(2 * stats.norm.sf(abs(result["z"])))


def test_delong_identical_models():
    y, a, _ = _random_scores(3)
    result = delong_test(y, a, a)
    assert (result["difference"], result["se"], result["z"], result["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert "no significant difference" in result["sentence"]


def test_delong_hand_example_with_ties():
    # COVID scores A = (.8, .6, .4), Non_COVID A = (.6, .2). Pair scores psi (1 win, .5 tie, 0 loss):
    #   .8: 1, 1 -> V10 = 1;  .6: .5, 1 -> .75;  .4: 0, 1 -> .5          AUC_A = 2.25 / 3 = .75
    #   Non_COVID .6: (1 + .5 + 0)/3 = .5;  .2: 1 -> V01 = (.5, 1)
    # B = (.9, .3, .5) vs (.4, .1): V10 = (1, .5, 1), AUC_B = 2.5/3; V01 = (2/3, 1).
    #   Differences A - B: V10 (0, .25, -.5), var 21/144; V01 (-1/6, 0), var 2/144.
    #   var(AUC_A - AUC_B) = (21/144)/3 + (2/144)/2 = 8/144 = 1/18; z = (-1/12) / sqrt(1/18).
    y = [1, 1, 1, 0, 0]
    a = [0.8, 0.6, 0.4, 0.6, 0.2]
    b = [0.9, 0.3, 0.5, 0.4, 0.1]
    result = delong_test(y, a, b)
    assert result["auc_a"] == pytest.approx(0.75) and result["auc_b"] == pytest.approx(2.5 / 3)
    assert result["difference"] == pytest.approx(-1 / 12)
    assert result["se"] == pytest.approx(math.sqrt(1 / 18))
    assert result["z"] == pytest.approx(-math.sqrt(18) / 12)
    assert result["p_value"] == pytest.approx(0.72367, abs=1e-5)
    json.dumps(result, allow_nan=False)


def test_delong_detects_a_real_difference_and_says_so():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    good = 2.0 * y + rng.normal(size=400)  # any real scores work: the test is rank-based
    weak = 0.3 * y + rng.normal(size=400)
    result = delong_test(y, good, weak, names=("full model", "baseline"))
    assert result["p_value"] < 0.001 and result["ci"][0] > 0
    assert result["sentence"].startswith(f"AUC {result['auc_a']:.3f} (full model) vs {result['auc_b']:.3f}")
    assert "p < 0.001 (DeLong): full model is better at the 5% level." in result["sentence"]


def test_delong_needs_two_of_each_class():
    with pytest.raises(RespiscanError, match="at least 2 COVID and 2 Non_COVID"):
        delong_test([1, 0, 0], [0.9, 0.1, 0.2], [0.8, 0.3, 0.1])


def _predictions(y: np.ndarray, right: list[bool]) -> np.ndarray:
    return np.where(right, y, 1 - y)


def _table_case(both_right: int, only_a: int, only_b: int, both_wrong: int):
    right_a = [True] * both_right + [True] * only_a + [False] * only_b + [False] * both_wrong
    right_b = [True] * both_right + [False] * only_a + [True] * only_b + [False] * both_wrong
    y = np.arange(len(right_a)) % 2
    return y, _predictions(y, right_a), _predictions(y, right_b)


def test_mcnemar_exact_hand_table():
    # b = 2, c = 8: exact two-sided binomial p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024.
    result = mcnemar_test(*_table_case(5, 2, 8, 3), names=("full", "baseline"))
    assert (result["both_correct"], result["b"], result["c"], result["both_wrong"]) == (5, 2, 8, 3)
    assert result["exact"] is True
    assert result["statistic"] == 2
    assert result["p_value"] == pytest.approx(112 / 1024)
    assert result["accuracy_a"] == pytest.approx(7 / 18) and result["accuracy_b"] == pytest.approx(13 / 18)
    assert "p = 0.109" in result["sentence"] and "no significant difference" in result["sentence"]


def test_mcnemar_chi_square_hand_table():
    # b = 10, c = 20 (30 discordant >= 25): chi2 = (|10 - 20| - 1)^2 / 30 = 2.7 on 1 df.
    result = mcnemar_test(*_table_case(40, 10, 20, 5))
    assert result["exact"] is False
    assert result["statistic"] == pytest.approx(2.7)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(2.7, 1))
    # b = 5, c = 40: B is clearly more accurate.
    result = mcnemar_test(*_table_case(40, 5, 40, 5), names=("A", "B"))
    assert result["p_value"] < 0.001 and "B is more accurate at the 5% level" in result["sentence"]


def test_mcnemar_no_discordant_pairs():
    result = mcnemar_test(*_table_case(6, 0, 0, 2))
    assert (result["b"], result["c"], result["p_value"]) == (0, 0, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n, flip", [(60, 0.1), (400, 0.2)])  # exact and chi-square regimes
def test_mcnemar_matches_statsmodels(seed, n, flip):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    pred_a = np.where(rng.random(n) < flip, 1 - y, y)
    pred_b = np.where(rng.random(n) < flip * 1.5, 1 - y, y)
    result = mcnemar_test(y, pred_a, pred_b)
    ra, rb = pred_a == y, pred_b == y
    table = [[np.sum(ra & rb), np.sum(ra & ~rb)], [np.sum(~ra & rb), np.sum(~ra & ~rb)]]
    expected = mcnemar(table, exact=result["b"] + result["c"] < 25, correction=True)
    assert result["exact"] == (n == 60)
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue)


def test_mcnemar_rejects_mismatched_lengths():
    with pytest.raises(RespiscanError):
        mcnemar_test([0, 1, 1], [0, 1], [0, 1, 1])


def test_anova_hand_example():
    # x = (1, 2, 3), y = (4, 5, 6): SSB = 3 * 1.5^2 * 2 = 13.5 on 1 df, SSW = 2 + 2 = 4 on 4 df, F = 13.5.
    result = anova_over_runs({"x": [1, 2, 3], "y": [4, 5, 6]}, metric="AUC")
    assert result["f_statistic"] == pytest.approx(13.5)
    assert result["p_value"] == pytest.approx(stats.f.sf(13.5, 1, 4))
    x = result["per_config"]["x"]
    assert (x["n"], x["mean"], x["sd"]) == (3, 2.0, 1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert x["ci"] == pytest.approx((2 - half, 2 + half))
    assert "Mean AUC differs between the 2 configurations" in result["sentence"]
    assert "highest mean AUC: y (5.000" in result["sentence"]
    json.dumps(result, allow_nan=False)


def test_anova_matches_scipy_and_handles_constant_runs():
    groups = {"a": [0.91, 0.92, 0.90, 0.93], "b": [0.90, 0.91, 0.92], "c": [0.85, 0.88, 0.86]}
    expected = stats.f_oneway(*groups.values())
    result = anova_over_runs(groups)
    assert result["f_statistic"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    constant = anova_over_runs({"a": [0.9, 0.9], "b": [0.8, 0.8]})
    assert constant["f_statistic"] is None and constant["p_value"] is None
    assert constant["sentence"].startswith("No ANOVA possible")
    with pytest.raises(RespiscanError):
        anova_over_runs({"a": [0.9, 0.91]})
    with pytest.raises(RespiscanError):
        anova_over_runs({"a": [0.9, 0.91], "b": [0.8]})


def test_paired_runs_matches_scipy():
    a = [0.912, 0.905, 0.921, 0.915, 0.930, 0.918]
    b = [0.887, 0.899, 0.902, 0.915, 0.901, 0.893]
    result = paired_runs_test(a, b, names=("full", "baseline"), metric="AUC")
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(a, b)
    assert result["t_statistic"] == pytest.approx(t.statistic) and result["t_p_value"] == pytest.approx(t.pvalue)
    assert result["wilcoxon_statistic"] == pytest.approx(w.statistic)
    assert result["wilcoxon_p_value"] == pytest.approx(w.pvalue)
    d = np.subtract(a, b)
    half = stats.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert result["mean_difference"] == pytest.approx(d.mean())
    assert result["ci"] == pytest.approx((d.mean() - half, d.mean() + half))
    assert "full is higher in AUC at the 5% level" in result["sentence"]
    json.dumps(result, allow_nan=False)


def test_paired_runs_degenerate():
    same = paired_runs_test([0.9, 0.91, 0.92], [0.9, 0.91, 0.92])
    assert same["mean_difference"] == 0.0 and same["t_p_value"] is None and same["wilcoxon_p_value"] is None
    assert "no conclusion" in same["sentence"]
    shifted = paired_runs_test([0.5, 0.6, 0.7], [0.25, 0.35, 0.45])  # constant difference: no t-test
    assert shifted["t_p_value"] is None and shifted["wilcoxon_p_value"] == pytest.approx(0.25)
    with pytest.raises(RespiscanError):
        paired_runs_test([0.9, 0.91], [0.9, 0.91, 0.92])
