"""Statistical comparisons of models: DeLong for AUCs, McNemar for paired predictions, and tests over
repeated training runs (seeds). Every result carries a `sentence`, a plain-English one-line reading,
so that reports state what a p-value means instead of leaving it to the reader.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from respiscan.errors import RespiscanError
from respiscan.metrics import check_binary_inputs, check_labels

_NOISE = 1e-12  # a standard error or spread below this is rounding noise: treated as zero
_MCNEMAR_EXACT_BELOW = 25  # discordant pairs; the chi-square approximation is poor for fewer


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise RespiscanError(f"confidence must be between 0 and 1, got {confidence!r}")
    return float(confidence)


def _format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _level(confidence: float) -> str:
    return f"{100 * (1 - confidence):g}%"


def _verdict(difference: float, p: float | None, names: tuple[str, str], confidence: float, better: str) -> str:
    """'A is better at the 5% level' or 'no significant difference at the 5% level'."""
    if p is None:
        return "no conclusion can be drawn"
    if p >= 1 - confidence or difference == 0:
        return f"no significant difference at the {_level(confidence)} level"
    winner = names[0] if difference > 0 else names[1]
    return f"{winner} is {better} at the {_level(confidence)} level"


def _normal_p(difference: float, se: float) -> tuple[float | None, float | None]:
    """Two-sided z-test; z = 0, p = 1 for no difference and no variance (identical inputs), None when
    the variance is zero but the difference is not (degenerate data, no test possible)."""
    if se > _NOISE:
        z = difference / se
        return z, float(2 * stats.norm.sf(abs(z)))
    return (0.0, 1.0) if difference == 0 else (None, None)


# --- DeLong -------------------------------------------------------------------------------------------

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


def _delong_variance(pos: np.ndarray, neg: np.ndarray) -> float:
    """DeLong variance of an AUC from its components; of an AUC difference from component differences."""
    return float(np.var(pos, ddof=1) / len(pos) + np.var(neg, ddof=1) / len(neg))


def delong_test(y_true, prob_a, prob_b, confidence: float = 0.95, names: tuple[str, str] = ("A", "B")) -> dict:
    """Two-sided DeLong test of AUC(A) = AUC(B) for two models scored on the same cases.

    Keys: auc_a, auc_b, difference (A - B), se, ci (of the difference), z, p_value, sentence.
    z and p_value are None when the variance is zero with a nonzero difference (no test possible).
    """
    y, a = check_binary_inputs(y_true, prob_a, unit_interval=False)
    _, b = check_binary_inputs(y, prob_b, unit_interval=False)
    confidence = _check_confidence(confidence)
    auc, pos, neg = _delong_components(y, np.vstack([a, b]))
    difference = float(auc[0] - auc[1])
    # Variance of the difference = L S L' with L = (1, -1), computed from component differences so
    # that identical models give exactly zero.
    se = math.sqrt(_delong_variance(pos[0] - pos[1], neg[0] - neg[1]))
    z, p = _normal_p(difference, se)
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * se
    ci = (difference - half, difference + half)
    return {
        "auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": difference, "se": se, "ci": ci,
        "z": z, "p_value": p,
        "sentence": (
            f"AUC {auc[0]:.3f} ({names[0]}) vs {auc[1]:.3f} ({names[1]}): difference {difference:.3f} "
            f"({100 * confidence:g}% CI {ci[0]:.3f} to {ci[1]:.3f}), "
            + (f"{_format_p(p)} (DeLong)" if p is not None else "no DeLong test possible (zero variance)")
            + f": {_verdict(difference, p, names, confidence, 'better')}."),
    }


# --- McNemar ------------------------------------------------------------------------------------------

def mcnemar_test(y_true, pred_a, pred_b, confidence: float = 0.95, names: tuple[str, str] = ("A", "B")) -> dict:
    """McNemar test of equal accuracy for two models' 0/1 predictions on the same cases.

    Only discordant cases carry information: b = A right and B wrong, c = A wrong and B right. Exact
    binomial test when b + c < 25, else chi-square with continuity correction (statsmodels).
    Keys: n, both_correct, b, c, both_wrong, accuracy_a, accuracy_b, exact, statistic, p_value, sentence.
    """
    y, pa, pb = check_labels(y_true), check_labels(pred_a, "pred_a"), check_labels(pred_b, "pred_b")
    if not len(y) == len(pa) == len(pb):
        raise RespiscanError(f"y_true, pred_a and pred_b must have equal length; got {len(y)}, {len(pa)} and {len(pb)}")
    right_a, right_b = pa == y, pb == y
    confidence = _check_confidence(confidence)
    table = np.array([[np.sum(right_a & right_b), np.sum(right_a & ~right_b)],
                      [np.sum(~right_a & right_b), np.sum(~right_a & ~right_b)]])
    b, c = int(table[0, 1]), int(table[1, 0])
    exact = b + c < _MCNEMAR_EXACT_BELOW
    result = mcnemar(table, exact=exact, correction=True)
    p = float(result.pvalue)
    accuracy_a, accuracy_b = float(right_a.mean()), float(right_b.mean())
    return {
        "n": len(y), "both_correct": int(table[0, 0]), "b": b, "c": c, "both_wrong": int(table[1, 1]),
        "accuracy_a": accuracy_a, "accuracy_b": accuracy_b, "exact": exact,
        "statistic": float(result.statistic), "p_value": p,
        "sentence": (
            f"Accuracy {accuracy_a:.3f} ({names[0]}) vs {accuracy_b:.3f} ({names[1]}): {b} cases only "
            f"{names[0]} got right, {c} only {names[1]}, {_format_p(p)} "
            f"(McNemar, {'exact' if exact else 'chi-square'}): "
            f"{_verdict(b - c, p, names, confidence, 'more accurate')}."),
    }


# --- Repeated runs ------------------------------------------------------------------------------------

def _runs(values, name: str) -> np.ndarray:
    runs = np.asarray(values, dtype=float)
    if runs.ndim != 1 or len(runs) < 2 or not np.isfinite(runs).all():
        raise RespiscanError(f"{name} needs at least 2 finite values (one per run); got {values!r}")
    return runs


def mean_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student-t CI of the mean over runs (seeds)."""
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    mean = float(np.mean(values))
    return mean - float(half), mean + float(half)


def anova_over_runs(metric_by_config: dict[str, list[float]], confidence: float = 0.95,
                    metric: str = "metric") -> dict:
    """One-way ANOVA: does the mean of a metric over runs differ between configurations?

    Keys: f_statistic, p_value (None when every run within each configuration gave the same value),
    per_config {name: {n, mean, sd, ci}}, sentence.
    """
    confidence = _check_confidence(confidence)
    if len(metric_by_config) < 2:
        raise RespiscanError("ANOVA needs at least 2 configurations")
    runs = {name: _runs(values, f"configuration {name!r}") for name, values in metric_by_config.items()}
    per_config = {name: {"n": len(v), "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)),
                         "ci": mean_ci(v, confidence)} for name, v in runs.items()}
    best = max(per_config, key=lambda name: per_config[name]["mean"])
    best_text = (f"highest mean {metric}: {best} ({per_config[best]['mean']:.3f}, {100 * confidence:g}% CI "
                 f"{per_config[best]['ci'][0]:.3f} to {per_config[best]['ci'][1]:.3f})")
    if all(np.ptp(v) <= _NOISE for v in runs.values()):
        return {"f_statistic": None, "p_value": None, "per_config": per_config,
                "sentence": f"No ANOVA possible: every run within each configuration gave the same {metric}; "
                            f"{best_text}."}
    f, p = (float(v) for v in stats.f_oneway(*runs.values()))
    differs = "differs" if p < 1 - confidence else "does not differ significantly"
    return {
        "f_statistic": f, "p_value": p, "per_config": per_config,
        "sentence": (f"Mean {metric} {differs} between the {len(runs)} configurations at the "
                     f"{_level(confidence)} level (one-way ANOVA F = {f:.2f}, {_format_p(p)}); {best_text}."),
    }


def paired_runs_test(a: list[float], b: list[float], confidence: float = 0.95,
                     names: tuple[str, str] = ("A", "B"), metric: str = "metric") -> dict:
    """Paired comparison of two configurations run with the same seeds (run i of a pairs with run i of b).

    Keys: n, mean_a, mean_b, mean_difference (a - b), ci (t-CI of the mean difference), t_statistic,
    t_p_value, wilcoxon_statistic, wilcoxon_p_value, sentence. The tests are None when all differences
    are equal (t-test) or all zero (Wilcoxon); the verdict follows the t-test, else the Wilcoxon test.
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
    if np.any(difference != 0):
        w_stat, w_p = (float(v) for v in stats.wilcoxon(difference))
    tests = ", ".join(f"{label} {_format_p(p)}" for label, p in (("paired t-test", t_p), ("Wilcoxon", w_p))
                      if p is not None) or "no test possible (all differences equal)"
    verdict = _verdict(mean_difference, t_p if t_p is not None else w_p, names, confidence, f"higher in {metric}")
    return {
        "n": len(a), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_difference": mean_difference,
        "ci": ci, "t_statistic": t_stat, "t_p_value": t_p, "wilcoxon_statistic": w_stat, "wilcoxon_p_value": w_p,
        "sentence": (f"Mean {metric} {a.mean():.3f} ({names[0]}) vs {b.mean():.3f} ({names[1]}) over {len(a)} "
                     f"paired runs: difference {mean_difference:.3f} ({100 * confidence:g}% CI {ci[0]:.3f} to "
                     f"{ci[1]:.3f}), {tests}: {verdict}."),
    }
