"""Discovery of the reference layout, manifests and train/test CSVs; validation carving; their error paths."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from respiscan.data.samples import (
    carve_validation,
    check_trainable,
    count_by_source,
    discover,
    fingerprint,
    folder_samples,
    parse_label,
    write_manifest,
)
from respiscan.errors import RespiscanError


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8), value, np.uint8))
    return path


def _layout(root: Path, names=("COVID", "Non_COVID"), n=2) -> Path:
    for split_dir in ("X_Ray_Train", "X_Ray_Test", "CT_Scan_Train", "CT_Scan_Test"):
        for name in names:
            for i in range(n):
                _png(root / split_dir / name / f"{i}.png")
    return root


def _manifest(root: Path, rows, header="path,modality,label,split,group,source") -> Path:
    (root / "manifest.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root


def test_reference_layout(tmp_path):
    samples = discover(_layout(tmp_path))
    assert len(samples) == 16
    s = next(s for s in samples if s.id == "X_Ray_Train/COVID/0.png")
    assert (s.modality, s.label, s.split) == ("xray", 1, "train")
    ct = next(s for s in samples if s.id == "CT_Scan_Test/Non_COVID/1.png")
    assert (ct.modality, ct.label, ct.split) == ("ct", 0, "test")


def test_common_class_spellings_accepted(tmp_path):
    samples = discover(_layout(tmp_path, names=("covid", "non-covid")))
    assert {s.label for s in samples} == {0, 1}


def test_unknown_class_folder_lists_accepted_names(tmp_path):
    _layout(tmp_path, names=("COVID", "Pneumonia"))
    with pytest.raises(RespiscanError, match="Pneumonia.*accepted: COVID, Non_COVID"):
        discover(tmp_path)


def test_empty_class_folder(tmp_path):
    _layout(tmp_path)
    for f in (tmp_path / "X_Ray_Train" / "COVID").iterdir():
        f.unlink()
    with pytest.raises(RespiscanError, match="empty class folder"):
        discover(tmp_path)


def test_manifest_with_group_and_source(tmp_path):
    _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    _manifest(tmp_path, ["a.png,X-ray,COVID,train,p1,siteA", "b.png,CT,non-covid,test,,siteB"])
    a, b = discover(tmp_path)
    assert (a.modality, a.label, a.split, a.group, a.source) == ("xray", 1, "train", "p1", "siteA")
    assert (b.modality, b.label, b.split, b.group, b.source) == ("ct", 0, "test", None, "siteB")
    assert discover(tmp_path / "manifest.csv") == [a, b]


@pytest.mark.parametrize("rows, header, message", [
    (["a.png,xray,COVID"], "path,modality,label", "missing column.*split"),
    (["a.png,mri,COVID,train"], "path,modality,label,split", "unknown modality 'mri'"),
    (["a.png,xray,maybe,train"], "path,modality,label,split", "unknown label 'maybe'"),
    (["a.png,xray,COVID,holdout"], "path,modality,label,split", "unknown split 'holdout'"),
    (["/etc/passwd,xray,COVID,train"], "path,modality,label,split", "absolute path"),
    (["../x.png,xray,COVID,train"], "path,modality,label,split", "escapes the data folder"),
    (["a.png,xray,COVID,train", "a.png,xray,COVID,train"], "path,modality,label,split", "duplicate sample id"),
])
def test_manifest_errors_name_the_row(tmp_path, rows, header, message):
    _png(tmp_path / "a.png")
    _manifest(tmp_path, rows, header)
    with pytest.raises(RespiscanError, match=message):
        discover(tmp_path)


def test_train_test_csv_annotations(tmp_path):
    _png(tmp_path / "img" / "a.png"), _png(tmp_path / "img" / "b.png")
    (tmp_path / "train.csv").write_text("filename,modality,label\nimg/a.png,xray,1\n")
    (tmp_path / "test.csv").write_text("filename,modality,label\nimg/b.png,xray,0\n")
    a, b = discover(tmp_path)
    assert (a.split, a.label, b.split, b.label) == ("train", 1, "test", 0)


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(RespiscanError, match="no such file"):
        discover(tmp_path / "nope")
    with pytest.raises(RespiscanError, match="no images found"):
        discover(tmp_path)


def test_one_class_is_not_trainable(tmp_path):
    samples = discover(_layout(tmp_path, names=("COVID",)))
    with pytest.raises(RespiscanError, match="only one class"):
        check_trainable(samples, "data")


def test_validation_is_grouped_stratified_and_leaves_test_alone(tmp_path):
    rows = []
    for i in range(60):
        label = "COVID" if i % 2 else "Non_COVID"
        for k in range(3):  # three slices per case: a case must not straddle train and val
            _png(tmp_path / f"{i}_{k}.png")
            rows.append(f"{i}_{k}.png,ct,{label},train,case{i},")
        _png(tmp_path / f"t{i}.png")
        rows.append(f"t{i}.png,ct,{label},test,tcase{i},")
    samples = discover(_manifest(tmp_path, rows))
    carved = carve_validation(samples, 0.2, seed=3)
    val = [s for s in carved if s.split == "val"]
    assert 0.1 < len(val) / 180 < 0.3
    assert {s.label for s in val} == {0, 1}
    train_groups = {s.group for s in carved if s.split == "train"}
    assert not train_groups & {s.group for s in val}
    assert [s for s in carved if s.split == "test"] == [s for s in samples if s.split == "test"]
    assert carve_validation(samples, 0.2, seed=3) == carved
    assert carve_validation(samples, 0.2, seed=4) != carved


def test_folder_samples_for_batch_prediction(tmp_path):
    _png(tmp_path / "x" / "1.png"), _png(tmp_path / "x" / "sub" / "2.jpg")
    samples = folder_samples(tmp_path / "x", "X-ray")
    assert [s.id for s in samples] == ["1.png", "sub/2.jpg"] and {s.modality for s in samples} == {"xray"}


def test_parse_label_spellings():
    assert [parse_label(v, "t") for v in ("COVID-19", "Non_COVID", "negative", "1")] == [1, 0, 0, 1]


# --- several data folders ------------------------------------------------------------------------------

def _site(root: Path, rows, header="path,modality,label,split,group,source") -> Path:
    for row in rows:
        _png(root / row.split(",")[0])
    return _manifest(root, rows, header)


def test_one_folder_keeps_its_ids_and_gets_its_name_as_source(tmp_path):
    samples = discover(_layout(tmp_path / "hospital_a"))
    assert samples[0].id == "CT_Scan_Test/COVID/0.png" and {s.source for s in samples} == {"hospital_a"}
    assert discover([tmp_path / "hospital_a"]) == samples
    assert {s.source for s in discover(tmp_path / "hospital_a" / ".")} == {"hospital_a"}


def test_several_folders_prefix_ids_and_keep_groups_apart(tmp_path):
    a = _site(tmp_path / "a", ["x.png,xray,COVID,train,p1,north", "y.png,xray,Non_COVID,train,p1,north"])
    b = _site(tmp_path / "b", ["x.png,xray,COVID,train,p1,", "y.png,ct,Non_COVID,test,,"])
    _layout(tmp_path / "c", n=1)
    samples = discover([a, b / "manifest.csv", tmp_path / "c"])
    by_id = {s.id: s for s in samples}
    assert len(by_id) == len(samples) == 12 and [s.id for s in samples] == sorted(by_id)
    assert (by_id["a/x.png"].source, by_id["a/x.png"].group) == ("north", "north:p1")
    assert (by_id["b/x.png"].source, by_id["b/x.png"].group) == ("b", "b:p1")  # same patient id, other source
    assert by_id["b/y.png"].group is None and by_id["b/y.png"].path == b / "y.png"
    assert {s.source for s in samples if s.id.startswith("c/")} == {"c"}
    assert discover([tmp_path / "c", b, a]) == samples  # the order of the folders does not matter


def test_folders_with_the_same_name_are_refused(tmp_path):
    first, second = _layout(tmp_path / "x" / "data", n=1), _layout(tmp_path / "y" / "data", n=1)
    with pytest.raises(RespiscanError, match="2 data folders named 'data'") as err:
        discover([first, second])
    assert str(first) in str(err.value) and str(second) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RespiscanError, match="named 'data'"):
        discover([first, first])
    with pytest.raises(RespiscanError, match="no data folder"):
        discover([])


def test_validation_is_carved_from_every_source(tmp_path):
    rows = {"big": [], "small": [], "own_val": []}
    for name, n in (("big", 60), ("small", 20), ("own_val", 10)):
        for i in range(n):
            label = "COVID" if i % 2 else "Non_COVID"
            split = "val" if name == "own_val" and i < 4 else "train"
            rows[name] += [f"{i}_{k}.png,ct,{label},{split},case{i}," for k in range(2)]
    samples = discover([_site(tmp_path / name, r) for name, r in rows.items()])
    carved = carve_validation(samples, 0.2, seed=1)
    val = [s for s in carved if s.split == "val"]
    for source in ("big", "small"):
        share = sum(s.source == source for s in val) / sum(s.source == source for s in samples)
        assert 0.1 < share < 0.3, (source, share)
        assert {s.label for s in val if s.source == source} == {0, 1}
    # A source that brings its own validation images keeps them, and its train images stay in train.
    assert [s for s in carved if s.source == "own_val"] == [s for s in samples if s.source == "own_val"]
    assert not {s.group for s in carved if s.split == "train"} & {s.group for s in val}


def test_fingerprint_and_counts_of_several_folders(tmp_path):
    a = _site(tmp_path / "a", ["x.png,xray,COVID,train,p1,", "y.png,xray,Non_COVID,test,p2,"])
    b = _site(tmp_path / "b", ["x.png,xray,COVID,train,p1,", "z.png,ct,COVID,train,p3,"])
    both = discover([a, b])
    assert fingerprint(both) == fingerprint(discover([b, a]))
    assert fingerprint(both)["samples_sha256"] != fingerprint(discover(a))["samples_sha256"]
    assert count_by_source(both) == [
        {"source": "a", "modality": "xray", "split": "test", "label": "Non_COVID", "n": 1},
        {"source": "a", "modality": "xray", "split": "train", "label": "COVID", "n": 1},
        {"source": "b", "modality": "ct", "split": "train", "label": "COVID", "n": 1},
        {"source": "b", "modality": "xray", "split": "train", "label": "COVID", "n": 1}]


def test_write_manifest_paths_read_back_from_anywhere(tmp_path, monkeypatch):
    from respiscan.evaluation.report import read_splits

    _site(tmp_path / "a", ["x.png,xray,COVID,train,p1,"]), _site(tmp_path / "b", ["x.png,ct,COVID,test,,"])
    monkeypatch.chdir(tmp_path)
    samples = discover([Path("a"), Path("b")])  # relative folders, as typed on a command line
    write_manifest(samples, tmp_path / "bundle" / "splits.csv")
    monkeypatch.chdir(tmp_path / "bundle")
    back = read_splits(tmp_path / "bundle")
    assert [(s.id, s.group, s.source) for s in back] == [("a/x.png", "a:p1", "a"), ("b/x.png", None, "b")]
    assert all(s.path.is_absolute() and s.path.is_file() for s in back)
    with pytest.raises(RespiscanError, match="not inside"):
        write_manifest(back, tmp_path / "m.csv", root=tmp_path / "a")
    write_manifest(back, tmp_path / "manifest.csv", root=tmp_path)
    assert [(s.id, s.source) for s in discover(tmp_path)] == [("a/x.png", "a"), ("b/x.png", "b")]
