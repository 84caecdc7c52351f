"""What every prediction engine shares, without torch: the bundle's config, preprocessing, combining the
modalities of a case, labels, batches, the shift warning (shift.py) and test-time augmentation (tta.py).
Engines (torch_engine.py, onnx_engine.py) only supply `outputs`: p(COVID) and the embedding it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from respiscan.bundle import Bundle
from respiscan.data.images import iter_batches, load_preprocessed
from respiscan.data.io import is_volume
from respiscan.data.samples import MODALITIES, Sample
from respiscan.errors import RespiscanError
from respiscan.serving.shift import ShiftScorer
from respiscan.serving.tta import tta_views
from respiscan.utils import write_rows

ImageInput = str | Path | np.ndarray
BATCH = 64  # images decoded ahead of the model in `predict_samples`: two such batches are in memory at once
PREDICTION_COLUMNS = ["id", "path", "modality", "probability", "prediction", "in_distribution", "ood_score",
                      "uncalibrated_probability"]


@dataclass(frozen=True)
class Outputs:
    """What an engine computes for a batch of one modality."""

    probability: np.ndarray  # (N,) p(COVID)
    embedding: np.ndarray  # (N, 1280) the task-specific embedding (the shift detector's input)


@dataclass(frozen=True)
class Scored:
    """A batch's scores. `ood_score` > 1 (`in_distribution` false): unlike the training images; both None
    for bundles without a shift detector. With TTA, `probability` is the mean over the views, `tta_std` the
    standard deviation (None without TTA); the shift score is the unaugmented view's."""

    probability: np.ndarray
    ood_score: np.ndarray | None
    in_distribution: np.ndarray | None
    tta_std: np.ndarray | None
    uncalibrated: np.ndarray  # the network's p(COVID), before the bundle's calibration (mean over TTA views)


@dataclass(frozen=True)
class PreparedCase:
    """One case ready for the engine (`BasePipeline.prepare_case`): its preprocessed images by modality and,
    for a CT volume, the volume's result (a volume is scored slice by slice, on its own, when prepared)."""

    images: dict[str, np.ndarray]  # modality -> (size, size) uint8
    ct_volume: dict | None = None


class BasePipeline:
    """A loaded bundle. `predict(xray=..., ct=...)` for one case, `predict_samples` for many."""

    def __init__(self, bundle: str | Path | Bundle):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.config = self.bundle.config
        self.modalities: list[str] = list(self.config.model.modalities)
        self.preprocess_config = self.config.preprocess
        # a threshold per modality and, with two, for the fused probability: BundleConfig checks it
        self.thresholds: dict[str, float] = dict(self.config.thresholds)
        records = self.config.operating_points or {}
        self.operating_point = str(next(iter(records.values())).point) if records else "not recorded"
        self.shift = ShiftScorer.of(self.bundle)

    def outputs(self, images: np.ndarray, modality: str) -> Outputs:
        """p(COVID) and embeddings for preprocessed uint8 images (N, size, size) of one modality."""
        raise NotImplementedError

    def probabilities(self, images: np.ndarray, modality: str) -> np.ndarray:
        """Calibrated p(COVID) for preprocessed uint8 images (N, size, size) of one modality."""
        return self.calibrate(self.outputs(images, modality).probability, modality)

    def calibrate(self, probability: np.ndarray, modality: str) -> np.ndarray:
        """The bundle's calibration map of `modality` (identity for bundles without one), the same for every
        engine because it is applied here, after the engine."""
        return self.config.calibration_of(modality).apply(probability)

    def use_operating_point(self, text: str) -> None:
        """Replace the thresholds, for this pipeline only, by those `text` ("youden", "sensitivity=0.95",
        "specificity=0.90") gives on the calibration scores stored in the bundle."""
        from respiscan.calibration import OperatingPoint  # numpy only, like the rest of the ONNX path

        point = OperatingPoint.parse(text)
        try:
            self.thresholds = self.config.thresholds_at(point)
        except RespiscanError as e:
            raise RespiscanError(f"{self.bundle.path}/{e}") from None
        self.operating_point = str(point)

    def score(self, images: np.ndarray, modality: str, tta: int = 1) -> Scored:
        """p(COVID) (averaged over `tta` views when above 1), the shift score and the TTA spread."""
        if tta < 1:
            raise RespiscanError(f"--tta must be at least 1 (1: no test-time augmentation), got {tta}")
        views = tta_views(images, tta)
        out = self.outputs(views.reshape(-1, *images.shape[1:]), modality)
        raw = out.probability.reshape(tta, len(images))
        p = self.calibrate(raw, modality)
        shift = self.shift.score(out.embedding[:len(images)], images, modality) if self.shift else None
        return Scored(p.mean(axis=0), None if shift is None else shift.score,
                      None if shift is None else shift.in_distribution, p.std(axis=0) if tta > 1 else None,
                      raw.mean(axis=0))

    def check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise RespiscanError(f"this bundle was trained without {modality} images; "
                                 f"it accepts: {', '.join(self.modalities)}")

    def prepare(self, image: ImageInput, modality: str) -> np.ndarray:
        """A file path, or a grey uint8 array, preprocessed as in training."""
        if isinstance(image, np.ndarray):
            return self.preprocess_config.apply(image, modality)
        return load_preprocessed(image, modality, self.preprocess_config)

    def label(self, probability: float, kind: str) -> str:
        return self.config.class_names[int(probability >= self.thresholds[kind])]

    def predict(self, xray: ImageInput | None = None, ct: ImageInput | None = None, tta: int = 1) -> dict:
        """One case: X-ray only, CT only, or both (then `probability` is the fused one). A CT volume (NIfTI,
        DICOM series folder, multi-frame DICOM) is scored slice by slice; `ct_volume` then holds the details.

        Per modality, `<m>_in_distribution` is false when the image is unlike the training images (`<m>_ood_score`
        above 1; both None for a bundle without a shift detector, or a volume). `tta` > 1 averages that many
        test-time augmentations and adds `<m>_tta_std`, their spread."""
        return self.predict_prepared([self.prepare_case(xray, ct)], tta)[0]

    def prepare_case(self, xray: ImageInput | None = None, ct: ImageInput | None = None) -> PreparedCase:
        """`predict`'s checks and preprocessing, without the engine (but a CT volume is scored here)."""
        given = {m: image for m, image in zip(MODALITIES, (xray, ct)) if image is not None}
        if not given:
            raise RespiscanError("give an X-ray, a CT image, or both")
        for modality in given:
            self.check_modality(modality)
        images, volume = {}, None
        for modality, image in given.items():
            if modality == "ct" and not isinstance(image, np.ndarray) and is_volume(image):
                from respiscan.serving.volume import score_volume

                volume = score_volume(self, image)
            else:
                images[modality] = self.prepare(image, modality)
        return PreparedCase(images, volume)

    def predict_prepared(self, cases: list[PreparedCase], tta: int = 1) -> list[dict]:
        """`predict`'s result for each case, with one engine call per modality for all of them (the server
        scores concurrent requests together this way). With `tta` > 1, one call per case: the random views
        of an image depend on its place in the batch (tta.py), and a case must not depend on the others."""
        results: list[dict] = []
        for case in cases:
            result: dict = {"xray_probability": None, "ct_probability": None}
            result |= {f"{m}_{key}": None for m in MODALITIES for key in ("in_distribution", "ood_score")}
            if case.ct_volume is not None:
                result["ct_volume"] = case.ct_volume
                result["ct_probability"] = case.ct_volume["probability"]
            results.append(result)
        for modality in MODALITIES:
            rows = [i for i, case in enumerate(cases) if modality in case.images]
            for group in [rows] if tta == 1 and rows else [[i] for i in rows]:
                self._score_into(results, cases, group, modality, tta)
        for case, result in zip(cases, results):
            given = [m for m in MODALITIES if m in case.images or (m == "ct" and case.ct_volume is not None)]
            kind = "fused" if len(given) == 2 else given[0]
            result["probability"] = fuse([result[f"{m}_probability"] for m in given])
            result["label"] = self.label(result["probability"], kind)
            result["threshold"] = self.thresholds[kind]
            result["operating_point"] = self.operating_point
            result["tta"] = tta
        return results

    def _score_into(self, results: list[dict], cases: list[PreparedCase], rows: list[int], modality: str,
                    tta: int) -> None:
        """One engine call for the `modality` images of `cases[rows]`; their fields written into `results`."""
        scored = self.score(np.stack([cases[i].images[modality] for i in rows]), modality, tta)
        for j, i in enumerate(rows):
            result = results[i]
            result[f"{modality}_probability"] = float(scored.probability[j])
            if scored.ood_score is not None:
                result[f"{modality}_in_distribution"] = bool(scored.in_distribution[j])
                result[f"{modality}_ood_score"] = float(scored.ood_score[j])
            if scored.tta_std is not None:
                result[f"{modality}_tta_std"] = float(scored.tta_std[j])

    def predict_samples(self, samples: list[Sample], strict: bool = False,
                        tta: int = 1) -> tuple[list[dict], list[tuple[str, str]]]:
        """Rows (PREDICTION_COLUMNS, and tta_std with `tta` > 1) for many images, and the skipped ones."""
        for modality in sorted({s.modality for s in samples}):
            self.check_modality(modality)
        rows, skipped = [], []
        for modality in self.modalities:
            group = [s for s in samples if s.modality == modality]
            if not group:
                continue
            # the next batch decodes while this one runs (data/images.py); memory holds two batches
            for batch in iter_batches(group, self.preprocess_config, BATCH, strict=strict):
                skipped += batch.skipped
                kept, images = batch.samples, batch.images
                scored = self.score(images, modality, tta)
                for i, (s, p) in enumerate(zip(kept, scored.probability)):
                    rows.append({"id": s.id, "path": str(s.path), "modality": modality, "probability": float(p),
                                 "prediction": self.label(float(p), modality), **_row_extras(scored, i),
                                 "uncalibrated_probability": float(scored.uncalibrated[i])})
        return rows, skipped


def fuse(probabilities: list[float]) -> float:
    """Patient-level probability from the per-modality ones: their mean (documented in the bundle)."""
    return float(np.mean(probabilities))


def _row_extras(scored: Scored, i: int) -> dict:
    """A batch row's shift columns (empty without a detector) and, with TTA, its spread."""
    extras = {"in_distribution": None if scored.in_distribution is None else bool(scored.in_distribution[i]),
              "ood_score": None if scored.ood_score is None else float(scored.ood_score[i])}
    return extras if scored.tta_std is None else {**extras, "tta_std": float(scored.tta_std[i])}


def write_predictions(path: str | Path, rows: list[dict]) -> None:
    tta = ["tta_std"] if rows and "tta_std" in rows[0] else []
    write_rows(path, rows, [*PREDICTION_COLUMNS, *tta])
