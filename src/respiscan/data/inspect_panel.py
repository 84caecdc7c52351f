"""The reference's "Sample_Processing" panel: one X-ray and one CT slice through classic OpenCV operations.

It is a look at the data, not part of the model: it lets a reader see what thresholds, blurs, morphology,
edges and equalisation do to each modality. Every operation maps a grey uint8 HxW image to one of the
same shape and type, so the panel can lay them out in one grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import SubFigure

from respiscan.errors import RespiscanError
from respiscan.figures import new_figure, save_png

Operation = Callable[[np.ndarray], np.ndarray]

MAX_SIDE = 512
COLUMNS = 7
_KERNEL = np.ones((5, 5), np.uint8)
_CLAHE = cv2.createCLAHE(clipLimit=4.0, tileGridSize=(8, 8))


def _threshold(kind: int) -> Operation:
    return lambda img: cv2.threshold(img, 127, 255, kind)[1]


def _adaptive(method: int) -> Operation:
    return lambda img: cv2.adaptiveThreshold(img, 255, method, cv2.THRESH_BINARY, 11, 2)


def _morph(op: int) -> Operation:
    return lambda img: cv2.morphologyEx(img, op, _KERNEL)


def _otsu(img: np.ndarray) -> np.ndarray:
    return cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]


def _sobel(dx: int, dy: int) -> Operation:
    return lambda img: cv2.convertScaleAbs(cv2.Sobel(img, cv2.CV_64F, dx, dy, ksize=3))


def _unsharp(img: np.ndarray) -> np.ndarray:
    """Add back 0.5 x (image - blur): boosts edges without the noise of a Laplacian kernel."""
    return cv2.addWeighted(img, 1.5, cv2.GaussianBlur(img, (0, 0), 3), -0.5, 0)


OPERATIONS: tuple[tuple[str, Operation], ...] = (
    ("binary (127)", _threshold(cv2.THRESH_BINARY)),
    ("binary inv (127)", _threshold(cv2.THRESH_BINARY_INV)),
    ("trunc (127)", _threshold(cv2.THRESH_TRUNC)),
    ("tozero (127)", _threshold(cv2.THRESH_TOZERO)),
    ("tozero inv (127)", _threshold(cv2.THRESH_TOZERO_INV)),
    ("adaptive mean", _adaptive(cv2.ADAPTIVE_THRESH_MEAN_C)),
    ("adaptive Gaussian", _adaptive(cv2.ADAPTIVE_THRESH_GAUSSIAN_C)),
    ("Otsu", _otsu),
    ("Gaussian blur + Otsu", lambda img: _otsu(cv2.GaussianBlur(img, (5, 5), 0))),
    ("mean blur 5x5", lambda img: cv2.blur(img, (5, 5))),
    ("median blur 5", lambda img: cv2.medianBlur(img, 5)),
    ("Gaussian blur 5x5", lambda img: cv2.GaussianBlur(img, (5, 5), 0)),
    ("bilateral", lambda img: cv2.bilateralFilter(img, 9, 75, 75)),
    ("erosion", lambda img: cv2.erode(img, _KERNEL)),
    ("dilation", lambda img: cv2.dilate(img, _KERNEL)),
    ("opening", _morph(cv2.MORPH_OPEN)),
    ("closing", _morph(cv2.MORPH_CLOSE)),
    ("morph. gradient", _morph(cv2.MORPH_GRADIENT)),
    ("top-hat", _morph(cv2.MORPH_TOPHAT)),
    ("black-hat", _morph(cv2.MORPH_BLACKHAT)),
    ("Laplacian", lambda img: cv2.convertScaleAbs(cv2.Laplacian(img, cv2.CV_64F, ksize=3))),
    ("Sobel x", _sobel(1, 0)),
    ("Sobel y", _sobel(0, 1)),
    ("Canny (100, 200)", lambda img: cv2.Canny(img, 100, 200)),
    ("unsharp mask", _unsharp),
    ("histogram equalisation", cv2.equalizeHist),
    ("CLAHE (4.0, 8x8)", _CLAHE.apply),
)


def _prepare(image: np.ndarray, name: str) -> np.ndarray:
    """Validate, and shrink large inputs: the panel is for looking, and bilateral on 4k images is slow."""
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint8 or min(img.shape, default=0) < 1:
        raise RespiscanError(f"{name}: need a grey uint8 HxW image, got {img.dtype} {img.shape}")
    scale = MAX_SIDE / max(img.shape)
    if scale < 1:
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def _block(sub: SubFigure, img: np.ndarray, heading: str) -> None:
    panels = [("original", img)] + [(name, op(img)) for name, op in OPERATIONS]
    rows = math.ceil(len(panels) / COLUMNS)
    axes = sub.subplots(rows, COLUMNS).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (name, out) in zip(axes, panels):
        ax.imshow(out, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
        ax.set_title(name, fontsize=8, pad=3, fontweight="bold" if name == "original" else "normal")
    sub.suptitle(f"{heading} ({img.shape[1]}x{img.shape[0]} px)", fontsize=14, fontweight="bold")
    sub.set_facecolor("0.95")


def sample_panel(xray: np.ndarray, ct: np.ndarray, path: str | Path) -> Path:
    """One figure, an X-ray block above a CT block, each: the original then every operation in OPERATIONS."""
    images = {"X-ray": _prepare(xray, "X-ray"), "CT": _prepare(ct, "CT")}
    rows = math.ceil((len(OPERATIONS) + 1) / COLUMNS)
    cell = 14.0 / COLUMNS
    heights = [rows * (cell * img.shape[0] / img.shape[1] + 0.3) + 0.5 for img in images.values()]
    fig = new_figure(14.0, sum(heights))
    subs = fig.subfigures(len(images), 1, height_ratios=heights, hspace=0.02)
    for sub, (heading, img) in zip(subs, images.items()):
        _block(sub, img, heading)
    return save_png(fig, path, tight=False)
