"""Fit the distribution-shift detector that serving/shift.py scores: per modality, the mean and Ledoit-Wolf
shrunk precision of the training images' task-specific embeddings and of their image statistics
(data/image_stats.py), and a threshold for each distance, set together on the validation images.

Two distances, because each misses what the other sees: the embedding knows what the model learnt, the image
statistics what a chest scan looks like (the embedding alone let most photographs and noise through on
realdev's CT; README "Can I trust this prediction?"). Ledoit-Wolf, because 1280 dimensions from a few hundred
images give a singular sample covariance; the thresholds come from validation images, because the training
images' own distances are optimistic (the embedder was fitted to them). sklearn's `mahalanobis` sets the
thresholds; serving recomputes the same distances in numpy from the stored statistics (tests/test_shift.py
checks that the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from respiscan.bundle import OOD_FILE, ood_image_key, ood_mean_key, ood_precision_key, sha256_file
from respiscan.data.image_stats import image_statistics, modality_mismatch
from respiscan.errors import RespiscanError
from respiscan.runtime import save_tensors

FALSE_ALARM_RATE = 0.05  # share of in-source (validation) images flagged, by construction


@dataclass(frozen=True)
class FittedOod:
    """The statistics to write (tensor name -> array) and the config record of each modality's thresholds."""

    tensors: dict[str, np.ndarray]
    thresholds: dict[str, dict]
    false_alarm_rate: float


def _mahalanobis(fit: np.ndarray, check: np.ndarray) -> tuple[LedoitWolf, np.ndarray]:
    fitted = LedoitWolf().fit(np.asarray(fit, dtype=np.float64))
    return fitted, np.sqrt(fitted.mahalanobis(np.asarray(check, dtype=np.float64)))


def fit_ood(train: dict[str, np.ndarray], val: dict[str, np.ndarray], train_images: dict[str, np.ndarray],
            val_images: dict[str, np.ndarray], false_alarm_rate: float = FALSE_ALARM_RATE) -> FittedOod:
    """Per modality: statistics of the embeddings `train[m]` (N, D) and of the images `train_images[m]`
    (N, H, W) uint8, and the two thresholds at which a share `false_alarm_rate` of the validation images has
    one distance or the other too large (each distance's own quantile, both scaled by one common factor).
    With two modalities, the validation scores (and the false alarms measured) include the wrong-modality
    check that serving applies: the image statistics' distance over its threshold, against the same for the
    other modality's Gaussian."""
    tensors, thresholds, image_fits, val_stats, embedding_scores = {}, {}, {}, {}, {}
    for m, x in train.items():
        if len(x) < 2 or len(val[m]) < 1:
            raise RespiscanError(f"the shift detector needs at least 2 training and 1 validation {m} images")
        embedding, d_embedding = _mahalanobis(x, val[m])
        val_stats[m] = image_statistics(val_images[m])
        image, d_image = _mahalanobis(image_statistics(train_images[m]), val_stats[m])
        q = 1 - false_alarm_rate
        limits = np.array([np.quantile(d_embedding, q), np.quantile(d_image, q)])
        limits *= np.quantile(np.maximum(d_embedding / limits[0], d_image / limits[1]), q)
        embedding_scores[m] = np.maximum(d_embedding / limits[0], d_image / limits[1])
        image_fits[m] = image, float(limits[1])
        for (mean_key, precision_key), fitted in (((ood_mean_key(m), ood_precision_key(m)), embedding),
                                                  ((ood_image_key(m, "mean"), ood_image_key(m, "precision")), image)):
            tensors[mean_key] = fitted.location_.astype(np.float32)
            tensors[precision_key] = fitted.precision_.astype(np.float32)
        thresholds[m] = {"threshold": float(limits[0]), "image_threshold": float(limits[1]), "n_train": len(x),
                         "n_val": len(val[m])}
    for m, scores in embedding_scores.items():
        for other in set(image_fits) - {m}:  # what serving computes
            own, other_fit = image_fits[m], image_fits[other]
            scores = np.maximum(scores, modality_mismatch(
                np.sqrt(own[0].mahalanobis(val_stats[m])) / own[1],
                np.sqrt(other_fit[0].mahalanobis(val_stats[m])) / other_fit[1]))
        thresholds[m] |= {"val_flagged": float(np.mean(scores > 1.0)),
                          "val_scores": [round(float(v), 6) for v in np.sort(scores)]}
    return FittedOod(tensors, thresholds, false_alarm_rate)


def write_ood(folder: Path, fitted: FittedOod) -> dict:
    """Write the statistics into the bundle folder; the config's `ood` record that names them."""
    path = save_tensors(folder / OOD_FILE, {k: torch.from_numpy(v) for k, v in fitted.tensors.items()})
    return {"file": OOD_FILE, "sha256": sha256_file(path), "false_alarm_rate": fitted.false_alarm_rate,
            "modalities": fitted.thresholds, "space": "task-specific embedding (1280-d) and image statistics",
            "method": "mahalanobis-ledoit-wolf, flagged when either distance exceeds its threshold"
                      + (" or the image lies nearer the other modality's images" if len(fitted.thresholds) > 1 else ""),
            "modality_check": len(fitted.thresholds) > 1}
