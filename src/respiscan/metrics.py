"""Binary classification metrics for COVID (label 1, the positive class) vs Non_COVID (label 0).

Sensitivity is the share of COVID cases caught, TP / (TP + FN); specificity the share of Non_COVID cases
cleared, TN / (TN + FP). The reference research code had the two swapped; the tests pin the orientation
to hand-computed confusion matrices.

A metric that is undefined on the given data (e.g. an AUC when y_true holds one class, PPV when nothing is
predicted positive) is reported as None with a sentence in `warnings`, never as NaN, an exception or a
scikit-learn warning, so that reports stay JSON-serialisable and honest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score

from respiscan.calibration import (
    EPS,
    Calibration,
    CalibrationMethod,
    OperatingPoint,
    ScoreCounts,
    floor_scores,
    thresholds_for,
)
from respiscan.errors import RespiscanError

SCALAR_METRICS = (
    "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "mcc",
    "roc_auc", "pr_auc", "brier", "ece",
)
_LABELS = {
    "balanced_accuracy": "balanced accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
    "ppv": "PPV", "npv": "NPV", "f1": "F1", "mcc": "MCC", "roc_auc": "ROC AUC", "pr_auc": "PR AUC",
}
# Why a metric can be undefined, in the order the explanation is looked for; f1 needs both "no_pos" and
# "no_pred_pos", and "no_pos" is then the first active cause.
_CAUSES = {
    "sensitivity": ("no_pos",), "specificity": ("no_neg",), "balanced_accuracy": ("no_pos", "no_neg"),
    "ppv": ("no_pred_pos",), "npv": ("no_pred_neg",), "f1": ("no_pos",),
    "mcc": ("no_pos", "no_neg", "no_pred_pos", "no_pred_neg"),
    "roc_auc": ("no_pos", "no_neg"), "pr_auc": ("no_pos", "no_neg"),
}
ECE_BINS = 10
_MIN_DEFINED_FRACTION = 0.5  # bootstrap: a CI from fewer defined resamples would be conditioned on luck
N_RESAMPLES = 2000  # bootstrap resamples: enough for stable BCa bounds at 95 %
_JACKKNIFE_UNITS = 200  # BCa acceleration: beyond this many groups, leave out blocks of groups instead
# Binned ECE gets no bootstrap interval: it is biased upward and not smooth where a bin's gap is near 0, so its
# resamples sit above the estimate and neither BCa nor percentile intervals cover the true ECE (simulated at
# n = 200: 0 % and 0 % coverage at a true ECE of 0.016, 49 % and 1 % at 0.048). Consistency resampling
# (`ece_if_calibrated`) is the valid inference for it.
_NOT_BOOTSTRAPPED = frozenset({"ece"})


def check_labels(values, name: str = "y_true") -> np.ndarray:
    """A non-empty 1-D array of 0 (Non_COVID) / 1 (COVID) labels, as int64."""
    labels = np.asarray(values)
    if labels.ndim != 1 or len(labels) == 0:
        raise RespiscanError(f"{name} must be a non-empty 1-D array; got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        found = sorted(set(labels.tolist()))[:5]
        raise RespiscanError(f"{name} must hold only 0 (Non_COVID) and 1 (COVID); found {found}")
    return labels.astype(np.int64)


def check_binary_inputs(y_true, prob, unit_interval: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and finite scores of equal length; scores must be probabilities unless
    `unit_interval` is False (rank-based statistics accept any score)."""
    y = check_labels(y_true)
    p = np.asarray(prob, dtype=float)
    if p.shape != y.shape:
        raise RespiscanError(f"y_true has shape {y.shape} but the scores have shape {p.shape}")
    if not np.isfinite(p).all():
        raise RespiscanError("scores must be finite numbers")
    if unit_interval and not ((p >= 0).all() and (p <= 1).all()):
        raise RespiscanError("prob must hold probabilities in [0, 1]")
    return y, p


def _check_n_bins(n_bins: int) -> None:
    if int(n_bins) != n_bins or n_bins < 1:
        raise RespiscanError(f"n_bins must be a positive integer, got {n_bins!r}")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den is 0 (undefined, turned into None at the edge)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den != 0)


def _count_metrics(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """Every confusion-matrix metric, elementwise, so point estimates and bootstrap share one formula."""
    tp, fp, fn, tn = (np.asarray(v, dtype=float) for v in (tp, fp, fn, tn))
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    margins = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": _ratio(tp * tn - fp * fn, np.sqrt(margins)),
    }


def _bin_index(prob: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins [0, 1/k), ..., [(k-1)/k, 1]; prob = 1 falls in the last bin."""
    return np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)


def _calibration_sums(y: np.ndarray, prob: np.ndarray, weights: np.ndarray, n_bins: int):
    """Per bin and per weight row: total weight, weighted sum of prob, weighted sum of y."""
    onehot = np.zeros((len(prob), n_bins))
    onehot[np.arange(len(prob)), _bin_index(prob, n_bins)] = 1.0
    return weights @ onehot, weights @ (onehot * prob[:, None]), weights @ (onehot * y[:, None])


def _ece_from_sums(count: np.ndarray, sum_prob: np.ndarray, sum_y: np.ndarray) -> np.ndarray:
    # sum_b n_b/n * |mean_prob_b - freq_b| = sum_b |sum_prob_b - sum_y_b| / n
    return np.abs(sum_prob - sum_y).sum(axis=-1) / count.sum(axis=-1)


def expected_calibration_error(y_true, prob, n_bins: int = ECE_BINS) -> float:
    """Count-weighted mean gap between predicted probability and observed COVID rate over equal-width bins."""
    y, p = check_binary_inputs(y_true, prob)
    _check_n_bins(n_bins)
    return float(_ece_from_sums(*_calibration_sums(y, p, np.ones((1, len(p))), n_bins))[0])


def reliability_curve(y_true, prob, n_bins: int = ECE_BINS) -> dict[str, list[float] | list[int]]:
    """Data for a reliability diagram: `bin_edges` (all bins) and, for the non-empty bins only,
    `bin_centre`, `mean_prob`, `frequency` (observed COVID rate) and `count`."""
    y, p = check_binary_inputs(y_true, prob)
    _check_n_bins(n_bins)
    count, sum_prob, sum_y = (a[0] for a in _calibration_sums(y, p, np.ones((1, len(p))), n_bins))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    used = count > 0
    return {
        "bin_edges": edges.tolist(),
        "bin_centre": ((edges[:-1] + edges[1:]) / 2)[used].tolist(),
        "mean_prob": (sum_prob[used] / count[used]).tolist(),
        "frequency": (sum_y[used] / count[used]).tolist(),
        "count": count[used].astype(int).tolist(),
    }


def _undefined_warnings(values: dict[str, float | None], active: dict[str, bool], threshold: float) -> list[str]:
    """One sentence per cause, naming every metric that it leaves undefined."""
    reasons = {
        "no_pos": "y_true has no COVID (positive) cases",
        "no_neg": "y_true has no Non_COVID (negative) cases",
        "no_pred_pos": f"no case is predicted COVID at threshold {threshold:g}",
        "no_pred_neg": f"every case is predicted COVID at threshold {threshold:g}",
    }
    by_cause: dict[str, list[str]] = {}
    for name, causes in _CAUSES.items():
        if values[name] is None:
            cause = next(c for c in causes if active[c])
            by_cause.setdefault(cause, []).append(_LABELS[name])
    sentences = []
    for cause, labels in by_cause.items():
        listed = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
        verb = "is" if len(labels) == 1 else "are"
        sentences.append(f"{listed[0].upper()}{listed[1:]} {verb} undefined (reported as None): {reasons[cause]}.")
    return sentences


def _check_threshold(threshold: float) -> float:
    if not math.isfinite(threshold):
        raise RespiscanError(f"threshold must be a finite number, got {threshold!r}")
    return float(threshold)


def binary_metrics(y_true, prob, threshold: float = 0.5) -> dict:
    """Point estimates of every metric at `threshold` (COVID predicted when prob >= threshold).

    Keys: n, n_positive, threshold, confusion_matrix {tn, fp, fn, tp}, the SCALAR_METRICS (float or None)
    and warnings (sentences explaining each None).
    """
    y, p = check_binary_inputs(y_true, prob)
    threshold = _check_threshold(threshold)
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    both_classes = 0 < tp + fn < len(y)
    values: dict[str, float | None] = {
        name: None if np.isnan(v) else float(v) for name, v in _count_metrics(tp, fp, fn, tn).items()}
    values["roc_auc"] = float(roc_auc_score(y, p)) if both_classes else None
    values["pr_auc"] = float(average_precision_score(y, p)) if both_classes else None
    values["brier"] = float(brier_score_loss(y, p, pos_label=1))
    values["ece"] = expected_calibration_error(y, p, ECE_BINS)
    active = {"no_pos": tp + fn == 0, "no_neg": tn + fp == 0, "no_pred_pos": tp + fp == 0,
              "no_pred_neg": tn + fn == 0}
    return {
        "n": len(y),
        "n_positive": tp + fn,
        "threshold": threshold,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        **{name: values[name] for name in SCALAR_METRICS},
        "warnings": _undefined_warnings(values, active, threshold),
    }


def _weighted_metrics(y: np.ndarray, prob: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every scalar metric for each row of `weights` (resample counts per sample); NaN where undefined.

    Bootstrap resamples are weightings of the original samples, so all metrics are weighted sums: no
    per-resample Python loop and no per-resample sklearn call. Ties in prob count half, as in sklearn.
    """
    pos, neg = y.astype(float), 1.0 - y
    out = _count_metrics(weights @ (pos * pred), weights @ (neg * pred), weights @ (pos * (1 - pred)),
                         weights @ (neg * (1 - pred)))
    total = weights.sum(axis=1)
    out["brier"] = weights @ (prob - y) ** 2 / total
    out["ece"] = _ece_from_sums(*_calibration_sums(y, prob, weights, ECE_BINS))

    # Weighted positives / negatives per distinct score, scores ascending.
    order = np.argsort(prob, kind="stable")
    sorted_prob = prob[order]
    starts = np.flatnonzero(np.r_[True, sorted_prob[1:] != sorted_prob[:-1]])
    w = weights[:, order]
    pos_w = np.add.reduceat(w * pos[order], starts, axis=1)
    neg_w = np.add.reduceat(w * neg[order], starts, axis=1)
    n_pos, n_neg = pos_w.sum(axis=1), neg_w.sum(axis=1)
    # ROC AUC: P(score_pos > score_neg) + P(tie) / 2, via the negatives ranked below each positive.
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    out["roc_auc"] = _ratio((pos_w * (neg_below + neg_w / 2)).sum(axis=1), n_pos * n_neg)
    # Average precision: precision at each distinct threshold (descending) times the recall gained there.
    tp_cum = np.cumsum(pos_w[:, ::-1], axis=1)
    precision = _ratio(tp_cum, tp_cum + np.cumsum(neg_w[:, ::-1], axis=1))
    gained = (pos_w[:, ::-1] * np.nan_to_num(precision)).sum(axis=1)  # precision is only NaN where pos_w is 0
    out["pr_auc"] = np.where(n_neg > 0, _ratio(gained, n_pos), np.nan)
    return out


CIMethod = Literal["BCa", "percentile"]


@dataclass(frozen=True)
class BootstrapCI:
    """Bootstrap intervals of every scalar metric (keyed as SCALAR_METRICS; None where undefined, and always
    for ECE, which has no valid bootstrap interval) and the method that gave each: "BCa" where its bias
    correction and acceleration are defined, else "percentile"."""
    intervals: dict[str, tuple[float, float] | None]
    methods: dict[str, CIMethod | None]


def _clusters_and_strata(y: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray]:
    """Cluster index per sample (its group, or itself without groups) and stratum per cluster: 0 all
    Non_COVID, 1 all COVID, 2 both, so that every resample keeps the test set's class mix."""
    if groups is None:
        index = np.arange(len(y))
    else:
        groups = np.asarray(groups)
        if groups.shape != y.shape:
            raise RespiscanError(f"groups has shape {groups.shape} but y_true has {y.shape}")
        index = np.unique(groups, return_inverse=True)[1]
    n_clusters = int(index.max()) + 1
    positives = np.bincount(index, weights=y, minlength=n_clusters)
    sizes = np.bincount(index, minlength=n_clusters)
    return index, np.where(positives == 0, 0, np.where(positives == sizes, 1, 2))


def _jackknife_units(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Jackknife unit per cluster: the cluster itself, or beyond _JACKKNIFE_UNITS clusters random blocks of
    clusters within a stratum (about _JACKKNIFE_UNITS in all). A block's left-out sum of independent
    influences has the same expected skewness per case, so the acceleration estimate stays unbiased at a
    fraction of the cost of leaving out each of thousands of cases."""
    if len(strata) <= _JACKKNIFE_UNITS:
        return np.arange(len(strata))
    units = np.empty(len(strata), dtype=np.int64)
    first = 0
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        n_blocks = max(2, math.ceil(_JACKKNIFE_UNITS * len(members) / len(strata)))
        for block, chunk in enumerate(np.array_split(members, min(n_blocks, len(members)))):
            units[chunk] = first + block
        first += min(n_blocks, len(members))
    return units


def _metrics_by_rows(y: np.ndarray, prob: np.ndarray, pred: np.ndarray, n_rows: int,
                     rows: Callable[[int, int], np.ndarray]) -> dict[str, np.ndarray]:
    """_weighted_metrics over `n_rows` weight rows, built `rows(start, stop)` a chunk at a time, since the
    rows x samples weight matrix of thousands of resamples would not fit in memory at once."""
    chunk = max(1, 2_000_000 // len(y))
    parts = [_weighted_metrics(y, prob, pred, rows(start, min(start + chunk, n_rows)))
             for start in range(0, n_rows, chunk)]
    return {name: np.concatenate([part[name] for part in parts]) for name in SCALAR_METRICS}


def _bca_levels(draws: np.ndarray, point: float, jackknife: np.ndarray, strata: np.ndarray,
                confidence: float) -> tuple[float, float] | None:
    """The two BCa quantile levels (Efron & Tibshirani 1993, 14.3), or None where BCa is undefined: an
    undefined point, resample or leave-one-group-out value, a bootstrap distribution entirely on one side
    of the estimate, or no jackknife spread. The acceleration sums the jackknife over each stratum as
    scipy.stats.bootstrap does over its samples; ties with the estimate count half in the bias correction."""
    from scipy.special import ndtr, ndtri

    if np.isnan(point) or np.isnan(draws).any() or np.isnan(jackknife).any():
        return None
    share = (np.count_nonzero(draws < point) + np.count_nonzero(draws <= point)) / (2 * len(draws))
    if not 0 < share < 1:
        return None
    z0 = float(ndtri(share))
    numerator = denominator = 0.0
    for stratum in np.unique(strata):
        values = jackknife[strata == stratum]
        n = len(values)
        u = (n - 1) * (values.mean() - values)
        numerator += float(np.sum(u ** 3)) / n ** 3
        denominator += float(np.sum(u ** 2)) / n ** 2
    if denominator <= 1e-24:
        return None
    acceleration = numerator / (6 * denominator ** 1.5)
    levels = []
    for z in (ndtri((1 - confidence) / 2), ndtri((1 + confidence) / 2)):
        shrink = 1 - acceleration * (z0 + z)
        if shrink <= 0:
            return None
        levels.append(float(ndtr(z0 + (z0 + z) / shrink)))
    return levels[0], levels[1]


def bootstrap_ci(y_true, prob, threshold: float = 0.5, groups=None, n_resamples: int = N_RESAMPLES,
                 confidence: float = 0.95, seed: int = 0) -> BootstrapCI:
    """Bootstrap CI of every scalar metric: BCa where defined, percentile otherwise (`methods` says which).

    Resampling is stratified by class: COVID and Non_COVID cases (or groups; groups holding both classes are
    a third stratum) are drawn separately, so that every resample has the test set's class mix and the AUC
    stays defined. With `groups` (one id per sample, e.g. patient) whole groups are resampled, and the BCa
    acceleration leaves one group out at a time, since slices or views of one patient are not independent
    and treating them so gives falsely narrow intervals. Resamples where a metric is undefined are skipped
    for it (its interval is then percentile); the CI is None when fewer than half remain.
    """
    y, p = check_binary_inputs(y_true, prob)
    threshold = _check_threshold(threshold)
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise RespiscanError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise RespiscanError(f"confidence must be between 0 and 1, got {confidence!r}")
    index, strata = _clusters_and_strata(y, groups)
    n_clusters = len(strata)
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    pred = (p >= threshold).astype(float)
    rng = np.random.default_rng(seed)

    def resamples(start: int, stop: int) -> np.ndarray:
        counts = np.zeros((stop - start, n_clusters))
        for cluster in members:
            counts[:, cluster] = rng.multinomial(len(cluster), np.full(len(cluster), 1.0 / len(cluster)),
                                                 size=stop - start)
        return counts[:, index]

    draws = _metrics_by_rows(y, p, pred, n_resamples, resamples)
    units = _jackknife_units(strata, rng)
    unit_of_sample = units[index]
    unit_strata = np.zeros(int(units.max()) + 1, dtype=np.int64)
    unit_strata[units] = strata

    def left_out(start: int, stop: int) -> np.ndarray:
        return (unit_of_sample[None, :] != np.arange(start, stop)[:, None]).astype(float)

    points = _weighted_metrics(y, p, pred, np.ones((1, len(y))))
    jackknife = _metrics_by_rows(y, p, pred, len(unit_strata), left_out)
    tail = (1 - confidence) / 2
    intervals: dict[str, tuple[float, float] | None] = {}
    methods: dict[str, CIMethod | None] = {}
    for name in SCALAR_METRICS:
        values = draws[name][~np.isnan(draws[name])]
        if name in _NOT_BOOTSTRAPPED or len(values) < _MIN_DEFINED_FRACTION * n_resamples:
            intervals[name], methods[name] = None, None
            continue
        levels = _bca_levels(draws[name], float(points[name][0]), jackknife[name], unit_strata, confidence)
        low, high = np.percentile(values, [100 * q for q in (levels or (tail, 1 - tail))])
        intervals[name], methods[name] = (float(low), float(high)), "BCa" if levels else "percentile"
    return BootstrapCI(intervals, methods)


def choose_threshold(y_true, prob, method: Literal["youden", "sensitivity"] = "youden",
                     target_sensitivity: float | None = None) -> float:
    """Operating threshold picked on held-out data (never the test split, or the test is biased).

    "youden": the ROC point maximising sensitivity + specificity - 1 (ties: the largest threshold).
    "sensitivity": the largest threshold whose sensitivity reaches `target_sensitivity`, e.g. for a
    screening use that must miss few COVID cases. The result is a score value, used as prob >= threshold.
    """
    y, p = check_binary_inputs(y_true, prob)
    if not 0 < y.sum() < len(y):
        raise RespiscanError("choosing a threshold needs both COVID and Non_COVID cases")
    if method == "youden":
        if target_sensitivity is not None:
            raise RespiscanError("target_sensitivity is only used with method='sensitivity'")
    elif method == "sensitivity":
        if target_sensitivity is None or not 0 < target_sensitivity <= 1:
            raise RespiscanError(f"method='sensitivity' needs target_sensitivity in (0, 1], got {target_sensitivity!r}")
    else:
        raise RespiscanError(f"unknown threshold method {method!r}; use 'youden' or 'sensitivity'")
    scores, index = np.unique(p, return_inverse=True)
    counts = [np.bincount(index, weights=w, minlength=len(scores)) for w in (y, 1 - y)]
    return float(thresholds_for(scores, *counts, OperatingPoint(method, target_sensitivity))[0])


def operating_threshold(y_true, prob, point: OperatingPoint, groups=None, n_resamples: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> ChosenThreshold:
    """`point`'s threshold on these scores, with the percentile bootstrap interval of the threshold itself
    (whole groups resampled, as in `bootstrap_ci`), and the sensitivity and specificity it reaches here."""
    y, p = check_binary_inputs(y_true, prob)
    counts = ScoreCounts.of(y, p)
    threshold = counts.threshold(point)
    scores, index = np.unique(floor_scores(p), return_inverse=True)
    group_index = np.unique(np.asarray(groups) if groups is not None else np.arange(len(y)), return_inverse=True)[1]
    n_groups = int(group_index.max()) + 1
    rng = np.random.default_rng(seed)
    onehot = np.zeros((len(y), len(scores)))
    onehot[np.arange(len(y)), index] = 1.0
    weights = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples)[:, group_index]
    drawn = thresholds_for(scores, weights @ (onehot * y[:, None]), weights @ (onehot * (1 - y)[:, None]), point)
    drawn = drawn[~np.isnan(drawn)]
    tail = 100 * (1 - confidence) / 2
    ci = (None if len(drawn) < _MIN_DEFINED_FRACTION * n_resamples
          else [float(v) for v in np.percentile(drawn, [tail, 100 - tail])])
    reached = binary_metrics(y, p, threshold)
    return ChosenThreshold(point, threshold, ci, len(y), int(y.sum()), reached["sensitivity"],
                           reached["specificity"], counts)


@dataclass(frozen=True)
class ChosenThreshold:
    point: OperatingPoint
    threshold: float
    ci: list[float] | None  # the threshold's bootstrap interval; None when too few resamples hold both classes
    n: int
    n_positive: int
    sensitivity: float | None  # reached on the images it was chosen on
    specificity: float | None
    scores: ScoreCounts


def log_loss(y_true, prob) -> float:
    """Mean negative log-likelihood of the labels (natural log); probabilities clipped to [1e-15, 1 - 1e-15]."""
    y, p = check_binary_inputs(y_true, prob)
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def ece_if_calibrated(y_true, prob, n_bins: int = ECE_BINS, draws: int = N_RESAMPLES,
                      seed: int = 0) -> dict[str, float]:
    """Consistency resampling (Broecker and Smith 2007): the ECE a perfectly calibrated model with these
    probabilities would show on this many images, drawing each label as Bernoulli(p). On a few hundred test
    images that floor is itself several points, so an observed ECE is read against it: `mean` and `q95` of the
    drawn ECEs, and `p_value`, the share of draws at least as far off as the observed one (small: miscalibrated)."""
    y, p = check_binary_inputs(y_true, prob)
    _check_n_bins(n_bins)
    labels = (np.random.default_rng(seed).random((draws, len(p))) < p).astype(float)
    onehot = np.zeros((len(p), n_bins))
    onehot[np.arange(len(p)), _bin_index(p, n_bins)] = 1.0
    drawn = np.abs(p @ onehot - labels @ onehot).sum(axis=1) / len(p)
    observed = expected_calibration_error(y, p, n_bins)
    return {"mean": float(drawn.mean()), "q95": float(np.quantile(drawn, 0.95)),
            "p_value": float((1 + (drawn >= observed - 1e-12).sum()) / (draws + 1))}


def calibration_scores(y_true, prob) -> dict:
    """The calibration measures evaluate reports before and after calibration (lower is better), with the ECE
    a perfectly calibrated model would show on the same images (`ece_if_calibrated`)."""
    y, p = check_binary_inputs(y_true, prob)
    return {"ece": expected_calibration_error(y, p), "brier": float(brier_score_loss(y, p, pos_label=1)),
            "log_loss": log_loss(y, p), "ece_if_calibrated": ece_if_calibrated(y, p)}


def fit_calibration(y_true, prob, method: CalibrationMethod = "platt", fitted_on: str = "") -> Calibration:
    """A calibration map fitted on held-out (y, p): "platt" (slope and intercept on the logit) or "temperature"
    (slope only). Both use Platt's smoothed targets, (n+ + 1) / (n+ + 2) and 1 / (n- + 2), so that a small or
    separable calibration set cannot drive the map to infinite confidence. A Platt fit that would invert the
    ranking (slope <= 0: the model is worse than chance on these images) falls back to temperature scaling."""
    from scipy.optimize import minimize, minimize_scalar

    y, p = check_binary_inputs(y_true, prob)
    n_pos, n = int(y.sum()), len(y)
    if not 0 < n_pos < n:
        raise RespiscanError("fitting a calibration needs both COVID and Non_COVID cases")
    if method == "identity":
        return Calibration("identity", fitted_on=fitted_on, n=n, n_positive=n_pos)
    clipped = np.clip(p, EPS, 1 - EPS)
    z = np.log(clipped) - np.log1p(-clipped)
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n - n_pos + 2))
    if method == "platt":
        # cross-entropy against the soft targets, minimised in numpy with its exact gradient: scikit-learn's
        # logistic regression sums in parallel threads, so the same data gave maps differing in the 14th digit
        def platt_loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
            logit = ab[0] * z + ab[1]
            loss = np.mean(np.logaddexp(0.0, logit) - target * logit)
            residual = 1 / (1 + np.exp(-logit)) - target
            return float(loss), np.array([np.mean(residual * z), np.mean(residual)])

        best_ab = minimize(platt_loss, np.array([1.0, 0.0]), jac=True, method="BFGS", options={"gtol": 1e-10}).x
        slope, intercept = float(best_ab[0]), float(best_ab[1])
        if slope > 0:
            return Calibration("platt", slope, intercept, fitted_on, n, n_pos)
    elif method != "temperature":
        raise RespiscanError(f"unknown calibration method {method!r}; accepted: platt, temperature, identity")

    def loss(log_slope: float) -> float:
        q = np.clip(1 / (1 + np.exp(-np.exp(log_slope) * z)), 1e-15, 1 - 1e-15)
        return float(-np.mean(target * np.log(q) + (1 - target) * np.log1p(-q)))

    best = minimize_scalar(loss, bounds=(-7.0, 7.0), method="bounded")
    return Calibration("temperature", float(np.exp(best.x)), 0.0, fitted_on, n, n_pos)


def at_prevalence(sensitivity: float | None, specificity: float | None, prevalence: float) -> dict[str, float | None]:
    """PPV and NPV at a deployment's COVID prevalence (Bayes' rule), from sensitivity and specificity, which do
    not depend on the test set's class balance (PPV and NPV measured on it do)."""
    if not 0 < prevalence < 1:
        raise RespiscanError(f"prevalence must lie strictly between 0 and 1, got {prevalence!r}")
    if sensitivity is None or specificity is None:
        return {"ppv": None, "npv": None}
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return {"ppv": tp / (tp + fp) if tp + fp > 0 else None, "npv": tn / (tn + fn) if tn + fn > 0 else None}
