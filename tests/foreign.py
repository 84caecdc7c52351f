"""Images that are not chest scans, made here: photographs (the sample photos that scikit-learn and matplotlib
ship), drawings, and noise, each as grey uint8 arrays of several sizes and crops."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

KINDS = ("photograph", "drawing", "noise")


def _photographs() -> list[np.ndarray]:
    import matplotlib
    from sklearn.datasets import load_sample_images

    photos = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in load_sample_images().images]
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [*photos, cv2.imread(str(hopper), cv2.IMREAD_GRAYSCALE)]


def _photograph(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape
    side = int(rng.integers(min(h, w) // 3, min(h, w)))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    return np.ascontiguousarray(photo[y:y + side, x:x + side])


def _drawing(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Shapes, lines and text in a few grey levels on a plain background, like a diagram or a sketch."""
    image = np.full((size, size), int(rng.choice([0, 255, int(rng.integers(0, 256))])), np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        colour = int(rng.integers(0, 256))
        a, b = (tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2))
        shape = rng.integers(4)
        if shape == 0:
            cv2.rectangle(image, a, b, colour, int(rng.choice([-1, 2, 5])))
        elif shape == 1:
            cv2.circle(image, a, int(rng.integers(5, size // 3)), colour, int(rng.choice([-1, 2, 5])))
        elif shape == 2:
            cv2.line(image, a, b, colour, int(rng.integers(1, 8)))
        else:
            cv2.putText(image, "respiscan"[: int(rng.integers(2, 10))], a, cv2.FONT_HERSHEY_SIMPLEX,
                        float(rng.uniform(0.5, 2.5)), colour, int(rng.integers(1, 4)))
    return image


def _noise(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # uniform white noise
        return rng.integers(0, 256, (size, size), dtype=np.uint8)
    if kind == 1:  # Gaussian noise around a random grey
        return np.clip(rng.normal(rng.uniform(40, 215), rng.uniform(10, 60), (size, size)), 0, 255).astype(np.uint8)
    coarse = rng.integers(0, 256, (8, 8)).astype(np.uint8)  # smooth blotches
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def foreign_images(n_per_kind: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """`n_per_kind` images of each kind in KINDS, seeded."""
    rng = np.random.default_rng(seed)
    photos = _photographs()
    return {"photograph": [_photograph(rng, photos) for _ in range(n_per_kind)],
            "drawing": [_drawing(rng) for _ in range(n_per_kind)],
            "noise": [_noise(rng) for _ in range(n_per_kind)]}
