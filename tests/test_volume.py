"""CT volumes: lung-slice detection, per-slice scores and the top-k study probability, from NIfTI and DICOM."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from respiscan.data.io import DicomWindow, read_volume
from respiscan.data.synth import make_image
from respiscan.errors import RespiscanError
from respiscan.serving.torch_engine import Pipeline
from respiscan.serving.volume import AGGREGATION, air_level, lung_fraction, score_volume

SIZE = 96
# slice kinds from inferior to superior: air beyond the patient, abdomen, chest slices (COVID or not), air
LAYOUT = ["air", "abdomen", "covid", "clear", "covid", "clear", "clear", "air"]
LUNG = [kind in ("covid", "clear") for kind in LAYOUT]


def chest_hu(covid: bool, seed: int) -> np.ndarray:
    """A synthetic CT slice in realistic HU: air -1000, lung about -900, body above -300 (monotone in grey)."""
    grey, _ = make_image("ct", covid, SIZE, np.random.default_rng(seed))
    return np.interp(grey, [0, 60, 100, 255], [-1000, -800, -100, 300])


def abdomen_hu(rng: np.random.Generator) -> np.ndarray:
    """Soft tissue with a bowel-gas bubble of about 1% of the body: a body, but no lung."""
    y, x = np.mgrid[:SIZE, :SIZE] / SIZE
    hu = np.where(((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1, 40.0, -1000.0)
    hu[((x - 0.6) / 0.05) ** 2 + ((y - 0.45) / 0.05) ** 2 < 1] = -1000
    return hu + rng.normal(0, 15, hu.shape)


def scan(layout: list[str]) -> list[np.ndarray]:
    """Integer HU slices (rows anterior -> posterior, columns patient right -> left), inferior first."""
    rng = np.random.default_rng(0)
    kinds = {"air": lambda i: rng.normal(-1000, 15, (SIZE, SIZE)), "abdomen": lambda i: abdomen_hu(rng),
             "covid": lambda i: chest_hu(True, i), "clear": lambda i: chest_hu(False, i)}
    return [np.rint(kinds[kind](i)).astype(np.int16) for i, kind in enumerate(layout)]


def write_nifti(slices: list[np.ndarray], path: Path) -> Path:
    """RAS+ NIfTI (0.7 x 0.7 x 5 mm) whose displayed slices are `slices`: x runs to the patient's right
    (image columns reversed), y anterior (image rows reversed), z superior."""
    hu = np.stack([s[::-1, ::-1].T for s in slices], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 5.0, 1.0])), path)
    return path


def write_dicom_series(slices: list[np.ndarray], folder: Path) -> Path:
    """Standard axial CT slices (stored as displayed), files named in reverse order of their z position."""
    folder.mkdir()
    series = generate_uid()
    for i, hu in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", series
        ds.Rows, ds.Columns = hu.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 5.0 * i]
        ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{len(slices) - i:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def pipe(bundle) -> Pipeline:
    return Pipeline(bundle)


@pytest.fixture(scope="module")
def nifti(tmp_path_factory) -> Path:
    return write_nifti(scan(LAYOUT), tmp_path_factory.mktemp("volume") / "chest.nii.gz")


def window(pipe: Pipeline) -> DicomWindow:
    return DicomWindow(pipe.preprocess_config.dicom_ct_center, pipe.preprocess_config.dicom_ct_width)


def test_lung_slices_are_found_and_scored_like_single_images(pipe, nifti):
    result = score_volume(pipe, nifti)
    assert [s["lung"] for s in result["slices"]] == LUNG
    assert [s["index"] for s in result["slices"]] == list(range(len(LAYOUT)))
    assert result["n_slices"] == len(LAYOUT) and result["n_lung_slices"] == sum(LUNG)
    slices = read_volume(nifti, window=window(pipe))
    lung = np.flatnonzero(LUNG)
    expected = pipe.probabilities(np.stack([pipe.prepare(slices[i], "ct") for i in lung]), "ct")
    assert [result["slices"][i]["probability"] for i in lung] == expected.tolist()
    assert all(s["probability"] is None for s, is_lung in zip(result["slices"], LUNG) if not is_lung)


@pytest.mark.parametrize("top_k", [1, 3, 100])
def test_study_probability_is_the_mean_of_the_top_k_lung_slices(pipe, nifti, top_k):
    result = score_volume(pipe, nifti, top_k=top_k)
    scores = sorted((s["probability"] for s in result["slices"] if s["lung"]), reverse=True)
    k = min(top_k, sum(LUNG))
    assert result["k"] == k and result["aggregation"] == AGGREGATION
    assert result["probability"] == pytest.approx(sum(scores[:k]) / k, rel=1e-12)
    assert result["label"] == pipe.label(result["probability"], "ct")
    assert result["threshold"] == pipe.thresholds["ct"]


def test_dicom_series_gives_the_same_result_as_nifti(pipe, nifti, tmp_path):
    series = write_dicom_series(scan(LAYOUT), tmp_path / "series")
    np.testing.assert_array_equal(read_volume(series, window=window(pipe)), read_volume(nifti, window=window(pipe)))
    from_dicom, from_nifti = score_volume(pipe, series), score_volume(pipe, nifti)
    assert from_dicom["slices"] == from_nifti["slices"]
    assert from_dicom["probability"] == from_nifti["probability"]


def test_volume_without_lung_is_refused_naming_the_file(pipe, tmp_path):
    path = write_nifti(scan(["air", "abdomen", "abdomen", "air"]), tmp_path / "abdomen.nii.gz")
    with pytest.raises(RespiscanError) as info:
        score_volume(pipe, path)
    message = str(info.value)
    assert message.startswith(f"{path}: none of its 4 slices contains lung") and "\n" not in message


def test_top_k_must_be_positive(pipe, nifti):
    with pytest.raises(RespiscanError, match="top_k must be at least 1"):
        score_volume(pipe, nifti, top_k=0)


def test_lung_fraction_counts_air_enclosed_by_the_body():
    air = air_level(DicomWindow())
    assert air == pytest.approx((-500 + 1350) / 1500 * 255)
    assert air_level(DicomWindow(40, 400)) == 0.5  # window above -500 HU: only its bottom grey level is air
    chest = np.zeros((20, 20), np.uint8)
    chest[2:18, 2:18] = 200  # body: 16 x 16
    chest[5:9, 5:9] = chest[5:9, 11:15] = 80  # two enclosed dark lungs, 32 px
    assert lung_fraction(chest, air) == pytest.approx(32 / 256)
    chest[5:9, 0:9] = 80  # the right lung now opens to the outside air: no longer inside the body
    assert lung_fraction(chest, air) == pytest.approx(16 / (256 - 4 * 7))
    assert lung_fraction(np.zeros((20, 20), np.uint8), air) == 0.0
    assert lung_fraction(np.full((20, 20), 200, np.uint8), air) == 0.0


def test_cli_predicts_a_volume_with_per_slice_scores(bundle, nifti, tmp_path, capsys, monkeypatch):
    import csv
    import json
    import sys

    from respiscan.cli import main

    monkeypatch.setattr(sys, "argv", ["respiscan", "predict", str(bundle), "--ct", str(nifti), "--json",
                                      "--out", str(tmp_path / "slices.csv")])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    result = json.loads(capsys.readouterr().out)
    volume = result["ct_volume"]
    assert result["ct_probability"] == result["probability"] == volume["probability"]
    assert volume["n_slices"] == len(LAYOUT) and len(volume["slices"]) == len(LAYOUT)
    rows = list(csv.DictReader(open(tmp_path / "slices.csv")))
    assert [int(r["index"]) for r in rows] == list(range(len(LAYOUT)))
