"""`respiscan preprocess`: write preprocessed copies of a data set; the originals are never touched."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2

from respiscan.data.images import load_dataset_images
from respiscan.data.preprocess import PreprocessConfig
from respiscan.data.samples import discover, write_manifest
from respiscan.errors import RespiscanError
from respiscan.utils import atomic_write


def write_preprocessed(data: str | Path, out: str | Path, size: int = 224, strict: bool = False) -> tuple[int, list]:
    """Same relative paths under `out` (as PNG) plus a manifest.csv; returns (count written, skipped)."""
    data, out = Path(data), Path(out)
    root = data if data.is_dir() else data.parent
    if out.resolve() == root.resolve() or out.resolve().is_relative_to(root.resolve()):
        raise RespiscanError(f"{out}: output must be outside the data folder (the originals are never overwritten)")
    if out.exists() and any(out.iterdir()):
        raise RespiscanError(f"{out}: output folder exists and is not empty")
    samples = discover(data)
    images, kept, skipped = load_dataset_images(samples, PreprocessConfig(size=size), strict=strict, desc="preprocess")
    written = []
    for image, s in zip(images, kept):
        target = out / Path(s.id).with_suffix(".png")
        _, png = cv2.imencode(".png", image)
        with atomic_write(target, "wb") as f:
            f.write(png.tobytes())
        written.append(replace(s, path=target))
    write_manifest(written, out / "manifest.csv", root=out)
    return len(written), skipped
