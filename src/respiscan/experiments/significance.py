"""Repeated runs over seeds: do the shared features help, and does the adversary add to them?

Per seed, three configurations are trained: "full" (shared MLP, plain), "task_only" (no shared features) and
"adversarial" (adversarially learned shared features). They share one stage folder per seed, so they start from
the same embedding models and differ only in the stages being compared. One seed is one run; differences
between runs of one configuration are the noise a single run hides, which the reference's single train/test
comparison could not show.

The design is blocked by seed, so the tests are too: a Friedman test across the three configurations with
seed as block, paired tests over seeds for each comparison, and on one seed's test predictions the (clustered,
where the data has groups) DeLong and McNemar tests. Every p-value that gets a verdict is in one Holm family;
the primary comparison, declared here before any run, is full vs task_only in AUC, paired over seeds.

Every choice (best epoch, thresholds) is made on the validation split inside `train`; the test split is only
scored. Nothing here picks a configuration or a seed by its test result.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from respiscan.data.samples import DataPaths, discover
from respiscan.errors import RespiscanError
from respiscan.evaluation.evaluate import CONFIDENCE, evaluate
from respiscan.evaluation.report import KIND_NAMES, METRIC_NAMES, Block, render_markdown
from respiscan.evaluation.stats import delong_test, friedman_over_runs, holm, mcnemar_test, mean_ci, paired_runs_test
from respiscan.training.config import TrainConfig
from respiscan.training.trainer import train
from respiscan.utils import atomic_write, write_json, write_rows

CONFIGS = {"full": "plain", "task_only": "none", "adversarial": "adversarial"}  # name -> ModelSpec.shared
COMPARISONS = (("full", "task_only"), ("full", "adversarial"))
PRIMARY = "full_vs_task_only"  # the comparison the experiment is for, in AUC paired over seeds
RUN_METRICS = {"auc": "roc_auc", "accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
               "f1": "f1"}  # runs.csv column -> metrics.json key
RUN_COLUMNS = ["config", "seed", "modality", *(f"{c}{part}" for c in RUN_METRICS for part in ("", "_low", "_high"))]


def _guarded(test: Callable[..., dict], *args, **kwargs) -> dict:
    """The test's result, or why it could not run (e.g. a run with an undefined AUC) as its sentence."""
    try:
        return test(*args, **kwargs)
    except RespiscanError as e:
        return {"error": str(e), "p_value": None, "sentence": f"Not computed: {e}."}


def _summarise(values: list[float | None], lows: list[float | None], highs: list[float | None]) -> dict:
    """Mean over the runs where the metric is defined with two intervals: `ci`, the t-interval over seeds
    (training randomness; clipped to [0, 1], the range of every runs.csv metric, since with few runs the
    t-interval is wider than the metric can be), and `test_ci`, the runs' bootstrap intervals (test-set
    sampling) with their bounds averaged over runs."""
    defined = np.array([v for v in values if v is not None], dtype=float)
    ci = tuple(float(v) for v in np.clip(mean_ci(defined, CONFIDENCE), 0, 1)) if len(defined) >= 2 else None
    bounds = [(lo, hi) for lo, hi in zip(lows, highs) if lo is not None and hi is not None]
    test_ci = tuple(float(v) for v in np.mean(bounds, axis=0)) if bounds else None
    return {"n": len(defined), "mean": float(defined.mean()) if len(defined) else None, "ci": ci, "test_ci": test_ci}


def _predictions(run: Path) -> dict[str, dict[str, dict[str, str]]]:
    """predictions.csv of one run as modality -> id -> row."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    with open(run / "predictions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["modality"], {})[row["id"]] = row
    return out


def _paired_on_test(runs: dict[str, Path], modalities: list[str], groups: dict[str, str]) -> tuple[dict, dict]:
    """DeLong (AUC) and McNemar (labels at each bundle's threshold) on one seed's test predictions, clustered
    by the data's groups (patients, scans) where a group holds several test images."""
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
            cluster = [groups.get(i) or i for i in ids]
            delong[key][m] = _guarded(delong_test, y, prob[a], prob[b], CONFIDENCE, names=(a, b), groups=cluster)
            mcnemar[key][m] = _guarded(mcnemar_test, y, pred[a], pred[b], CONFIDENCE, names=(a, b), groups=cluster)
    return delong, mcnemar


def _cell(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    seeds = "" if s["ci"] is None else f"seeds {s['ci'][0]:.3f}-{s['ci'][1]:.3f}"
    test = "" if s["test_ci"] is None else f"test {s['test_ci'][0]:.3f}-{s['test_ci'][1]:.3f}"
    spread = "; ".join(part for part in (seeds, test) if part)
    return f"{s['mean']:.3f}" + (f" ({spread})" if spread else "")


def _summary_blocks(summary: dict) -> list[Block]:
    header = ["Configuration", "Modality", *(METRIC_NAMES[k] for k in RUN_METRICS.values())]
    rows = [[name, KIND_NAMES[m], *(_cell(s) for s in metrics.values())]
            for name, by_modality in summary["metrics"].items() for m, metrics in by_modality.items()]

    def sentences(results: dict[str, dict]) -> list[str]:
        return [f"{KIND_NAMES[m]}: {r['sentence']}" for m, r in results.items()]

    family = summary["family"]
    seed = summary["seeds"][0]
    blocks: list[Block] = [
        ("h1", "respiscan significance summary"),
        ("p", f"Data: {summary['data']}. {summary['runs']} runs (seeds {', '.join(map(str, summary['seeds']))}) of "
              "three configurations: full (task-specific + plain shared features), task_only (task-specific "
              "features only) and adversarial (task-specific + adversarially learned shared features). The "
              "configurations of one seed share their embedding models, so every test treats the seed as a block. "
              "Epochs and thresholds were chosen on the validation split; the test split was only scored."),
        ("h2", "Test metrics over runs"),
        ("p", f"Each cell: mean over runs (seeds: {100 * CONFIDENCE:g}% t-interval of the per-run values, the spread "
              "that training randomness gives, clipped to [0, 1]; test: the runs' bootstrap intervals of the test "
              "split, the test-sampling uncertainty of one run, bounds averaged over runs). Per-run values and "
              "intervals are in runs.csv, per-run metrics and reports in runs/."),
        ("table", header, rows),
        ("h2", "Tests and multiplicity"),
        ("p", f"All {family['size']} p-values below form one family, corrected by Holm's step-down method; each "
              "verdict follows the Holm-adjusted p. A p above the level is no evidence of a difference, which is "
              "not evidence that the configurations are equal. Primary comparison, declared before the runs: "
              "full vs task_only in AUC, paired over seeds."),
        ("h3", "Primary: full vs task_only, AUC paired over seeds"), ("ul", sentences(summary["paired"][PRIMARY])),
        ("h3", "Friedman test of per-run AUC across the three configurations (seeds as blocks)"),
        ("ul", sentences(summary["friedman"]))]
    for a, b in COMPARISONS:
        key = f"{a}_vs_{b}"
        if key != PRIMARY:
            blocks += [("h3", f"{a} vs {b}, AUC paired over seeds"), ("ul", sentences(summary["paired"][key]))]
        blocks += [("h3", f"{a} vs {b}, DeLong test of AUC on seed {seed}'s test predictions"),
                   ("ul", sentences(summary["delong"][key])),
                   ("h3", f"{a} vs {b}, McNemar test of the labels at each bundle's threshold, seed {seed}"),
                   ("ul", sentences(summary["mcnemar"][key]))]
    return blocks


def _with_holm(summary: dict) -> dict:
    """Every test result of the summary, replaced by its Holm-adjusted version over the whole family."""
    slots = [(summary["friedman"], m) for m in summary["friedman"]]
    slots += [(summary[test][key], m) for test in ("paired", "delong", "mcnemar")
              for key in summary[test] for m in summary[test][key]]
    adjusted = holm([where[m] for where, m in slots], CONFIDENCE)
    for (where, m), result in zip(slots, adjusted):
        where[m] = result
    summary["family"] = {"method": "Holm", "size": sum(1 for r in adjusted if "p_holm" in r),
                         "primary": f"{PRIMARY}: AUC paired over seeds"}
    return summary


def summarise_runs(data: DataPaths, rows: list[dict], seeds: list[int], run_folder: Callable[[str, int], Path]) -> dict:
    """The summary of a finished set of runs: runs.csv's `rows` and each run's predictions.csv in
    `run_folder(config, seed)`; the data gives the groups for the clustered tests."""
    modalities = list(dict.fromkeys(r["modality"] for r in rows))
    groups = {s.id: s.group for s in discover(data) if s.split == "test" and s.group}

    def per_run(name: str, m: str, column: str = "auc") -> list[float | None]:
        return [r[column] for r in rows if r["config"] == name and r["modality"] == m]

    def interval(name: str, m: str, column: str) -> dict:
        low, high = per_run(name, m, f"{column}_low"), per_run(name, m, f"{column}_high")
        return _summarise(per_run(name, m, column), low, high)

    delong, mcnemar = _paired_on_test({name: run_folder(name, seeds[0]) for name in CONFIGS}, modalities, groups)
    summary = {
        "data": str(data), "runs": len(seeds), "seeds": seeds, "configs": CONFIGS, "confidence": CONFIDENCE,
        "metrics": {name: {m: {c: interval(name, m, c) for c in RUN_METRICS} for m in modalities} for name in CONFIGS},
        "friedman": {m: _guarded(friedman_over_runs, {name: per_run(name, m) for name in CONFIGS}, CONFIDENCE,
                                 metric=f"{KIND_NAMES[m]} AUC") for m in modalities},
        "paired": {f"{a}_vs_{b}": {m: _guarded(paired_runs_test, per_run(a, m), per_run(b, m), CONFIDENCE,
                                               names=(a, b), metric=f"{KIND_NAMES[m]} AUC") for m in modalities}
                   for a, b in COMPARISONS},
        "delong": delong, "mcnemar": mcnemar,
    }
    return _with_holm(summary)


def run_significance(data: str | Path, out: str | Path, runs: int, base_config: TrainConfig,
                     progress: bool = True) -> dict:
    """Train and test `runs` seeds (base_config.seed, +1, ...) of the three configurations; write runs.csv,
    summary.json and summary.md to OUT (bundles and per-run evaluations under OUT/runs) and return the summary.
    Finished stages are kept in OUT/stages and reused, so a repeated or interrupted run does not train them again."""
    if runs < 2:
        raise RespiscanError(f"significance needs at least 2 runs (seeds) to compare runs; got {runs}")
    out = Path(out)
    seeds = [base_config.seed + i for i in range(runs)]

    run_folder = partial(_run_folder, out)
    rows: list[dict] = []
    for seed in seeds:
        for name, shared in CONFIGS.items():
            run = run_folder(name, seed)
            if progress:
                print(f"[seed {seed}] {name}: training and testing -> {run}")
            cfg = base_config.with_overrides(seed=seed, shared=shared)
            bundle = train(data, run / "bundle", cfg, stages_dir=out / "stages" / f"seed{seed}")
            results = evaluate(bundle, data, run, figures=False)
            for m, metrics in results["modalities"].items():
                row = {"config": name, "seed": seed, "modality": m}
                for column, key in RUN_METRICS.items():
                    low, high = metrics["ci"][key] or (None, None)
                    row.update({column: metrics[key], f"{column}_low": low, f"{column}_high": high})
                rows.append(row)
    write_rows(out / "runs.csv", rows, RUN_COLUMNS)
    return _write_summary(out, summarise_runs(data, rows, seeds, run_folder))


def reanalyse(data: str | Path, out: str | Path) -> dict:
    """The summary of the runs an earlier `run_significance` left in OUT, recomputed from its runs.csv and each
    run's predictions.csv without training anything: a changed or added test runs on the kept predictions."""
    out = Path(out)
    try:
        with open(out / "runs.csv", newline="", encoding="utf-8") as f:
            rows = [{k: v if k in ("config", "modality") else (int(v) if k == "seed" else
                                                                (float(v) if v else None)) for k, v in r.items()}
                    for r in csv.DictReader(f)]
    except OSError as e:
        raise RespiscanError(f"{out / 'runs.csv'}: cannot read the runs of an earlier significance run "
                             f"({e.strerror})") from e
    if not rows or list(rows[0]) != RUN_COLUMNS:
        raise RespiscanError(f"{out / 'runs.csv'}: not a runs table of `respiscan significance`")
    seeds, run_folder = sorted({r["seed"] for r in rows}), partial(_run_folder, out)
    missing = [run_folder(name, seeds[0]) for name in CONFIGS
               if not (run_folder(name, seeds[0]) / "predictions.csv").is_file()]
    if missing:
        raise RespiscanError(f"{missing[0]}: no predictions.csv; the test-set tests need it")
    return _write_summary(out, summarise_runs(data, rows, seeds, run_folder))


def _run_folder(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}-seed{seed}"


def _write_summary(out: Path, summary: dict) -> dict:
    write_json(out / "summary.json", summary)
    with atomic_write(out / "summary.md", "w", encoding="utf-8") as f:
        f.write(render_markdown(_summary_blocks(summary)))
    return summary
