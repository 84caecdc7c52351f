"""Figures without global state: a new Agg-backed `Figure` (no pyplot; safe in threads and headless) and an
atomic PNG writer, shared by the inspect panel, the evaluation plots and the Grad-CAM overlays."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from respiscan.utils import atomic_write

DPI = 150


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, tight: bool = True) -> Path:
    """Atomic, so a viewer or a half-finished run never sees a truncated PNG."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        extra = {"bbox_inches": "tight", "pad_inches": 0.05} if tight else {}
        fig.savefig(f, format="png", dpi=DPI, **extra)
    return path
