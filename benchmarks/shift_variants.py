"""The shift detector as fitted (one Gaussian per modality, pooled over sources) against one mean per source with
a single tied covariance of the within-source residuals (Lee et al. 2018's class-conditional Mahalanobis, with
sources for classes), on a bundle trained on several sources (README "Can I trust this prediction?").

    python benchmarks/shift_variants.py BUNDLE DATA [DATA ...]

Both variants are fitted here, in float64, on the bundle's own training images (its splits.csv) and thresholded
on its validation images as `training/shift.py` does (each source its own thresholds in the tied variant; an
input is foreign when it is far from every source). Printed per modality: the share flagged of each source's
validation and test images, of the other modality's test images given as this one, and of made-up photographs,
drawings and noise (tests/foreign.py, seed 1).
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.covariance import LedoitWolf

from respiscan.data.image_stats import image_statistics
from respiscan.data.images import load_dataset_images
from respiscan.data.samples import discover
from respiscan.serving import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from foreign import foreign_images  # noqa: E402

Q = 0.95  # 5 % of validation images flagged, as training/shift.py
Features = tuple[np.ndarray, np.ndarray]  # embeddings, image statistics
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _distance(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = x - mean
    return np.sqrt(np.maximum(((centred @ precision) * centred).sum(axis=1), 0.0))


def _limits(d_embedding: np.ndarray, d_image: np.ndarray) -> np.ndarray:
    """The two thresholds as training/shift.py sets them: each distance's quantile, scaled by one factor."""
    limits = np.array([np.quantile(d_embedding, Q), np.quantile(d_image, Q)])
    return limits * np.quantile(np.maximum(d_embedding / limits[0], d_image / limits[1]), Q)


def pooled(train: Features, val: Features) -> Scorer:
    fits = [LedoitWolf().fit(x) for x in train]
    parts = lambda e, s: [_distance(x, f.location_, f.precision_) for x, f in zip((e, s), fits)]  # noqa: E731
    limits = _limits(*parts(*val))
    return lambda e, s: np.maximum(*(d / limit for d, limit in zip(parts(e, s), limits)))


def tied(train: Features, train_src: np.ndarray, val: Features, val_src: np.ndarray) -> Scorer:
    sources = sorted(set(train_src))
    means, precisions = [], []
    for x in train:
        mean = {s: x[train_src == s].mean(axis=0) for s in sources}
        residuals = x - np.stack([mean[s] for s in train_src])
        means.append(mean)
        precisions.append(LedoitWolf(assume_centered=True).fit(residuals).precision_)
    parts = lambda e, s, src: [_distance(x, m[src], p) for x, m, p in zip((e, s), means, precisions)]  # noqa: E731
    limits = {s: _limits(*parts(val[0][val_src == s], val[1][val_src == s], s)) for s in sources}
    return lambda e, st: np.min([np.maximum(*(d / limit for d, limit in zip(parts(e, st, s), limits[s])))
                                 for s in sources], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", nargs="+", type=Path)
    args = parser.parse_args()
    pipe = load(args.bundle)
    with open(args.bundle / "splits.csv", newline="") as f:
        split = {r["id"]: r["split"] for r in csv.DictReader(f)}
    samples = [s for s in discover(args.data) if s.id in split]

    def features(images: np.ndarray, modality: str) -> Features:
        embedding = np.concatenate([pipe.outputs(images[i:i + 64], modality).embedding
                                    for i in range(0, len(images), 64)])
        return embedding.astype(np.float64), image_statistics(images)

    made_up = foreign_images(40, seed=1)
    print("| modality | detector | " + " | ".join(["flagged: each source's validation / test", "other modality",
                                                   *made_up]) + " |")
    print("|---|---|---|---|" + "---|" * len(made_up))
    for modality in pipe.modalities:
        group = [s for s in samples if s.modality == modality]
        images, kept, _ = load_dataset_images(group, pipe.preprocess_config, desc=modality)
        e, st = features(images, modality)
        where, src = np.array([split[s.id] for s in kept]), np.array([s.source for s in kept])
        tr, va, te = (where == k for k in ("train", "val", "test"))
        other = [replace(s, modality=modality) for s in samples if s.modality != modality and split[s.id] == "test"]
        foreign = {"other modality": features(load_dataset_images(other, pipe.preprocess_config, desc="swap")[0],
                                              modality)}
        foreign |= {kind: features(np.stack([pipe.prepare(i, modality) for i in ims]), modality)
                    for kind, ims in made_up.items()}
        for name, score in (("pooled (as fitted)", pooled((e[tr], st[tr]), (e[va], st[va]))),
                            ("tied, per source", tied((e[tr], st[tr]), src[tr], (e[va], st[va]), src[va]))):
            per_source = "; ".join(
                f"{s} {np.mean(score(e[va & (src == s)], st[va & (src == s)]) > 1):.1%} / "
                f"{np.mean(score(e[te & (src == s)], st[te & (src == s)]) > 1):.1%}" for s in sorted(set(src)))
            others = [f"{np.mean(score(*f) > 1):.1%}" for f in foreign.values()]
            print(f"| {modality} | {name} | {per_source} | " + " | ".join(others) + " |", flush=True)


if __name__ == "__main__":
    main()
