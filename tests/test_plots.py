"""Every figure function writes a readable PNG, also for the awkward inputs real runs produce."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.special import expit

from respiscan.data import inspect_panel
from respiscan.errors import RespiscanError
from respiscan.evaluation import plots
from respiscan.serving import explain


def _scores(rng: np.random.Generator, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.4).astype(int)
    prob = expit(rng.normal(0, 1, n) + 2 * (y - 0.5))
    return y, prob


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.mode in ("RGB", "RGBA")
        assert img.width > 0 and img.height > 0
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.fixture
def curves() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "X-ray": _scores(rng),
        "CT": _scores(rng),
        "fused": _scores(rng),
        "negatives only": (np.zeros(30, int), rng.random(30)),
    }


def test_roc(tmp_path: Path, curves: dict) -> None:
    out = plots.plot_roc(curves, tmp_path / "roc.png", {"X-ray": 0.5, "fused": 0.3})
    assert out == tmp_path / "roc.png"
    _assert_png(out)


def test_pr(tmp_path: Path, curves: dict) -> None:
    _assert_png(plots.plot_pr(curves, tmp_path / "pr.png", {"CT": 0.5, "fused": 1.0}))


def test_single_class_only(tmp_path: Path) -> None:
    one = {"positives only": (np.ones(10, int), np.linspace(0, 1, 10))}
    _assert_png(plots.plot_roc(one, tmp_path / "roc.png"))
    _assert_png(plots.plot_pr(one, tmp_path / "pr.png"))
    _assert_png(plots.plot_reliability(one, tmp_path / "rel.png"))


@pytest.mark.parametrize(
    "bad",
    [
        {"a": (np.array([0, 1]), np.array([0.2]))},
        {"a": (np.array([0, 2]), np.array([0.2, 0.3]))},
        {"a": (np.array([0, 1]), np.array([0.2, np.nan]))},
        {"a": (np.array([], int), np.array([]))},
        {},
    ],
)
def test_bad_curves_raise(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(RespiscanError):
        plots.plot_roc(bad, tmp_path / "roc.png")


def test_unknown_operating_point_raises(tmp_path: Path, curves: dict) -> None:
    with pytest.raises(RespiscanError, match="unknown"):
        plots.plot_roc(curves, tmp_path / "roc.png", {"xray": 0.5})


def test_confusion(tmp_path: Path) -> None:
    cms = {
        "X-ray": {"tn": 50, "fp": 10, "fn": 5, "tp": 35},
        "empty class": {"tn": 0, "fp": 0, "fn": 2, "tp": 8},
    }
    _assert_png(plots.plot_confusion(cms, tmp_path / "cm.png"))
    with pytest.raises(RespiscanError, match="tp"):
        plots.plot_confusion({"bad": {"tn": 1, "fp": 1, "fn": 1}}, tmp_path / "bad.png")


def test_reliability(tmp_path: Path, curves: dict) -> None:
    _assert_png(plots.plot_reliability(curves, tmp_path / "rel.png", n_bins=5))


def test_reliability_shows_the_metrics_bins_and_ece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bins as in test_metrics' hand example: (.05), (.15, .12), (.95, 1.0); prob 1.0 is in the last bin.
    figures = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figures.append(fig) or Path(path))
    plots.plot_reliability({"model": (np.array([0, 1, 1, 0, 1]), np.array([0.05, 0.15, 0.12, 0.95, 1.0]))},
                           tmp_path / "rel.png")
    top, bottom = figures[0].axes
    line = next(line for line in top.get_lines() if line.get_label().startswith("model"))
    assert line.get_xdata() == pytest.approx([0.05, 0.135, 0.975])
    assert line.get_ydata() == pytest.approx([0.0, 1.0, 0.5])
    assert f"ECE = {(0.05 + 2 * 0.865 + 2 * 0.475) / 5:.3f}" in line.get_label()
    (steps,) = bottom.patches
    assert steps.get_data().values.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    with pytest.raises(RespiscanError, match="n_bins"):
        plots.plot_reliability({"model": (np.array([0, 1]), np.array([0.2, 0.8]))}, tmp_path / "bad.png", n_bins=0)


def test_operating_points_match_the_confusion_matrix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At 0.5: TP 3, FN 2, FP 1, TN 4 -> TPR .6, FPR .2, precision .75; at 0.95 nothing is predicted COVID.
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1, 0])
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4, 0.7, 0.45, 0.05])
    figures = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figures.append(fig) or Path(path))
    plots.plot_roc({"a": (y, p)}, tmp_path / "roc.png", {"a": 0.5})
    plots.plot_pr({"a": (y, p), "b": (y, p)}, tmp_path / "pr.png", {"a": 0.5, "b": 0.95})
    roc, pr = (fig.axes[0] for fig in figures)
    (marker,) = [line for line in roc.get_lines() if line.get_label().startswith("a @")]
    assert (marker.get_xdata(), marker.get_ydata()) == (pytest.approx(0.2), pytest.approx(0.6))
    (marker,) = [line for line in pr.get_lines() if line.get_label().startswith("a @")]
    assert (marker.get_xdata(), marker.get_ydata()) == (pytest.approx(0.6), pytest.approx(0.75))
    assert "b @ 0.95: no positive predictions" in [line.get_label() for line in pr.get_lines()]


def test_bad_curve_error_names_the_curve(tmp_path: Path) -> None:
    with pytest.raises(RespiscanError, match="curve 'CT': prob must hold probabilities"):
        plots.plot_pr({"CT": (np.array([0, 1]), np.array([0.2, 1.5]))}, tmp_path / "pr.png")


def test_training_curves(tmp_path: Path) -> None:
    full = tmp_path / "full.csv"
    full.write_text("epoch,train_loss,val_loss,val_auc,val_acc,lr\n"
                    + "".join(f"{e},{1 / (e + 1)},{1.1 / (e + 1)},{0.7 + 0.02 * e},{0.6 + 0.02 * e},0.001\n"
                              for e in range(5)))
    one = tmp_path / "one.csv"
    one.write_text("epoch,train_loss,val_auc\n1,0.6,0.8\n")
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("epoch,gen_loss,disc_loss,val_auc,never_loss\n1,2.0,,,\n1,,0.7,0.6,\n2,1.5,0.6,,\n")
    scores_only = tmp_path / "scores.csv"
    scores_only.write_text("epoch,val_auc\n1,0.7\n2,0.8\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("epoch,train_loss\n")
    logs = {"full": full, "single epoch": one, "gaps": gaps, "scores only": scores_only, "no rows": header_only}
    _assert_png(plots.plot_training_curves(logs, tmp_path / "train.png"))


def test_training_log_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,train_loss\n1,oops\n")
    with pytest.raises(RespiscanError, match="oops"):
        plots.plot_training_curves({"bad": bad}, tmp_path / "train.png")
    with pytest.raises(RespiscanError, match="not found"):
        plots.plot_training_curves({"missing": tmp_path / "missing.csv"}, tmp_path / "train.png")
    no_epoch = tmp_path / "no_epoch.csv"
    no_epoch.write_text("step,train_loss\n1,0.5\n")
    with pytest.raises(RespiscanError, match="epoch"):
        plots.plot_training_curves({"x": no_epoch}, tmp_path / "train.png")


def test_gradcam_overlay(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (96, 80), dtype=np.uint8)
    heat = rng.random((7, 7))
    _assert_png(explain.plot_gradcam_overlay(image, heat, tmp_path / "cam.png", "COVID (p = 0.91)"))
    with pytest.raises(RespiscanError):
        explain.plot_gradcam_overlay(image.astype(float), heat, tmp_path / "bad.png", "bad")


def test_operations_keep_shape() -> None:
    names = [name for name, _ in inspect_panel.OPERATIONS]
    assert len(names) >= 27 and len(set(names)) == len(names)
    image = np.random.default_rng(2).integers(0, 256, (48, 64), dtype=np.uint8)
    for name, op in inspect_panel.OPERATIONS:
        out = op(image)
        assert out.shape == image.shape and out.dtype == np.uint8, name


def test_sample_panel(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    xray = rng.integers(0, 256, (700, 600), dtype=np.uint8)  # above 512: exercises the resize
    ct = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    _assert_png(inspect_panel.sample_panel(xray, ct, tmp_path / "panel.png"))
    with pytest.raises(RespiscanError, match="CT"):
        inspect_panel.sample_panel(xray, np.zeros((8, 8, 3), np.uint8), tmp_path / "bad.png")
