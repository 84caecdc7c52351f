"""What every prediction engine shares, without torch: the bundle's config, preprocessing, combining the
modalities of a case, labels and batches. Engines (torch_engine.py, onnx_engine.py) only supply
`probabilities`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from respiscan.bundle import Bundle
from respiscan.data.images import load_dataset_images, load_preprocessed
from respiscan.data.io import is_volume
from respiscan.data.samples import MODALITIES, Sample
from respiscan.errors import RespiscanError
from respiscan.utils import write_rows

ImageInput = str | Path | np.ndarray


class BasePipeline:
    """A loaded bundle. `predict(xray=..., ct=...)` for one case, `predict_samples` for many."""

    def __init__(self, bundle: str | Path | Bundle):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.config = self.bundle.config
        self.modalities: list[str] = list(self.config.model.modalities)
        self.preprocess_config = self.config.preprocess
        # a threshold per modality and, with two, for the fused probability: BundleConfig checks it
        self.thresholds: dict[str, float] = dict(self.config.thresholds)

    def probabilities(self, images: np.ndarray, modality: str) -> np.ndarray:
        """p(COVID) for preprocessed uint8 images (N, size, size) of one modality."""
        raise NotImplementedError

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

    def predict(self, xray: ImageInput | None = None, ct: ImageInput | None = None) -> dict:
        """One case: X-ray only, CT only, or both (then `probability` is the fused one). A CT volume (NIfTI,
        DICOM series folder, multi-frame DICOM) is scored slice by slice; `ct_volume` then holds the details."""
        given = {m: image for m, image in zip(MODALITIES, (xray, ct)) if image is not None}
        if not given:
            raise RespiscanError("give an X-ray, a CT image, or both")
        for modality in given:
            self.check_modality(modality)
        result: dict = {"xray_probability": None, "ct_probability": None}
        for modality, image in given.items():
            if modality == "ct" and not isinstance(image, np.ndarray) and is_volume(image):
                from respiscan.serving.volume import score_volume

                result["ct_volume"] = score_volume(self, image)
                result["ct_probability"] = result["ct_volume"]["probability"]
                continue
            prepared = self.prepare(image, modality)[None]
            result[f"{modality}_probability"] = float(self.probabilities(prepared, modality)[0])
        kind = "fused" if len(given) == 2 else next(iter(given))
        result["probability"] = fuse([result[f"{m}_probability"] for m in given])
        result["label"] = self.label(result["probability"], kind)
        result["threshold"] = self.thresholds[kind]
        return result

    def predict_samples(self, samples: list[Sample], strict: bool = False) -> tuple[list[dict], list[tuple[str, str]]]:
        """Rows (id, path, modality, probability, prediction) for many images, and the skipped ones."""
        for modality in sorted({s.modality for s in samples}):
            self.check_modality(modality)
        rows, skipped = [], []
        for modality in self.modalities:
            group = [s for s in samples if s.modality == modality]
            if not group:
                continue
            images, kept, bad = load_dataset_images(group, self.preprocess_config, strict=strict,
                                                    desc=f"read {modality}")
            skipped += bad
            for s, p in zip(kept, self.probabilities(images, modality)):
                rows.append({"id": s.id, "path": str(s.path), "modality": modality, "probability": float(p),
                             "prediction": self.label(float(p), modality)})
        return rows, skipped


def fuse(probabilities: list[float]) -> float:
    """Patient-level probability from the per-modality ones: their mean (documented in the bundle)."""
    return float(np.mean(probabilities))


def write_predictions(path: str | Path, rows: list[dict]) -> None:
    write_rows(path, rows, ["id", "path", "modality", "probability", "prediction"])
