"""A cheap probe of a CT crop's transfer between sources, without a deep model.

Every CT slice of UCSD COVID-CT (realdev) and MosMed (sites) is preprocessed at 96 px with each crop; a
logistic regression on a 24x24 thumbnail, or on a 32-bin histogram of the non-blank pixels, is fitted on one
source's train split and scored (AUC) on every slice of the other source.

    python benchmarks/transfer_probe.py --crops none ct_body ct_lungs
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from respiscan.data.preprocess import CROPS, preprocess

SOURCES = {"UCSD": "data/realdev", "MosMed": "data/sites/mosmed_ct"}  # under ../shared


def features(image: np.ndarray) -> dict[str, np.ndarray]:
    hist = np.histogram(image[image > 0], bins=32, range=(0, 256))[0]
    return {"thumbnail": cv2.resize(image, (24, 24), interpolation=cv2.INTER_AREA).ravel() / 255.0,
            "histogram": hist / max(1, hist.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--crops", nargs="+", default=["none", "ct_body", "ct_lungs"], choices=CROPS)
    args = parser.parse_args()
    rows = {}
    for name, folder in SOURCES.items():
        root = args.shared / folder
        if not (root / "manifest.csv").exists():
            sys.exit(f"needs {root}")
        rows[name] = [(cv2.imread(str(root / r["path"]), cv2.IMREAD_GRAYSCALE), r["label"] == "COVID", r["split"])
                      for r in csv.DictReader(open(root / "manifest.csv")) if r["modality"] == "ct"]
    print("| crop | features | UCSD train -> MosMed | MosMed train -> UCSD |\n|---|---|---|---|")
    for crop in args.crops:
        feats = {n: [features(preprocess(im, "ct", 96, crop=crop)) for im, _, _ in rs] for n, rs in rows.items()}
        for kind in ("thumbnail", "histogram"):
            cells = []
            for fit, score in (("UCSD", "MosMed"), ("MosMed", "UCSD")):
                train = [i for i, (_, _, split) in enumerate(rows[fit]) if split == "train"]
                x = np.array([feats[fit][i][kind] for i in train])
                y = np.array([rows[fit][i][1] for i in train])
                model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000)).fit(x, y)
                scores = model.predict_proba(np.array([f[kind] for f in feats[score]]))[:, 1]
                cells.append(f"{roc_auc_score([r[1] for r in rows[score]], scores):.3f}")
            print(f"| {crop} | {kind} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
