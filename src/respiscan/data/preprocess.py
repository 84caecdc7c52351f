"""The one preprocessing function, used by training and by prediction alike.

The reference computed CLAHE at prediction time and then fed the unprocessed image to the model (a
train/serve skew); here the same `preprocess` runs on both paths, with settings stored in the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from respiscan.errors import RespiscanError
from respiscan.records import Record


@dataclass(frozen=True)
class PreprocessConfig(Record):
    size: int = 224
    clahe_clip: float = 4.0
    clahe_tiles: int = 8
    ct_opening: int = 2  # square kernel side of the CT morphological opening; 0 turns it off
    dicom_ct_center: float = -600.0  # lung window applied to CT DICOM/NIfTI values in HU
    dicom_ct_width: float = 1500.0

    def apply(self, image: np.ndarray, modality: str) -> np.ndarray:
        return preprocess(image, modality, self.size, clahe_clip=self.clahe_clip, clahe_tiles=self.clahe_tiles,
                          ct_opening=self.ct_opening)


def preprocess(image: np.ndarray, modality: str, size: int = 224, *, clahe_clip: float = 4.0,
               clahe_tiles: int = 8, ct_opening: int = 2) -> np.ndarray:
    """Grey uint8 image -> CLAHE (clip 4.0, 8x8 tiles) -> CT only: 2x2 opening -> size x size uint8."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise RespiscanError(f"preprocess expects a 2-D grey uint8 image, got {image.dtype} {image.shape}")
    if modality not in ("xray", "ct"):
        raise RespiscanError(f"unknown modality {modality!r}; accepted: xray, ct")
    out = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(clahe_tiles, clahe_tiles)).apply(image)
    if modality == "ct" and ct_opening > 0:
        out = cv2.morphologyEx(out, cv2.MORPH_OPEN, np.ones((ct_opening, ct_opening), np.uint8))
    shrinking = out.shape[0] > size or out.shape[1] > size
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
