"""The one preprocessing function, used by training and by prediction alike.

The reference computed CLAHE at prediction time and then fed the unprocessed image to the model (a
train/serve skew); here the same `preprocess` runs on both paths, with settings stored in the bundle.

`crop="body"` removes what lies outside the patient before anything else: a model trained on one hospital's
images otherwise learns its frames, burned-in text, scanner table and field of view (on realdev's CT a
classifier that sees only the outer 5 % of the image reaches AUC 0.77).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import cv2
import numpy as np

from respiscan.errors import RespiscanError
from respiscan.records import Record

# "body": crop both modalities to the patient's outline; "ct_body": CT only (measured: it helps CT transfer
# between sources and hurts X-ray's, README "Across sites"); "ct_lungs": CT cut to the box around the lungs, so that
# a slice from a whole-body field of view and one cut tight from a paper show the lungs at the same scale
Crop = Literal["none", "body", "ct_body", "ct_lungs"]
CROPS = get_args(Crop)
MIN_BODY_FRACTION = 0.1  # a "body" smaller than this share of the image is a failed segmentation: keep it all


@dataclass(frozen=True)
class PreprocessConfig(Record):
    size: int = 224
    clahe_clip: float = 4.0
    clahe_tiles: int = 8
    ct_opening: int = 2  # square kernel side of the CT morphological opening; 0 turns it off
    dicom_ct_center: float = -600.0  # lung window applied to CT DICOM/NIfTI values in HU
    dicom_ct_width: float = 1500.0
    # crop to the patient's outline and blank what lies outside it (presets: "ct_body"); not written when "none",
    # so that configs from before it write back unchanged
    crop: Crop = field(default="none", metadata={"omit_default": True})
    # shorter side at which the crop's outline is found (`body_outline`); 0: at full size, as bundles from before
    # it did (the presets: 128, about 5x faster on realdev's CT)
    outline_side: int = field(default=0, metadata={"omit_default": True})

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise RespiscanError(f"unknown crop {self.crop!r}; accepted: {', '.join(CROPS)}")
        if self.outline_side < 0:
            raise RespiscanError(f"outline_side must be 0 (full size) or positive, got {self.outline_side}")

    def apply(self, image: np.ndarray, modality: str) -> np.ndarray:
        return preprocess(image, modality, self.size, clahe_clip=self.clahe_clip, clahe_tiles=self.clahe_tiles,
                          ct_opening=self.ct_opening, crop=self.crop, outline_side=self.outline_side)


def _frame_box(image: np.ndarray, tolerance: float = 2.0) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) inside any uniform frame: outer rows and columns whose pixels barely vary
    (a black or white frame, padding), trimmed from each side."""
    rows, cols = image.std(axis=1) > tolerance, image.std(axis=0) > tolerance
    if not rows.any() or not cols.any():
        return 0, image.shape[0], 0, image.shape[1]
    r, c = np.flatnonzero(rows), np.flatnonzero(cols)
    return int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1


def _largest_bright_hull(image: np.ndarray, within: np.ndarray | None) -> np.ndarray | None:
    """Convex hull (points) of the largest region above Otsu's threshold, the threshold taken over `within`
    only when given; an opening first cuts thin things (text, frame lines, the CT table) off it."""
    side = min(image.shape)
    smooth = cv2.GaussianBlur(image, (0, 0), max(1.0, side / 150))
    level, _ = cv2.threshold(smooth[within > 0] if within is not None else smooth, 0, 255,
                             cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = ((smooth > level) & (within > 0 if within is not None else True)).astype(np.uint8)
    k = max(3, side // 40)
    bright = cv2.morphologyEx(bright, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if n < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    # the hull of a region is the hull of its outer boundary: a few hundred points instead of every pixel
    outline, _ = cv2.findContours((labels == largest).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return cv2.convexHull(np.concatenate(outline))


def _filled(shape: tuple[int, ...], hull: np.ndarray, offset: tuple[float, float] = (0.0, 0.0),
            scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """uint8 mask of `shape`, 255 inside the hull (x, y points) once scaled and shifted."""
    mask = np.zeros(shape, np.uint8)
    points = np.rint(hull.reshape(-1, 2) * scale + offset).astype(np.int32)
    cv2.fillConvexPoly(mask, points, 255)
    return mask


def body_outline(image: np.ndarray, modality: str, work_side: int = 0) -> np.ndarray | None:
    """The patient's outline as a uint8 mask (255 inside), or None when it is implausibly small (then nothing
    is cropped). CT takes a second threshold inside the first outline: in a scanner's reconstruction circle the
    first one finds the circle (air inside it is brighter than the black outside), the second the body; on a
    slice already cut to the body the second finds the same body. With `work_side`, the outline is found on
    the image shrunk to that shorter side and its hull scaled back: the same outline to a pixel or two, at a
    fraction of the cost (README "Speed")."""
    full = image.shape
    if 0 < work_side < min(full):
        f = work_side / min(full)
        image = cv2.resize(image, (max(1, round(full[1] * f)), max(1, round(full[0] * f))),
                           interpolation=cv2.INTER_AREA)
    scale = (full[1] / image.shape[1], full[0] / image.shape[0])
    top, bottom, left, right = _frame_box(image)
    inside = _largest_bright_hull(image[top:bottom, left:right], None)
    if inside is None:
        return None
    hull = inside + np.array([left, top], dtype=inside.dtype)
    if modality == "ct":
        mask = _filled(image.shape, hull)
        inner = _largest_bright_hull(image, mask)
        if inner is not None and (_filled(image.shape, inner) > 0).sum() >= 0.3 * (mask > 0).sum():
            hull = inner
    mask = _filled(full, hull, scale=scale, offset=((scale[0] - 1) / 2, (scale[1] - 1) / 2))
    return mask if (mask > 0).mean() >= MIN_BODY_FRACTION else None


def lung_box(image: np.ndarray, body: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) around the lungs: the one or two largest regions darker than Otsu's threshold inside the
    body, away from its edge (the air outside), with a 5 % margin; None when they are implausibly small."""
    side = min(image.shape)
    k = max(3, side // 50)
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    smooth = cv2.GaussianBlur(image, (0, 0), max(1.0, side / 200))
    level, _ = cv2.threshold(smooth[body > 0], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = cv2.morphologyEx(((smooth < level) & (cv2.erode(body, disk) > 0)).astype(np.uint8), cv2.MORPH_OPEN, disk)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    if n < 2:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    lungs = [1 + i for i in np.argsort(areas)[::-1][:2] if areas[i] >= 0.15 * areas.max()]
    if areas[[i - 1 for i in lungs]].sum() < 0.05 * (body > 0).sum():
        return None
    x, y, w, h = cv2.boundingRect(np.isin(labels, lungs).astype(np.uint8))
    m = int(0.05 * max(w, h))
    x0, y0 = max(0, x - m), max(0, y - m)
    return x0, y0, min(image.shape[1], x + w + m) - x0, min(image.shape[0], y + h + m) - y0


def preprocess(image: np.ndarray, modality: str, size: int = 224, *, clahe_clip: float = 4.0,
               clahe_tiles: int = 8, ct_opening: int = 2, crop: Crop = "none", outline_side: int = 0) -> np.ndarray:
    """Grey uint8 image -> [body or lung crop] -> CLAHE (clip 4.0, 8x8 tiles) -> CT only: 2x2 opening -> size x size."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise RespiscanError(f"preprocess expects a 2-D grey uint8 image, got {image.dtype} {image.shape}")
    if modality not in ("xray", "ct"):
        raise RespiscanError(f"unknown modality {modality!r}; accepted: xray, ct")
    cropped = crop == "body" or (crop.startswith("ct_") and modality == "ct")
    mask = body_outline(image, modality, outline_side) if cropped else None
    if mask is not None:  # CLAHE then sees the patient only, whatever the field of view
        box = lung_box(image, mask) if crop == "ct_lungs" else None
        x, y, w, h = box or cv2.boundingRect(mask)
        image, mask = image[y:y + h, x:x + w], mask[y:y + h, x:x + w]
    out = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(clahe_tiles, clahe_tiles)).apply(image)
    if modality == "ct" and ct_opening > 0:
        out = cv2.morphologyEx(out, cv2.MORPH_OPEN, np.ones((ct_opening, ct_opening), np.uint8))
    if mask is not None:
        out = np.where(mask > 0, out, 0).astype(np.uint8)
    shrinking = out.shape[0] > size or out.shape[1] > size
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
