"""Fit the distribution-shift detector that serving/shift.py scores: per modality, the mean and Ledoit-Wolf
shrunk precision of the training images' task-specific embeddings, and a threshold on the validation images.

Ledoit-Wolf, because 1280 dimensions from a few hundred images give a singular sample covariance; the
threshold comes from validation images, because the training images' own distances are optimistic (the
embedder was fitted to them). sklearn's `mahalanobis` sets the threshold; serving recomputes the same
distance in numpy from the stored statistics (tests/test_shift.py checks that the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from respiscan.bundle import OOD_FILE, ood_mean_key, ood_precision_key, sha256_file
from respiscan.errors import RespiscanError
from respiscan.runtime import save_tensors

FALSE_ALARM_RATE = 0.05  # share of in-source (validation) images flagged, by construction


@dataclass(frozen=True)
class FittedOod:
    """The statistics to write (tensor name -> array) and the config record of each modality's threshold."""

    tensors: dict[str, np.ndarray]
    thresholds: dict[str, dict]
    false_alarm_rate: float


def fit_ood(train: dict[str, np.ndarray], val: dict[str, np.ndarray],
            false_alarm_rate: float = FALSE_ALARM_RATE) -> FittedOod:
    """Per modality: statistics of `train[m]` (N, D) and the distance that (1 - rate) of `val[m]` stay under."""
    tensors, thresholds = {}, {}
    for m, x in train.items():
        if len(x) < 2 or len(val[m]) < 1:
            raise RespiscanError(f"the shift detector needs at least 2 training and 1 validation {m} images")
        fitted = LedoitWolf().fit(np.asarray(x, dtype=np.float64))
        distance = np.sqrt(fitted.mahalanobis(np.asarray(val[m], dtype=np.float64)))
        threshold = float(np.quantile(distance, 1 - false_alarm_rate))
        tensors[ood_mean_key(m)] = fitted.location_.astype(np.float32)
        tensors[ood_precision_key(m)] = fitted.precision_.astype(np.float32)
        thresholds[m] = {"threshold": threshold, "n_train": len(x), "n_val": len(val[m]),
                         "val_flagged": float(np.mean(distance > threshold))}
    return FittedOod(tensors, thresholds, false_alarm_rate)


def write_ood(folder: Path, fitted: FittedOod) -> dict:
    """Write the statistics into the bundle folder; the config's `ood` record that names them."""
    path = save_tensors(folder / OOD_FILE, {k: torch.from_numpy(v) for k, v in fitted.tensors.items()})
    return {"file": OOD_FILE, "sha256": sha256_file(path), "false_alarm_rate": fitted.false_alarm_rate,
            "modalities": fitted.thresholds}
