"""The distribution-shift warning: fitted in training, scored alike by both engines, and it flags what is not a
chest scan of the bundle's modality (made-up photographs, drawings, noise, and the other modality)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from conftest import REALDEV
from foreign import foreign_images
from respiscan.bundle import OOD_FILE, Bundle, OodDetector
from respiscan.cli import main
from respiscan.data.images import load_dataset_images
from respiscan.data.samples import discover
from respiscan.errors import RespiscanError
from respiscan.records import build
from respiscan.serving.export import export_onnx
from respiscan.serving.onnx_engine import OnnxPipeline
from respiscan.serving.pipeline import write_predictions
from respiscan.serving.shift import ShiftScorer
from respiscan.serving.torch_engine import Pipeline
from respiscan.training.shift import fit_ood, write_ood

OTHER = {"xray": "ct", "ct": "xray"}


@pytest.fixture(scope="module")
def pipe(bundle):
    return Pipeline(bundle, bf16=False)


def _test_images(pipe, synth_data, modality: str, given_as: str) -> np.ndarray:
    """The test images of `modality`, preprocessed as `given_as` (the other modality: a swapped input)."""
    paths = [s.path for s in discover(synth_data) if s.modality == modality and s.split == "test"]
    return np.stack([pipe.prepare(p, given_as) for p in paths])


def _smooth_images(rng: np.random.Generator, n: int, size: int = 48) -> np.ndarray:
    """Blurred blobs on a vertical gradient: images with some layout and some texture."""
    import cv2

    ramp = np.linspace(40, 200, size)[:, None]
    return np.stack([np.clip(ramp + cv2.GaussianBlur(rng.normal(0, 40, (size, size)), (0, 0), 4) * 3, 0, 255)
                     .astype(np.uint8) for _ in range(n)])


def test_numpy_score_is_the_larger_of_sklearns_two_distances_over_their_thresholds(tmp_path):
    from respiscan.data.image_stats import image_statistics

    rng = np.random.default_rng(0)
    cov = np.diag(rng.uniform(0.5, 2.0, 24))
    train, val, shifted = (rng.multivariate_normal(np.zeros(24), cov, n) for n in (300, 400, 50))
    train_images, val_images = _smooth_images(rng, 300), _smooth_images(rng, 400)
    fitted = fit_ood({"xray": train}, {"xray": val}, {"xray": train_images}, {"xray": val_images})
    ood, _ = build(OodDetector, write_ood(tmp_path, fitted), "ood")  # as BundleConfig reads the record
    limits = ood.modalities["xray"]
    scores = ShiftScorer(tmp_path, ood).score(val, val_images, "xray")
    embedding = np.sqrt(LedoitWolf().fit(train).mahalanobis(val)) / limits.threshold
    image = np.sqrt(LedoitWolf().fit(image_statistics(train_images)).mahalanobis(image_statistics(val_images)))
    assert np.allclose(scores.score, np.maximum(embedding, image / limits.image_threshold), rtol=1e-4)
    assert scores.in_distribution.mean() == pytest.approx(0.95, abs=0.01)  # the 5 % false-alarm rate, on val
    assert limits.val_flagged == pytest.approx(0.05, abs=0.01)
    assert (embedding > 1).mean() < 0.05 and (image / limits.image_threshold > 1).mean() < 0.05  # each flags some
    scorer = ShiftScorer(tmp_path, ood)
    assert scorer.score(shifted + 2.0, val_images[:50], "xray").in_distribution.mean() < 0.1
    noisy = rng.integers(0, 256, val_images[:50].shape, dtype=np.uint8)  # embeddings in place, images not
    assert scorer.score(val[:50], noisy, "xray").in_distribution.mean() == 0.0
    # a detector written before the image statistics scores the embedding alone
    old = replace(ood, modalities={"xray": replace(limits, image_threshold=None)})
    assert np.allclose(ShiftScorer(tmp_path, old).score(val, noisy, "xray").score, embedding, rtol=1e-4)


def test_with_two_modalities_an_image_nearer_the_others_images_is_flagged(tmp_path):
    """The wrong-modality check: the score also takes the image statistics' distance to the own modality's
    training images over that to the other's (each over its threshold), in serving as in the validation scores
    training records; a detector written before the check scores without it."""
    from respiscan.data.image_stats import image_statistics

    rng = np.random.default_rng(1)
    embeddings = {m: {k: rng.normal(size=(n, 8)) for k, n in (("train", 200), ("val", 150))} for m in OTHER}
    images = {"xray": {k: _smooth_images(rng, n) for k, n in (("train", 200), ("val", 150))},
              "ct": {k: 255 - _smooth_images(rng, n) for k, n in (("train", 200), ("val", 150))}}
    fitted = fit_ood(*({m: d[k] for m, d in source.items()} for source in (embeddings, images)
                       for k in ("train", "val")))
    ood, _ = build(OodDetector, write_ood(tmp_path, fitted), "ood")
    assert ood.modality_check
    val = embeddings["ct"]["val"]
    for m in OTHER:
        stats = {o: image_statistics(images[o]["train"]) for o in OTHER}
        own, other = (np.sqrt(LedoitWolf().fit(stats[o]).mahalanobis(image_statistics(images["ct"]["val"])))
                      / ood.modalities[o].image_threshold for o in (m, OTHER[m]))
        embedding = np.sqrt(LedoitWolf().fit(embeddings[m]["train"]).mahalanobis(val)) / ood.modalities[m].threshold
        got = ShiftScorer(tmp_path, ood).score(val, images["ct"]["val"], m).score
        assert np.allclose(got, np.maximum.reduce([embedding, own, own / other]), rtol=1e-4)
        if m == "ct":
            assert np.allclose(np.sort(got), ood.modalities["ct"].val_scores, atol=1e-4)
        else:  # CT images given as X-ray: nearer the CT images, all flagged by the check
            assert (own / other > 1).all()
            before = ShiftScorer(tmp_path, replace(ood, modality_check=False)).score(val, images["ct"]["val"], m)
            assert np.allclose(before.score, np.maximum(embedding, own), rtol=1e-4)


def test_training_records_the_detector(bundle):
    ood = Bundle.open(bundle).config.ood
    assert ood is not None and (bundle / ood.file).is_file() and ood.false_alarm_rate == 0.05 and ood.modality_check
    for m in ("xray", "ct"):
        limit = ood.modalities[m]
        assert limit.threshold > 0 and limit.n_train > limit.n_val >= 1
        scores = np.array(limit.val_scores)  # the reference for whole sets
        assert len(scores) == limit.n_val and np.all(np.diff(scores) >= 0)
        assert np.mean(scores > 1) == pytest.approx(limit.val_flagged)


@pytest.mark.parametrize("modality", ["xray", "ct"])
def test_foreign_images_and_the_other_modality_are_flagged(pipe, synth_data, modality):
    own = pipe.score(_test_images(pipe, synth_data, modality, modality), modality)
    swapped = pipe.score(_test_images(pipe, synth_data, OTHER[modality], modality), modality)
    assert swapped.in_distribution.mean() == 0.0
    for kind, images in foreign_images(8, seed=3).items():
        scored = pipe.score(np.stack([pipe.prepare(image, modality) for image in images]), modality)
        assert (~scored.in_distribution).mean() >= 0.95, kind
        assert np.median(scored.ood_score) > 2 * np.median(own.ood_score), kind
    # the threshold comes from 3 validation images here, so in-source test images sit near it, but below the rest
    assert np.median(own.ood_score) < 1.5 and own.ood_score.max() < swapped.ood_score.min()


def test_predict_warns_on_stderr_and_reports_per_modality(bundle, synth_data, tmp_path, capsys, monkeypatch):
    import cv2

    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), foreign_images(1, seed=5)["photograph"][0])
    ct = next(s.path for s in discover(synth_data) if s.modality == "ct" and s.split == "test")
    monkeypatch.setattr(sys, "argv", ["respiscan", "predict", str(bundle), "--xray", str(photo), "--ct", str(ct),
                                      "--json", "--engine", "torch"])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    assert done.value.code in (0, None)
    result = json.loads(out)
    assert result["xray_in_distribution"] is False and result["xray_ood_score"] > 1
    assert isinstance(result["ct_in_distribution"], bool) and result["ct_ood_score"] > 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len([w for w in warnings if "X-ray input is unlike" in w]) == 1


def test_batch_rows_and_csv_carry_the_columns(pipe, synth_data, tmp_path):
    rows, _ = pipe.predict_samples([s for s in discover(synth_data) if s.split == "test"])
    assert all(isinstance(r["in_distribution"], bool) and r["ood_score"] > 0 for r in rows)
    write_predictions(tmp_path / "p.csv", rows)
    with open(tmp_path / "p.csv", newline="") as f:
        header = csv.DictReader(f).fieldnames
    assert {"in_distribution", "ood_score"} <= set(header)


def test_torch_and_onnx_agree_on_the_shift_score(bundle, synth_data, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    export_onnx(copy)
    torch_pipe, onnx_pipe = Pipeline(copy, bf16=False), OnnxPipeline(copy, threads=1)
    samples = discover(synth_data)
    for m in ("xray", "ct"):
        images, _, _ = load_dataset_images([s for s in samples if s.modality == m], onnx_pipe.preprocess_config)
        images = np.concatenate([images, _test_images(torch_pipe, synth_data, OTHER[m], m)])
        want, got = torch_pipe.score(images, m), onnx_pipe.score(images, m)
        assert np.allclose(got.ood_score, want.ood_score, rtol=1e-3, atol=1e-4)
        assert (got.in_distribution == want.in_distribution).mean() >= 0.95  # equal but within 1e-3 of 1


def test_a_bundle_without_the_detector_still_predicts(bundle, synth_data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    config = json.loads((old / "config.json").read_text())
    del config["ood"]
    (old / "config.json").write_text(json.dumps(config))
    (old / OOD_FILE).unlink()
    xray = next(s.path for s in discover(synth_data) if s.modality == "xray" and s.split == "test")
    result = Pipeline(old, bf16=False).predict(xray=xray)
    assert result["xray_in_distribution"] is None and result["xray_ood_score"] is None
    assert result["xray_probability"] == pytest.approx(Pipeline(bundle, bf16=False).predict(xray=xray)["probability"])
    rows, _ = Pipeline(old, bf16=False).predict_samples([s for s in discover(synth_data) if s.split == "test"][:3])
    assert all(r["in_distribution"] is None and r["ood_score"] is None for r in rows)


def test_modified_statistics_are_refused(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / OOD_FILE).read_bytes())
    data[-8] ^= 0xFF
    (copy / OOD_FILE).write_bytes(bytes(data))
    with pytest.raises(RespiscanError, match=f"{OOD_FILE}: does not match the hash"):
        Pipeline(copy)


def test_shift_products_run_with_one_blas_thread_and_restore_it(tmp_path, monkeypatch):
    """OpenBLAS's idle threads spin after a call and slowed the engine's next batch by a third: the score's
    products run with one BLAS thread, and the process's setting is back afterwards."""
    from threadpoolctl import threadpool_info

    import respiscan.serving.shift as shift

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    if not blas_threads():
        pytest.skip("numpy links no BLAS that threadpoolctl can see")
    rng = np.random.default_rng(1)
    train, val = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    images = _smooth_images(rng, 200)
    fitted = fit_ood({"xray": train}, {"xray": val}, {"xray": images}, {"xray": images})
    ood, _ = build(OodDetector, write_ood(tmp_path, fitted), "ood")
    seen, distance = [], shift._distance
    monkeypatch.setattr(shift, "_distance", lambda *a: (seen.append(blas_threads()), distance(*a))[1])
    before = blas_threads()
    ShiftScorer(tmp_path, ood).score(val, images, "xray")
    assert seen == [{1}, {1}] and blas_threads() == before


def test_set_shift_is_the_mann_whitney_auc_with_delong_interval_streamed():
    from sklearn.metrics import roc_auc_score

    from respiscan.serving.shift import SetShiftTest

    rng = np.random.default_rng(4)
    reference, batch = np.round(rng.gamma(4, 0.2, 150), 2), np.round(rng.gamma(4, 0.2, 400) + 0.4, 2)  # ties
    test = SetShiftTest(reference[::-1])  # any order
    for part in np.array_split(batch, 9):
        test.add(part)
    result = test.result()
    assert result.auc == pytest.approx(roc_auc_score(np.r_[np.ones(400), np.zeros(150)], np.r_[batch, reference]))
    wins = (batch[:, None] > reference) + 0.5 * (batch[:, None] == reference)
    se = np.sqrt(wins.mean(1).var(ddof=1) / 400 + wins.mean(0).var(ddof=1) / 150)
    assert result.ci == pytest.approx((result.auc - 1.96 * se, result.auc + 1.96 * se), abs=1e-4)
    assert result.shifted and result.n == 400


def test_set_shift_false_alarms_and_power():
    from respiscan.serving.shift import SetShiftTest

    rng = np.random.default_rng(5)

    def shifted(offset: float) -> float:
        verdicts = []
        for _ in range(300):
            test = SetShiftTest(rng.normal(size=200))  # a new validation split each time
            test.add(rng.normal(size=150) + offset)
            verdicts.append(test.result().shifted)
        return float(np.mean(verdicts))

    assert shifted(0.0) <= 0.04  # like validation: a one-sided 2.5 % test
    assert shifted(-0.5) == 0.0  # closer to the training images than validation is no warning
    assert shifted(0.6) >= 0.9  # a medium effect (AUC 0.66) is caught in 150 images


def test_predict_and_evaluate_compare_whole_sets_with_validation(bundle, synth_data, tmp_path, capsys, monkeypatch):
    import cv2
    from sklearn.metrics import roc_auc_score

    from respiscan.evaluation.evaluate import evaluate

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(foreign_images(6, seed=7)["photograph"]):
        cv2.imwrite(str(photos / f"photo{i}.png"), image)
    monkeypatch.setattr(sys, "argv", ["respiscan", "predict", str(bundle), "--data", str(photos), "--modality",
                                      "xray", "--out", str(tmp_path / "p.csv"), "--engine", "torch"])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code in (0, None)
    lines = [line for line in err.splitlines() if "as a set" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: xray in ") and "shift AUC 1.000" in lines[0], err

    results = evaluate(bundle, synth_data, tmp_path / "eval", figures=False, engine="torch")
    ood = Bundle.open(bundle).config.ood
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for m in ("xray", "ct"):
        scores = [float(r["ood_score"]) for r in rows if r["modality"] == m]
        reference = ood.modalities[m].val_scores
        shift = results["modalities"][m]["set_shift"]
        expected = roc_auc_score([1] * len(scores) + [0] * len(reference), scores + reference)
        assert shift["n"] == len(scores) and shift["auc"] == pytest.approx(expected, abs=1e-6)
        assert shift["ci"][0] <= shift["auc"] <= shift["ci"][1]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Unlike the training images as a set" in report
    card = Bundle.open(bundle).config.model_card
    recorded = {r.kind: r for r in card.results if r.method == "evaluate" and r.data == results["data"]}
    for m in ("xray", "ct"):
        assert recorded[m].set_shift_auc == pytest.approx(results["modalities"][m]["set_shift"]["auc"])
    assert "Shift AUC as a set" in (bundle / "MODEL_CARD.md").read_text()


@pytest.mark.skipif(not (REALDEV / "manifest.csv").is_file() or not (REALDEV.parent / "sites" / "mosmed_ct").is_dir(),
                    reason="../shared/data/realdev or sites absent")
def test_real_mosmed_slices_pass_one_by_one_but_not_as_a_set(tmp_path):
    """The detector fitted on real UCSD CT slices (a network-free 12 x 12 thumbnail as the embedding, so that
    the test needs no training) flags few MosMed slices one by one, yet MosMed as a set is unlike them, and
    UCSD's own test split is not."""
    import cv2

    from respiscan.data.preprocess import PreprocessConfig
    from respiscan.data.samples import carve_validation
    from respiscan.serving.shift import set_shift

    rng = np.random.default_rng(0)
    ct = [s for s in carve_validation(discover(REALDEV), 0.3, seed=0) if s.modality == "ct"]
    train = [s for s in ct if s.split == "train"]
    mosmed = [s for s in discover(REALDEV.parent / "sites" / "mosmed_ct") if s.split == "test"]
    sets = {"train": [train[i] for i in sorted(rng.choice(len(train), 250, replace=False))],
            "val": [s for s in ct if s.split == "val"], "test": [s for s in ct if s.split == "test"],
            "mosmed": [mosmed[i] for i in sorted(rng.choice(len(mosmed), 100, replace=False))]}
    images = {k: load_dataset_images(v, PreprocessConfig(size=64, crop="ct_body"), desc=k)[0]
              for k, v in sets.items()}
    embed = {k: np.stack([cv2.resize(i, (12, 12), interpolation=cv2.INTER_AREA).ravel() / 255.0 for i in v])
             for k, v in images.items()}
    fitted = fit_ood({"ct": embed["train"]}, {"ct": embed["val"]}, {"ct": images["train"]}, {"ct": images["val"]})
    ood, _ = build(OodDetector, write_ood(tmp_path, fitted), "ood")
    scorer = ShiftScorer(tmp_path, ood)
    scores = {k: scorer.score(embed[k], images[k], "ct") for k in ("test", "mosmed")}
    assert (~scores["mosmed"].in_distribution).mean() <= 0.1  # one by one, MosMed mostly passes
    own, other = (set_shift(ood, "ct", scores[k].score) for k in ("test", "mosmed"))
    assert not own.shifted and own.ci[0] < 0.5 < own.ci[1]
    assert other.shifted and other.auc > own.auc + 0.1


@pytest.mark.skipif(not (REALDEV / "manifest.csv").is_file(), reason="../shared/data/realdev absent")
def test_real_xrays_given_as_ct_and_ct_given_as_xray_are_caught_by_the_modality_check(tmp_path):
    """A detector fitted on real realdev X-rays and CT slices (a network-free 12 x 12 thumbnail as the
    embedding): the image statistics alone let some of the other modality's test images through, the check
    catches every one, and it flags no more of the modality's own test images."""
    import cv2

    from respiscan.data.preprocess import PreprocessConfig
    from respiscan.data.samples import carve_validation

    rng = np.random.default_rng(0)
    samples = carve_validation(discover(REALDEV), 0.3, seed=0)
    images, embed = {}, {}
    for m in OTHER:
        own = [s for s in samples if s.modality == m]
        train = [s for s in own if s.split == "train"]
        subsets = {"train": [train[i] for i in sorted(rng.choice(len(train), 250, replace=False))],
                   "val": [s for s in own if s.split == "val"], "test": [s for s in own if s.split == "test"]}
        for k, chosen in subsets.items():
            images[m, k] = load_dataset_images(chosen, PreprocessConfig(size=64), desc=f"{m} {k}")[0]
            embed[m, k] = np.stack([cv2.resize(i, (12, 12), interpolation=cv2.INTER_AREA).ravel() / 255.0
                                    for i in images[m, k]])
    fitted = fit_ood(*({m: source[m, k] for m in OTHER} for source in (embed, images) for k in ("train", "val")))
    ood, _ = build(OodDetector, write_ood(tmp_path, fitted), "ood")
    flagged = {}
    for check in (False, True):
        scorer = ShiftScorer(tmp_path, replace(ood, modality_check=check))
        for m in OTHER:
            for given in OTHER:
                scored = scorer.score(embed[m, "test"], images[m, "test"], given)
                flagged[check, m, given] = (~scored.in_distribution).mean()
    assert flagged[False, "xray", "ct"] < 0.97  # X-rays given as CT that the image statistics alone let through
    for m in OTHER:
        assert flagged[True, m, OTHER[m]] == 1.0
        assert flagged[True, m, m] == flagged[False, m, m] <= 0.07
        assert ood.modalities[m].val_flagged <= 0.06


def test_texture_by_table_equals_the_binary_patterns_by_definition():
    """The packed-byte texture (twice as fast) gives the histograms of the definition: per pixel, the eight ring
    comparisons, uniform when they change at most twice around the ring, labelled by how many are set, else 9."""
    from respiscan.data.image_stats import _RING, TEXTURE_RADII, _texture

    g = np.random.default_rng(0).random((40, 37), dtype=np.float32)
    g[10:20, 10:20] = 0.5  # flat patches: ties, where ">=" matters
    for r, got in zip(TEXTURE_RADII, _texture(g)):
        centre = g[r:-r, r:-r]
        h, w = centre.shape
        counts = np.zeros(10)
        for y in range(h):
            for x in range(w):
                bits = [int(g[r + y + dy * r, r + x + dx * r] >= centre[y, x]) for dy, dx in _RING]
                changes = sum(bits[k] != bits[k - 1] for k in range(8))
                counts[sum(bits) if changes <= 2 else 9] += 1
        np.testing.assert_allclose(got, np.sqrt(counts / counts.sum()))
