"""Every figure function writes a readable PNG, also for the awkward inputs real runs produce."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from respiscan.errors import RespiscanError
from respiscan.data import inspect_panel
from respiscan.evaluation import plots
from respiscan.serving import explain


def _scores(rng: np.random.Generator, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.4).astype(int)
    prob = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 2 * (y - 0.5))))
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


def test_reliability_bins_put_one_in_last_bin() -> None:
    conf, freq, count = plots._reliability_bins(np.array([0, 1, 1]), np.array([0.0, 0.95, 1.0]), 10)
    assert count.tolist() == [1] + [0] * 8 + [2]
    assert conf[-1] == pytest.approx(0.975) and freq[-1] == 1.0
    assert np.isnan(conf[1])


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
