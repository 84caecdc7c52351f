"""Crossval: folds that never score what trained them, and the whole run on synthetic sites."""

import json

import pytest

from conftest import tiny_config
from respiscan.data.samples import Sample
from respiscan.errors import RespiscanError
from respiscan.experiments.crossval import group_folds, run_crossval, source_folds


def _samples(sources=("a", "b", "c"), per=12):
    out = []
    for source in sources:
        for i in range(per):
            for modality in ("xray", "ct"):
                out.append(Sample(f"{source}/{modality}/{i}", f"/x/{source}/{modality}/{i}.png", modality, i % 2,
                                  "test" if i % 4 == 0 else "train", group=f"{source}:p{i // 2}", source=source))
    return out


def test_source_folds_score_only_the_left_out_source_and_train_on_no_test_image():
    samples = _samples()
    folds = source_folds(samples)
    assert [f.name for f in folds] == ["a", "b", "c"]
    for fold in folds:
        test = [s for s in fold.samples if s.split == "test"]
        train = [s for s in fold.samples if s.split != "test"]
        assert {s.source for s in test} == {fold.name}
        assert len(test) == sum(s.source == fold.name for s in samples)  # every image of the source is scored
        assert fold.name not in {s.source for s in train}
        original = {s.id: s.split for s in samples}
        assert all(original[s.id] == "train" for s in train)  # the other sources' test splits stay unseen


def test_source_folds_refuse_one_source_and_a_modality_with_one_source():
    with pytest.raises(RespiscanError, match="at least two sources"):
        source_folds(_samples(("a",)))
    only_a_has_ct = [s for s in _samples(("a", "b")) if not (s.source == "b" and s.modality == "ct")]
    with pytest.raises(RespiscanError, match="no ct images to train on"):
        source_folds(only_a_has_ct)


def test_group_folds_keep_groups_whole_and_score_every_image_once():
    samples = _samples(("a",), per=40)
    folds = group_folds(samples, 4, seed=0)
    tested = [s.id for f in folds for s in f.samples if s.split == "test"]
    assert sorted(tested) == sorted(s.id for s in samples)
    for fold in folds:
        test_groups = {(s.modality, s.group) for s in fold.samples if s.split == "test"}
        train_groups = {(s.modality, s.group) for s in fold.samples if s.split != "test"}
        assert not test_groups & train_groups
        labels = [s.label for s in fold.samples if s.split == "test"]
        assert 0 < sum(labels) < len(labels)  # stratified: both classes in every fold
    with pytest.raises(RespiscanError, match="fewer than"):
        group_folds(samples, 100, seed=0)


@pytest.mark.slow
def test_crossval_on_synthetic_sites_writes_a_table_per_left_out_site(tmp_path, capsys):
    from respiscan.data.synth import generate

    data = generate(tmp_path / "sites", n_per_class=8, size=48, seed=2, progress=False, sites=2)
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    cfg = tiny_config().with_overrides(image_size=48)
    result = run_crossval(folders, tmp_path / "cv", cfg, by="source")
    rows = result["folds"]
    assert sorted({r["fold"] for r in rows}) == ["site0", "site1"]
    assert {r["modality"] for r in rows} == {"xray", "ct"}
    for r in rows:
        assert r["n"] == 2 * 8 and 0 <= r["auc"] <= 1 and r["in_source_val_auc"] is not None
        # the shortcut baselines come from the audit train ran on the fold, scored on the same left-out images
        shortcuts = json.loads((tmp_path / "cv" / "folds" / r["fold"] / "bundle" / "config.json").read_text())[
            "audit"]["shortcuts"][r["modality"]]
        assert shortcuts["n_test"] == r["n"]
        assert [r["border_baseline_auc"], r["intensity_baseline_auc"]] == [
            shortcuts["border"]["logistic"], shortcuts["intensity"]["logistic"]]
        assert all(0 <= r[k] <= 1 for k in ("border_baseline_auc", "intensity_baseline_auc"))
    saved = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert saved["folds"] == rows and set(saved["mean"]) == {"xray", "ct"}
    assert "Left out" in (tmp_path / "cv" / "crossval.md").read_text()
    assert "Intensity-statistics baseline AUC" in (tmp_path / "cv" / "crossval.md").read_text()
    capsys.readouterr()
    again = run_crossval(folders, tmp_path / "cv", cfg, by="source", resume=True)
    assert again["folds"] == rows and capsys.readouterr().out.count("finished earlier, reused") == 2


def test_crossval_with_the_source_adversary_over_three_sites(tmp_path):
    """Each fold trains on two sources, so the source adversary has something to act on; every fold is evaluated
    and reported (the report once lacked this shared kind)."""
    from respiscan.data.synth import generate

    data = generate(tmp_path / "sites", n_per_class=8, size=48, seed=3, progress=False, sites=3, confound=0.8)
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    cfg = tiny_config().with_overrides(image_size=48, shared="source_adversarial").with_site_methods(
        balance="source_class", backbone_adversary=1.0)
    result = run_crossval(folders, tmp_path / "cv", cfg, by="source", modality="ct")
    assert sorted(r["fold"] for r in result["folds"]) == ["site0", "site1", "site2"]
    assert all(0 <= r["auc"] <= 1 for r in result["folds"])
    backbone_logs = list((tmp_path / "cv" / "folds" / "site1").rglob("embedding_task_ct.csv"))
    assert backbone_logs and "train_source_acc" in backbone_logs[0].read_text().splitlines()[0]
    assert "source-adversarial" in (tmp_path / "cv" / "folds" / "site1" / "evaluation" / "report.html").read_text()
