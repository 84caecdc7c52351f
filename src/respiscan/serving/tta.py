"""Test-time augmentation: the same image seen N ways, so that the spread of p(COVID) says how steady it is.

View 0 is the image as it is; the others are small random affine and intensity changes of the preprocessed
image, half the ranges the scratch backbones trained with (training/stages.py `random_affine`: rotation 10
degrees, scale and gain 10 %, shift 6 %), so every view is one the model has seen the like of. No flips: chest
X-rays and axial CT slices both show lateralised anatomy (heart and aortic arch on the left, liver on the
right), a flipped image is one no training image resembles (situs inversus), and training never flipped.
The views are drawn from a fixed seed, so the same input always gives the same result.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_ROTATE, MAX_SCALE, MAX_SHIFT, MAX_GAIN = 5.0, 0.05, 0.03, 0.05  # degrees; fractions of size / intensity
SEED = 0


def tta_views(images: np.ndarray, n: int, seed: int = SEED) -> np.ndarray:
    """(n, N, S, S) uint8: view 0 the images unchanged, views 1..n-1 each image under its own random change."""
    if n < 1:
        raise ValueError(f"TTA needs at least one view, got {n}")
    rng = np.random.default_rng(seed)
    views = [images]
    for _ in range(n - 1):
        views.append(np.stack([_augment(image, rng) for image in images]) if len(images) else images)
    return np.stack(views)


def _augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    angle, scale, gain, level = rng.uniform(-1, 1, 4) * (MAX_ROTATE, MAX_SCALE, MAX_GAIN, MAX_GAIN)
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, 1 + scale)
    matrix[:, 2] += rng.uniform(-1, 1, 2) * MAX_SHIFT * size
    moved = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0).astype(np.float32)
    mean = moved.mean()
    return np.clip((moved - mean) * (1 + gain) + mean * (1 + level), 0, 255).round().astype(np.uint8)
