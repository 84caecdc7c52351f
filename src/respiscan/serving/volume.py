"""Study-level COVID probability for a CT volume, from its axial slices that contain lung.

The network was trained on single axial slices, so a volume is scored slice by slice. Slices without lung
(neck, abdomen, air beyond the patient) say nothing about COVID pneumonia and are skipped. The study
probability is the mean of the k highest lung-slice probabilities: COVID findings occupy a few slices, so a
mean over all slices would dilute them, while one maximum would hang on a single noisy slice.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from respiscan.data.io import DicomWindow, read_volume
from respiscan.errors import RespiscanError

AIR_HU = -500.0  # air and aerated lung lie below; fat (about -100 HU), soft tissue, blood and bone above
LUNG_FRACTION = 0.05  # a slice contains lung when this share of the body's area is air-dark
AGGREGATION = "mean of the top-k lung-slice probabilities"


def air_level(window: DicomWindow) -> float:
    """The grey level of AIR_HU in the lung-windowed slice (kept inside 0..255, so that a window starting
    above AIR_HU calls only its bottom grey level air)."""
    low = window.ct_center - window.ct_width / 2
    return float(np.clip((AIR_HU - low) / window.ct_width * 255, 0.5, 254.5))


def lung_fraction(slice_: np.ndarray, air: float) -> float:
    """Share of the body's area that is air-dark (grey level below `air`).

    The body is everything not reachable from the image border through air-dark pixels (the air around the
    patient, flood-filled from outside), so the lungs, enclosed by the chest wall, count as body; 0 when the
    slice holds no body. Air-dark pixels join through edges only (4-connectivity), so that a wall one pixel
    thin, even a diagonal one, still encloses.
    """
    dark = (slice_ < air).astype(np.uint8)
    _, labels = cv2.connectedComponents(dark, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    body = int(outside.size - outside.sum())
    inside_dark = int(dark.sum() - outside.sum())
    return inside_dark / body if body else 0.0


def score_volume(pipeline, path: str | Path, top_k: int = 5) -> dict:
    """Per-slice and study-level p(COVID) for a CT volume (NIfTI, DICOM series folder, multi-frame DICOM).

    Slices are read with the bundle's CT window, checked for lung (`lung_fraction` > LUNG_FRACTION), and the
    lung slices scored with the bundle's preprocessing; the label uses the bundle's CT threshold.
    """
    if top_k < 1:
        raise RespiscanError(f"top_k must be at least 1, got {top_k}")
    pipeline.check_modality("ct")
    cfg = pipeline.preprocess_config
    window = DicomWindow(cfg.dicom_ct_center, cfg.dicom_ct_width)
    slices = read_volume(path, window=window)
    air = air_level(window)
    fractions = [lung_fraction(s, air) for s in slices]
    lung = [i for i, f in enumerate(fractions) if f > LUNG_FRACTION]
    if not lung:
        raise RespiscanError(f"{path}: none of its {len(slices)} slices contains lung (air-dark area over "
                             f"{LUNG_FRACTION:.0%} of the body below {AIR_HU:.0f} HU); is it a chest CT?")
    probabilities = pipeline.probabilities(np.stack([pipeline.prepare(slices[i], "ct") for i in lung]), "ct")
    by_slice = dict(zip(lung, map(float, probabilities)))
    k = min(top_k, len(lung))
    probability = float(np.mean(np.sort(probabilities)[-k:]))
    return {
        "path": str(path), "probability": probability, "label": pipeline.label(probability, "ct"),
        "threshold": pipeline.thresholds["ct"], "aggregation": AGGREGATION, "k": k,
        "n_slices": len(slices), "n_lung_slices": len(lung),
        "slices": [{"index": i, "lung": i in by_slice, "lung_fraction": round(f, 4), "probability": by_slice.get(i)}
                   for i, f in enumerate(fractions)],
    }
