"""DICOM in, DICOM out: a Structured Report (and a Grad-CAM Secondary Capture) for one X-ray instance or one
CT series, so that the result files with the patient's study in a PACS like any other object of that study.

The SR is a Comprehensive SR holding a TID 1500 measurement report (built with highdicom): one measurement
group whose qualitative evaluation is COVID-19 (SNOMED 840539006) Present or Absent at the bundle's operating
point and whose measurement is the probability (DCM 122157 "Probability", UCUM "1"). The algorithm is named
"respiscan" with its version, and its parameters record the weights' SHA-256 and the threshold. The SR is
UNVERIFIED and PRELIMINARY: a model's output that no reader has signed. Patient and study attributes are
copied from the input, and every input instance is referenced (evidence and the group's source images).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from respiscan import __version__
from respiscan.data.io import DicomWindow, read_volume
from respiscan.errors import RespiscanError
from respiscan.extras import require

ALGORITHM = "respiscan"
COVID19 = Code("840539006", "SCT", "COVID-19")  # SNOMED CT: disease caused by SARS-CoV-2
XRAY_MODALITIES = ("CR", "DX", "RG")  # computed, digital and conventional radiography
SR_SERIES_NUMBER = 9901  # high, out of the way of the scanner's own series numbers
SC_SERIES_NUMBER = 9902
OVERLAY_ALPHA = 0.45  # the heat map's weight in the overlay, as in explain.plot_gradcam_overlay
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# type 2 attributes highdicom copies from the first instance; an empty value where the input has none
_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")


@dataclass(frozen=True)
class DicomInput:
    """The image instances of one X-ray or one CT series (headers only, pixel data dropped), checked."""

    paths: list[Path]
    headers: list[Dataset]
    modality: str  # "xray" or "ct"

    @property
    def study_uid(self) -> str:
        return str(self.headers[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)


@dataclass(frozen=True)
class DicomReport:
    """What one input gave: pipeline.predict's result and the DICOM objects (the SR, then the SC if asked)."""

    input: DicomInput
    result: dict
    datasets: list[Dataset]


def report_for_files(pipeline, paths: list[Path], explain: bool = False) -> list[Dataset]:
    """The SR for the DICOM file(s) of one X-ray instance or one CT series, then, with `explain`, a Secondary
    Capture of the Grad-CAM overlay. Bad input raises RespiscanError with one line."""
    return report(pipeline, paths, explain).datasets


def report(pipeline, paths: list[Path], explain: bool = False) -> DicomReport:
    """report_for_files with the prediction itself, for callers that also log or return it."""
    hd = require("highdicom", "the DICOM Structured Report")
    inp = read_input([Path(p) for p in paths])
    if inp.modality not in pipeline.modalities:
        raise RespiscanError(f"{inp.paths[0]}: a {inp.modality} image, but this bundle was trained without "
                             f"{inp.modality} images; it accepts: {', '.join(pipeline.modalities)}")
    with _source(inp) as source:
        result = pipeline.predict(**{inp.modality: source})
        try:
            datasets = [_structured_report(hd, pipeline, inp, result)]
            if explain:
                datasets.append(_secondary_capture(hd, pipeline, inp, result, source))
        except (ValueError, TypeError, AttributeError) as exc:  # highdicom refusing an input attribute's value
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise RespiscanError(f"{inp.paths[0]}: cannot build the DICOM output from its attributes: {reason}") \
                from exc
    return DicomReport(inp, result, datasets)


def read_input(paths: list[Path]) -> DicomInput:
    """Read and check the headers: DICOM files, image instances of one study and one series, X-ray or CT.

    Non-image objects (DICOMDIR, reports, presentation states) among images are left out, as a zipped study
    may hold them; an input of non-images only is an error.
    """
    if not paths:
        raise RespiscanError("no DICOM files given")
    images: list[tuple[Path, Dataset]] = []
    for path in paths:
        ds = _read_header(path)
        if any(tag in ds for tag in _PIXEL_TAGS):
            for tag in _PIXEL_TAGS:
                ds.pop(tag, None)
            images.append((path, ds))
    if not images:
        raise RespiscanError(f"{paths[0]}: DICOM has no pixel data" if len(paths) == 1 else
                             f"{paths[0].parent}: none of the {len(paths)} DICOM files has pixel data")
    for path, ds in images:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise RespiscanError(f"{path}: DICOM has no {keyword}")
    first = images[0][0]
    if len({str(ds.StudyInstanceUID) for _, ds in images}) > 1:
        raise RespiscanError(f"{first.parent}: the files belong to several studies; send one study at a time")
    if len({str(ds.SeriesInstanceUID) for _, ds in images}) > 1:
        raise RespiscanError(f"{first.parent}: the files belong to several series; send one X-ray instance "
                             f"or one CT series")
    modality = _modality(first, images[0][1])
    if modality == "xray" and len(images) > 1:
        raise RespiscanError(f"{first.parent}: {len(images)} X-ray instances in one series; send one at a time")
    return DicomInput([p for p, _ in images], [ds for _, ds in images], modality)


def _read_header(path: Path) -> Dataset:
    """The file's data set with pixel data deferred (read from disk only if accessed, which it never is)."""
    if not path.is_file():
        raise RespiscanError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    try:
        return dcmread(path, defer_size=1024)
    except InvalidDicomError:
        raise RespiscanError(f"{path}: not a DICOM file (no DICM preamble and file meta)") from None
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise RespiscanError(f"{path}: cannot read DICOM file: {reason}") from exc


def _modality(path: Path, ds: Dataset) -> str:
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality == "CT":
        return "ct"
    if modality in XRAY_MODALITIES:
        return "xray"
    raise RespiscanError(f"{path}: DICOM Modality {modality or '(none)'}; expected CT or an X-ray "
                         f"({', '.join(XRAY_MODALITIES)})")


@contextmanager
def _source(inp: DicomInput) -> Iterator[Path]:
    """What pipeline.predict reads: the file of a single instance, else a folder holding just the series
    (the files' own folder when it holds nothing else, else a temporary folder of links to them)."""
    if len(inp.paths) == 1:
        yield inp.paths[0]
        return
    folder = inp.paths[0].parent
    others = {p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    if all(p.parent == folder for p in inp.paths) and others == set(inp.paths):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="respiscan-series-") as tmp:
        for i, path in enumerate(inp.paths):
            os.symlink(path.resolve(), Path(tmp) / f"{i:05d}_{path.name}")
        yield Path(tmp)


def _algorithm(hd, pipeline, kind: str):
    return hd.sr.AlgorithmIdentification(
        name=ALGORITHM, version=__version__,
        parameters=[f"weights_sha256={pipeline.config.weights_sha256}", f"threshold={pipeline.thresholds[kind]}"])


def _evidence(inp: DicomInput) -> list[Dataset]:
    """The headers, with the type 2 patient and study attributes highdicom copies present (empty if absent),
    and a PatientSex outside the standard's M, F, O emptied (highdicom refuses it; archives hold such values)."""
    evidence = []
    for ds in inp.headers:
        missing = [k for k in _PATIENT_STUDY if k not in ds]
        odd_sex = str(ds.get("PatientSex") or "") not in ("", "M", "F", "O")
        if missing or odd_sex:
            ds = deepcopy(ds)
            for keyword in missing:
                setattr(ds, keyword, "")
            if odd_sex:
                ds.PatientSex = ""
        evidence.append(ds)
    return evidence


def _structured_report(hd, pipeline, inp: DicomInput, result: dict) -> Dataset:
    algorithm = _algorithm(hd, pipeline, inp.modality)
    present = result["label"] == pipeline.config.positive_class
    # the same UID for the same weights: the device is the model
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[pipeline.config.weights_sha256]), name=ALGORITHM,
        manufacturer_name=ALGORITHM, model_name=f"{ALGORITHM} {inp.modality} COVID-19 classifier")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{ALGORITHM} COVID-19"),
        finding_type=COVID19, algorithm_id=algorithm, finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=float(result["probability"]),
                                        unit=codes.UCUM.NoUnits, algorithm_id=algorithm)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(COVID19, codes.SCT.Present if present
                                                             else codes.SCT.Absent)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in inp.headers])
    content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
                                      imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(
        evidence=_evidence(inp), content=content, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=ALGORITHM, is_complete=True, is_final=False,
        is_verified=False, series_description=f"{ALGORITHM} COVID-19 (unverified)")


def _secondary_capture(hd, pipeline, inp: DicomInput, result: dict, source: Path) -> Dataset:
    """The Grad-CAM overlay on the image the network saw (for a volume: its most suspicious lung slice)."""
    from respiscan.serving.explain import gradcam
    from respiscan.serving.torch_engine import Pipeline

    explainer = pipeline if getattr(pipeline, "net", None) is not None else Pipeline(pipeline.bundle)
    volume = result.get("ct_volume")
    if volume is None:
        image, where = explainer.prepare(source, inp.modality), ""
    else:
        cfg = pipeline.preprocess_config
        best = max((s for s in volume["slices"] if s["lung"]), key=lambda s: s["probability"])
        slices = read_volume(source, DicomWindow(cfg.dicom_ct_center, cfg.dicom_ct_width))
        image = explainer.prepare(slices[best["index"]], "ct")
        where = f", slice {best['index'] + 1} of {volume['n_slices']} (inferior to superior)"
    # a value's first letter is its main direction (PS3.3 C.7.6.1.1.1), all a Secondary Capture may hold
    stored = tuple(str(v)[:1].upper() for v in inp.headers[0].get("PatientOrientation") or ())
    # axial CT is read in the radiological view; a film without PatientOrientation is taken as viewed PA or AP
    film = stored if len(stored) == 2 and all(v and v in "APLRHF" for v in stored) else ("L", "F")
    orientation = ("L", "P") if inp.modality == "ct" else film
    heat = np.clip(gradcam(explainer, image, inp.modality), 0, 1)
    jet = cv2.cvtColor(cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    grey = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    overlay = np.rint((1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * jet).astype(np.uint8)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_evidence(inp)[0], pixel_array=overlay, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=hd.UID(), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=ALGORITHM,
        patient_orientation=orientation, series_description=f"{ALGORITHM} Grad-CAM (unverified)")
    sc.BurnedInAnnotation = "NO"
    sc.ImageComments = (f"Grad-CAM of the COVID-19 logit{where}: p = {result['probability']:.4f}, "
                        f"{result['label']} at threshold {result['threshold']:.4f}; not for diagnosis")
    if volume is None:
        sc.SourceImageSequence = [Dataset()]
        sc.SourceImageSequence[0].ReferencedSOPClassUID = inp.headers[0].SOPClassUID
        sc.SourceImageSequence[0].ReferencedSOPInstanceUID = inp.headers[0].SOPInstanceUID
    return sc
