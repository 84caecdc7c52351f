"""Methods against the site shortcut (issue 11): balanced sampling, source adversary, body crop, scanner
augmentation, cross-fitting; each checked on a computation where the shortcut is planted."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from conftest import REALDEV, tiny_config
from respiscan.data.preprocess import PreprocessConfig, body_outline, lung_box, preprocess
from respiscan.data.samples import discover
from respiscan.data.synth import SiteLook, apply_look
from respiscan.errors import RespiscanError
from respiscan.models.mlp import SharedMLP
from respiscan.runtime import minibatches, predict_logits
from respiscan.training.config import ClassifierFit
from respiscan.training.loop import SourceAdversary, auc, train_classifier
from respiscan.training.stages import scanner_look
from respiscan.training.trainer import CROSSFIT, fit_samples_of, prepare_data

LOOKS = np.random.default_rng(99).normal(0, 1, (2, 4)) * 3  # each site's fixed offset in 4 "appearance" features
FIT = ClassifierFit(epochs=12, patience=12, batch_size=64, lr=1e-3, weight_decay=1e-3, select="last")


def confounded(n: int, covid_share: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of two sites: 4 features tell the site (strongly), 4 the disease (weakly, d' = 1 each)."""
    rng = np.random.default_rng(seed)
    xs, ys, sites = [], [], []
    for site, share in enumerate(covid_share):
        y = (rng.random(n) < share).astype(np.float32)
        xs.append(np.hstack([LOOKS[site] + rng.normal(0, 0.3, (n, 4)), y[:, None] + rng.normal(0, 1, (n, 4))]))
        ys.append(y)
        sites.append(np.full(n, site))
    return (torch.tensor(np.vstack(xs), dtype=torch.float32), torch.tensor(np.concatenate(ys)),
            torch.tensor(np.concatenate(sites)))


def cell_weights(site: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What --balance source_class gives: every (site, class) the same total weight."""
    counts = Counter(zip(site.tolist(), y.tolist()))
    return torch.tensor([1 / counts[k] for k in zip(site.tolist(), y.tolist())], dtype=torch.float64)


def fit_on_confounded(seed: int, balance: bool = False) -> float:
    """Train where site A is 90 % COVID and site B 10 %; AUC where both sites are 50 % (the shortcut fails)."""
    x, y, site = confounded(200, [0.9, 0.1], seed)
    xv, yv, _ = confounded(60, [0.9, 0.1], seed + 100)
    xt, yt, _ = confounded(200, [0.5, 0.5], seed + 200)
    weights = cell_weights(site, y) if balance else None
    torch.manual_seed(0)
    model = SharedMLP(in_dim=8)
    train_classifier(model, x, y, xv, yv, FIT, seed=seed, shard=False, weights=weights)
    with torch.no_grad():
        return auc(yt.numpy(), model(xt).numpy())


def test_weighted_minibatches_draw_every_stratum_equally():
    strata = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    counts = Counter(strata.tolist())
    weights = torch.tensor([1 / counts[int(s)] for s in strata])
    drawn = torch.cat(list(minibatches(len(strata), 100, torch.Generator().manual_seed(0), weights)))
    share = np.bincount(strata[drawn].numpy(), minlength=3) / len(drawn)
    assert len(drawn) == len(strata)
    np.testing.assert_allclose(share, 1 / 3, atol=0.05)


def test_source_class_balance_recovers_what_the_site_shortcut_costs():
    plain = np.mean([fit_on_confounded(seed) for seed in range(2)])
    balanced = np.mean([fit_on_confounded(seed, balance=True) for seed in range(2)])
    assert balanced > plain + 0.04, (plain, balanced)


def test_balanced_validation_gives_the_site_shortcut_no_credit():
    """With balance, validation is weighted as training's batches are: a score that is the site alone, which
    the confounded validation split rewards (AUC 0.9), scores 0.5; the logged val_auc, which chooses the epoch,
    is the model's weighted AUC."""
    x, y, site = confounded(200, [0.9, 0.1], 0)
    xv, yv, site_v = confounded(60, [0.9, 0.1], 100)
    w_v = cell_weights(site_v, yv)
    shortcut = (site_v == 0).double().numpy()
    assert auc(yv.numpy(), shortcut) > 0.8
    assert auc(yv.numpy(), shortcut, w_v.numpy()) == pytest.approx(0.5)
    model = SharedMLP(in_dim=8)
    result = train_classifier(model, x, y, xv, yv, FIT, seed=0, shard=False, weights=cell_weights(site, y),
                              val_weights=w_v)
    logits = predict_logits(model, xv, bf16=False, device=torch.device("cpu"))
    weighted = auc(yv.numpy(), logits, w_v.numpy())
    assert result.history[-1]["val_auc"] == pytest.approx(weighted)
    assert result.history[-1]["val_auc"] != pytest.approx(auc(yv.numpy(), logits), abs=1e-3)


def test_source_adversary_leaves_its_discriminator_guessing():
    """The discriminator reads the source almost perfectly at first; as the confusion weight ramps up the
    features stop telling it (its training accuracy falls towards chance, 0.5 for two sources)."""
    x, y, site = confounded(200, [0.9, 0.1], 0)
    xv, yv, _ = confounded(60, [0.9, 0.1], 100)
    torch.manual_seed(0)
    result = train_classifier(SharedMLP(in_dim=8), x, y, xv, yv, FIT, seed=0, shard=False,
                              adversary=SourceAdversary(site.long(), 2, 1.0))
    accuracy = [row["train_source_acc"] for row in result.history]
    assert accuracy[0] > 0.85
    assert np.mean(accuracy[-6:]) < 0.75, accuracy


def _phantom(size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.34) ** 2 < 1
    lungs = (((xx - 0.33) / 0.12) ** 2 + ((yy - 0.5) / 0.2) ** 2 < 1) | (((xx - 0.67) / 0.12) ** 2
                                                                        + ((yy - 0.5) / 0.2) ** 2 < 1)
    return np.where(body, np.where(lungs, 50, 170), 8).astype(np.uint8)


def test_body_crop_removes_frames_text_and_field_of_view_differences():
    """The same patient as two sites render it (white frame + text + zoom vs none): after the body crop the two
    preprocessed images differ far less than without it."""
    plain_look = SiteLook(1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, None, 0.05, None)
    marked = SiteLook(1.0, 1.0, 0.0, 0.0, 0.0, 1.15, 0.06, 1.0, "top_left", 0.08, None)
    phantom = _phantom()
    a, b = (apply_look(phantom, look, np.random.default_rng(0)) for look in (plain_look, marked))
    def gap(crop: str) -> float:
        return float(np.abs(preprocess(a, "ct", 64, crop=crop).astype(float)
                            - preprocess(b, "ct", 64, crop=crop).astype(float)).mean())
    assert gap("body") < 0.5 * gap("none"), (gap("body"), gap("none"))
    cropped = preprocess(b, "ct", 64, crop="body")
    for corner in (cropped[:4, :4], cropped[:4, -4:], cropped[-4:, :4], cropped[-4:, -4:]):
        assert corner.max() == 0  # outside the body's outline: the white frame and the text are gone


def test_ct_body_crops_ct_only():
    framed = apply_look(_phantom(), SiteLook(1.0, 1.0, 0.0, 0.0, 0.0, 1.15, 0.06, 1.0, "top_left", 0.08, None),
                        np.random.default_rng(0))
    np.testing.assert_array_equal(preprocess(framed, "ct", 64, crop="ct_body"),
                                  preprocess(framed, "ct", 64, crop="body"))
    np.testing.assert_array_equal(preprocess(framed, "xray", 64, crop="ct_body"), preprocess(framed, "xray", 64))
    assert not np.array_equal(preprocess(framed, "ct", 64, crop="ct_body"), preprocess(framed, "ct", 64))


def test_lung_crop_shows_the_lungs_at_one_scale_whatever_the_field_of_view():
    """A whole-body field of view and a figure cut tight around the lungs (as papers print them) come out of
    the lung crop nearly alike, and far apart out of the body crop; the box spans both lungs and little else."""
    side = 192
    noise = np.random.default_rng(0)
    wide = np.clip(_phantom(side) + noise.normal(0, 4, (side, side)), 0, 255).astype(np.uint8)
    tight = cv2.resize(wide[int(0.27 * side):int(0.73 * side), int(0.18 * side):int(0.82 * side)], (side, side))
    def gap(crop: str) -> float:
        return float(np.abs(preprocess(wide, "ct", 64, crop=crop).astype(float)
                            - preprocess(tight, "ct", 64, crop=crop).astype(float)).mean())
    assert gap("ct_lungs") < 0.5 * gap("ct_body"), (gap("ct_lungs"), gap("ct_body"))
    x, y, w, h = lung_box(wide, body_outline(wide, "ct"))
    assert x <= 0.21 * side and x + w >= 0.79 * side and y <= 0.3 * side and y + h >= 0.7 * side  # both lungs
    assert w * h < 0.6 * (0.84 * side) * (0.68 * side)  # well inside the body's box
    np.testing.assert_array_equal(preprocess(wide, "xray", 64, crop="ct_lungs"), preprocess(wide, "xray", 64))


def test_body_outline_keeps_the_whole_image_when_nothing_plausible_is_found():
    assert body_outline(np.zeros((64, 64), np.uint8), "xray") is None
    flat = np.full((64, 64), 120, np.uint8)
    np.testing.assert_array_equal(preprocess(flat, "xray", 64, crop="body"), preprocess(flat, "xray", 64))


def test_body_hull_from_the_outline_equals_the_hull_of_every_pixel():
    """The crop takes the convex hull of the largest region's outer boundary only (3.5x faster on realdev's CT,
    where every one of the 6,134 hulls of realdev and sites came out identical): the same mask as the hull of
    all its pixels, also for a ragged, concave region with holes."""
    from respiscan.data.preprocess import _filled, _largest_bright_hull

    rng = np.random.default_rng(0)
    for _ in range(5):
        image = np.full((200, 240), 10, np.uint8)
        for _ in range(6):  # overlapping bright blobs with dark holes: one concave, ragged region
            cv2.circle(image, tuple(int(v) for v in rng.integers(60, 180, 2)), int(rng.integers(15, 40)), 200, -1)
        cv2.circle(image, tuple(int(v) for v in rng.integers(80, 160, 2)), 8, 10, -1)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        got = _filled(image.shape, _largest_bright_hull(image, None))
        side = min(image.shape)
        smooth = cv2.GaussianBlur(image, (0, 0), max(1.0, side / 150))
        level, _ = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        k = max(3, side // 40)
        bright = cv2.morphologyEx((smooth > level).astype(np.uint8), cv2.MORPH_OPEN,
                                  cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        _, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
        region = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
        want = np.zeros_like(image)
        cv2.fillConvexPoly(want, cv2.convexHull(cv2.findNonZero(region)), 255)
        np.testing.assert_array_equal(got, want)
        assert (want > 0).sum() > region.sum()  # concave: the hull adds pixels, so the test can tell


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a > 0) & (b > 0)).sum() / ((a > 0) | (b > 0)).sum())


def test_outline_found_small_is_the_full_size_outline_to_a_pixel_or_two():
    """The presets find the body outline at 128 px and scale its hull back: on a 512 px slice inside a scanner's
    reconstruction circle, with a frame, text and noise, the same body as at full size; a work side at or above
    the image's is the full-size computation itself."""
    side = 512
    yy, xx = np.mgrid[:side, :side] / side
    image = np.where((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.46 ** 2, 40, 0).astype(np.uint8)  # the circle
    image[(((xx - 0.5) / 0.36) ** 2 + ((yy - 0.52) / 0.27) ** 2) < 1] = 160  # the body
    image[(((xx - 0.38) / 0.09) ** 2 + ((yy - 0.5) / 0.15) ** 2) < 1] = 60  # a lung
    image[:6], image[:, :6] = 255, 255  # a frame
    cv2.putText(image, "R 12", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2)
    image = np.clip(image + np.random.default_rng(0).normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    full, small = body_outline(image, "ct"), body_outline(image, "ct", work_side=128)
    assert _iou(full, small) > 0.98
    body = (((xx - 0.5) / 0.36) ** 2 + ((yy - 0.52) / 0.27) ** 2) < 1
    assert _iou(small, body) > 0.97 and _iou(full, body) > 0.97  # both found the body, not the circle
    np.testing.assert_array_equal(body_outline(image, "ct", work_side=side), full)
    np.testing.assert_array_equal(preprocess(image, "ct", 64, crop="ct_body", outline_side=0),
                                  preprocess(image, "ct", 64, crop="ct_body"))


@pytest.mark.skipif(not REALDEV.is_dir(), reason="../shared/data/realdev is absent")
def test_outline_found_small_agrees_on_real_ct():
    """On realdev's CT slices the 128 px outline covers the full-size one: median IoU 0.99 (the rest is where
    Otsu's threshold moves a little with the scale: README "Speed")."""
    from respiscan.data.io import read_image
    from respiscan.data.samples import discover

    slices = [s for s in discover(REALDEV) if s.modality == "ct"][::25]
    ious = []
    for s in slices:
        image = read_image(s.path, modality="ct")
        full, small = body_outline(image, "ct"), body_outline(image, "ct", work_side=128)
        assert (full is None) == (small is None), s.path
        if full is not None:
            ious.append(_iou(full, small))
    assert len(ious) >= 20 and np.median(ious) > 0.98 and min(ious) > 0.7, ious


def test_outline_side_is_stored_only_when_set_and_the_presets_set_it():
    from respiscan.records import dump
    from respiscan.training.config import PRESETS

    assert PreprocessConfig.from_dict({"size": 224, "crop": "ct_body"}).outline_side == 0  # bundles from before it
    assert "outline_side" not in dump(PreprocessConfig(crop="ct_body"), {})  # so they write back unchanged
    assert dump(PreprocessConfig(outline_side=128), {})["outline_side"] == 128
    assert PRESETS["fast"].preprocess.outline_side == PRESETS["seed"].preprocess.outline_side == 128
    with pytest.raises(RespiscanError, match="outline_side"):
        PreprocessConfig(outline_side=-1)


def test_scanner_look_varies_profile_resolution_and_noise_reproducibly():
    images = torch.from_numpy(np.stack([_phantom(64)] * 8)).float()
    first = scanner_look(images, torch.Generator().manual_seed(3))
    again = scanner_look(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again)
    assert first.shape == (8, 1, 64, 64) and first.min() >= 0 and first.max() <= 255
    means = first.mean(dim=(1, 2, 3))
    assert means.std() > 1.0  # each image drew its own intensity profile
    assert not torch.allclose(first[0, 0], images[0])


@pytest.mark.slow
def test_crossfit_keeps_the_mlp_part_of_train_from_the_backbone(synth_data):
    cfg = replace(tiny_config(), crossfit=0.4)
    samples = fit_samples_of(synth_data, cfg)
    data = prepare_data(samples, cfg, strict=False, cache_dir=None, where="synth")
    assert data.mlp_split == CROSSFIT
    for m in cfg.model.modalities:
        backbone, held = data.rows[m, "train"], data.rows[m, CROSSFIT]
        assert held and backbone
        assert not {s.group or s.id for s in backbone} & {s.group or s.id for s in held}
        assert {s.label for s in held} == {0, 1}
        assert len(held) == len(data.labels(m, CROSSFIT))
    assert {s.id for s in discover(synth_data) if s.split == "train"} >= {
        s.id for m in cfg.model.modalities for s in data.rows[m, CROSSFIT]}
