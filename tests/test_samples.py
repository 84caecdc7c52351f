"""Discovery of the reference layout, manifests and train/test CSVs; validation carving; their error paths."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from respiscan.data.samples import carve_validation, check_trainable, discover, folder_samples, parse_label
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
