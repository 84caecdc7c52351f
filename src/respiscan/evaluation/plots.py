"""Paper figures: ROC, precision-recall, confusion matrices, reliability, training curves.

Every function builds its own `Figure` on an Agg canvas (no pyplot, no global state, safe in threads and on
headless machines), writes a 150-dpi PNG atomically and returns its path. COVID (label 1) is the positive
class and a sample is called positive when `prob >= threshold`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from respiscan.data.samples import CLASS_NAMES
from respiscan.errors import RespiscanError
from respiscan.figures import new_figure, save_png
from respiscan.metrics import (
    ECE_BINS,
    binary_metrics,
    check_binary_inputs,
    expected_calibration_error,
    reliability_curve,
)

LOSS_KEYS = ("loss",)
SCORE_KEYS = ("auc", "acc", "f1", "sens", "spec")

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _style(ax: Axes) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)


def _colour(i: int) -> tuple[float, float, float, float]:
    """Same dict order, same colour: "X-ray" keeps its colour across all figures of a paper."""
    return colormaps["tab10"](i % 10)


def _scores(name: str, y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check one (y_true, prob) pair early so a bad input names its curve instead of failing inside sklearn."""
    try:
        return check_binary_inputs(y_true, prob)
    except RespiscanError as e:
        raise RespiscanError(f"curve {name!r}: {e}") from None


def _checked(curves: Curves, operating_points: Mapping[str, float] | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not curves:
        raise RespiscanError("no curves to plot")
    unknown = set(operating_points or {}) - set(curves)
    if unknown:
        raise RespiscanError(f"operating points for unknown curves: {sorted(unknown)}; curves: {list(curves)}")
    return {name: _scores(name, *pair) for name, pair in curves.items()}


def _note(ax: Axes, text: str) -> None:
    """An empty legend entry: a skipped curve is reported where the reader looks, not silently dropped."""
    ax.plot([], [], " ", label=text)


def plot_roc(curves: Curves, path: str | Path, operating_points: Mapping[str, float] | None = None) -> Path:
    """ROC curves with AUC in the legend, the chosen threshold marked, and the chance diagonal."""
    data = _checked(curves, operating_points)
    fig = new_figure(5.2, 5.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    for i, (name, (y, p)) in enumerate(data.items()):
        if len(np.unique(y)) < 2:
            _note(ax, f"{name}: ROC undefined (one class only)")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.8, color=_colour(i), label=f"{name} (AUC = {roc_auc_score(y, p):.3f}, n = {y.size})")
        if operating_points and name in operating_points:
            t = operating_points[name]
            at = binary_metrics(y, p, t)
            x, yv = 1 - at["specificity"], at["sensitivity"]
            ax.plot(x, yv, "o", ms=7, mfc="white", mec=_colour(i), mew=2,
                    label=f"{name} @ {t:.2f}: TPR {yv:.2f}, FPR {x:.2f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title="ROC curve",
           xlabel="False positive rate (1 − specificity)", ylabel="True positive rate (sensitivity)")
    _style(ax)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return save_png(fig, path)


def plot_pr(curves: Curves, path: str | Path, operating_points: Mapping[str, float] | None = None) -> Path:
    """Precision-recall curves with average precision; the prevalence line is what a random ranking scores."""
    data = _checked(curves, operating_points)
    fig = new_figure(5.2, 6.4)
    ax = fig.add_subplot()
    prevalences = {name: float(y.mean()) for name, (y, _) in data.items() if len(np.unique(y)) == 2}
    shared = len(set(prevalences.values())) <= 1
    if prevalences and shared:
        prev = next(iter(prevalences.values()))
        ax.axhline(prev, ls="--", lw=1, color="grey", label=f"chance (prevalence = {prev:.2f})")
    for i, (name, (y, p)) in enumerate(data.items()):
        if len(np.unique(y)) < 2:
            _note(ax, f"{name}: PR skipped (one class only)")
            continue
        if not shared:
            ax.axhline(prevalences[name], ls=":", lw=1, color=_colour(i),
                       label=f"{name} chance (prevalence = {prevalences[name]:.2f})")
        precision, recall, _ = precision_recall_curve(y, p)
        ax.plot(recall, precision, lw=1.8, color=_colour(i), drawstyle="steps-post",
                label=f"{name} (AP = {average_precision_score(y, p):.3f}, n = {y.size})")
        if operating_points and name in operating_points:
            t = operating_points[name]
            at = binary_metrics(y, p, t)
            if at["ppv"] is not None:
                prec, rec = at["ppv"], at["sensitivity"]
                ax.plot(rec, prec, "o", ms=7, mfc="white", mec=_colour(i), mew=2,
                        label=f"{name} @ {t:.2f}: precision {prec:.2f}, recall {rec:.2f}")
            else:
                _note(ax, f"{name} @ {t:.2f}: no positive predictions")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title="Precision-recall curve",
           xlabel="Recall (sensitivity)", ylabel="Precision (PPV)")
    _style(ax)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False)
    return save_png(fig, path)


def plot_confusion(cms: Mapping[str, Mapping[str, int]], path: str | Path) -> Path:
    """One confusion matrix per model; colour is the row fraction so classes of unequal size compare fairly."""
    if not cms:
        raise RespiscanError("no confusion matrices to plot")
    fig = new_figure(3.4 * len(cms) + 0.9, 3.6)
    axes = fig.subplots(1, len(cms), squeeze=False)[0]
    image = None
    for ax, (name, cm) in zip(axes, cms.items()):
        try:
            m = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]], dtype=np.int64)
        except KeyError as e:
            raise RespiscanError(f"confusion matrix {name!r} lacks {e.args[0]!r}; needs tn, fp, fn, tp") from None
        if (m < 0).any():
            raise RespiscanError(f"confusion matrix {name!r} has a negative count")
        rows = m.sum(axis=1, keepdims=True)
        frac = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
        image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for (r, c), count in np.ndenumerate(m):
            pct = f"{100 * frac[r, c]:.1f}%" if rows[r, 0] else "–"
            ax.text(c, r, f"{count}\n{pct}", ha="center", va="center", fontsize=10,
                    color="white" if frac[r, c] > 0.5 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
               xlabel="Predicted class", ylabel="True class", title=f"{name} (n = {int(m.sum())})")
        ax.tick_params(axis="y", labelrotation=90)
        for label in ax.get_yticklabels():
            label.set_verticalalignment("center")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="Fraction of true class")
    return save_png(fig, path)


def plot_reliability(curves: Curves, path: str | Path, n_bins: int = ECE_BINS) -> Path:
    """Reliability diagram with ECE; the count histogram shows which bins are too sparse to trust."""
    data = _checked(curves, None)
    fig = new_figure(5.2, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="perfect calibration")
    for i, (name, (y, p)) in enumerate(data.items()):
        curve = reliability_curve(y, p, n_bins)
        ece = expected_calibration_error(y, p, n_bins)
        top.plot(curve["mean_prob"], curve["frequency"], "o-", ms=4, lw=1.5, color=_colour(i),
                 label=f"{name} (ECE = {ece:.3f}, n = {y.size})")
        # Each non-empty bin's centre weighted by its count gives the counts of all bins, empty ones at 0.
        counts, edges = np.histogram(curve["bin_centre"], bins=curve["bin_edges"], weights=curve["count"])
        bottom.stairs(counts, edges, color=_colour(i), lw=1.5)
    top.set(xlim=(0, 1), ylim=(-0.01, 1.01), title="Reliability diagram",
            ylabel="Observed frequency of COVID")
    top.legend(loc="upper left", fontsize=8, framealpha=0.9)
    bottom.set(xlabel="Mean predicted probability of COVID", ylabel="Samples per bin")
    bottom.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    for ax in (top, bottom):
        _style(ax)
    return save_png(fig, path)


def _read_log(path: Path) -> dict[str, np.ndarray]:
    """Epoch plus the loss/score columns as float arrays; empty cells become NaN (not every row logs everything)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise RespiscanError(f"{path}: training log not found") from None
    names = [n for n in (rows[0].keys() if rows else []) if n is not None]
    if rows and "epoch" not in names:
        raise RespiscanError(f"{path}: no 'epoch' column; columns: {names}")
    wanted = ["epoch"] + [n for n in names if _kind(n) is not None]
    out: dict[str, np.ndarray] = {}
    for col in wanted:
        values = []
        for i, row in enumerate(rows, start=2):
            cell = (row.get(col) or "").strip()
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                raise RespiscanError(f"{path}: line {i}, column {col!r}: not a number: {cell!r}") from None
        out[col] = np.array(values, dtype=float)
    return out


def _kind(column: str) -> str | None:
    name = column.lower()
    if any(k in name for k in LOSS_KEYS):
        return "loss"
    if any(k in name for k in SCORE_KEYS):
        return "score"
    return None


def plot_training_curves(logs: Mapping[str, str | Path], path: str | Path) -> Path:
    """One panel per training stage: losses on the left axis, scores (AUC, accuracy) on a right axis."""
    if not logs:
        raise RespiscanError("no training logs to plot")
    ncols = min(len(logs), 3)
    nrows = math.ceil(len(logs) / ncols)
    fig = new_figure(5.0 * ncols, 4.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(logs):]:
        ax.set_visible(False)
    for ax, (stage, log) in zip(axes, logs.items()):
        columns = _read_log(Path(log))
        epoch = columns.pop("epoch", np.array([]))
        series = {c: v for c, v in columns.items() if np.isfinite(v[np.isfinite(epoch)]).any()}
        ax.set(title=stage, xlabel="Epoch", ylabel="Loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _style(ax)
        if not series:
            ax.text(0.5, 0.5, "no loss or score values logged", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
            continue
        right = None
        handles = []
        for i, (col, values) in enumerate(series.items()):
            ok = np.isfinite(epoch) & np.isfinite(values)
            if _kind(col) == "loss":
                target, ls = ax, "-"
            else:
                right = right or ax.twinx()
                target, ls = right, "--"
            handles += target.plot(epoch[ok], values[ok], ls=ls, marker="o", ms=3, lw=1.5,
                                   color=_colour(i), label=col)
        if right is not None:
            scores = np.concatenate([v[np.isfinite(v)] for c, v in series.items() if _kind(c) == "score"])
            if scores.min() >= 0 and scores.max() <= 1:
                right.set_ylim(0, 1.02)
            right.set_ylabel("Score")
            right.spines["top"].set_visible(False)
        if not any(_kind(c) == "loss" for c in series):
            ax.set_yticks([])
            ax.set_ylabel("")
        epochs = np.unique(epoch[np.isfinite(epoch)])
        if epochs.size == 1:  # autoscale would zoom to fractions of an epoch around a lone point
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8,
                  ncol=len(handles) if len(handles) <= 4 else math.ceil(len(handles) / 2), frameon=False)
    return save_png(fig, path)
