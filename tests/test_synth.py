"""The synthetic generator: image contract, determinism, the written layout, and a task that a small CNN can
learn but a single brightness feature cannot solve (the demo and the other tests depend on both)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from respiscan.data.samples import check_trainable, discover
from respiscan.data.synth import apply_look, generate, make_image, site_looks
from respiscan.errors import RespiscanError

MODALITIES = ("xray", "ct")


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", [32, 64, 224])
def test_image_and_mask_shapes(modality: str, size: int) -> None:
    for covid in (True, False):
        image, mask = make_image(modality, covid, size, np.random.default_rng(1))
        assert image.shape == (size, size) and image.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == bool
        assert image.std() > 20  # real contrast, not a blank frame


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(RespiscanError, match="modality"):
        make_image("mri", True, 64, np.random.default_rng(0))
    with pytest.raises(RespiscanError, match="size"):
        make_image("ct", True, 16, np.random.default_rng(0))


@pytest.mark.parametrize("modality", MODALITIES)
def test_make_image_is_deterministic(modality: str) -> None:
    a = make_image(modality, True, 96, np.random.default_rng(7))
    b = make_image(modality, True, 96, np.random.default_rng(7))
    c = make_image(modality, True, 96, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("modality", MODALITIES)
def test_masks_mark_covid_opacities_only(modality: str) -> None:
    size = 64
    for seed in range(25):
        _, mask = make_image(modality, False, size, np.random.default_rng([seed, 0]))
        assert not mask.any()
        image, mask = make_image(modality, True, size, np.random.default_rng([seed, 1]))
        assert mask.any()
        assert mask.mean() < 0.25  # patches, not whole lungs
        rows, cols = np.nonzero(mask)
        margin = round(0.05 * size)  # inside the chest, never at the frame's edge
        assert rows.min() >= margin and cols.min() >= margin
        assert rows.max() < size - margin and cols.max() < size - margin
        assert image[mask].mean() > image[:, :margin].mean()  # on the patient, not on the dark background


def _read_manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", "modality", "label", "split", "group", "source"]
        return list(reader)


def test_generate_writes_the_reference_layout(tmp_path: Path) -> None:
    out = generate(tmp_path / "new" / "synth", n_per_class=5, size=48, seed=3, test_fraction=0.4, progress=False)
    assert out == tmp_path / "new" / "synth"
    counts = Counter(p.relative_to(out).parent.as_posix() for p in out.rglob("*.png"))
    for folder in ("X_Ray", "CT_Scan"):
        for label in ("COVID", "Non_COVID"):
            assert counts[f"{folder}_Train/{label}"] == 3
            assert counts[f"{folder}_Test/{label}"] == 2  # round(5 * 0.4)
    assert sum(counts.values()) == 20

    rows = _read_manifest(out)
    assert len(rows) == 20 and {r["source"] for r in rows} == {"synthetic"}
    patients: dict[str, set] = {}
    for r in rows:
        path = out / r["path"]
        assert path.is_file() and "\\" not in r["path"]
        assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape == (48, 48)
        prefix = {"xray": "X_Ray", "ct": "CT_Scan"}[r["modality"]]
        assert r["path"].startswith(f"{prefix}_{r['split'].title()}/{r['label']}/")
        assert r["group"] == f"synth-{path.stem}"
        patients.setdefault(r["group"], set()).add((r["modality"], r["label"], r["split"]))
    # One X-ray and one CT per patient, same label and split, so the two can be paired.
    assert len(patients) == 10
    assert all({m for m, _, _ in v} == {"xray", "ct"} and len({(lab, s) for _, lab, s in v}) == 1
               for v in patients.values())

    samples = discover(out)
    check_trainable(samples, str(out))
    assert len(samples) == 20 and all(s.group and s.group.startswith("synth-p") for s in samples)


def test_generate_always_keeps_a_test_image(tmp_path: Path) -> None:
    out = generate(tmp_path / "d", n_per_class=2, size=32, test_fraction=0.0, progress=False)
    assert Counter(r["split"] for r in _read_manifest(out)) == {"train": 4, "test": 4}


def test_generate_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(generate(tmp_path / "a", 3, size=64, seed=11, progress=False))
    b = files(generate(tmp_path / "b", 3, size=64, seed=11, progress=False))
    c = files(generate(tmp_path / "c", 3, size=64, seed=12, progress=False))
    assert a == b
    assert a != c


def test_generate_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(RespiscanError) as err:
        generate(tmp_path, 2, size=32, progress=False)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    generate(tmp_path / "empty", 2, size=32, progress=False)  # an existing empty folder is fine


def test_generate_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(tmp_path / "quiet", 2, size=32, progress=False)
    assert capsys.readouterr().err == ""
    generate(tmp_path / "loud", 2, size=32, progress=True)
    assert "8/8" in capsys.readouterr().err


# --- learnable, but not by a brightness threshold ------------------------------------------------------

def _lung_mean(image: np.ndarray, modality: str) -> float:
    """Mean of the dark (lung) pixels in the central chest, split from mediastinum and bone by Otsu."""
    s = image.shape[0]
    box = (image[int(0.15 * s):int(0.65 * s), int(0.15 * s):int(0.85 * s)] if modality == "xray"
           else image[int(0.3 * s):int(0.7 * s), int(0.2 * s):int(0.8 * s)])
    threshold, _ = cv2.threshold(box, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(box[box < threshold].mean())


def _tiny_cnn_auc(images: np.ndarray, labels: np.ndarray, n_train: int) -> float:
    """Train a 3-layer CNN for a few seconds on the first n_train images; AUC on the rest."""
    torch.manual_seed(0)
    x = torch.tensor(images, dtype=torch.float32)[:, None] / 255
    x = (x - x[:n_train].mean()) / x[:n_train].std()
    y = torch.tensor(labels, dtype=torch.float32)

    def block(c_in: int, c_out: int, k: int = 3) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2), torch.nn.BatchNorm2d(c_out),
                torch.nn.ReLU()]

    net = torch.nn.Sequential(*block(1, 16, 5), *block(16, 32), *block(32, 32), torch.nn.AdaptiveMaxPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=1e-3)
    for _ in range(15):
        net.train()
        order = torch.randperm(n_train)
        for start in range(0, n_train, 32):
            idx = order[start:start + 32]
            batch = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x[idx].flip(-1), x[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(batch).squeeze(1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        scores = net(x[n_train:]).squeeze(1).numpy()
    return float(roc_auc_score(labels[n_train:], scores))


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions run fastest on one thread, and a busy CI box makes extra threads spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("modality", MODALITIES)
def test_task_is_learnable_but_not_trivial(modality: str, one_torch_thread: None) -> None:
    n = 400  # 200 per class at 64 px: 300 to train, 100 held out
    labels = np.arange(n) % 2
    images = np.stack([make_image(modality, bool(c), 64, np.random.default_rng([2024, i]))[0]
                       for i, c in enumerate(labels)])

    brightness_auc = roc_auc_score(labels, [_lung_mean(im, modality) for im in images])
    assert max(brightness_auc, 1 - brightness_auc) < 0.97, f"lung brightness alone separates: {brightness_auc:.3f}"

    cnn_auc = _tiny_cnn_auc(images, labels, n_train=300)
    assert cnn_auc > 0.7, f"a tiny CNN cannot learn {modality}: held-out AUC {cnn_auc:.3f}"


def test_ct_lungs_stay_inside_the_chest_wall() -> None:
    """Lung air never joins the air outside the body (a lung through the chest wall would be a free,
    unrealistic cue, and would put opacities on the body's edge)."""
    for seed in range(40):
        image, _ = make_image("ct", seed % 2 == 0, 160, np.random.default_rng([seed, 2]))
        n, labels, stats, _ = cv2.connectedComponentsWithStats((image < 60).astype(np.uint8), connectivity=8)
        outside = labels[0, 0]
        lungs = [k for k in range(1, n) if k != outside and stats[k, cv2.CC_STAT_AREA] > 0.01 * image.size]
        assert len(lungs) >= 2, f"seed {seed}: a lung joins the outside air"


# --- several sites -----------------------------------------------------------------------------------------

def _site_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir())


def _global_statistics(image: np.ndarray) -> list[float]:
    """7 global intensity statistics and the mean of the outer 3% frame: what a site's look changes."""
    b = max(1, round(0.03 * image.shape[0]))
    frame = np.concatenate([image[:b].ravel(), image[-b:].ravel(), image[:, :b].ravel(), image[:, -b:].ravel()])
    return [image.mean(), image.std(), *np.percentile(image, [5, 25, 50, 75, 95]), frame.mean()]


def test_sites_write_one_data_folder_each(tmp_path: Path) -> None:
    out = generate(tmp_path / "sites", n_per_class=4, size=48, seed=5, sites=3, progress=False)
    assert [p.name for p in _site_folders(out)] == ["site0", "site1", "site2"]
    info = json.loads((out / "sites.json").read_text())
    assert list(info["sites"]) == ["site0", "site1", "site2"] and info["confound"] == 0.0
    for folder in _site_folders(out):
        samples = discover(folder)
        assert len(samples) == 16 and {s.source for s in samples} == {folder.name}
        assert {s.group for s in samples} == {f"{folder.name}-p{k:04d}" for k in range(8)}
        suffixes = {s.path.suffix for s in samples}
        assert len(suffixes) <= 2 and suffixes <= {".png", ".jpg"}
    combined = discover(_site_folders(out))
    check_trainable(combined, str(out))
    assert len({s.id for s in combined}) == 48 and len({s.group for s in combined}) == 24
    again = generate(tmp_path / "again", n_per_class=4, size=48, seed=5, sites=3, progress=False)
    assert all((again / p.relative_to(out)).read_bytes() == p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_sites_differ_measurably(tmp_path: Path) -> None:
    """A linear model on global statistics tells the sites apart; on shuffled site names it cannot."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = generate(tmp_path / "sites", n_per_class=8, size=64, seed=0, sites=3, progress=False)
    samples = discover(_site_folders(out))
    for modality in MODALITIES:
        mine = [s for s in samples if s.modality == modality]
        x = np.array([_global_statistics(cv2.imread(str(s.path), cv2.IMREAD_GRAYSCALE).astype(float)) for s in mine])
        site = np.unique([s.source for s in mine], return_inverse=True)[1]
        for y, separated in ((site, True), (np.random.default_rng(0).permutation(site), False)):
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            auc = roc_auc_score(y, cross_val_predict(model, x, y, cv=4, method="predict_proba"), multi_class="ovr")
            assert auc > 0.9 if separated else auc < 0.75, (modality, separated, auc)


def test_site_look_keeps_the_anatomy() -> None:
    """The look changes how an image is rendered, not what it shows: intensity order survives in the chest
    (at the original field of view, so that pixels can be compared one to one)."""
    from scipy.stats import spearmanr

    for look in site_looks(4, seed=2):
        for modality in MODALITIES:
            image, _ = make_image(modality, True, 96, np.random.default_rng(3))
            rendered = apply_look(image, replace(look[modality], zoom=1.0), np.random.default_rng(4))
            assert rendered.shape == image.shape and rendered.dtype == np.uint8
            inner = slice(24, 72)
            assert spearmanr(image[inner, inner].ravel(), rendered[inner, inner].ravel())[0] > 0.8


@pytest.mark.parametrize("sites, confound, covid", [(2, 0.8, [18, 2]), (2, 0.0, [10, 10]), (3, 1.0, [20, 10, 0])])
def test_confound_sets_the_site_label_correlation(tmp_path: Path, sites: int, confound: float,
                                                  covid: list[int]) -> None:
    from scipy.stats.contingency import association

    out = generate(tmp_path / "s", n_per_class=10, size=32, seed=1, sites=sites, confound=confound, progress=False)
    samples = [s for s in discover(_site_folders(out)) if s.modality == "ct"]  # one image per patient
    table = np.array([[sum(s.label == c for s in samples if s.source == site.name) for c in (1, 0)]
                      for site in _site_folders(out)])
    assert table[:, 0].tolist() == covid and (table.sum(axis=1) == 20).all()
    if sites == 2:
        assert association(table, method="cramer") == pytest.approx(confound)
    assert [v["covid_share"] for v in json.loads((out / "sites.json").read_text())["sites"].values()] == \
        [c / 20 for c in covid]


@pytest.mark.parametrize("kwargs, message", [
    ({"sites": -1}, "sites=-1"), ({"sites": 2, "confound": 1.5}, "confound=1.5"),
    ({"sites": 1, "confound": 0.5}, "needs at least 2 sites")])
def test_bad_site_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(RespiscanError, match=message):
        generate(tmp_path / "s", 2, size=32, progress=False, **kwargs)
    assert not (tmp_path / "s").exists()
