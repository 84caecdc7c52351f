"""External validation: one model per fold with identical settings, each scored on what it left out.

`--by source` leaves each acquisition source out in turn (train on the others' train splits, score on every
image of the left-out source): the protocol that shows whether a model learnt the finding or the site.
`--folds K` is grouped, class-stratified K-fold within the data (whole groups/patients per fold), for data
from one source. Each fold's epochs and thresholds are chosen on a validation split carved from its own
training data, so nothing in a fold ever looks at the images it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from respiscan.bundle import CONFIG, Bundle
from respiscan.data.audit import source_of
from respiscan.data.samples import DataPaths, Sample, data_paths, discover
from respiscan.errors import RespiscanError
from respiscan.evaluation.evaluate import evaluate
from respiscan.evaluation.report import KIND_NAMES, render_markdown
from respiscan.training.config import TrainConfig
from respiscan.training.trainer import train
from respiscan.utils import atomic_write, read_json, write_json, write_rows

By = Literal["source", "group"]
BY: tuple[str, ...] = get_args(By)
BASELINES = ("border", "intensity")  # the audit's shortcut features reported beside each fold (logistic model)
SUMMARISED = ("auc", "sensitivity", "specificity", "ece", "in_source_val_auc",
              *(f"{kind}_baseline_auc" for kind in BASELINES))


@dataclass(frozen=True)
class Fold:
    """One model's data: `samples` with split train (validation is carved from it) and test (scored)."""

    name: str
    held_out: str
    samples: list[Sample]


def source_folds(samples: list[Sample]) -> list[Fold]:
    """Leave one source out: its every image is the test set; the other sources' train splits train."""
    sources = sorted({source_of(s) for s in samples})
    if len(sources) < 2:
        raise RespiscanError(f"crossval --by source needs at least two sources; the data has {sources}")
    folds = []
    for source in sources:
        test = [replace(s, split="test") for s in samples if source_of(s) == source]
        rest = [s for s in samples if source_of(s) != source and s.split != "test"]
        missing = sorted({s.modality for s in test} - {s.modality for s in rest})
        if missing:
            raise RespiscanError(f"crossval: leaving out {source!r} leaves no {missing[0]} images to train on; "
                                 "each modality needs at least two sources")
        folds.append(Fold(source, f"source {source}", rest + test))
    return folds


def group_folds(samples: list[Sample], k: int, seed: int) -> list[Fold]:
    """Grouped, class-stratified K-fold over all images (whole groups per fold), one modality at a time."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise RespiscanError(f"crossval --folds needs K >= 2, got {k}")
    assignment: dict[str, int] = {}
    for modality in sorted({s.modality for s in samples}):
        mine = [s for s in samples if s.modality == modality]
        groups = [s.group or s.id for s in mine]
        if len(set(groups)) < k:
            raise RespiscanError(f"crossval: {modality} has {len(set(groups))} groups, fewer than {k} folds")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for fold, (_, test_idx) in enumerate(splitter.split(np.zeros(len(mine)), [s.label for s in mine], groups)):
            assignment.update({mine[i].id: fold for i in test_idx})
    return [Fold(f"fold{f + 1}", f"fold {f + 1} of {k}",
                 [replace(s, split="test" if assignment[s.id] == f else "train") for s in samples])
            for f in range(k)]


def _fold_rows(fold: Fold, results: dict, bundle: Path) -> list[dict]:
    config = Bundle.open(bundle).config
    # the audit that train runs fits its shortcut models on the fold's non-test images and scores its test
    # images, i.e. the left-out ones: the same protocol as the fold's model, without a network
    shortcuts = (config.audit or {}).get("shortcuts") or {}
    rows = []
    for modality, m in results["modalities"].items():
        ci = m["ci"].get("roc_auc") or [None, None]
        baseline = shortcuts.get(modality) or {}
        rows.append({"fold": fold.name, "held_out": fold.held_out, "modality": modality, "n": m["n"],
                     "auc": m["roc_auc"], "auc_low": ci[0], "auc_high": ci[1], "threshold": m["threshold"],
                     "sensitivity": m["sensitivity"], "specificity": m["specificity"], "ece": m["ece"],
                     "in_source_val_auc": (config.validation_metrics.get(modality) or {}).get("roc_auc"),
                     **{f"{kind}_baseline_auc": (baseline.get(kind) or {}).get("logistic") for kind in BASELINES}})
    return rows


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _markdown(rows: list[dict], summary: dict) -> str:
    header = ["Left out", "Modality", "n", "AUC (95% CI)", "Sensitivity", "Specificity", "ECE",
              "In-source validation AUC", "Border-only baseline AUC", "Intensity-statistics baseline AUC"]
    table = [[r["held_out"], KIND_NAMES.get(r["modality"], r["modality"]), str(r["n"]),
              f"{_num(r['auc'])} ({_num(r['auc_low'])}-{_num(r['auc_high'])})", _num(r["sensitivity"]),
              _num(r["specificity"]), _num(r["ece"]), _num(r["in_source_val_auc"]),
              *(_num(r[f"{kind}_baseline_auc"]) for kind in BASELINES)] for r in rows]
    means = [[f"mean of {s['folds']} folds", KIND_NAMES.get(m, m), "", *(_num(s[k]) for k in SUMMARISED)]
             for m, s in summary.items()]
    return render_markdown([
        ("h1", "respiscan crossval"),
        ("p", "One model per fold with identical settings, each scored on the images it left out. Sensitivity "
              "and specificity are at each fold's own operating point, chosen on a validation split of its "
              "training data. The in-source validation AUC is that split's: the gap between it and the "
              "left-out AUC is what moving to a new source costs. The baselines are the audit's network-free "
              "shortcut models (a logistic regression on the outer 5 % of the raw image, or on seven global "
              "intensity statistics), fitted on the fold's training images and scored on the same left-out "
              "images: a model that does not beat them there has not shown that it learnt more than the look."),
        ("table", header, table + means)])


def run_crossval(data: DataPaths, out: str | Path, config: TrainConfig, *, by: By = "source", folds: int = 5,
                 resume: bool = False, progress: bool = True, modality: str | None = None) -> dict:
    """Train and score every fold; write crossval.json, crossval.csv and crossval.md to OUT (each fold's
    bundle and evaluation under OUT/folds/NAME) and return the summary. `modality` keeps that one only."""
    out = Path(out)
    samples = [s for s in discover(data) if modality in (None, s.modality)]
    if not samples:
        raise RespiscanError(f"crossval: no {modality} images in {', '.join(map(str, data_paths(data)))}")
    plan = source_folds(samples) if by == "source" else group_folds(samples, folds, config.seed)
    rows: list[dict] = []
    for i, fold in enumerate(plan, 1):
        where = out / "folds" / fold.name
        bundle, metrics = where / "bundle", where / "evaluation" / "metrics.json"
        if resume and metrics.is_file() and (bundle / CONFIG).is_file():
            results = read_json(metrics)
            if progress:
                print(f"[fold {i}/{len(plan)}] {fold.held_out}: finished earlier, reused")
        else:
            if progress:
                n_test = sum(s.split == "test" for s in fold.samples)
                print(f"[fold {i}/{len(plan)}] {fold.held_out}: training on {len(fold.samples) - n_test} images, "
                      f"scoring {n_test}")
            train(data, bundle, config, samples=fold.samples, resume=resume)
            results = evaluate(bundle, data, where / "evaluation", samples=fold.samples, figures=False)
        rows += _fold_rows(fold, results, bundle)
    summary = {}
    for modality in dict.fromkeys(r["modality"] for r in rows):
        mine = [r for r in rows if r["modality"] == modality]
        summary[modality] = {"folds": len(mine), **{k: _mean([r[k] for r in mine]) for k in SUMMARISED}}
    result = {"data": [str(p) for p in data_paths(data)], "by": by,
              "folds": rows, "mean": summary, "config": config.to_dict()}
    write_json(out / "crossval.json", result)
    write_rows(out / "crossval.csv", rows)
    with atomic_write(out / "crossval.md", "w", encoding="utf-8") as f:
        f.write(_markdown(rows, summary))
    return result


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
