"""Repeated runs over seeds: do the shared features help, and does the adversary add to them?

Per seed, three configurations are trained: "full" (shared MLP, plain), "task_only" (no shared features) and
"adversarial" (adversarially learned shared features). They share one stage folder per seed, so they start from
the same embedding models and differ only in the stages being compared. One seed is one run; differences
between runs of one configuration are the noise a single run hides, which the reference's single train/test
comparison could not show.

Every choice (best epoch, thresholds) is made on the validation split inside `train`; the test split is only
scored. Nothing here picks a configuration or a seed by its test result.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from respiscan.errors import RespiscanError
from respiscan.evaluation.evaluate import CONFIDENCE, evaluate
from respiscan.evaluation.report import KIND_NAMES, METRIC_NAMES, Block, render_markdown
from respiscan.evaluation.stats import anova_over_runs, delong_test, mcnemar_test, mean_ci, paired_runs_test
from respiscan.training.config import TrainConfig
from respiscan.training.trainer import train
from respiscan.utils import atomic_write, write_json, write_rows

CONFIGS = {"full": "plain", "task_only": "none", "adversarial": "adversarial"}  # name -> ModelSpec.shared
COMPARISONS = (("full", "task_only"), ("full", "adversarial"))
RUN_METRICS = {"auc": "roc_auc", "accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
               "f1": "f1"}  # runs.csv column -> metrics.json key


def _guarded(test: Callable[..., dict], *args, **kwargs) -> dict:
    """The test's result, or why it could not run (e.g. a run with an undefined AUC) as its sentence."""
    try:
        return test(*args, **kwargs)
    except RespiscanError as e:
        return {"error": str(e), "sentence": f"Not computed: {e}."}


def _summarise(values: list[float | None]) -> dict:
    """Mean and t-interval over the runs where the metric is defined; the interval is clipped to [0, 1], the
    range of every runs.csv metric (with few runs the t-interval is wider than the metric can be)."""
    defined = np.array([v for v in values if v is not None], dtype=float)
    ci = tuple(float(v) for v in np.clip(mean_ci(defined, CONFIDENCE), 0, 1)) if len(defined) >= 2 else None
    return {"n": len(defined), "mean": float(defined.mean()) if len(defined) else None, "ci": ci}


def _predictions(run: Path) -> dict[str, dict[str, dict[str, str]]]:
    """predictions.csv of one run as modality -> id -> row."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    with open(run / "predictions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["modality"], {})[row["id"]] = row
    return out


def _paired_on_test(runs: dict[str, Path], modalities: list[str]) -> tuple[dict, dict]:
    """DeLong (AUC) and McNemar (labels at each bundle's threshold) on one seed's test predictions."""
    preds = {name: _predictions(run) for name, run in runs.items()}
    delong: dict[str, dict] = {}
    mcnemar: dict[str, dict] = {}
    for a, b in COMPARISONS:
        key = f"{a}_vs_{b}"
        delong[key], mcnemar[key] = {}, {}
        for m in (m for m in modalities if m in preds[a] and m in preds[b]):
            ids = sorted(set(preds[a][m]) & set(preds[b][m]))
            y = np.array([preds[a][m][i]["label"] == "COVID" for i in ids], dtype=int)
            prob = {n: np.array([float(preds[n][m][i]["probability"]) for i in ids]) for n in (a, b)}
            pred = {n: np.array([preds[n][m][i]["prediction"] == "COVID" for i in ids], dtype=int) for n in (a, b)}
            delong[key][m] = _guarded(delong_test, y, prob[a], prob[b], CONFIDENCE, names=(a, b))
            mcnemar[key][m] = _guarded(mcnemar_test, y, pred[a], pred[b], CONFIDENCE, names=(a, b))
    return delong, mcnemar


def _summary_blocks(summary: dict) -> list[Block]:
    header = ["Configuration", "Modality", *(METRIC_NAMES[k] for k in RUN_METRICS.values())]
    rows = []
    for name, by_modality in summary["metrics"].items():
        for m, metrics in by_modality.items():
            cells = []
            for s in metrics.values():
                ci = "" if s["ci"] is None else f" ({s['ci'][0]:.3f} to {s['ci'][1]:.3f})"
                cells.append("n/a" if s["mean"] is None else f"{s['mean']:.3f}{ci}")
            rows.append([name, KIND_NAMES[m], *cells])

    def sentences(results: dict[str, dict]) -> list[str]:
        return [f"{KIND_NAMES[m]}: {r['sentence']}" for m, r in results.items()]

    blocks: list[Block] = [
        ("h1", "respiscan significance summary"),
        ("p", f"Data: {summary['data']}. {summary['runs']} runs (seeds {', '.join(map(str, summary['seeds']))}) of "
              "three configurations: full (task-specific + plain shared features), task_only (task-specific "
              "features only) and adversarial (task-specific + adversarially learned shared features). The "
              "configurations of one seed share their embedding models. Epochs and thresholds were chosen on "
              "the validation split; the test split was only scored."),
        ("h2", "Test metrics over runs"),
        ("p", f"Each cell: mean over runs ({100 * CONFIDENCE:g}% t-interval of the per-run values, clipped to "
              "[0, 1]). Per-run values are in runs.csv, per-run metrics and reports in runs/."),
        ("table", header, rows),
        ("h2", "One-way ANOVA of per-run AUC across the three configurations"), ("ul", sentences(summary["anova"]))]
    for a, b in COMPARISONS:
        key = f"{a}_vs_{b}"
        blocks += [("h2", f"{a} vs {b}"),
                   ("h3", "Paired over seeds (AUC)"), ("ul", sentences(summary["paired"][key])),
                   ("h3", f"DeLong test of AUC, test predictions of seed {summary['seeds'][0]}"),
                   ("ul", sentences(summary["delong"][key])),
                   ("h3", f"McNemar test of the labels at each bundle's threshold, seed {summary['seeds'][0]}"),
                   ("ul", sentences(summary["mcnemar"][key]))]
    return blocks


def run_significance(data: str | Path, out: str | Path, runs: int, base_config: TrainConfig,
                     progress: bool = True) -> dict:
    """Train and test `runs` seeds (base_config.seed, +1, ...) of the three configurations; write runs.csv,
    summary.json and summary.md to OUT (bundles and per-run evaluations under OUT/runs) and return the summary."""
    if runs < 2:
        raise RespiscanError(f"significance needs at least 2 runs (seeds) to compare runs; got {runs}")
    out = Path(out)
    seeds = [base_config.seed + i for i in range(runs)]
    rows: list[dict] = []
    for seed in seeds:
        for name, shared in CONFIGS.items():
            run = out / "runs" / f"{name}-seed{seed}"
            if progress:
                print(f"[seed {seed}] {name}: training and testing -> {run}")
            cfg = base_config.with_overrides(seed=seed, shared=shared)
            bundle = train(data, run / "bundle", cfg, stages_dir=out / "stages" / f"seed{seed}")
            results = evaluate(bundle, data, run, figures=False)
            rows += [{"config": name, "seed": seed, "modality": m, **{c: metrics[k] for c, k in RUN_METRICS.items()}}
                     for m, metrics in results["modalities"].items()]
    write_rows(out / "runs.csv", rows, ["config", "seed", "modality", *RUN_METRICS])

    modalities = list(dict.fromkeys(r["modality"] for r in rows))

    def per_run(name: str, m: str, column: str = "auc") -> list[float | None]:
        return [r[column] for r in rows if r["config"] == name and r["modality"] == m]

    delong, mcnemar = _paired_on_test({name: out / "runs" / f"{name}-seed{seeds[0]}" for name in CONFIGS}, modalities)
    summary = {
        "data": str(data), "runs": runs, "seeds": seeds, "configs": CONFIGS, "confidence": CONFIDENCE,
        "metrics": {name: {m: {c: _summarise(per_run(name, m, c)) for c in RUN_METRICS} for m in modalities}
                    for name in CONFIGS},
        "anova": {m: _guarded(anova_over_runs, {name: per_run(name, m) for name in CONFIGS}, CONFIDENCE,
                              metric=f"{KIND_NAMES[m]} AUC") for m in modalities},
        "paired": {f"{a}_vs_{b}": {m: _guarded(paired_runs_test, per_run(a, m), per_run(b, m), CONFIDENCE,
                                               names=(a, b), metric=f"{KIND_NAMES[m]} AUC") for m in modalities}
                   for a, b in COMPARISONS},
        "delong": delong, "mcnemar": mcnemar,
    }
    write_json(out / "summary.json", summary)
    with atomic_write(out / "summary.md", "w", encoding="utf-8") as f:
        f.write(render_markdown(_summary_blocks(summary)))
    return summary
