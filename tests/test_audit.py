"""The data audit finds what we plant: copies (altered in every way public sets alter them), label conflicts,
patients across splits, shortcut baselines and a source/label confound; and stays quiet on clean data."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from respiscan.data.audit import audit, check_strict, format_audit, shortcut_warnings
from respiscan.data.samples import discover
from respiscan.errors import RespiscanError

FIELDS = ["path", "modality", "label", "split", "group", "source"]
KINDS = ("crop", "pad", "flip", "rotate", "clahe", "contrast", "resize", "jpeg")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Synthetic data whose manifest gives two sources, each with both classes (no confound)."""
    from respiscan.data.synth import generate

    root = generate(tmp_path_factory.mktemp("audit") / "data", n_per_class=6, size=64, seed=3, progress=False)
    return root, _rows(root, "manifest.csv")


def _rows(root: Path, name: str) -> list[dict]:
    with open(root / name, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["source"] = "site_a" if i % 2 else "site_b"
    return rows


def _write(root: Path, rows: list[dict], name: str) -> Path:
    path = root / name
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _train_row(rows: list[dict], modality: str) -> dict:
    return next(r for r in rows if r["split"] == "train" and r["modality"] == modality)


def _pairs(result: dict, *kinds: str) -> set[frozenset[str]]:
    return {frozenset((p["a"], p["b"])) for kind in kinds for p in result[kind]}


def _altered(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One of the alterations public sets apply when they re-share an image."""
    h, w = image.shape
    if kind == "crop":  # 5 % of each side length, split at random between the two edges
        dy, dx = round(0.05 * h), round(0.05 * w)
        top, left = int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1))
        return image[top:h - (dy - top), left:w - (dx - left)]
    if kind == "pad":  # 10 % black on every side
        py, px = round(0.1 * h), round(0.1 * w)
        return cv2.copyMakeBorder(image, py, py, px, px, cv2.BORDER_CONSTANT, value=0)
    if kind == "flip":
        return image[:, ::-1]
    if kind == "rotate":
        turn = cv2.getRotationMatrix2D((w / 2, h / 2), 3.0 * float(rng.choice([-1, 1])), 1.0)
        return cv2.warpAffine(image, turn, (w, h))
    if kind == "clahe":
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)
    if kind == "contrast":  # gamma, gain and offset
        return np.clip((image / 255.0) ** 0.6 * 230 + 10, 0, 255).astype(np.uint8)
    if kind == "resize":
        return cv2.resize(image, (round(w * 0.6), round(h * 0.6)), interpolation=cv2.INTER_AREA)
    return image  # "jpeg": re-encoded when written


def test_finds_planted_duplicates_across_and_within_splits(clean):
    root, rows = clean
    planted = root / "planted"
    planted.mkdir(exist_ok=True)
    xray, ct = _train_row(rows, "xray"), _train_row(rows, "ct")
    # exact copy of a train X-ray in test, and another one inside train
    shutil.copy(root / xray["path"], planted / "copy_test.png")
    shutil.copy(root / xray["path"], planted / "copy_train.png")
    # near copy of a train CT in test: brighter, noisy, rescaled and re-encoded as JPEG
    image = cv2.imread(str(root / ct["path"]), cv2.IMREAD_GRAYSCALE).astype(float)
    noisy = image + 12 + np.random.default_rng(0).normal(0, 2, image.shape)
    cv2.imwrite(str(planted / "near_test.jpg"), cv2.resize(np.clip(noisy, 0, 255).astype(np.uint8), (80, 80)))
    (planted / "broken.png").write_bytes(b"not an image")
    extra = [{**xray, "path": "planted/copy_test.png", "split": "test", "group": "x1"},
             {**xray, "path": "planted/copy_train.png", "group": "x2"},
             {**ct, "path": "planted/near_test.jpg", "split": "test", "group": "x3"},
             {**ct, "path": "planted/broken.png", "group": "x4"}]
    result = audit(discover(_write(root, rows + extra, "planted.csv")), progress=False)

    assert result["n_images"] == len(rows) + 4
    assert [u["id"] for u in result["unreadable"]] == ["planted/broken.png"]
    exact = _pairs(result, "exact_duplicates")
    assert frozenset((xray["path"], "planted/copy_test.png")) in exact
    assert frozenset((xray["path"], "planted/copy_train.png")) in exact
    assert frozenset((ct["path"], "planted/near_test.jpg")) in _pairs(result, "near_duplicates")
    within = next(p for p in result["exact_duplicates"] if {p["a"], p["b"]} == {xray["path"], "planted/copy_train.png"})
    assert not within["cross_split"]
    assert result["exact_duplicates"][0]["cross_split"]  # cross-split pairs are listed first
    assert result["cross_split_duplicates"] >= 3  # copy_test with the original and with copy_train, near_test
    assert result["errors"] == [] and result["label_conflicts"] == []
    assert any("across splits" in w for w in result["warnings"])
    assert any("within one split" in w for w in result["warnings"])
    with pytest.raises(RespiscanError, match="across splits; first: .*exact duplicate") as err:
        check_strict(result)
    assert "\n" not in str(err.value)
    text = format_audit(result)
    assert "exact duplicate pairs: 3" in text and "warning:" in text


@pytest.fixture(scope="module")
def altered(tmp_path_factory) -> tuple[dict, dict[str, tuple[str, str]], set[str]]:
    """Synthetic phantoms at 96 px; five train images per modality copied into test with each alteration, and
    one flipped copy given the opposite label. Returns the audit, copy id -> (original id, kind), and the ids
    of the phantoms."""
    from respiscan.data.synth import generate

    root = generate(tmp_path_factory.mktemp("altered") / "data", n_per_class=10, size=96, seed=5, progress=False)
    rows = _rows(root, "manifest.csv")
    rng = np.random.default_rng(0)
    planted, extra = {}, []
    for modality in ("xray", "ct"):
        train = [r for r in rows if r["split"] == "train" and r["modality"] == modality]
        for row in rng.choice(train, 5, replace=False):
            image = cv2.imread(str(root / row["path"]), cv2.IMREAD_GRAYSCALE)
            for kind in KINDS:
                rel = f"planted/{modality}/{kind}_{Path(row['path']).stem}.{'jpg' if kind == 'jpeg' else 'png'}"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / rel), np.ascontiguousarray(_altered(image, kind, rng)),
                            [cv2.IMWRITE_JPEG_QUALITY, 60] if kind == "jpeg" else [])
                extra.append({**row, "path": rel, "split": "test", "group": rel})
                planted[rel] = (row["path"], kind)
    conflict = next(r for r in rows if r["split"] == "train" and r["modality"] == "xray" and r["path"] not in
                    {original for original, _ in planted.values()})
    image = cv2.imread(str(root / conflict["path"]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(root / "planted" / "relabelled.png"), np.ascontiguousarray(image[:, ::-1]))
    flipped_label = "Non_COVID" if conflict["label"] == "COVID" else "COVID"
    extra.append({**conflict, "path": "planted/relabelled.png", "split": "test", "group": "relabelled",
                  "label": flipped_label})
    planted["planted/relabelled.png"] = (conflict["path"], "relabelled")
    return audit(discover(_write(root, rows + extra, "altered.csv")), progress=False), planted, \
        {r["path"] for r in rows}


@pytest.mark.parametrize("kind", KINDS)
def test_finds_altered_copies_across_splits(altered, kind):
    result, planted, _ = altered
    found = _pairs(result, "exact_duplicates", "near_duplicates")
    hits = [frozenset((original, copy)) in found for copy, (original, k) in planted.items() if k == kind]
    assert len(hits) == 10 and sum(hits) >= 9, f"{kind}: {sum(hits)} of {len(hits)} copies found"


def test_altered_copies_of_distinct_images_are_not_reported(altered):
    """At most 1 % of the pairs of distinct images (same modality, across splits) is reported as a copy or as
    likely the same patient."""
    result, planted, phantoms = altered

    def image_of(sample_id: str) -> str:
        return planted[sample_id][0] if sample_id in planted else sample_id

    ids = list(phantoms) + list(planted)
    modality = {i: ("xray" if "X_Ray" in image_of(i) else "ct") for i in ids}
    split = {i: "test" if i in planted or "_Test/" in i else "train" for i in ids}
    distinct = sum(modality[a] == modality[b] and split[a] != split[b] and image_of(a) != image_of(b)
                   for n, a in enumerate(ids) for b in ids[n + 1:])
    reported = [p for kind in ("near_duplicates", "similar_across_splits") for p in result[kind]
                if image_of(p["a"]) != image_of(p["b"])]
    assert distinct > 1000 and len(reported) <= 0.01 * distinct, reported


def test_a_copy_with_the_opposite_label_is_an_error(altered):
    result, _, _ = altered
    assert len(result["label_conflicts"]) == 1 and len(result["errors"]) == 1
    assert result["label_conflicts"][0]["b"] == "planted/relabelled.png" or \
        result["label_conflicts"][0]["a"] == "planted/relabelled.png"
    with pytest.raises(RespiscanError, match="opposite labels") as err:
        check_strict(result)
    assert "\n" not in str(err.value)
    assert "error: 1 copy pair(s) with opposite labels" in format_audit(result)


def test_clean_data_passes(clean):
    root, rows = clean
    result = audit(discover(_write(root, rows, "clean.csv")), progress=False)
    assert result["exact_duplicates"] == result["near_duplicates"] == [] and result["cross_split_duplicates"] == 0
    assert result["similar_across_splits"] == result["groups_across_splits"] == result["errors"] == []
    assert result["confounds"] == [] and result["cramers_v"] < 0.5
    check_strict(result)
    by_split = result["balance"]["by_split"]
    assert sum(c["n"] for c in by_split.values()) == len(rows)
    assert all(c["COVID"] + c["Non_COVID"] == c["n"] for c in by_split.values())
    assert set(result["balance"]["by_source"]) == {"site_a", "site_b"}


def test_groups_across_splits_and_missing_groups(clean):
    root, rows = clean
    leaked = [dict(r) for r in rows]
    test_ct = next(r for r in leaked if r["split"] == "test" and r["modality"] == "ct")
    test_ct["group"] = _train_row(leaked, "ct")["group"]
    result = audit(discover(_write(root, leaked, "leaked.csv")), progress=False)
    # the train patient's group holds its X-ray and its CT
    assert result["groups_across_splits"] == [{"group": test_ct["group"], "splits": {"test": 1, "train": 2}}]
    with pytest.raises(RespiscanError, match="1 group\\(s\\) in more than one split"):
        check_strict(result)
    assert result["ungrouped"] == []  # one image per patient and modality, but each patient has an X-ray and a CT

    ungrouped = audit(discover(_write(root, [{**r, "group": ""} for r in rows], "ungrouped.csv")), progress=False)
    assert ungrouped["ungrouped"] == ["xray", "ct"] and ungrouped["groups_across_splits"] == []
    assert any(w.startswith("ct images have no groups") for w in ungrouped["warnings"])
    per_image = [{**r, "group": r["path"]} for r in rows]  # a group id per file: no patient is known
    assert audit(discover(_write(root, per_image, "per_image.csv")), progress=False)["ungrouped"] == ["xray", "ct"]


def test_shortcut_baselines_see_a_planted_frame_and_file_format(clean, tmp_path):
    """COVID images get a white frame and are stored as JPEG: border and metadata baselines find them."""
    root, rows = clean
    marked = []
    for row in rows:
        image = cv2.imread(str(root / row["path"]), cv2.IMREAD_GRAYSCALE)
        covid = row["label"] == "COVID"
        if covid:
            image = cv2.copyMakeBorder(image[2:-2, 2:-2], 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=255)
        rel = Path(row["path"]).with_suffix(".jpg" if covid else ".png").as_posix()
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), image)
        marked.append({**row, "path": rel})
    result = audit(discover(_write(tmp_path, marked, "manifest.csv")), progress=False)
    for modality in ("xray", "ct"):
        baselines = result["shortcuts"][modality]
        assert baselines["n_test"] == sum(r["split"] == "test" and r["modality"] == modality for r in rows)
        assert max(baselines["border"].values()) >= 0.9 and max(baselines["metadata"].values()) == 1.0
        assert any(w.startswith(f"{modality}: the outer 5 %") for w in result["warnings"])
    # next to a model: a baseline within 0.1 of the model's AUC is worth a sentence even below 0.7
    chance = {"logistic": 0.5, "boosting": 0.5}
    shortcuts = {"ct": {"n_train": 10, "n_test": 10, "border": {"logistic": 0.62, "boosting": 0.55},
                        "intensity": chance, "metadata": chance}}
    assert shortcut_warnings(shortcuts) == []
    (sentence,) = shortcut_warnings(shortcuts, {"ct": 0.7})
    assert "0.62" in sentence and "against the model's 0.70" in sentence


def test_flags_source_label_confound(clean):
    root, rows = clean
    confounded = [{**r, "source": "covid_hospital" if r["label"] == "COVID" else "clinic"} for r in rows]
    result = audit(discover(_write(root, confounded, "confounded.csv")), progress=False)
    kinds = {(c["kind"], c.get("source")) for c in result["confounds"]}
    assert {("single_class_source", "covid_hospital"), ("single_class_source", "clinic"), ("cramers_v", None)} == kinds
    assert result["cramers_v"] == pytest.approx(1.0)
    assert any("contributes only COVID images" in w for w in result["warnings"])
    assert any("Cramer's V" in w for w in result["warnings"])


def test_similarity_threshold_is_checked(clean):
    root, rows = clean
    with pytest.raises(RespiscanError, match="similarity must be between"):
        audit(discover(_write(root, rows, "clean.csv")), similarity=0.5, progress=False)
