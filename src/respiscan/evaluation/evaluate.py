"""Evaluate a bundle on a data set's test split: per modality and fused, COVID as the positive class.

Writes to OUT: metrics.json (point estimates; 95% bootstrap CIs that resample patients where the data names
them, since images of one patient are not independent; a per-source breakdown when the test images come from
several sources), predictions.csv, the paper figures (roc, pr, confusion, reliability, training_curves .png)
and report.md / report.html, which explain all of it to a reader without the code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from respiscan.bundle import LOGS
from respiscan.data.audit import class_balance, source_of
from respiscan.data.samples import CLASS_NAMES, DataPaths, Sample, describe, discover
from respiscan.errors import RespiscanError
from respiscan.evaluation.plots import plot_confusion, plot_pr, plot_reliability, plot_roc, plot_training_curves
from respiscan.evaluation.report import KIND_NAMES, read_splits, write_report
from respiscan.metrics import binary_metrics, bootstrap_ci
from respiscan.serving import Engine
from respiscan.serving import load as load_pipeline
from respiscan.serving.pipeline import BasePipeline, fuse
from respiscan.utils import write_json, write_rows

N_RESAMPLES = 1000
CONFIDENCE = 0.95
_STAGE_ORDER = ("embedding", "task_mlp", "shared", "head")  # training-curve panels in the order stages ran

Cases = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # labels, probabilities, groups, sources


def pair_cases(xray: list[Sample], ct: list[Sample], seed: int = 0) -> tuple[list[tuple[Sample, Sample]], str]:
    """X-ray/CT pairs for the fused probability: by shared group (patient) when the data has them, else
    same-label pseudo-pairs (seeded), which the report must call what they are."""
    by_group = {s.group: s for s in ct if s.group}
    pairs = [(x, by_group[x.group]) for x in xray if x.group in by_group and by_group[x.group].label == x.label]
    if pairs:
        return pairs, "patient (shared group id)"
    rng = np.random.default_rng(seed)
    pairs = []
    for label in (0, 1):
        xs = [s for s in xray if s.label == label]
        cs = [s for s in ct if s.label == label]
        rng.shuffle(xs)
        rng.shuffle(cs)
        pairs += list(zip(xs, cs))
    return pairs, "same-label pseudo-pairs (the data has no X-ray/CT pairs of one patient)"


def _scored(y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray, n_resamples: int, seed: int) -> dict:
    """binary_metrics plus `ci`: the bootstrap interval of every metric, resampling whole groups."""
    return {**binary_metrics(y, p, threshold),
            "ci": bootstrap_ci(y, p, threshold, groups=groups, n_resamples=n_resamples, confidence=CONFIDENCE,
                               seed=seed)}


def _kind_metrics(cases: Cases, threshold: float, n_resamples: int, seed: int) -> dict:
    """Metrics with CIs; with several sources also per source, since a pooled score can hide a source that fails."""
    y, p, groups, sources = cases
    result = _scored(y, p, threshold, groups, n_resamples, seed)
    names = sorted(set(sources.tolist()))
    if len(names) > 1:
        result["by_source"] = {name: _scored(y[sources == name], p[sources == name], threshold,
                                             groups[sources == name], n_resamples, seed) for name in names}
    return result


def _image_cases(samples: list[Sample], prob: dict[str, float]) -> Cases:
    return (np.array([s.label for s in samples]), np.array([prob[s.id] for s in samples]),
            np.array([s.group or s.id for s in samples]), np.array([source_of(s) for s in samples]))


def _fused_cases(pairs: list[tuple[Sample, Sample]], prob: dict[str, float]) -> Cases:
    """A fused case's group is its X-ray's patient; its source names both images' sources when they differ."""
    sources = [source_of(x) if source_of(x) == source_of(c) else f"{source_of(x)} + {source_of(c)}"
               for x, c in pairs]
    return (np.array([x.label for x, _ in pairs]), np.array([fuse([prob[x.id], prob[c.id]]) for x, c in pairs]),
            np.array([x.group or x.id for x, _ in pairs]), np.array(sources))


def _training_logs(bundle: Path) -> dict[str, Path]:
    """BUNDLE/logs/*.csv by stage name, in the order the stages ran."""
    def order(path: Path) -> tuple[int, str]:
        stage = next((i for i, prefix in enumerate(_STAGE_ORDER) if path.stem.startswith(prefix)), len(_STAGE_ORDER))
        return stage, path.stem

    return {p.stem: p for p in sorted((bundle / LOGS).glob("*.csv"), key=order)}


def _plots(cases: dict[str, Cases], metrics: dict[str, dict], bundle: Path, out: Path,
           warnings: list[str]) -> dict[str, str]:
    """The figures beside metrics.json (file names by kind); a bundle without usable logs gets a warning instead."""
    curves = {KIND_NAMES[k]: (c[0], c[1]) for k, c in cases.items()}
    points = {KIND_NAMES[k]: metrics[k]["threshold"] for k in cases}
    files = [plot_roc(curves, out / "roc.png", points), plot_pr(curves, out / "pr.png", points),
             plot_confusion({KIND_NAMES[k]: metrics[k]["confusion_matrix"] for k in cases}, out / "confusion.png"),
             plot_reliability(curves, out / "reliability.png")]
    logs = _training_logs(bundle)
    if not logs:
        warnings.append("Training curves are not shown: the bundle has no logs/*.csv.")
    else:
        try:
            files.append(plot_training_curves(logs, out / "training_curves.png"))
        except RespiscanError as e:
            warnings.append(f"Training curves are not shown: {e}.")
    return {f.stem: f.name for f in files}


def _seen_in_training(test: list[Sample], bundle: Path) -> list[str]:
    """Test images the bundle was trained or validated on (same file): their scores measure memory."""
    fitted = {Path(s.path).resolve() for s in read_splits(bundle) if s.split != "test"}
    return [s.id for s in test if Path(s.path).resolve() in fitted]


def evaluate(bundle: str | Path, data: DataPaths, out: str | Path | None = None, *, strict: bool = False,
             pipeline: BasePipeline | None = None, engine: Engine = "auto", n_resamples: int = N_RESAMPLES,
             seed: int = 0, figures: bool = True, samples: list[Sample] | None = None) -> dict:
    """Metrics with CIs on the test split, figures and report; writes them to `out` (default BUNDLE/evaluation).

    The engine is chosen as `predict` chooses it (`serving.load`). `seed` seeds the bootstrap, so the same
    inputs give the same intervals. `figures=False` skips the plots (most of the time taken), for callers that
    evaluate many runs and report them together. `samples` replaces discovering DATA (crossval's folds).
    """
    bundle = Path(bundle)
    pipe = pipeline or load_pipeline(bundle, engine)
    out = Path(out) if out else bundle / "evaluation"
    test = [s for s in (discover(data) if samples is None else samples)
            if s.split == "test" and s.modality in pipe.modalities]
    if not test:
        raise RespiscanError(f"{describe(data)}: no test images for the bundle's modalities "
                             f"({', '.join(pipe.modalities)})")
    rows, skipped = pipe.predict_samples(test, strict=strict)
    by_id = {s.id: s for s in test}
    prob = {r["id"]: r["probability"] for r in rows}
    for r in rows:
        r["label"] = CLASS_NAMES[by_id[r["id"]].label]
    scored = [s for s in test if s.id in prob]
    results: dict = {"split": "test", "bundle": str(bundle), "data": describe(data), "positive_class": "COVID",
                     "skipped": [{"id": i, "reason": why} for i, why in skipped], "modalities": {}}
    cases = {m: _image_cases(mine, prob) for m in pipe.modalities if (mine := [s for s in scored if s.modality == m])}
    if len(cases) == 2:
        pairs, how = pair_cases([s for s in scored if s.modality == "xray"], [s for s in scored if s.modality == "ct"])
        if pairs:
            cases["fused"] = _fused_cases(pairs, prob)
            results["fused"] = {"pairing": how, "n_pairs": len(pairs)}
    metrics = {k: _kind_metrics(c, pipe.thresholds[k], n_resamples, seed) for k, c in cases.items()}
    results["modalities"] = {m: metrics[m] for m in pipe.modalities if m in metrics}
    if "fused" in metrics:
        results["fused"].update(metrics["fused"])
    grouped = any(s.group for s in scored)
    results["ci"] = {"confidence": CONFIDENCE, "method": "percentile bootstrap", "n_resamples": n_resamples,
                     "seed": seed, "resampled": "patients (group ids)" if grouped else "images"}
    results["test_set"] = class_balance(scored, lambda s: f"{s.modality} / test / {source_of(s)}")
    results["warnings"] = []
    seen = _seen_in_training(scored, bundle)
    if seen:
        results["warnings"].append(
            f"{len(seen)} test image(s) were in the bundle's training or validation split (e.g. {seen[0]}): their "
            "scores measure memory, not generalisation.")
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = _plots(cases, metrics, bundle, out, results["warnings"]) if figures else {}
    md, html = write_report(results, pipe.bundle, out)
    results["report"] = {"markdown": md.name, "html": html.name}
    write_json(out / "metrics.json", results)
    write_rows(out / "predictions.csv", rows, ["id", "path", "modality", "label", "probability", "prediction"])
    return results
