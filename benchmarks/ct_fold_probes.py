"""Two label-free or network-free ideas for CT transfer, measured on the fold bundles of a CT crossval run.

1. AdaBN (Li et al. 2016): each fold bundle's BatchNorm statistics re-estimated on half of the left-out
   source's groups (labels unused), scored on the other half, against the bundle as trained.
2. The shift detector's network-free image statistics (`data/image_stats.py`) as a CT classifier: a logistic
   regression fitted on one source's train split, scored on the other source, alone and fused (mean logit)
   with the fold's deep model.

UCSD's (realdev's) test split is never scored; everything else of the left-out source is.

    respiscan crossval ../shared/data/realdev ../shared/data/sites/mosmed_ct --by source --modality ct --out cv
    python benchmarks/ct_fold_probes.py cv
"""

from __future__ import annotations

import argparse
import copy
import csv
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from respiscan.data.audit import source_of
from respiscan.data.image_stats import HISTOGRAM_BINS, image_statistics
from respiscan.data.images import load_dataset_images
from respiscan.data.samples import Sample, discover
from respiscan.serving.torch_engine import Pipeline

SOURCES = {"ct_ucsd_covid_ct": "data/realdev", "mosmed_ct": "data/sites/mosmed_ct"}  # fold name -> under ../shared


def scored(samples: list[Sample]) -> np.ndarray:
    """Every image but UCSD's test split (realdev's, looked at too often to be scored again)."""
    return np.array([not (s.split == "test" and source_of(s) == "ct_ucsd_covid_ct") for s in samples])


def adabn(net: torch.nn.Module, images: np.ndarray, modality: str) -> torch.nn.Module:
    """A copy whose CT embedder and task-MLP BatchNorm layers hold `images`' statistics."""
    net = copy.deepcopy(net)
    parts = [net.task_embedder(modality), net.shared_embedder(modality), net.task[modality]]
    norms = [m for p in parts for m in p.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over every batch
        m.train()
    with torch.no_grad():
        for i in range(0, len(images), 32):
            net.logits_and_embedding(torch.from_numpy(images[i:i + 32]), modality)
    for m in norms:
        m.eval()
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crossval", type=Path, help="a `crossval --by source --modality ct` output folder")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = parser.parse_args()
    images, samples, stats = {}, {}, {}
    for fold, folder in SOURCES.items():
        pipe = Pipeline(args.crossval / "folds" / fold / "bundle", bf16=False)
        ct = [s for s in discover(args.shared / folder) if s.modality == "ct"]
        images[fold], samples[fold], _ = load_dataset_images(ct, pipe.preprocess_config)
        stats[fold] = image_statistics(images[fold])

    print("\n| left out | images | as trained: AUC, sens / spec at its threshold | AdaBN on the other half |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for fold in SOURCES:
        pipe = Pipeline(args.crossval / "folds" / fold / "bundle", bf16=False)
        ss, keep = samples[fold], scored(samples[fold])
        groups = np.array([s.group or s.id for s in ss])
        half = set(rng.permutation(np.unique(groups[keep]))[: len(np.unique(groups[keep])) // 2])
        adapt = keep & np.array([g in half for g in groups])
        test = keep & ~adapt
        y = np.array([s.label for s in ss])[test]
        cells = []
        for net in (pipe.net, adabn(pipe.net, images[fold][adapt], "ct")):
            pipe.net = net
            p = pipe.probabilities(images[fold][test], "ct")
            hit = p >= pipe.thresholds["ct"]
            cells.append(f"{roc_auc_score(y, p):.3f}, {hit[y == 1].mean():.2f} / {1 - hit[y == 0].mean():.2f}")
        print(f"| {fold} | {adapt.sum()} adapt, {test.sum()} scored | {cells[0]} | {cells[1]} |")

    print("\n| left out | features | C | in-source (grouped 5-fold on the other's train) | image statistics alone "
          "| fused with the deep fold model | deep alone |")
    print("|---|---|---|---|---|---|---|")
    for fold, other in (("mosmed_ct", "ct_ucsd_covid_ct"), ("ct_ucsd_covid_ct", "mosmed_ct")):
        fit = np.array([s.split == "train" for s in samples[other]])
        y_fit = np.array([s.label for s in samples[other]])[fit]
        groups = [s.group or s.id for s, f in zip(samples[other], fit) if f]
        keep = scored(samples[fold])
        y = np.array([s.label for s in samples[fold]])[keep]
        with open(args.crossval / "folds" / fold / "evaluation" / "predictions.csv", newline="") as f:
            deep_by_path = {str(Path(r["path"]).resolve()): float(r["uncalibrated_probability"])
                            for r in csv.DictReader(f)}
        deep = np.array([deep_by_path[str(Path(s.path).resolve())] for s in samples[fold]])[keep]
        for name, block in (("all 111", slice(None)), (f"histogram {HISTOGRAM_BINS}", slice(0, HISTOGRAM_BINS))):
            for c in (0.01, 0.1):
                model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
                p = model.fit(stats[other][fit][:, block], y_fit).predict_proba(stats[fold][keep][:, block])[:, 1]
                fused = expit((logit(np.clip(deep, 1e-6, 1 - 1e-6)) + logit(p)) / 2)
                inside = cross_val_predict(model, stats[other][fit][:, block], y_fit, groups=groups,
                                           cv=StratifiedGroupKFold(5, shuffle=True, random_state=0),
                                           method="predict_proba")[:, 1]
                print(f"| {fold} | {name} | {c} | {roc_auc_score(y_fit, inside):.3f} | {roc_auc_score(y, p):.3f} | "
                      f"{roc_auc_score(y, fused):.3f} | {roc_auc_score(y, deep):.3f} |")


if __name__ == "__main__":
    main()
