"""The distribution-shift warning: how far an input's embedding lies from the training images', without torch.

Training (training/shift.py) fits, per modality, the mean and a Ledoit-Wolf shrunk precision matrix of the
task-specific 1280-d embeddings of the training images, and sets the threshold at the distance that 95 % of
the validation images stay under (a 5 % false-alarm rate on in-source images). Here, both engines score an
embedding with the same numpy code: the Mahalanobis distance divided by that threshold, so a score above 1
means "farther from the training images than 95 % of the validation images were", and the input is then
reported as not in distribution. The statistics are a safetensors file in the bundle, checked by hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from respiscan.bundle import Bundle, OodDetector, ood_mean_key, ood_precision_key
from respiscan.errors import RespiscanError


@dataclass(frozen=True)
class ShiftScores:
    """Per image: the distance relative to the threshold (> 1: unlike the training images) and the verdict."""

    score: np.ndarray
    in_distribution: np.ndarray


class ShiftScorer:
    """A bundle's shift detector, loaded once: `score(embeddings, modality)`."""

    def __init__(self, path: Path, detector: OodDetector):
        from safetensors import SafetensorError
        from safetensors.numpy import load

        file = path / detector.file
        try:
            data = file.read_bytes()  # read once: the bytes hashed are the bytes used, and a cold start reads less
        except OSError as e:
            raise RespiscanError(f"{file}: cannot read the shift-detector statistics ({e.strerror})") from e
        if hashlib.sha256(data).hexdigest() != detector.sha256:
            raise RespiscanError(f"{file}: does not match the hash in config.json (truncated or modified)")
        try:
            tensors = load(data)
        except (SafetensorError, ValueError) as e:
            raise RespiscanError(f"{file}: unreadable safetensors file ({e})") from e
        self.detector = detector
        self.stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for m in detector.modalities:
            if ood_mean_key(m) not in tensors or ood_precision_key(m) not in tensors:
                raise RespiscanError(f"{file}: no statistics for {m}")
            self.stats[m] = tensors[ood_mean_key(m)], tensors[ood_precision_key(m)]

    @classmethod
    def of(cls, bundle: Bundle) -> ShiftScorer | None:
        """The bundle's detector; None for bundles trained before it existed (they report no shift score)."""
        detector = bundle.config.ood
        return None if detector is None else cls(bundle.path, detector)

    def score(self, embeddings: np.ndarray, modality: str) -> ShiftScores:
        mean, precision = self.stats[modality]
        centred = np.asarray(embeddings, dtype=np.float32) - mean  # float32 products, float64 sum: 1e-6 relative
        distance = np.sqrt(np.maximum(((centred @ precision) * centred).sum(axis=1, dtype=np.float64), 0.0))
        score = distance / self.detector.modalities[modality].threshold
        return ShiftScores(score, score <= 1.0)
