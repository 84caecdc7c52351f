"""Statistical comparisons of models: DeLong for AUCs, McNemar for paired predictions, and tests over
repeated training runs (seeds).

Where the cases come in groups (CT slices of one scan or paper, images of one patient) the paired tests are
the clustered ones: Obuchowski's (1997) DeLong variance (against a t reference over the groups) and
Durkalski et al.'s (2003) McNemar statistic, which count a group's correlated errors as one piece of
evidence. Treating slices as independent makes the plain tests reject equally good models far too often.
Without groups (or with singleton groups only) the plain tests run, and every result names the method that
ran. `auc_differences` and `accuracy_differences` are the same tests vectorised over rows (simulations).

Every result carries a `sentence`, a plain-English one-line reading, so that reports state what a p-value
means instead of leaving it to the reader; a p-value above the level is "no evidence of a difference", never
a statement that the two are equal. `holm` adjusts a family of results and rewrites their verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

from respiscan.errors import RespiscanError
from respiscan.metrics import check_binary_inputs, check_labels

_NOISE = 1e-12  # a standard error or spread below this is rounding noise: treated as zero
_MCNEMAR_EXACT_BELOW = 25  # discordant pairs; the chi-square approximation is poor for fewer
DELONG = "DeLong"
CLUSTERED_DELONG = "clustered DeLong (Obuchowski 1997)"
CLUSTERED_MCNEMAR = "clustered McNemar (Durkalski et al. 2003)"
FRIEDMAN = "Friedman test, seeds as blocks"


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise RespiscanError(f"confidence must be between 0 and 1, got {confidence!r}")
    return float(confidence)


def _format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _level(confidence: float) -> str:
    return f"{100 * (1 - confidence):g}%"


def _verdict(p: float | None, claim: str | None, confidence: float) -> str:
    """`claim` ('A is better') at the level, or 'no evidence of a difference': a p above the level does not
    show that the two are equal, only that these data cannot tell them apart."""
    if p is None:
        return "no conclusion can be drawn"
    if claim is not None and p < 1 - confidence:
        return f"{claim} at the {_level(confidence)} level"
    return f"no evidence of a difference at the {_level(confidence)} level"


def _claim(difference: float, names: tuple[str, str], better: str) -> str | None:
    """What a significant result would show: the side the point estimate favours (None for no difference)."""
    if difference == 0:
        return None
    return f"{names[0] if difference > 0 else names[1]} is {better}"


def _sentence(reading: str, test: str, verdict: str, note: str) -> str:
    return f"{reading}, {test}: {verdict}." + (f" {note}" if note else "")


def _finish(result: dict, reading: str, test: str, claim: str | None, confidence: float, note: str = "") -> dict:
    """Add the parts every result shares: `reading` (the estimate), `test` (p and method), `claim` (what a p
    below the level would show), `note` (a caveat) and `sentence`."""
    result.update(reading=reading, test=test, claim=claim, note=note,
                  sentence=_sentence(reading, test, _verdict(result["p_value"], claim, confidence), note))
    return result


def _clusters(groups, n: int) -> tuple[np.ndarray, int] | None:
    """Group index per case and the number of groups, or None when no group holds more than one case (the
    plain tests are then exact, and the clustered ones reduce to them)."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise RespiscanError(f"groups must hold one id per case ({n}); got shape {groups.shape}")
    _, index = np.unique(groups, return_inverse=True)
    n_groups = int(index.max()) + 1
    return None if n_groups == n else (index, n_groups)


def _score_rows(values, n: int, name: str) -> np.ndarray:
    rows = np.atleast_2d(np.asarray(values, dtype=float))
    if rows.ndim != 2 or rows.shape[1] != n:
        raise RespiscanError(f"{name} must hold {n} scores per row (one per case); got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise RespiscanError(f"{name} must be finite numbers")
    return rows


def _two_sided_p(difference: np.ndarray, se: np.ndarray, df: float) -> np.ndarray:
    """Two-sided p of difference / se against a t (df) or, for df = inf, a normal reference: 1 for no
    difference and no variance (identical inputs), NaN when the variance is zero but the difference is not
    (degenerate data, no test possible)."""
    from scipy.special import ndtr, stdtr

    safe = np.where(se > _NOISE, se, 1.0)
    tail = ndtr(-np.abs(difference) / safe) if math.isinf(df) else stdtr(df, -np.abs(difference) / safe)
    return np.where(se > _NOISE, 2 * tail, np.where(difference == 0, 1.0, np.nan))


# --- DeLong -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AUCDifferences:
    """AUC(A) - AUC(B) for rows of paired scores, each with its standard error (one entry per row)."""
    method: str
    n_groups: int
    df: float  # degrees of freedom of the t reference; inf for the normal one (plain DeLong)
    auc_a: np.ndarray
    auc_b: np.ndarray
    difference: np.ndarray
    se: np.ndarray

    def p_values(self) -> np.ndarray:
        return _two_sided_p(self.difference, self.se, self.df)


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components of k score vectors (k x n), by midranks (Sun & Xu 2014).

    Returns (auc (k,), pos (k x m), neg (k x n_neg)): pos[i] is the share of negatives scored below
    positive i (ties count half), neg[j] the share of positives scored above negative j.
    """
    positives, negatives = scores[:, y == 1], scores[:, y == 0]
    m, n = positives.shape[1], negatives.shape[1]
    if m < 2 or n < 2:
        raise RespiscanError(f"DeLong needs at least 2 COVID and 2 Non_COVID cases; got {m} and {n}")
    rank_all = stats.rankdata(np.hstack([positives, negatives]), axis=1)  # midranks
    rank_pos = stats.rankdata(positives, axis=1)
    rank_neg = stats.rankdata(negatives, axis=1)
    pos = (rank_all[:, :m] - rank_pos) / n
    neg = 1.0 - (rank_all[:, m:] - rank_neg) / m
    auc = pos.mean(axis=1)
    return auc, pos, neg


def _clustered_variance(y: np.ndarray, pos: np.ndarray, neg: np.ndarray, theta: np.ndarray, index: np.ndarray,
                        n_groups: int) -> tuple[np.ndarray, float]:
    """Obuchowski's (1997) variance of an AUC (or, from component differences, of an AUC difference) when
    cases come in groups, per row of components: they are summed per group, so a group's correlated cases
    count once. Also the degrees of freedom of its t reference.

    With I10 groups holding COVID cases, I01 holding Non_COVID ones, M and N cases of each class:
    var = S10 / M + S01 / N + 2 S11 / (M N), where S10 = I10 / ((I10 - 1) M) sum_i (V10_i - m_i theta)^2,
    S01 likewise and S11 = I / (I - 1) sum_i (V10_i - m_i theta)(V01_i - n_i theta). With singleton groups
    S11 = 0 and S10, S01 are DeLong's variances: the plain DeLong variance.
    The variance is estimated from only I10 or I01 groups of a class, and with few (12 COVID papers in
    realdev's CT test split) a normal reference rejects equally good models too often (0.07 at the 5 % level
    by simulation); a t reference with min(I10, I01) - 1 degrees of freedom, as for cluster-robust variances,
    keeps the error rate at or below the level.
    """
    onehot = np.zeros((len(y), n_groups))
    onehot[np.arange(len(y)), index] = 1.0
    pos_onehot, neg_onehot = onehot[y == 1], onehot[y == 0]
    m_i, n_i = pos_onehot.sum(axis=0), neg_onehot.sum(axis=0)
    i10, i01 = int(np.count_nonzero(m_i)), int(np.count_nonzero(n_i))
    if i10 < 2 or i01 < 2:
        raise RespiscanError(f"the clustered DeLong test needs COVID cases in at least 2 groups and Non_COVID "
                             f"cases in at least 2; got {i10} and {i01}")
    big_m, big_n = len(pos_onehot), len(neg_onehot)
    x = pos @ pos_onehot - m_i * theta[:, None]
    z = neg @ neg_onehot - n_i * theta[:, None]
    s10 = i10 / ((i10 - 1) * big_m) * np.sum(x * x, axis=1)
    s01 = i01 / ((i01 - 1) * big_n) * np.sum(z * z, axis=1)
    s11 = n_groups / (n_groups - 1) * np.sum(x * z, axis=1)
    return np.maximum(0.0, s10 / big_m + s01 / big_n + 2 * s11 / (big_m * big_n)), float(min(i10, i01) - 1)


def auc_differences(y_true, scores_a, scores_b, groups=None) -> AUCDifferences:
    """AUC differences of paired scores, one per row of `scores_a` / `scores_b` (rows x cases; a 1-D array
    is one row), vectorised so that simulations and many comparisons run at once: DeLong's variance, or
    with `groups` (one id per case) where a group holds several cases, Obuchowski's clustered variance."""
    y = check_labels(y_true)
    a, b = _score_rows(scores_a, len(y), "scores_a"), _score_rows(scores_b, len(y), "scores_b")
    if a.shape != b.shape:
        raise RespiscanError(f"scores_a and scores_b must have the same shape; got {a.shape} and {b.shape}")
    clusters = _clusters(groups, len(y))
    auc, pos, neg = _delong_components(y, np.vstack([a, b]))
    r = len(a)
    difference = auc[:r] - auc[r:]
    # Variance of the difference = L S L' with L = (1, -1), computed from component differences so
    # that identical models give exactly zero.
    pos_d, neg_d = pos[:r] - pos[r:], neg[:r] - neg[r:]
    if clusters is None:
        variance = np.var(pos_d, axis=1, ddof=1) / pos_d.shape[1] + np.var(neg_d, axis=1, ddof=1) / neg_d.shape[1]
        method, n_groups, df = DELONG, len(y), math.inf
    else:
        variance, df = _clustered_variance(y, pos_d, neg_d, difference, *clusters)
        method, n_groups = CLUSTERED_DELONG, clusters[1]
    return AUCDifferences(method, n_groups, df, auc[:r], auc[r:], difference, np.sqrt(variance))


def delong_test(y_true, prob_a, prob_b, confidence: float = 0.95, names: tuple[str, str] = ("A", "B"),
                groups=None) -> dict:
    """Two-sided test of AUC(A) = AUC(B) for two models scored on the same cases: DeLong's, or with `groups`
    (one id per case) where a group holds several cases, Obuchowski's clustered DeLong (t reference).

    Keys: method, n, n_groups, df, auc_a, auc_b, difference (A - B), se, ci (of the difference), z (the
    difference over its se), p_value, reading, test, claim, sentence. z and p_value are None when the
    variance is zero with a nonzero difference (no test possible).
    """
    y, a = check_binary_inputs(y_true, prob_a, unit_interval=False)
    _, b = check_binary_inputs(y, prob_b, unit_interval=False)
    confidence = _check_confidence(confidence)
    result = auc_differences(y, a, b, groups)
    difference, se = float(result.difference[0]), float(result.se[0])
    p = float(result.p_values()[0])
    p = None if math.isnan(p) else p
    z = None if p is None else (difference / se if se > _NOISE else 0.0)
    quantile = stats.norm.ppf if math.isinf(result.df) else (lambda q: stats.t.ppf(q, result.df))
    half = float(quantile(0.5 + confidence / 2)) * se
    ci = (difference - half, difference + half)
    auc_a, auc_b = float(result.auc_a[0]), float(result.auc_b[0])
    where = "" if math.isinf(result.df) else f", {result.n_groups} groups of {len(y)} cases, t with {result.df:g} df"
    reading = (f"AUC {auc_a:.3f} ({names[0]}) vs {auc_b:.3f} ({names[1]}): difference {difference:.3f} "
               f"({100 * confidence:g}% CI {ci[0]:.3f} to {ci[1]:.3f})")
    test = (f"{_format_p(p)} ({result.method}{where})" if p is not None
            else f"no {result.method} test possible (zero variance)")
    return _finish({"method": result.method, "n": len(y), "n_groups": result.n_groups,
                    "df": None if math.isinf(result.df) else result.df, "auc_a": auc_a, "auc_b": auc_b,
                    "difference": difference, "se": se, "ci": ci, "z": z, "p_value": p},
                   reading, test, _claim(difference, names, "better"), confidence)


# --- McNemar ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccuracyDifferences:
    """Discordant counts and McNemar-type tests for rows of paired 0/1 predictions (one entry per row)."""
    clustered: bool
    n_groups: int
    b: np.ndarray  # cases only A got right
    c: np.ndarray  # cases only B got right
    exact: np.ndarray  # plain McNemar: the exact binomial test ran (b + c < 25)
    statistic: np.ndarray
    p_value: np.ndarray


def durkalski_statistic(discordance: np.ndarray, index: np.ndarray, n_groups: int) -> np.ndarray:
    """Durkalski et al.'s (2003) clustered McNemar chi-square (1 df) per row of `discordance` (+1 where only A
    is right, -1 where only B is, else 0; rows x cases): with d_k = (b_k - c_k) / n_k per group (n_k the
    group's cases), (sum d_k)^2 / sum d_k^2; 0 without discordant cases. With singleton groups it is
    McNemar's (b - c)^2 / (b + c) without continuity correction."""
    onehot = np.zeros((discordance.shape[-1], n_groups))
    onehot[np.arange(len(index)), index] = 1.0
    d = np.atleast_2d(discordance) @ onehot / onehot.sum(axis=0)
    denominator = np.sum(d * d, axis=1)
    return np.where(denominator > 0, d.sum(axis=1) ** 2 / np.where(denominator > 0, denominator, 1.0), 0.0)


def accuracy_differences(y_true, pred_a, pred_b, groups=None) -> AccuracyDifferences:
    """McNemar tests of paired 0/1 predictions, one per row of `pred_a` / `pred_b` (rows x cases; a 1-D array
    is one row), vectorised like auc_differences. Without groups (or with singleton groups): McNemar's exact
    binomial test where b + c < 25, else chi-square with continuity correction, as statsmodels computes
    them. With `groups` where a group holds several cases: Durkalski's clustered chi-square."""
    y = check_labels(y_true)
    pa, pb = (_score_rows(v, len(y), name) for v, name in ((pred_a, "pred_a"), (pred_b, "pred_b")))
    if pa.shape != pb.shape or not (np.isin(pa, (0, 1)).all() and np.isin(pb, (0, 1)).all()):
        raise RespiscanError(f"pred_a and pred_b must be 0/1 predictions of one shape; got {pa.shape} and {pb.shape}")
    right_a, right_b = pa == y, pb == y
    b, c = np.sum(right_a & ~right_b, axis=1), np.sum(~right_a & right_b, axis=1)
    clusters = _clusters(groups, len(y))
    exact = np.zeros(len(b), dtype=bool)
    if clusters is None:
        exact = b + c < _MCNEMAR_EXACT_BELOW
        corrected = (np.abs(b - c) - 1.0) ** 2 / np.maximum(b + c, 1)
        statistic = np.where(exact, np.minimum(b, c), corrected).astype(float)
        p = np.where(exact, np.minimum(1.0, 2 * stats.binom.cdf(np.minimum(b, c), b + c, 0.5)),
                     stats.chi2.sf(corrected, 1))
        n_groups = len(y)
    else:
        statistic = durkalski_statistic(right_a.astype(float) - right_b, *clusters)
        p, n_groups = stats.chi2.sf(statistic, 1), clusters[1]
    return AccuracyDifferences(clusters is not None, n_groups, b, c, exact, statistic, p)


def mcnemar_test(y_true, pred_a, pred_b, confidence: float = 0.95, names: tuple[str, str] = ("A", "B"),
                 groups=None) -> dict:
    """Test of equal accuracy for two models' 0/1 predictions on the same cases.

    Only discordant cases carry information: b = A right and B wrong, c = A wrong and B right. Without
    groups: McNemar's exact binomial test when b + c < 25, else chi-square with continuity correction.
    With `groups` where a group holds several cases: Durkalski's clustered chi-square.
    Keys: method, n, n_groups, both_correct, b, c, both_wrong, accuracy_a, accuracy_b, statistic, p_value,
    reading, test, claim, sentence.
    """
    y, pa, pb = check_labels(y_true), check_labels(pred_a, "pred_a"), check_labels(pred_b, "pred_b")
    if not len(y) == len(pa) == len(pb):
        raise RespiscanError(f"y_true, pred_a and pred_b must have equal length; got {len(y)}, {len(pa)} and {len(pb)}")
    confidence = _check_confidence(confidence)
    result = accuracy_differences(y, pa, pb, groups)
    b, c = int(result.b[0]), int(result.c[0])
    if result.clustered:
        method = f"{CLUSTERED_MCNEMAR}, {result.n_groups} groups of {len(y)} cases"
    else:
        method = f"McNemar, {'exact' if result.exact[0] else 'chi-square'}"
    right_a, right_b = pa == y, pb == y
    accuracy_a, accuracy_b = float(right_a.mean()), float(right_b.mean())
    p = float(result.p_value[0])
    reading = (f"Accuracy {accuracy_a:.3f} ({names[0]}) vs {accuracy_b:.3f} ({names[1]}): {b} cases only "
               f"{names[0]} got right, {c} only {names[1]}")
    return _finish({"method": method, "n": len(y), "n_groups": result.n_groups,
                    "both_correct": int(np.sum(right_a & right_b)), "b": b, "c": c,
                    "both_wrong": int(np.sum(~right_a & ~right_b)), "accuracy_a": accuracy_a,
                    "accuracy_b": accuracy_b, "statistic": float(result.statistic[0]), "p_value": p},
                   reading, f"{_format_p(p)} ({method})", _claim(b - c, names, "more accurate"), confidence)


# --- Repeated runs ------------------------------------------------------------------------------------

def _runs(values, name: str) -> np.ndarray:
    runs = np.asarray(values, dtype=float)
    if runs.ndim != 1 or len(runs) < 2 or not np.isfinite(runs).all():
        raise RespiscanError(f"{name} needs at least 2 finite values (one per run); got {values!r}")
    return runs


def mean_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student-t CI of the mean over runs (seeds): the spread that training randomness alone gives."""
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    mean = float(np.mean(values))
    return mean - float(half), mean + float(half)


def friedman_over_runs(metric_by_config: dict[str, list[float]], confidence: float = 0.95,
                       metric: str = "metric") -> dict:
    """Friedman test: do configurations differ in a metric, with each seed as a block? Run i of every
    configuration shares seed i (and its embedding models), so configurations are ranked within each seed,
    which removes the seed-to-seed spread that a one-way ANOVA would count as noise.

    Keys: method, n_runs, statistic, p_value (None when every seed ties all configurations), min_p (the
    smallest p the chi-square approximation can give with this many seeds), mean_rank (1 = highest),
    per_config {name: {n, mean, sd, ci}}, note, reading, test, claim, sentence.
    """
    confidence = _check_confidence(confidence)
    if len(metric_by_config) < 3:
        raise RespiscanError(f"the Friedman test needs at least 3 configurations; got {len(metric_by_config)}")
    runs = {name: _runs(values, f"configuration {name!r}") for name, values in metric_by_config.items()}
    n = {len(v) for v in runs.values()}
    if len(n) != 1:
        raise RespiscanError(f"every configuration needs one value per seed; got {sorted(n)} values")
    n_runs, k = n.pop(), len(runs)
    table = np.column_stack(list(runs.values()))  # seeds x configurations
    mean_rank = dict(zip(runs, stats.rankdata(-table, axis=1).mean(axis=0).tolist()))
    per_config = {name: {"n": n_runs, "mean": float(v.mean()), "sd": float(np.std(v, ddof=1)),
                         "ci": mean_ci(v, confidence)} for name, v in runs.items()}
    best = max(per_config, key=lambda name: per_config[name]["mean"])
    min_p = float(stats.chi2.sf(n_runs * (k - 1), k - 1))  # every seed ranks the configurations alike
    note = (f"With {n_runs} seeds the Friedman test cannot reach the {_level(confidence)} level (smallest "
            f"possible p = {min_p:.3f}); more seeds are needed to show a difference."
            if min_p >= 1 - confidence else "")
    ranks = ", ".join(f"{name} {r:.2f}" for name, r in mean_rank.items())
    reading = (f"Mean rank of {metric} within each of {n_runs} seeds (1 = highest): {ranks}; highest mean: "
               f"{best} ({per_config[best]['mean']:.3f})")
    result = {"method": FRIEDMAN, "n_runs": n_runs, "statistic": None, "p_value": None, "min_p": min_p,
              "mean_rank": mean_rank, "per_config": per_config}
    if np.all(np.ptp(table, axis=1) <= _NOISE):
        return _finish(result, reading, f"no Friedman test possible (every seed gave all configurations the same "
                                        f"{metric})", None, confidence)
    statistic, p = (float(v) for v in stats.friedmanchisquare(*runs.values()))
    result.update(statistic=statistic, p_value=p)
    return _finish(result, reading, f"chi-square {statistic:.2f}, {_format_p(p)} ({FRIEDMAN})",
                   f"the {k} configurations differ in {metric}", confidence, note)


def wilcoxon_min_p(n: int) -> float:
    """Smallest two-sided p of the exact Wilcoxon signed-rank test with n nonzero differences: 2 / 2^n."""
    return 2.0 / 2 ** n


def paired_runs_test(a: list[float], b: list[float], confidence: float = 0.95,
                     names: tuple[str, str] = ("A", "B"), metric: str = "metric") -> dict:
    """Paired comparison of two configurations run with the same seeds (run i of a pairs with run i of b).

    The verdict follows the paired t-test. The Wilcoxon signed-rank test is added as a check that does not
    assume normal differences, but only where it can reach the level: with n runs its smallest two-sided
    p is 2 / 2^n (0.0625 for 5 runs), and below that a plain note says so instead.
    Keys: method, n, mean_a, mean_b, mean_difference (a - b), ci (t-CI of the mean difference: training
    randomness), t_statistic, t_p_value, wilcoxon_statistic, wilcoxon_p_value, p_value, note, reading, test,
    claim, sentence. The t-test is None when all differences are equal; p_value then falls back to Wilcoxon.
    """
    confidence = _check_confidence(confidence)
    a, b = _runs(a, "a"), _runs(b, "b")
    if len(a) != len(b):
        raise RespiscanError(f"paired runs need equal lengths; got {len(a)} and {len(b)}")
    difference = np.where(np.abs(a - b) <= _NOISE, 0.0, a - b)
    mean_difference = float(difference.mean())
    ci = mean_ci(difference, confidence)
    t_stat = t_p = w_stat = w_p = None
    if np.ptp(difference) > _NOISE:  # the paired t-test is the one-sample t-test of the differences
        t_stat, t_p = (float(v) for v in stats.ttest_1samp(difference, 0.0))
    nonzero = int(np.count_nonzero(difference))
    note = ""
    if nonzero and wilcoxon_min_p(nonzero) < 1 - confidence:
        w_stat, w_p = (float(v) for v in stats.wilcoxon(difference))
    elif nonzero:
        runs = f"{nonzero} runs" if nonzero == len(difference) else f"{nonzero} runs that differ (of {len(difference)})"
        note = (f"Wilcoxon signed-rank not run: with {runs} its smallest two-sided p is 2/2^{nonzero} = "
                f"{wilcoxon_min_p(nonzero):.3f}, which cannot reach the {_level(confidence)} level.")
    p, method = (t_p, "paired t-test") if t_p is not None else (w_p, "Wilcoxon signed-rank")
    parts = [f"{label} {_format_p(q)}" for label, q in (("paired t-test", t_p), ("Wilcoxon signed-rank", w_p))
             if q is not None]
    test = ", ".join(parts) or "no test possible (all differences equal)"
    reading = (f"Mean {metric} {a.mean():.3f} ({names[0]}) vs {b.mean():.3f} ({names[1]}) over {len(a)} paired "
               f"runs: difference {mean_difference:.3f} ({100 * confidence:g}% CI over seeds, training "
               f"randomness: {ci[0]:.3f} to {ci[1]:.3f})")
    result = {"method": method, "n": len(a), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
              "mean_difference": mean_difference, "ci": ci, "t_statistic": t_stat, "t_p_value": t_p,
              "wilcoxon_statistic": w_stat, "wilcoxon_p_value": w_p, "p_value": p}
    return _finish(result, reading, test, _claim(mean_difference, names, f"higher in {metric}"), confidence, note)


# --- Multiplicity -------------------------------------------------------------------------------------

def holm(results: list[dict], confidence: float = 0.95) -> list[dict]:
    """Holm's step-down correction over a family of results from this module (statsmodels multipletests).

    Each result with a p-value gets p_holm and family_size, and a sentence whose verdict follows the adjusted
    p, so that a family of many tests does not produce "significant" findings by chance alone. Results
    without a p-value (no test possible) are not part of the family and are returned unchanged.
    """
    confidence = _check_confidence(confidence)
    tested = [i for i, r in enumerate(results) if r.get("p_value") is not None]
    out = [dict(r) for r in results]
    if not tested:
        return out
    adjusted = multipletests([results[i]["p_value"] for i in tested], alpha=1 - confidence, method="holm")[1]
    for i, p_holm in zip(tested, adjusted):
        r = out[i]
        r.update(p_holm=float(p_holm), family_size=len(tested))
        r["sentence"] = _sentence(r["reading"], f"{r['test']}; Holm-adjusted {_format_p(float(p_holm))} over "
                                  f"{len(tested)} tests", _verdict(float(p_holm), r["claim"], confidence), r["note"])
    return out
