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
from typing import Literal

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

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


def bootstrap_ci(y_true, prob, threshold: float = 0.5, groups=None, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap CI of every scalar metric, keyed as in SCALAR_METRICS.

    With `groups` (one id per sample, e.g. patient) whole groups are resampled, since slices or views of
    one patient are not independent and treating them so gives falsely narrow intervals. Resamples where
    a metric is undefined are skipped for it; the CI is None when fewer than half remain.
    """
    y, p = check_binary_inputs(y_true, prob)
    threshold = _check_threshold(threshold)
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise RespiscanError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise RespiscanError(f"confidence must be between 0 and 1, got {confidence!r}")
    if groups is None:
        group_index, n_groups = np.arange(len(y)), len(y)
    else:
        groups = np.asarray(groups)
        if groups.shape != y.shape:
            raise RespiscanError(f"groups has shape {groups.shape} but y_true has {y.shape}")
        _, group_index = np.unique(groups, return_inverse=True)
        n_groups = int(group_index.max()) + 1

    pred = (p >= threshold).astype(float)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(y))  # bounds memory of the resamples x samples weight matrix
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        group_counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=size)
        parts.append(_weighted_metrics(y, p, pred, group_counts[:, group_index].astype(float)))

    tail = 100 * (1 - confidence) / 2
    result: dict[str, tuple[float, float] | None] = {}
    for name in SCALAR_METRICS:
        values = np.concatenate([part[name] for part in parts])
        values = values[~np.isnan(values)]
        if len(values) < _MIN_DEFINED_FRACTION * n_resamples:
            result[name] = None
        else:
            low, high = np.percentile(values, [tail, 100 - tail])
            result[name] = (float(low), float(high))
    return result


def choose_threshold(y_true, prob, method: Literal["youden", "sensitivity"] = "youden",
                     target_sensitivity: float | None = None) -> float:
    """Operating threshold picked on the validation split (never the test split, or the test is biased).

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
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    # Index 0 is sklearn's "predict nothing" point at threshold inf; thresholds decrease from there.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if method == "youden":
        youden = np.round(tpr - fpr, 12)  # .8 - .2 and .6 - 0 must tie, so the largest threshold wins
        return float(thresholds[np.argmax(youden)])
    return float(thresholds[np.argmax(tpr >= target_sensitivity)])
