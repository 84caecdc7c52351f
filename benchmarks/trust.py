"""The shift detector's figures for one bundle: the share of inputs flagged as unlike the training images, per
kind of input (README "Can I trust this prediction?").

    python benchmarks/trust.py BUNDLE DATA [DATA ...] [--engine onnx] [--foreign 40]

For each modality the bundle knows: the test split of every source in DATA (in-source when the bundle was trained
on that source, else external, with its AUC beside it), the other modality's test images given as this one, and
made-up photographs, drawings and noise (tests/foreign.py, seed 1). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from respiscan.bundle import Bundle
from respiscan.data.samples import discover
from respiscan.serving import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from foreign import foreign_images  # noqa: E402

OTHER = {"xray": "ct", "ct": "xray"}


def _flagged(pipe, images: list, modality: str) -> tuple[float, np.ndarray]:
    prepared = np.stack([pipe.prepare(image, modality) for image in images])
    scored = [pipe.score(prepared[i:i + 32], modality) for i in range(0, len(prepared), 32)]
    flagged = np.concatenate([~s.in_distribution for s in scored])
    return float(flagged.mean()), np.concatenate([s.probability for s in scored])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("data", nargs="+")
    parser.add_argument("--engine", default="onnx")
    parser.add_argument("--foreign", type=int, default=40, help="made-up images of each kind")
    args = parser.parse_args()

    pipe = load(args.bundle, engine=args.engine)
    trained_on = Bundle.open(args.bundle).config.data.sources_by_modality()
    test = [s for s in discover(args.data) if s.split == "test"]
    made_up = foreign_images(args.foreign, seed=1)
    print(f"bundle {args.bundle} ({args.engine}); trained on: {trained_on or 'not recorded'}\n")
    print("| modality | input | n | flagged | AUC |")
    print("|---|---|---|---|---|")
    for modality in pipe.modalities:
        for source in sorted({s.source for s in test if s.modality == modality}):
            samples = [s for s in test if s.modality == modality and s.source == source]
            share, p = _flagged(pipe, [s.path for s in samples], modality)
            labels = [s.label for s in samples]
            kind = "in-source" if source in trained_on.get(modality, []) else "external"
            print(f"| {modality} | {source} test ({kind}) | {len(samples)} | {share:.1%} | "
                  f"{roc_auc_score(labels, p):.3f} |")
        swapped = [s.path for s in test if s.modality == OTHER[modality]]
        if swapped:
            share, _ = _flagged(pipe, swapped, modality)
            given = f"{OTHER[modality]} test images given as {modality}"
            print(f"| {modality} | {given} | {len(swapped)} | {share:.1%} | |")
        for kind, images in made_up.items():
            share, _ = _flagged(pipe, images, modality)
            print(f"| {modality} | made-up {kind} images | {len(images)} | {share:.1%} | |")


if __name__ == "__main__":
    main()
