"""Calibration maps and operating points: how a bundle turns a network's p(COVID) into a calibrated probability
and a label.

numpy only, because the ONNX engine applies them without torch, scipy or scikit-learn; fitting a map and the
bootstrap of a threshold (metrics.py) use scikit-learn. An operating point is a rule (Youden's J, a target
sensitivity or specificity) applied to scores of images that chose nothing else; the bundle keeps those scores
compactly (`ScoreCounts`, the ROC), so that `predict --operating-point` can apply another rule to the same images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from respiscan.errors import RespiscanError

CalibrationMethod = Literal["platt", "temperature", "identity"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
Rule = Literal["youden", "sensitivity", "specificity"]
RULES: tuple[str, ...] = get_args(Rule)
EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before the logit: float32 graphs round to 0 and 1
SCORE_DECIMALS = 5  # stored scores are floored to this grid: p >= t for a grid t is unchanged by the flooring


@dataclass(frozen=True)
class Calibration:
    """p_calibrated = sigmoid(slope * logit(p) + intercept): Platt scaling; temperature scaling is slope 1/T with
    intercept 0, identity slope 1 with intercept 0. Both are monotone (slope > 0), so no ranking or AUC changes."""

    method: CalibrationMethod
    slope: float = 1.0
    intercept: float = 0.0
    fitted_on: str = ""  # which images, how many
    n: int = 0
    n_positive: int = 0

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise RespiscanError(f"unknown calibration method {self.method!r}; accepted: "
                                 f"{', '.join(CALIBRATION_METHODS)}")
        if not (math.isfinite(self.slope) and self.slope > 0 and math.isfinite(self.intercept)):
            raise RespiscanError(f"calibration slope must be positive and finite, intercept finite; got "
                                 f"{self.slope!r}, {self.intercept!r}")

    def apply(self, prob) -> np.ndarray:
        p = np.asarray(prob, dtype=np.float64)
        if self.method == "identity":
            return p
        p = np.clip(p, EPS, 1 - EPS)
        z = self.slope * (np.log(p) - np.log1p(-p)) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


IDENTITY = Calibration("identity", fitted_on="none: the bundle predates calibration (the network's probabilities)")


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold rule: "youden" (max sensitivity + specificity - 1), "sensitivity=T" (the largest threshold whose
    sensitivity reaches T) or "specificity=T" (the smallest threshold whose specificity stays at T or above)."""

    rule: Rule
    target: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise RespiscanError(f"unknown operating point {self.rule!r}; accepted: youden, sensitivity=T, "
                                 "specificity=T (T in (0, 1])")
        if (self.rule == "youden") != (self.target is None):
            raise RespiscanError(f"operating point {self.rule}: " + (
                "takes no target" if self.rule == "youden" else "needs a target, e.g. sensitivity=0.90"))
        if self.target is not None and not 0 < self.target <= 1:
            raise RespiscanError(f"operating point {self.rule}={self.target:g}: the target must lie in (0, 1]")

    @classmethod
    def parse(cls, text: str) -> OperatingPoint:
        """"youden", "sensitivity=0.95" or "specificity=0.90"; RespiscanError in one line otherwise."""
        name, _, value = str(text).strip().lower().partition("=")
        if name not in RULES:
            raise RespiscanError(f"unknown operating point {text!r}; accepted: youden, sensitivity=T, specificity=T")
        try:
            target = float(value) if value else None
        except ValueError:
            raise RespiscanError(f"operating point {text!r}: {value!r} is not a number") from None
        return cls(name, target)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.rule if self.target is None else f"{self.rule}={self.target:g}"

    def describe(self) -> str:
        if self.rule == "youden":
            return "Youden's J (maximum sensitivity + specificity - 1)"
        if self.rule == "sensitivity":
            return f"the largest threshold reaching sensitivity {self.target:.2f}"
        return f"the smallest threshold keeping specificity at {self.target:.2f} or above"


@dataclass(frozen=True)
class ScoreCounts:
    """Scores of the images an operating point was chosen on, compactly: each distinct score (floored to
    SCORE_DECIMALS), ascending, with its COVID and Non_COVID counts. This is the whole ROC of those images."""

    scores: list[float]
    positives: list[int]
    negatives: list[int]

    def __post_init__(self) -> None:
        if not len(self.scores) == len(self.positives) == len(self.negatives):
            raise RespiscanError("scores, positives and negatives must have the same length")

    @classmethod
    def of(cls, y_true, prob) -> ScoreCounts:
        y, p = np.asarray(y_true, dtype=np.int64), floor_scores(prob)
        scores, index = np.unique(p, return_inverse=True)
        return cls(scores.tolist(), np.bincount(index, weights=y, minlength=len(scores)).astype(int).tolist(),
                   np.bincount(index, weights=1 - y, minlength=len(scores)).astype(int).tolist())

    def threshold(self, point: OperatingPoint) -> float:
        """The threshold `point` gives on these images; RespiscanError when they lack a class."""
        if not (sum(self.positives) and sum(self.negatives)):
            raise RespiscanError("choosing a threshold needs both COVID and Non_COVID cases")
        return float(thresholds_for(np.asarray(self.scores), np.asarray(self.positives)[None],
                                    np.asarray(self.negatives)[None], point)[0])


def floor_scores(prob) -> np.ndarray:
    scale = 10.0 ** SCORE_DECIMALS
    return np.floor(np.asarray(prob, dtype=np.float64) * scale + 1e-9) / scale


def thresholds_for(scores: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
                   point: OperatingPoint) -> np.ndarray:
    """One threshold per row: `scores` distinct and ascending (k,), `positives`/`negatives` weights (rows, k),
    e.g. bootstrap resamples; NaN where a row lacks a class. COVID is predicted when p >= threshold.

    A score with no weight in a row is no candidate in it, so resamples choose among the scores they hold.
    """
    pos, neg = (np.atleast_2d(np.asarray(a, dtype=np.float64))[:, ::-1] for a in (positives, negatives))
    desc = np.asarray(scores, dtype=np.float64)[::-1]
    n_pos, n_neg = pos.sum(axis=1, keepdims=True), neg.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr, fpr = np.cumsum(pos, axis=1) / n_pos, np.cumsum(neg, axis=1) / n_neg
    present = (pos + neg) > 0
    if point.rule == "youden":
        # rounded so that .8 - .2 and .6 - 0 tie; argmax takes the first, the largest threshold
        index = np.argmax(np.where(present, np.round(tpr - fpr, 12), -np.inf), axis=1)
        chosen = desc[index]
    elif point.rule == "sensitivity":
        chosen = desc[np.argmax(present & (tpr >= point.target - 1e-12), axis=1)]
    else:
        ok = present & (1 - fpr >= point.target - 1e-12)
        last = ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
        # when even the top score breaks the target, predict nothing: just above the highest score present
        top = desc[np.argmax(present, axis=1)]
        chosen = np.where(ok.any(axis=1), desc[last], np.minimum(1.0, top + 10.0 ** -SCORE_DECIMALS))
    return np.where((n_pos[:, 0] > 0) & (n_neg[:, 0] > 0), chosen, np.nan)
