"""Local recalibration (`respiscan calibrate`): a site's non-test images refit the maps and thresholds of a new
bundle with the same network; nothing of the test split is read, and the source bundle is left as it was."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import REALDEV
from respiscan.bundle import Bundle, sha256_file
from respiscan.calibration import OperatingPoint
from respiscan.data.samples import discover
from respiscan.errors import RespiscanError
from respiscan.evaluation.recalibrate import LOCAL_FILE, recalibrate
from respiscan.metrics import expected_calibration_error, fit_calibration
from respiscan.serving import load


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A second synthetic hospital: the same phantoms drawn with another look than the bundle was trained on."""
    from respiscan.data.synth import generate

    return generate(tmp_path_factory.mktemp("site") / "sites", n_per_class=14, size=64, seed=5, progress=False,
                    sites=2) / "site1"


def _scores(bundle, samples):
    """Rows by id from the engine `recalibrate` scores with by default."""
    rows, _ = load(bundle).predict_samples(samples)
    return {r["id"]: r for r in rows}


def test_maps_and_thresholds_are_refitted_on_the_non_test_images_only(bundle, site, tmp_path):
    before = sha256_file(Bundle.open(bundle).config_path)
    out = recalibrate(bundle, site, tmp_path / "local", operating_point="sensitivity=0.9")
    assert sha256_file(Bundle.open(bundle).config_path) == before  # the source bundle is untouched
    new, old = Bundle.open(out.bundle).config, Bundle.open(bundle).config
    assert new.weights_sha256 == old.weights_sha256 and not (out.bundle / "evaluation").exists()
    samples = discover(site)
    local = [s for s in samples if s.split != "test"]
    raw = _scores(bundle, local)
    used = {r["id"] for r in csv.DictReader(open(out.bundle / LOCAL_FILE))}
    assert used == {s.id for s in local}
    for m in ("xray", "ct"):
        mine = [s for s in local if s.modality == m]
        y = np.array([s.label for s in mine])
        p = np.array([raw[s.id]["uncalibrated_probability"] for s in mine])
        expected = fit_calibration(y, p, "platt")
        got = new.calibration_of(m)
        assert (got.slope, got.intercept) == pytest.approx((expected.slope, expected.intercept))
        assert "local images of site1" in got.fitted_on
        calibrated = got.apply(p)
        assert np.mean(calibrated[y == 1] >= new.thresholds[m]) >= 0.9  # the rule holds where it was chosen
        record = new.operating_points[m]
        assert record.n == len(mine) and record.point == OperatingPoint("sensitivity", 0.9)
        refit = next(r for r in out.refits if r.modality == m)
        assert refit.ece_after == pytest.approx(expected_calibration_error(y, calibrated))
    assert new.thresholds["fused"] == pytest.approx((new.thresholds["xray"] + new.thresholds["ct"]) / 2)
    card = new.model_card
    assert card.results == [] and any("local images of site1" in line for line in card.calibration)
    # the new bundle predicts with its maps; the ranking of the network stays
    test = [s for s in samples if s.split == "test"]
    a, b = _scores(bundle, test), _scores(out.bundle, test)
    for m in ("xray", "ct"):
        ids = [s.id for s in test if s.modality == m]
        y = [s.label for s in test if s.modality == m]
        assert roc_auc_score(y, [a[i]["probability"] for i in ids]) == pytest.approx(
            roc_auc_score(y, [b[i]["probability"] for i in ids]))
        assert [b[i]["uncalibrated_probability"] for i in ids] == pytest.approx(
            [a[i]["uncalibrated_probability"] for i in ids])


def test_refuses_an_existing_folder_and_data_without_labelled_non_test_images(bundle, site, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(RespiscanError, match="already exists"):
        recalibrate(bundle, site, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    only_test = [s for s in discover(site) if s.split == "test"]
    with pytest.raises(RespiscanError, match="no non-test images"):
        recalibrate(bundle, site, tmp_path / "x", samples=only_test)
    few = [s for s in discover(site) if s.split != "test"][:6]
    with pytest.raises(RespiscanError, match="too few"):
        recalibrate(bundle, site, tmp_path / "y", samples=few)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no partial folder left behind


def test_cli_calibrate_prints_each_refit_and_exits_2_on_bad_input(bundle, site, tmp_path, capsys, monkeypatch):
    from respiscan.cli import main

    def run(*argv):
        monkeypatch.setattr("sys.argv", ["respiscan", *map(str, argv)])
        with pytest.raises(SystemExit) as exited:
            main()
        return exited.value.code, capsys.readouterr()

    code, printed = run("calibrate", bundle, site, "--out", tmp_path / "b", "--operating-point", "youden")
    assert code in (0, None)
    assert "ct    n=" in printed.out and "(youden)" in printed.out
    assert Bundle.open(tmp_path / "b").config.operating_points["ct"].point == OperatingPoint("youden")
    code, printed = run("calibrate", bundle, site, "--out", tmp_path / "b")
    assert code == 2 and "already exists" in printed.err


@pytest.mark.skipif(not (REALDEV / "manifest.csv").exists(), reason="needs ../shared/data/realdev")
def test_recalibration_on_real_ct_fixes_what_a_foreign_bundle_gets_wrong(bundle, tmp_path):
    """The synthetic bundle scores real CT as a foreign site; refitted on 120 slices of realdev's train split, its
    probabilities on 80 slices of the test split are far better calibrated, and their ranking is the same."""
    rng = np.random.default_rng(0)
    ct = [s for s in discover(REALDEV) if s.modality == "ct"]
    pick = [ct[i] for i in rng.permutation(len(ct))]
    local = [s for s in pick if s.split == "train"][:120]
    test = [s for s in pick if s.split == "test"][:80]
    out = recalibrate(bundle, REALDEV, tmp_path / "local", samples=local + test)
    assert [r.n for r in out.refits] == [len(local)]
    assert out.kept and out.kept[0].startswith("xray: 0 images")
    a, b = _scores(bundle, test), _scores(out.bundle, test)
    y = np.array([s.label for s in test])
    before = np.array([a[s.id]["probability"] for s in test])
    after = np.array([b[s.id]["probability"] for s in test])
    assert roc_auc_score(y, after) == pytest.approx(roc_auc_score(y, before))
    assert expected_calibration_error(y, after) < expected_calibration_error(y, before)
    shutil.rmtree(out.bundle)
