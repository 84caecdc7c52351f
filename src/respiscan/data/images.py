"""Decode and preprocess images in parallel: all at once into uint8 arrays (memory and disk cache, for training),
or batch by batch with the next batch decoding while the caller runs the model on this one (for prediction)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from respiscan.data.preprocess import PreprocessConfig
from respiscan.data.samples import Sample
from respiscan.errors import RespiscanError

log = logging.getLogger(__name__)


def load_preprocessed(path: str | Path, modality: str, cfg: PreprocessConfig) -> np.ndarray:
    """Read one image file (any supported format) and preprocess it exactly as training did."""
    from respiscan.data.io import DicomWindow, read_image

    window = DicomWindow(ct_center=cfg.dicom_ct_center, ct_width=cfg.dicom_ct_width)
    return cfg.apply(read_image(path, modality=modality, window=window), modality)


def _read_or_error(s: Sample, cfg: PreprocessConfig, strict: bool) -> np.ndarray | RespiscanError:
    try:
        return load_preprocessed(s.path, s.modality, cfg)
    except RespiscanError as e:
        if strict:
            raise
        return e


@dataclass(frozen=True)
class ImageBatch:
    images: np.ndarray  # (N, size, size) uint8, preprocessed
    samples: list[Sample]  # the readable ones, in order
    skipped: list[tuple[str, str]]  # (id, reason) of the unreadable ones


def _gather(samples: list[Sample], outs: Iterable[np.ndarray | RespiscanError], cfg: PreprocessConfig) -> ImageBatch:
    """The readable images stacked, with their samples; the unreadable ones warned about and listed."""
    images, kept, skipped = [], [], []
    for s, out in zip(samples, outs):
        if isinstance(out, RespiscanError):
            log.warning("skipped %s", out)
            skipped.append((s.id, str(out)))
        else:
            images.append(out)
            kept.append(s)
    arr = np.stack(images) if images else np.zeros((0, cfg.size, cfg.size), np.uint8)
    return ImageBatch(arr, kept, skipped)


def _collect(batch: list[Sample], futures: list[Future], cfg: PreprocessConfig) -> ImageBatch:
    return _gather(batch, (f.result() for f in futures), cfg)


def iter_batches(samples: list[Sample], cfg: PreprocessConfig, batch_size: int = 64, *, strict: bool = False,
                 workers: int | None = None) -> Iterator[ImageBatch]:
    """The samples preprocessed, `batch_size` at a time; batch k+1 decodes in threads while the caller works on
    batch k, so decoding hides behind inference wherever the model leaves a core idle, and memory holds two
    batches whatever the number of samples."""
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        starts = range(0, len(samples), batch_size)
        pending = None
        for start in starts:
            batch = samples[start:start + batch_size]
            submitted = (batch, [pool.submit(_read_or_error, s, cfg, strict) for s in batch])
            if pending is not None:
                yield _collect(*pending, cfg)
            pending = submitted
        if pending is not None:
            yield _collect(*pending, cfg)


def _cache_key(samples: list[Sample], cfg: PreprocessConfig) -> str:
    h = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for s in samples:
        try:
            st = os.stat(s.path)
            h.update(f"{s.path}|{s.modality}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{s.path}|missing\n".encode())
    return h.hexdigest()[:20]


def load_dataset_images(samples: list[Sample], cfg: PreprocessConfig, *, cache_dir: Path | None = None,
                        strict: bool = False, workers: int | None = None, desc: str = "preprocess",
                        ) -> tuple[np.ndarray, list[Sample], list[tuple[str, str]]]:
    """Preprocessed uint8 arrays (N, size, size) for the readable samples, those samples, and the skipped ones.

    Unreadable images are skipped with a warning (and returned as (id, reason)); with strict=True the first
    one raises. OpenCV releases the GIL, so threads overlap decoding on all cores.
    """
    cache_file = cache_dir / f"images-{_cache_key(samples, cfg)}.npz" if cache_dir else None
    if cache_file and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            keep = set(z["ids"].tolist())
            skipped = [tuple(x) for x in z["skipped"].tolist()]
            return z["images"], [s for s in samples if s.id in keep], skipped

    from tqdm import tqdm  # here: one-image prediction never loads it

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        outs = pool.map(lambda s: _read_or_error(s, cfg, strict), samples)
        batch = _gather(samples, tqdm(outs, total=len(samples), desc=desc, unit="img"), cfg)
    arr, kept, skipped = batch.images, batch.samples, batch.skipped
    if cache_file:
        from respiscan.utils import atomic_write

        with atomic_write(cache_file, "wb") as f:
            np.savez(f, images=arr, ids=np.array([s.id for s in kept], dtype=str),
                     skipped=np.array(skipped, dtype=str).reshape(-1, 2))
    return arr, kept, skipped
