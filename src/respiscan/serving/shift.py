"""The distribution-shift warning: how far an input lies from the training images, without torch.

Training (training/shift.py) fits, per modality, the mean and a Ledoit-Wolf shrunk precision matrix of the
task-specific embeddings of the training images and of their image statistics (data/image_stats.py), and sets
one threshold per distance so that 95 % of the validation images stay under both (a 5 % false-alarm rate on
in-source images). Here, both engines score with the same numpy code: the larger of the two distances over its
threshold, so a score above 1 means "farther from the training images than 95 % of the validation images were",
and the input is then reported as not in distribution. Bundles from before the image statistics score the
embedding alone. The statistics are a safetensors file in the bundle, checked by hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from respiscan.bundle import Bundle, OodDetector, ood_image_key, ood_mean_key, ood_precision_key
from respiscan.data.image_stats import image_statistics
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
        self.image_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for m, limits in detector.modalities.items():
            keys = {"embedding": (ood_mean_key(m), ood_precision_key(m))}
            if limits.image_threshold is not None:
                keys["image"] = ood_image_key(m, "mean"), ood_image_key(m, "precision")
            for what, (mean, precision) in keys.items():
                if mean not in tensors or precision not in tensors:
                    raise RespiscanError(f"{file}: no {what} statistics for {m}")
                (self.stats if what == "embedding" else self.image_stats)[m] = tensors[mean], tensors[precision]

    @classmethod
    def of(cls, bundle: Bundle) -> ShiftScorer | None:
        """The bundle's detector; None for bundles trained before it existed (they report no shift score)."""
        detector = bundle.config.ood
        return None if detector is None else cls(bundle.path, detector)

    def score(self, embeddings: np.ndarray, images: np.ndarray, modality: str) -> ShiftScores:
        """Embeddings (N, D) and the preprocessed uint8 images (N, H, W) they came from."""
        limits = self.detector.modalities[modality]
        with _one_blas_thread():
            score = _distance(embeddings, *self.stats[modality]) / limits.threshold
            if modality in self.image_stats:
                score = np.maximum(score, _distance(image_statistics(images), *self.image_stats[modality])
                                   / limits.image_threshold)
        return ShiftScores(score, score <= 1.0)


def _distance(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = np.asarray(x, dtype=np.float32) - mean  # float32 products, float64 sum: 1e-6 relative
    return np.sqrt(np.maximum(((centred @ precision) * centred).sum(axis=1, dtype=np.float64), 0.0))


_controller = None  # threadpoolctl.ThreadpoolController, once one is needed


def _one_blas_thread():
    """numpy's BLAS (OpenBLAS) on one thread for these small products: its idle threads keep spinning after a
    call and took the cores from the engine's next batch (an ONNX batch of 8 plus its shift score: 97-109 ms
    with OpenBLAS's 2 threads, 73-79 ms under this limit, measured on 2 cores). Built on first use."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")
