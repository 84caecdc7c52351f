"""Repeated runs over seeds: three configurations per seed share the embedding stage and get compared with
seed-blocked tests, clustered test-set tests where the data has groups, and one Holm family."""

from __future__ import annotations

import csv
import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from respiscan.errors import RespiscanError
from respiscan.evaluation.stats import CLUSTERED_DELONG, CLUSTERED_MCNEMAR, DELONG
from respiscan.experiments.significance import (
    CONFIGS,
    PRIMARY,
    RUN_COLUMNS,
    reanalyse,
    run_significance,
    summarise_runs,
)

MODALITIES = ("xray", "ct")


@pytest.fixture(scope="module")
def significance(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("significance")
    return run_significance(synth_data, out, 2, tiny_config(seed=0), progress=False), out


def test_runs_csv_has_every_run(significance):
    _, out = significance
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert list(rows[0]) == RUN_COLUMNS
    assert sorted((r["config"], r["seed"], r["modality"]) for r in rows) == sorted(
        (c, str(s), m) for c, s, m in product(CONFIGS, (0, 1), MODALITIES))
    for r in rows:
        assert 0 <= float(r["auc_low"]) <= float(r["auc"]) <= float(r["auc_high"]) <= 1
        assert (out / "runs" / f"{r['config']}-seed{r['seed']}" / "metrics.json").is_file()


def test_reanalyse_recomputes_the_summary_from_the_kept_runs(significance, synth_data, tmp_path):
    summary, out = significance
    (out / "summary.md").unlink()
    again = reanalyse(synth_data, out)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(summary)) and (out / "summary.md").is_file()
    with pytest.raises(RespiscanError, match="runs.csv"):
        reanalyse(synth_data, tmp_path)


def test_summary_has_tests_with_sentences(significance):
    summary, out = significance
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["friedman"]) == set(MODALITIES)
    for comparison in ("full_vs_task_only", "full_vs_adversarial"):
        for test in ("paired", "delong", "mcnemar"):
            assert set(summary[test][comparison]) == set(MODALITIES), (test, comparison)
            assert all(r["sentence"] for r in summary[test][comparison].values())
    # two seeds: neither Wilcoxon nor Friedman can reach the level, and the summary says so
    assert all("cannot reach the 5% level" in r["sentence"] for r in summary["friedman"].values())
    assert all("Wilcoxon signed-rank not run" in r["sentence"] for r in summary["paired"][PRIMARY].values()
               if r.get("wilcoxon_p_value") is None and r.get("note"))
    assert all(r.get("wilcoxon_p_value") is None for r in summary["paired"][PRIMARY].values())
    # the synthetic patients have one image per modality: singleton groups, so the plain DeLong runs
    assert {r["method"] for r in summary["delong"]["full_vs_task_only"].values() if "method" in r} <= {DELONG}
    tested = [r for t in ("paired", "delong", "mcnemar") for c in summary[t].values() for r in c.values()]
    tested += list(summary["friedman"].values())
    assert summary["family"]["size"] == sum("p_holm" in r for r in tested) > 0
    for name in CONFIGS:
        auc = summary["metrics"][name]["xray"]["auc"]
        assert auc["n"] == 2 and 0 <= auc["ci"][0] <= auc["mean"] <= auc["ci"][1] <= 1
        assert 0 <= auc["test_ci"][0] <= auc["test_ci"][1] <= 1
    md = (out / "summary.md").read_text()
    assert "Friedman" in md and "DeLong" in md and "McNemar" in md and "| full | X-ray |" in md
    assert "Holm" in md and "training randomness" in md and "Primary: full vs task_only" in md


def _toy_runs(root: Path) -> tuple[Path, list[dict], list[int]]:
    """A manifest (no images needed) whose CT test slices come 3 to a scan, five seeds of runs.csv rows with a
    consistent full > task_only AUC effect and none between full and adversarial, and seed 0's predictions."""
    rng = np.random.default_rng(0)
    n = 60
    y = np.arange(n) % 2
    ids = {m: [f"{m}/{i:03d}.png" for i in range(n)] for m in MODALITIES}
    groups = {"xray": [f"x{i}" for i in range(n)], "ct": [f"scan{i // 6}-{i % 2}" for i in range(n)]}
    root.mkdir()
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "modality", "label", "split", "group"])
        for m in MODALITIES:
            writer.writerows([ids[m][i], m, ("Non_COVID", "COVID")[y[i]], "test", groups[m][i]] for i in range(n))
    scan_error = rng.normal(size=(3, 10))[:, np.arange(n) // 6]
    for k, name in enumerate(CONFIGS):
        run = root / "runs" / f"{name}-seed0"
        run.mkdir(parents=True)
        rows = []
        for m in MODALITIES:
            prob = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + scan_error[k] + rng.normal(size=n))))
            rows += [{"id": ids[m][i], "path": ids[m][i], "modality": m, "label": ("Non_COVID", "COVID")[y[i]],
                      "probability": prob[i], "prediction": ("Non_COVID", "COVID")[int(prob[i] >= 0.5)]}
                     for i in range(n)]
        with open(run / "predictions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    seeds = [0, 1, 2, 3, 4]
    level = np.array([0.80, 0.86, 0.91, 0.84, 0.95])
    effect = {"full": 0.010, "task_only": 0.0, "adversarial": 0.010}
    table = []
    for (s, seed), name, m in product(enumerate(seeds), CONFIGS, MODALITIES):
        auc = level[s] + effect[name] + 0.001 * rng.normal()
        row = {"config": name, "seed": seed, "modality": m, "auc": auc, "auc_low": auc - 0.06, "auc_high": auc + 0.04}
        for column in ("accuracy", "sensitivity", "specificity", "f1"):
            row.update({column: 0.8, f"{column}_low": 0.7, f"{column}_high": 0.9})
        table.append(row)
    return root, table, seeds


def test_summary_blocks_by_seed_clusters_by_scan_and_corrects_for_multiplicity(tmp_path):
    data, rows, seeds = _toy_runs(tmp_path / "toy")
    summary = summarise_runs(data, rows, seeds, lambda name, seed: data / "runs" / f"{name}-seed{seed}")
    json.dumps(summary, allow_nan=False)
    assert summary["family"] == {"method": "Holm", "size": 14, "primary": f"{PRIMARY}: AUC paired over seeds"}
    for m in MODALITIES:
        primary = summary["paired"][PRIMARY][m]
        assert primary["p_holm"] < 0.05 and primary["family_size"] == 14
        assert f"over 14 tests: full is higher in {'X-ray' if m == 'xray' else 'CT'} AUC at the 5% level" in (
            primary["sentence"])
        assert "smallest two-sided p is 2/2^5 = 0.062" in primary["sentence"]  # five seeds: no Wilcoxon
        assert summary["friedman"][m]["p_holm"] >= summary["friedman"][m]["p_value"]
    # the slices of one scan are one cluster; the X-ray images are singletons
    assert summary["delong"][PRIMARY]["ct"]["method"] == CLUSTERED_DELONG
    assert summary["delong"][PRIMARY]["ct"]["n_groups"] == 20
    assert summary["mcnemar"][PRIMARY]["ct"]["method"].startswith(CLUSTERED_MCNEMAR)
    assert summary["delong"][PRIMARY]["xray"]["method"] == DELONG
    auc = summary["metrics"]["full"]["ct"]["auc"]
    values = [r["auc"] for r in rows if r["config"] == "full" and r["modality"] == "ct"]
    assert auc["mean"] == pytest.approx(np.mean(values))
    assert auc["test_ci"] == pytest.approx((np.mean(values) - 0.06, np.mean(values) + 0.04))
    assert auc["ci"][1] - auc["ci"][0] > 0.1  # the seed-to-seed spread of the toy levels


def test_needs_two_runs(synth_data, tmp_path):
    with pytest.raises(RespiscanError, match="at least 2 runs"):
        run_significance(synth_data, tmp_path, 1, tiny_config(), progress=False)


def test_configurations_of_a_seed_share_the_embedding_stage(significance):
    _, out = significance
    for seed in (0, 1):
        stages = out / "stages" / f"seed{seed}"
        for key in ("task_xray", "task_ct"):  # the tiny config's embedder keys: one model per modality
            assert len(list(stages.glob(f"{key}-*.safetensors"))) == 1, (seed, key)
            assert len(list(stages.glob(f"embeddings_{key}-*.safetensors"))) == 1, (seed, key)
        assert len(list(stages.glob("shared_*.safetensors"))) == 2  # plain and adversarial
        # only the first configuration trained the embedding models; the others loaded them (and their logs)
        assert len(list(stages.glob("task_xray-*.embedding_task_xray.csv"))) == 1


def test_runs_that_reuse_a_stage_get_its_training_log(significance):
    """Each configuration's bundle has the logs of every stage it uses, trained by it or reused."""
    _, out = significance
    for seed in (0, 1):
        logs = {name: out / "runs" / f"{name}-seed{seed}" / "bundle" / "logs" for name in CONFIGS}
        for name, folder in logs.items():
            assert (folder / "embedding_task_xray.csv").is_file(), (name, seed)
        first = (logs["full"] / "embedding_task_ct.csv").read_text()
        assert (logs["adversarial"] / "embedding_task_ct.csv").read_text() == first
        assert (logs["adversarial"] / "shared_finetune.csv").is_file()
