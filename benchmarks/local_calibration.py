"""What local recalibration (`respiscan calibrate`) does for a bundle on a source it was not trained on.

For each fold of a `crossval --by source` run, the fold's bundle (trained without source S) is recalibrated on
n images of S's train split (whole groups, drawn at random; n = all as well) and scored on S's test split,
against the bundle as trained: AUC (unchanged by construction), sensitivity and specificity at the threshold,
and ECE.

    respiscan crossval ../shared/data/realdev ../shared/data/sites/mosmed_ct --by source --modality ct --out cv
    python benchmarks/local_calibration.py cv ../shared/data/realdev ../shared/data/sites/mosmed_ct
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from respiscan.data.audit import source_of
from respiscan.data.samples import discover
from respiscan.evaluation.evaluate import evaluate
from respiscan.evaluation.recalibrate import recalibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crossval", type=Path, help="a `crossval --by source` output folder")
    parser.add_argument("data", type=Path, nargs="+", help="the data folders it was run on")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 0], help="local images (0: all)")
    args = parser.parse_args()
    samples = discover(args.data)
    print("| left out | modality | local images (COVID) | AUC on its test split | sens / spec at the threshold "
          "| ECE |\n|---|---|---|---|---|---|")
    for fold in sorted(p for p in (args.crossval / "folds").iterdir() if (p / "bundle").is_dir()):
        bundle = fold / "bundle"
        mine = [s for s in samples if source_of(s) == fold.name]
        with tempfile.TemporaryDirectory() as tmp:
            trained = evaluate(bundle, args.data, Path(tmp) / "e", samples=mine, figures=False, n_resamples=200)
            for m, r in trained["modalities"].items():
                print(f"| {fold.name} | {m} | none (as trained) | {r['roc_auc']:.3f} | {r['sensitivity']:.2f} / "
                      f"{r['specificity']:.2f} | {r['ece']:.3f} |", flush=True)
            rng = np.random.default_rng(0)
            train = [s for s in mine if s.split != "test"]
            groups = rng.permutation(sorted({s.group or s.id for s in train}))
            for n in args.sizes:
                take, kept = set(), 0
                for g in groups:
                    if n and kept >= n:
                        break
                    members = [s for s in train if (s.group or s.id) == g]
                    take.update(s.id for s in members)
                    kept += len(members)
                local = [s for s in train if s.id in take]
                out = recalibrate(bundle, args.data, Path(tmp) / f"local{n}",
                                  samples=local + [s for s in mine if s.split == "test"])
                after = evaluate(out.bundle, args.data, Path(tmp) / f"e{n}", samples=mine, figures=False,
                                 n_resamples=200)
                for refit in out.refits:
                    r = after["modalities"][refit.modality]
                    print(f"| {fold.name} | {refit.modality} | {refit.n} ({refit.n_positive}) | {r['roc_auc']:.3f} | "
                          f"{r['sensitivity']:.2f} / {r['specificity']:.2f} | {r['ece']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
