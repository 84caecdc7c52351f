"""Several data folders as one data set: the real sources in ../shared/data (skipped where absent) and the
CLI's DATA [DATA ...] arguments on synthetic sites."""

import json
from collections import Counter

import pytest

from conftest import REALDEV
from respiscan.data.samples import carve_validation, count_by_source, discover, write_manifest
from test_cli import run

SITES = REALDEV.parent / "sites"
real = pytest.mark.skipif(not (REALDEV.is_dir() and SITES.is_dir()), reason="../shared/data/realdev or sites absent")


@pytest.fixture(scope="module")
def real_sources():
    return discover([REALDEV, SITES / "mosmed_ct", SITES / "cohen_xray"])


@real
def test_real_sources_read_as_one_data_set(real_sources):
    counts = {(r["source"], r["split"], r["label"]): r["n"] for r in count_by_source(real_sources)}
    assert {k: v for k, v in counts.items() if k[0] in ("mosmed_ct", "cohen_xray")} == {
        ("mosmed_ct", "train", "COVID"): 647, ("mosmed_ct", "train", "Non_COVID"): 203,
        ("mosmed_ct", "test", "COVID"): 162, ("mosmed_ct", "test", "Non_COVID"): 51,
        ("cohen_xray", "train", "COVID"): 140, ("cohen_xray", "train", "Non_COVID"): 68,
        ("cohen_xray", "test", "COVID"): 37, ("cohen_xray", "test", "Non_COVID"): 17}
    assert sum(counts.values()) == len(real_sources) == len(discover(REALDEV)) + 850 + 213 + 208 + 54
    assert len({s.id for s in real_sources}) == len(real_sources)
    assert Counter(s.id.split("/")[0] for s in real_sources).keys() == {"realdev", "mosmed_ct", "cohen_xray"}
    assert {s.source for s in real_sources} == {"ct_ucsd_covid_ct", "xray_covid19_radiography_db_224", "mosmed_ct",
                                                "cohen_xray"}
    assert all(s.group.startswith(f"{s.source}:") for s in real_sources if s.group)
    assert all(s.path.is_file() for s in real_sources[::97])


@real
def test_real_validation_covers_every_source_and_keeps_groups_whole(real_sources):
    carved = carve_validation(real_sources, 0.15, seed=0)
    assert [s for s in carved if s.split == "test"] == [s for s in real_sources if s.split == "test"]
    for source in {s.source for s in real_sources}:
        mine = [s for s in carved if s.source == source and s.split != "test"]
        val = [s for s in mine if s.split == "val"]
        assert 0.08 < len(val) / len(mine) < 0.25, source
        assert {s.label for s in val} == {0, 1}, source
    val_groups = {s.group for s in carved if s.split == "val" and s.group}
    assert val_groups and not val_groups & {s.group for s in carved if s.split == "train"}


@real
def test_real_splits_file_reads_back(real_sources, tmp_path, monkeypatch):
    from respiscan.evaluation.report import read_splits

    carved = carve_validation(real_sources, 0.15, seed=0)
    write_manifest(carved, tmp_path / "splits.csv")
    monkeypatch.chdir(tmp_path)
    back = read_splits(tmp_path)
    assert [(s.id, s.label, s.split, s.group, s.source) for s in back] == \
        [(s.id, s.label, s.split, s.group, s.source) for s in carved]
    assert all(b.path.is_absolute() and b.path.resolve() == s.path.resolve() for b, s in zip(back[::50], carved[::50]))


def test_synth_sites_then_audit_them_together(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sites"
    code, text, _ = run(["synth", out, "--sites", "2", "--confound", "0.6", "--n-per-class", "5", "--size", "48"],
                        capsys, monkeypatch)
    assert code == 0 and f"respiscan train {out / 'site0'} {out / 'site1'} --out" in text, text
    code, text, _ = run(["audit", out / "site0", out / "site1", "--out", tmp_path / "audit"], capsys, monkeypatch)
    assert code == 0 and "site0" in text and "site1" in text
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["n_images"] == 40 and audit["cramers_v"] == pytest.approx(0.6)  # site 0: 8 of 10 COVID, site 1: 2
    code, _, err = run(["audit", out / "site0", out / "site0"], capsys, monkeypatch)
    assert code == 2 and "named 'site0'" in err


def test_evaluate_on_several_folders(bundle, tmp_path, capsys, monkeypatch):
    from respiscan.data.synth import generate

    out = generate(tmp_path / "sites", n_per_class=3, size=64, seed=2, sites=2, progress=False)
    code, _, err = run(["evaluate", bundle, out / "site0", out / "site1", "--out", tmp_path / "eval"],
                          capsys, monkeypatch)
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    n_test = sum(s.split == "test" for s in discover([out / "site0", out / "site1"])) // 2  # per modality
    assert metrics["modalities"]["xray"]["n"] == metrics["modalities"]["ct"]["n"] == n_test
