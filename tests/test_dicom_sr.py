"""DICOM Structured Report out: it round-trips through pydicom, says what `predict` says on the same pixels,
references the input, and bad input is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from respiscan import __version__
from respiscan.data.synth import make_image
from respiscan.errors import RespiscanError
from respiscan.serving.dicom_sr import COVID19, report_for_files
from respiscan.serving.torch_engine import Pipeline

hd = pytest.importorskip("highdicom")
SIZE = 64
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "P-0042", "PatientBirthDate": "19700101", "PatientSex": "F"}


def instance(pixels: np.ndarray, modality: str, study: str, series: str, **attrs) -> Dataset:
    """A DICOM image instance of the patient PATIENT, 16-bit stored values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, modality
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def xray_instance(seed: int = 0, covid: bool = True, study: str | None = None) -> Dataset:
    grey, _ = make_image("xray", covid, SIZE, np.random.default_rng(seed))
    return instance(grey.astype(np.uint16) * 16, "DX", study or generate_uid(), generate_uid(),
                    PatientOrientation=["L", "F"])


def ct_series(n: int = 4, seed: int = 0, study: str | None = None) -> list[Dataset]:
    """Axial chest slices in HU (stored value = HU + 1024), every other one with COVID findings."""
    study, series, slices = study or generate_uid(), generate_uid(), []
    for i in range(n):
        grey, _ = make_image("ct", i % 2 == 0, SIZE, np.random.default_rng(seed + i))
        hu = np.interp(grey, [0, 60, 100, 255], [-1000, -800, -100, 300])
        slices.append(instance(np.rint(hu + 1024), "CT", study, series, RescaleSlope=1, RescaleIntercept=-1024,
                               ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[0, 0, 5.0 * i],
                               InstanceNumber=i + 1))
    return slices


def save(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(folder / f"IM{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def read_report(ds: Dataset, tmp_path: Path) -> Dataset:
    """Through a file and back, as a PACS would store and read it."""
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def finding(sr: Dataset) -> tuple[str, float]:
    """(COVID-19 present/absent, probability) read from the SR's TID 1500 content with highdicom."""
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    (group,) = report.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations(name=COVID19)
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    return evaluation.value.meaning, probability.value


def algorithm_items(sr: Dataset) -> dict[str, list[str]]:
    """Every TEXT item of the content tree by concept name (algorithm name, version, parameters)."""
    found: dict[str, list[str]] = {}

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT":
                found.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@pytest.fixture(scope="module")
def pipe(bundle) -> Pipeline:
    return Pipeline(bundle)


def test_xray_sr_round_trips_and_says_what_predict_says(pipe, tmp_path):
    source = xray_instance()
    (path,) = save([source], tmp_path / "in")
    (sr,) = report_for_files(pipe, [path])
    sr = read_report(sr, tmp_path)
    expected = pipe.predict(xray=path)
    meaning, probability = finding(sr)
    assert probability == pytest.approx(expected["probability"], abs=1e-6)
    assert meaning == ("Present" if expected["label"] == "COVID" else "Absent")
    assert sr.Modality == "SR" and sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    for key, value in PATIENT.items():
        assert str(sr.get(key)) == value
    assert hd.sr.ComprehensiveSR.from_dataset(sr).get_evidence() == [
        (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID, source.SOPClassUID)]
    texts = algorithm_items(sr)
    assert texts["Algorithm Name"][0] == "respiscan" and texts["Algorithm Version"][0] == __version__
    assert f"weights_sha256={pipe.config.weights_sha256}" in texts["Algorithm Parameters"]
    assert f"threshold={pipe.thresholds['xray']}" in texts["Algorithm Parameters"]


def test_ct_series_gives_one_sr_referencing_every_slice(pipe, tmp_path):
    series = ct_series(5)
    paths = save(series, tmp_path / "series")
    datasets = report_for_files(pipe, paths)
    assert len(datasets) == 1
    sr = read_report(datasets[0], tmp_path)
    expected = pipe.predict(ct=tmp_path / "series")
    assert expected["ct_volume"]["n_slices"] == 5
    meaning, probability = finding(sr)
    assert probability == pytest.approx(expected["probability"], abs=1e-6)
    assert meaning == ("Present" if expected["label"] == "COVID" else "Absent")
    evidence = hd.sr.ComprehensiveSR.from_dataset(sr).get_evidence()
    assert sorted(evidence) == sorted((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                       ds.SOPClassUID) for ds in series)


def test_a_series_among_other_files_is_read_through_links(pipe, tmp_path):
    """Files that share a folder with others (here a second copy of the series) give the same probability."""
    paths = save(ct_series(4, seed=3), tmp_path / "mixed")
    (tmp_path / "mixed" / "notes.txt").write_text("not DICOM")
    (sr,) = report_for_files(pipe, paths)
    folder = tmp_path / "alone"
    folder.mkdir()
    for p in paths:
        (folder / p.name).write_bytes(p.read_bytes())
    assert finding(sr)[1] == pytest.approx(pipe.predict(ct=folder)["probability"], abs=1e-6)


def test_nonstandard_patient_attributes_do_not_stop_the_sr(pipe, tmp_path):
    source = xray_instance(seed=4)
    source.PatientSex = "U"  # not one of M, F, O
    del source.PatientBirthDate
    (sr,) = report_for_files(pipe, save([source], tmp_path / "in"))
    assert sr.PatientSex == "" and sr.PatientBirthDate == "" and sr.PatientID == PATIENT["PatientID"]


def test_explain_adds_a_gradcam_secondary_capture(pipe, tmp_path):
    source = xray_instance(seed=5)
    source.PatientOrientation = ["P", "FL"]  # a composite value: its main direction goes into the capture
    (path,) = save([source], tmp_path / "in")
    sr, sc = report_for_files(pipe, [path], explain=True)
    sc = read_report(sc, tmp_path)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == PATIENT["PatientID"]
    assert sc.SeriesInstanceUID not in (sr.SeriesInstanceUID, source.SeriesInstanceUID)
    assert sc.pixel_array.shape == (SIZE, SIZE, 3) and sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.PatientOrientation == ["P", "F"]
    grey = pipe.prepare(path, "xray").astype(int)
    assert np.abs(sc.pixel_array.astype(int) - grey[..., None]).max() > 0  # the heat map is on it


def test_explain_on_a_ct_series(pipe, tmp_path):
    paths = save(ct_series(3, seed=7), tmp_path / "series")
    sr, sc = report_for_files(pipe, paths, explain=True)
    assert sc.Rows == SIZE and "slice" in sc.ImageComments and sc.PatientOrientation == ["L", "P"]


def one_line_error(pipe, paths: list[Path]) -> str:
    with pytest.raises(RespiscanError) as info:
        report_for_files(pipe, paths)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_bad_inputs_are_one_line_errors(pipe, bundle, tmp_path):
    text = tmp_path / "note.dcm"
    text.write_text("hello")
    assert "not a DICOM file" in one_line_error(pipe, [text])
    assert "no such file" in one_line_error(pipe, [tmp_path / "missing.dcm"])
    assert "no DICOM files" in one_line_error(pipe, [])

    no_pixels = xray_instance()
    del no_pixels.PixelData
    assert one_line_error(pipe, save([no_pixels], tmp_path / "nopix")).endswith("DICOM has no pixel data")

    a, b = ct_series(2), ct_series(2, seed=9)
    assert "several studies" in one_line_error(pipe, save(a + b, tmp_path / "studies"))
    study = generate_uid()
    assert "several series" in one_line_error(
        pipe, save(ct_series(2, study=study) + [xray_instance(study=study)], tmp_path / "series"))

    mr = xray_instance()
    mr.Modality = "MR"
    assert "Modality MR" in one_line_error(pipe, save([mr], tmp_path / "mr"))
    no_uid = xray_instance()
    del no_uid.StudyInstanceUID
    assert "no StudyInstanceUID" in one_line_error(pipe, save([no_uid], tmp_path / "nouid"))


def test_wrong_modality_for_the_bundle(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(pipe, "modalities", ["xray"])
    message = one_line_error(pipe, save(ct_series(2), tmp_path / "ct"))
    assert "trained without ct images" in message and str(tmp_path) in message
