"""Repeated runs over seeds: three configurations per seed share the embedding stage and get compared."""

from __future__ import annotations

import csv
import json
from itertools import product

import pytest

from conftest import tiny_config
from respiscan.errors import RespiscanError
from respiscan.experiments.significance import CONFIGS, run_significance

MODALITIES = ("xray", "ct")


@pytest.fixture(scope="module")
def significance(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("significance")
    return run_significance(synth_data, out, 2, tiny_config(seed=0), progress=False), out


def test_runs_csv_has_every_run(significance):
    _, out = significance
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert list(rows[0]) == ["config", "seed", "modality", "auc", "accuracy", "sensitivity", "specificity", "f1"]
    assert sorted((r["config"], r["seed"], r["modality"]) for r in rows) == sorted(
        (c, str(s), m) for c, s, m in product(CONFIGS, (0, 1), MODALITIES))
    for r in rows:
        assert 0 <= float(r["auc"]) <= 1
        assert (out / "runs" / f"{r['config']}-seed{r['seed']}" / "metrics.json").is_file()


def test_summary_has_tests_with_sentences(significance):
    summary, out = significance
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["anova"]) == set(MODALITIES)
    for comparison in ("full_vs_task_only", "full_vs_adversarial"):
        for test in ("paired", "delong", "mcnemar"):
            assert set(summary[test][comparison]) == set(MODALITIES), (test, comparison)
            assert all(r["sentence"] for r in summary[test][comparison].values())
    assert all("ANOVA" in r["sentence"] for r in summary["anova"].values())
    assert all("DeLong" in r["sentence"] for r in summary["delong"]["full_vs_task_only"].values())
    for name in CONFIGS:
        auc = summary["metrics"][name]["xray"]["auc"]
        assert auc["n"] == 2 and 0 <= auc["ci"][0] <= auc["mean"] <= auc["ci"][1] <= 1
    md = (out / "summary.md").read_text()
    assert "One-way ANOVA" in md and "DeLong" in md and "McNemar" in md and "| full | X-ray |" in md


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


def test_needs_two_runs(synth_data, tmp_path):
    with pytest.raises(RespiscanError, match="at least 2 runs"):
        run_significance(synth_data, tmp_path, 1, tiny_config(), progress=False)


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
