"""DeLong, McNemar (plain and clustered), Friedman, paired-run and Holm tests against slow reference
implementations, statsmodels/scipy, hand-worked examples and simulated grouped data."""

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from respiscan.errors import RespiscanError
from respiscan.evaluation.stats import (
    CLUSTERED_DELONG,
    CLUSTERED_MCNEMAR,
    DELONG,
    accuracy_differences,
    auc_differences,
    delong_test,
    durkalski_statistic,
    friedman_over_runs,
    holm,
    mcnemar_test,
    paired_runs_test,
)

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


def _slow_obuchowski_variance(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> float:
    """Obuchowski (1997) variance of AUC(a) - AUC(b), cluster by cluster, from its published formulas."""
    def components(s):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    (theta_a, v10_a, v01_a), (theta_b, v10_b, v01_b) = components(a), components(b)
    pos_groups, neg_groups = groups[y == 1], groups[y == 0]
    big_m, big_n = len(pos_groups), len(neg_groups)
    clusters = sorted(set(groups.tolist()))
    i10, i01, i = len(set(pos_groups.tolist())), len(set(neg_groups.tolist())), len(clusters)
    cov = np.zeros((2, 2))
    parts = [(theta_a, v10_a, v01_a), (theta_b, v10_b, v01_b)]
    for r in range(2):
        for s in range(2):
            tr, v10r, v01r = parts[r]
            ts, v10s, v01s = parts[s]
            s10 = s01 = s11 = s11_t = 0.0
            for k in clusters:
                m_k, n_k = np.sum(pos_groups == k), np.sum(neg_groups == k)
                xr, xs = v10r[pos_groups == k].sum() - m_k * tr, v10s[pos_groups == k].sum() - m_k * ts
                zr, zs = v01r[neg_groups == k].sum() - n_k * tr, v01s[neg_groups == k].sum() - n_k * ts
                s10 += xr * xs
                s01 += zr * zs
                s11 += xr * zs
                s11_t += xs * zr
            s10 *= i10 / ((i10 - 1) * big_m)
            s01 *= i01 / ((i01 - 1) * big_n)
            s11, s11_t = s11 * i / (i - 1), s11_t * i / (i - 1)
            cov[r, s] = s10 / big_m + s01 / big_n + (s11 + s11_t) / (big_m * big_n)
    return cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]


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
    assert result["method"] == DELONG and result["n_groups"] == len(y)
    assert result["se"] ** 2 == pytest.approx(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert result["difference"] == pytest.approx(result["auc_a"] - result["auc_b"])
    assert result["z"] == pytest.approx(result["difference"] / result["se"])
    assert result["p_value"] == pytest.approx(2 * stats.norm.sf(abs(result["z"])))


@pytest.mark.parametrize("seed", [0, 1])
def test_clustered_delong_matches_slow_obuchowski(seed):
    y, a, b = _random_scores(seed, 120)
    rng = np.random.default_rng(seed + 10)
    groups = rng.integers(0, 30, len(y))  # mixed groups: COVID and Non_COVID cases in one group
    result = delong_test(y, a, b, groups=groups)
    assert result["method"] == CLUSTERED_DELONG and result["n_groups"] == len(set(groups.tolist()))
    assert result["se"] ** 2 == pytest.approx(_slow_obuchowski_variance(y, a, b, groups))
    assert result["difference"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert f"{CLUSTERED_DELONG}, {result['n_groups']} groups of 120 cases" in result["sentence"]


def test_clustered_tests_with_singleton_groups_are_the_plain_tests():
    y, a, b = _random_scores(5)
    ids = [f"case{i}" for i in range(len(y))]
    assert delong_test(y, a, b, groups=ids) == delong_test(y, a, b)
    pred_a, pred_b = (a > 0.5).astype(int), (b > 0.3).astype(int)
    assert mcnemar_test(y, pred_a, pred_b, groups=ids) == mcnemar_test(y, pred_a, pred_b)
    # the clustered formulas themselves reduce to the plain ones with one case per group
    singletons = np.arange(len(y))
    reference = _slow_delong_covariance(y, a, b)
    assert _slow_obuchowski_variance(y, a, b, singletons) == pytest.approx(
        reference[0, 0] + reference[1, 1] - 2 * reference[0, 1])
    right_a, right_b = pred_a == y, pred_b == y
    table = [[np.sum(right_a & right_b), np.sum(right_a & ~right_b)],
             [np.sum(~right_a & right_b), np.sum(~right_a & ~right_b)]]
    uncorrected = mcnemar(table, exact=False, correction=False).statistic
    assert durkalski_statistic(right_a.astype(float) - right_b, singletons, len(y)) == pytest.approx(uncorrected)


def test_durkalski_hand_example():
    # group 0: 4 cases, A alone right on 2 -> d = 2/4; group 1: 2 cases, B alone right on 1 -> d = -1/2;
    # group 2: 1 case, A alone right -> d = 1; group 3: 3 cases, both right. X2 = (1/2)^2... = 1^2 / 1.5.
    y = np.zeros(10, dtype=int)
    groups = np.repeat([0, 1, 2, 3], [4, 2, 1, 3])
    pred_a = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    pred_b = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0, 0])
    result = mcnemar_test(y, pred_a, pred_b, names=("A", "B"), groups=groups)
    assert result["method"] == f"{CLUSTERED_MCNEMAR}, 4 groups of 10 cases"
    assert (result["b"], result["c"]) == (3, 1)
    assert result["statistic"] == pytest.approx(1 / 1.5)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(1 / 1.5, 1))
    assert "no evidence of a difference at the 5% level" in result["sentence"]


def _grouped_null(rng: np.random.Generator, n_sim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n_sim` draws of two equally good models on the realdev CT test split's group structure (73 COVID
    slices in 12 papers, 80 Non_COVID slices in 53, 42 of them single slices), each model with its own
    paper-level error. Returns labels, groups and scores (n_sim x 2 x cases)."""
    sizes = np.array([3, 3, 4, 4, 4, 5, 6, 6, 8, 8, 10, 12] + [1] * 42 + [2] * 6 + [3, 4, 5, 6, 8])
    groups = np.repeat(np.arange(len(sizes)), sizes)
    y = (groups < 12).astype(int)
    paper_error = rng.normal(size=(n_sim, 2, len(sizes)))[:, :, groups]
    scores = 1.5 * y + paper_error + 0.5 * rng.normal(size=(n_sim, 2, len(y)))
    return y, groups, scores


def test_clustered_tests_keep_the_type_one_error_on_grouped_data():
    """Equally good models with paper-level errors: the plain tests reject far too often (the slices of one
    paper are not independent), the clustered ones at about the nominal 5 %."""
    y, groups, scores = _grouped_null(np.random.default_rng(2024), 400)
    a, b = scores[:, 0], scores[:, 1]
    pa, pb = (a > 0.75).astype(int), (b > 0.75).astype(int)
    p = {"delong": auc_differences(y, a, b).p_values(),
         "clustered_delong": auc_differences(y, a, b, groups).p_values(),
         "mcnemar": accuracy_differences(y, pa, pb).p_value,
         "clustered_mcnemar": accuracy_differences(y, pa, pb, groups).p_value}
    rate = {k: float(np.mean(v < 0.05)) for k, v in p.items()}
    assert 0.02 <= rate["clustered_delong"] <= 0.08, rate
    assert 0.02 <= rate["clustered_mcnemar"] <= 0.08, rate
    assert rate["delong"] > 0.2 and rate["mcnemar"] > 0.15, rate
    # the vectorised rows are the one-comparison tests
    for i in range(3):
        assert delong_test(y, a[i], b[i], groups=groups)["p_value"] == pytest.approx(p["clustered_delong"][i])
        assert delong_test(y, a[i], b[i])["p_value"] == pytest.approx(p["delong"][i])
        assert mcnemar_test(y, pa[i], pb[i], groups=groups)["p_value"] == pytest.approx(p["clustered_mcnemar"][i])
        assert mcnemar_test(y, pa[i], pb[i])["p_value"] == pytest.approx(p["mcnemar"][i])


def test_clustered_delong_still_detects_a_real_difference():
    y, groups, scores = _grouped_null(np.random.default_rng(3), 1)
    good = scores[0, 0] + 2.0 * y  # a much better model on the same cases
    result = delong_test(y, good, scores[0, 1], names=("good", "weak"), groups=groups)
    assert result["p_value"] < 0.05 and result["ci"][0] > 0
    assert "good is better at the 5% level" in result["sentence"]


def test_clustered_delong_needs_two_groups_of_each_class():
    with pytest.raises(RespiscanError, match="COVID cases in at least 2 groups"):
        delong_test([1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.1, 0.4, 0.2], [0.8, 0.6, 0.9, 0.3, 0.1, 0.2],
                    groups=["p1", "p1", "p1", "p2", "p3", "p4"])


def test_delong_identical_models():
    y, a, _ = _random_scores(3)
    result = delong_test(y, a, a)
    assert (result["difference"], result["se"], result["z"], result["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert "no evidence of a difference" in result["sentence"]


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
    assert result["method"] == "McNemar, exact"
    assert result["statistic"] == 2
    assert result["p_value"] == pytest.approx(112 / 1024)
    assert result["accuracy_a"] == pytest.approx(7 / 18) and result["accuracy_b"] == pytest.approx(13 / 18)
    assert "p = 0.109" in result["sentence"] and "no evidence of a difference" in result["sentence"]


def test_mcnemar_chi_square_hand_table():
    # b = 10, c = 20 (30 discordant >= 25): chi2 = (|10 - 20| - 1)^2 / 30 = 2.7 on 1 df.
    result = mcnemar_test(*_table_case(40, 10, 20, 5))
    assert result["method"] == "McNemar, chi-square"
    assert result["statistic"] == pytest.approx(2.7)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(2.7, 1))
    # b = 5, c = 40: B is clearly more accurate.
    result = mcnemar_test(*_table_case(40, 5, 40, 5), names=("A", "B"))
    assert result["p_value"] < 0.001 and "B is more accurate at the 5% level" in result["sentence"]


def test_mcnemar_no_discordant_pairs():
    result = mcnemar_test(*_table_case(6, 0, 0, 2))
    assert (result["b"], result["c"], result["p_value"]) == (0, 0, 1.0)
    grouped = mcnemar_test(*_table_case(6, 0, 0, 2), groups=np.arange(8) // 2)
    assert grouped["method"].startswith(CLUSTERED_MCNEMAR) and grouped["p_value"] == 1.0


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
    assert result["method"] == ("McNemar, exact" if n == 60 else "McNemar, chi-square")
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue)


def test_mcnemar_rejects_mismatched_lengths():
    with pytest.raises(RespiscanError):
        mcnemar_test([0, 1, 1], [0, 1], [0, 1, 1])
    with pytest.raises(RespiscanError, match="one id per case"):
        mcnemar_test([0, 1, 1], [0, 1, 1], [0, 1, 1], groups=["a", "b"])


# --- runs over seeds ----------------------------------------------------------------------------------

# Five seeds whose level differs a lot (the seed's embedding models) with a small, consistent effect:
# full is 0.010 above task_only and adversarial 0.004 above it at every seed.
SEED_LEVEL = np.array([0.80, 0.86, 0.91, 0.84, 0.95])
TOY = {"full": SEED_LEVEL + 0.010 + np.array([0.001, -0.001, 0.0, 0.002, -0.002]),
       "task_only": SEED_LEVEL,
       "adversarial": SEED_LEVEL + 0.004 + np.array([0.0, 0.001, -0.001, 0.0, 0.001])}


def test_friedman_sees_a_consistent_effect_that_a_one_way_anova_misses():
    result = friedman_over_runs(TOY, metric="AUC")
    expected = stats.friedmanchisquare(*TOY.values())
    assert result["method"] == "Friedman test, seeds as blocks" and result["n_runs"] == 5
    assert result["statistic"] == pytest.approx(expected.statistic) == 10.0  # every seed ranks them alike
    assert result["p_value"] == pytest.approx(expected.pvalue) and result["p_value"] < 0.01
    assert result["mean_rank"] == {"full": 1.0, "task_only": 3.0, "adversarial": 2.0}
    assert stats.f_oneway(*TOY.values()).pvalue > 0.5  # the seed-to-seed spread swamps the effect
    assert "the 3 configurations differ in AUC at the 5% level" in result["sentence"]
    assert result["note"] == ""
    full = result["per_config"]["full"]
    half = stats.t.ppf(0.975, 4) * np.std(TOY["full"], ddof=1) / math.sqrt(5)
    assert full["ci"] == pytest.approx((TOY["full"].mean() - half, TOY["full"].mean() + half))
    json.dumps(result, allow_nan=False)


def test_friedman_without_evidence_and_with_too_few_seeds():
    rng = np.random.default_rng(1)
    noise = {name: SEED_LEVEL + 0.01 * rng.normal(size=5) for name in TOY}
    result = friedman_over_runs(noise, metric="AUC")
    assert result["p_value"] > 0.05 and "no evidence of a difference at the 5% level" in result["sentence"]
    two = friedman_over_runs({name: v[:2] for name, v in TOY.items()})
    assert two["min_p"] == pytest.approx(math.exp(-2)) and "cannot reach the 5% level" in two["sentence"]
    tied = friedman_over_runs({"a": [0.9, 0.8], "b": [0.9, 0.8], "c": [0.9, 0.8]})
    assert tied["p_value"] is None and "no conclusion" in tied["sentence"]
    with pytest.raises(RespiscanError, match="at least 3 configurations"):
        friedman_over_runs({"a": [0.9, 0.91], "b": [0.8, 0.7]})
    with pytest.raises(RespiscanError, match="one value per seed"):
        friedman_over_runs({"a": [0.9, 0.91], "b": [0.8, 0.7], "c": [0.1, 0.2, 0.3]})


def test_paired_runs_with_five_seeds_notes_that_wilcoxon_cannot_reach_the_level():
    result = paired_runs_test(TOY["full"], TOY["task_only"], names=("full", "task_only"), metric="AUC")
    t = stats.ttest_rel(TOY["full"], TOY["task_only"])
    assert result["t_p_value"] == pytest.approx(t.pvalue) and result["p_value"] == result["t_p_value"] < 0.001
    assert result["method"] == "paired t-test" and result["wilcoxon_p_value"] is None
    assert "smallest two-sided p is 2/2^5 = 0.062" in result["note"] and result["note"] in result["sentence"]
    assert "training randomness" in result["sentence"]
    assert "full is higher in AUC at the 5% level" in result["sentence"]
    tied = [*TOY["full"][:1], *TOY["task_only"][1:]]  # one seed with no difference: Wilcoxon drops it
    note = paired_runs_test(TOY["full"], tied, names=("full", "task_only"), metric="AUC")["note"]
    assert "with 4 runs that differ (of 5) its smallest two-sided p is 2/2^4 = 0.125" in note


def test_paired_runs_matches_scipy_with_six_seeds():
    a = [0.912, 0.905, 0.921, 0.915, 0.930, 0.918]
    b = [0.887, 0.899, 0.902, 0.913, 0.901, 0.893]
    result = paired_runs_test(a, b, names=("full", "baseline"), metric="AUC")
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(a, b)
    assert result["t_statistic"] == pytest.approx(t.statistic) and result["t_p_value"] == pytest.approx(t.pvalue)
    assert result["wilcoxon_statistic"] == pytest.approx(w.statistic)
    assert result["wilcoxon_p_value"] == pytest.approx(w.pvalue) == 2 / 2 ** 6
    assert result["note"] == ""
    d = np.subtract(a, b)
    half = stats.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert result["mean_difference"] == pytest.approx(d.mean())
    assert result["ci"] == pytest.approx((d.mean() - half, d.mean() + half))
    assert "full is higher in AUC at the 5% level" in result["sentence"]
    json.dumps(result, allow_nan=False)


def test_paired_runs_degenerate():
    same = paired_runs_test([0.9, 0.91, 0.92], [0.9, 0.91, 0.92])
    assert same["mean_difference"] == 0.0 and same["p_value"] is None and same["wilcoxon_p_value"] is None
    assert "no conclusion" in same["sentence"]
    shifted = paired_runs_test(np.linspace(0.5, 0.75, 6), np.linspace(0.25, 0.5, 6))  # constant difference
    assert shifted["t_p_value"] is None and shifted["wilcoxon_p_value"] == pytest.approx(2 / 2 ** 6)
    assert shifted["method"] == "Wilcoxon signed-rank" and shifted["p_value"] == shifted["wilcoxon_p_value"]
    with pytest.raises(RespiscanError):
        paired_runs_test([0.9, 0.91], [0.9, 0.91, 0.92])


def test_holm_adjusts_the_family_and_rewrites_the_verdicts():
    primary = paired_runs_test(TOY["full"], TOY["task_only"], names=("full", "task_only"), metric="AUC")
    marginal = mcnemar_test(*_table_case(40, 22, 9, 5))  # chi2 = (13 - 1)^2 / 31, p = 0.031
    null = mcnemar_test(*_table_case(40, 10, 12, 5))
    untestable = paired_runs_test([0.9, 0.91, 0.92], [0.9, 0.91, 0.92])
    assert marginal["p_value"] == pytest.approx(stats.chi2.sf(144 / 31, 1))
    assert "A is more accurate at the 5% level" in marginal["sentence"]
    adjusted = holm([primary, marginal, null, untestable])
    expected = multipletests([primary["p_value"], marginal["p_value"], null["p_value"]], method="holm")[1]
    assert [r["p_holm"] for r in adjusted[:3]] == pytest.approx(list(expected))
    assert all(r["family_size"] == 3 for r in adjusted[:3])
    assert "over 3 tests: full is higher in AUC at the 5% level" in adjusted[0]["sentence"]
    assert adjusted[1]["p_holm"] > 0.05
    assert "over 3 tests: no evidence of a difference at the 5% level" in adjusted[1]["sentence"]
    assert adjusted[3] == untestable and "p_holm" not in adjusted[3]
    assert primary["note"] in adjusted[0]["sentence"]
    json.dumps(adjusted, allow_nan=False)
