"""The distribution-shift warning: how far an input lies from the training images, without torch.

Training (training/shift.py) fits, per modality, the mean and a Ledoit-Wolf shrunk precision matrix of the
task-specific embeddings of the training images and of their image statistics (data/image_stats.py), and sets
one threshold per distance so that 95 % of the validation images stay under both (a 5 % false-alarm rate on
in-source images). Here, both engines score with the same numpy code: the larger of the two distances over its
threshold, so a score above 1 means "farther from the training images than 95 % of the validation images were",
and the input is then reported as not in distribution. Where the bundle has both modalities, an image whose
statistics lie nearer the other modality's training images than its own (each distance over its threshold) is
flagged too: the wrong-modality check. Bundles from before the image statistics score the embedding alone, and
those from before the check do without it. The statistics are a safetensors file in the bundle, checked by hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from respiscan.bundle import Bundle, OodDetector, ood_image_key, ood_mean_key, ood_precision_key
from respiscan.data.image_stats import image_statistics, modality_mismatch
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
                stats = image_statistics(images)
                own = _distance(stats, *self.image_stats[modality]) / limits.image_threshold
                score = np.maximum(score, own)
                others = set(self.image_stats) - {modality} if self.detector.modality_check else set()
                for other in others:
                    to_other = _distance(stats, *self.image_stats[other])
                    score = np.maximum(score, modality_mismatch(
                        own, to_other / self.detector.modalities[other].image_threshold))
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


SMALL_EFFECT_AUC = 0.556  # Cohen's d = 0.2, a "small" effect, as an AUC (Rice and Harris 2005)
_Z95 = 1.959964


@dataclass(frozen=True)
class SetShift:
    """Whether a set of images, taken together, lies farther from the training images than the validation images
    did. `auc`: the probability that one of its images scores above a validation image (0.5: alike), with its
    95 % DeLong interval; `shifted` when the interval lies above 0.5 and the AUC reaches a small effect. Images
    each just under the per-image threshold can still, as a set, be unlike the training images: on MosMed CT a
    realdev-trained bundle flags 3 % of the images but the set's AUC is 0.73 (README "Can I trust")."""

    n: int
    auc: float
    ci: tuple[float, float]
    shifted: bool

    def sentence(self, what: str) -> str:
        verdict = ("unlike the training images as a set: treat results on them as out of distribution"
                   if self.shifted else "not shown to differ, as a set, from the validation images")
        return (f"{what}: {self.n} images {verdict} (shift AUC {self.auc:.3f}, 95 % CI "
                f"{self.ci[0]:.3f}-{self.ci[1]:.3f}; 0.5 = as close to the training images as validation)")


class SetShiftTest:
    """The Mann-Whitney AUC of a set's shift scores against the validation images' (`OodThreshold.val_scores`),
    fed a batch at a time: memory holds the reference's counts, not the set, so it runs over whole archives.
    Its variance is DeLong's, which counts images as independent: slices of a few patients give too narrow an
    interval."""

    def __init__(self, reference):
        self.reference = np.sort(np.asarray(reference, dtype=np.float64))
        if len(self.reference) < 2:
            raise RespiscanError("a set-shift test needs at least 2 reference scores")
        self.n, self.v10_sum, self.v10_squares = 0, 0.0, 0.0
        self.below = np.zeros(len(self.reference) + 1)  # images with k reference scores below them
        self.at_most = np.zeros(len(self.reference) + 1)  # images with k reference scores at or below them

    def add(self, scores) -> None:
        x = np.asarray(scores, dtype=np.float64).ravel()
        lo = np.searchsorted(self.reference, x, side="left")
        hi = np.searchsorted(self.reference, x, side="right")
        v10 = (lo + hi) / (2 * len(self.reference))  # the share of reference scores below x, ties half
        self.n += len(x)
        self.v10_sum += float(v10.sum())
        self.v10_squares += float((v10 ** 2).sum())
        self.below += np.bincount(lo, minlength=len(self.below))
        self.at_most += np.bincount(hi, minlength=len(self.at_most))

    def result(self) -> SetShift | None:
        """None with fewer than 2 images: no variance."""
        if self.n < 2:
            return None
        m = len(self.reference)
        auc = self.v10_sum / self.n
        var10 = (self.v10_squares - self.n * auc ** 2) / (self.n - 1)
        # per reference score j: the images above it (more than j reference scores below them), ties half
        above = self.n - np.cumsum(self.below)[:m]
        tied = np.cumsum(self.below)[:m] - np.cumsum(self.at_most)[:m]
        v01 = (above + tied / 2) / self.n
        se = float(np.sqrt(max(var10, 0.0) / self.n + v01.var(ddof=1) / m))
        low, high = max(0.0, auc - _Z95 * se), min(1.0, auc + _Z95 * se)
        return SetShift(self.n, float(auc), (low, high), bool(low > 0.5 and auc >= SMALL_EFFECT_AUC))


def set_shift(detector: OodDetector | None, modality: str, scores) -> SetShift | None:
    """`SetShiftTest` of these scores against the bundle's validation scores; None without them (bundles from
    before the reference was stored) or with fewer than 2 scores."""
    limits = None if detector is None else detector.modalities.get(modality)
    if limits is None or not limits.val_scores:
        return None
    test = SetShiftTest(limits.val_scores)
    test.add(scores)
    return test.result()
