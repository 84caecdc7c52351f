"""Pipeline: images in, COVID probabilities out, exactly as the bundle was trained (same preprocessing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from respiscan.bundle import read_config, read_weights
from respiscan.data.images import load_dataset_images, load_preprocessed
from respiscan.data.preprocess import PreprocessConfig
from respiscan.data.samples import CLASS_NAMES, Sample
from respiscan.errors import RespiscanError
from respiscan.models.network import MMTLNet, ModelSpec
from respiscan.training.loop import bf16_supported, predict_logits
from respiscan.utils import write_rows

ImageInput = str | Path | np.ndarray


class Pipeline:
    """A loaded bundle. `predict(xray=..., ct=...)` for one case, `predict_samples` for many."""

    def __init__(self, bundle: str | Path, bf16: bool | None = None):
        self.bundle = Path(bundle)
        self.config = read_config(self.bundle)
        self.spec = ModelSpec.from_dict(self.config["model"])
        self.preprocess_config = PreprocessConfig.from_dict(self.config["preprocess"])
        self.thresholds: dict[str, float] = self.config["thresholds"]
        self.net = MMTLNet(self.spec, pretrained=False)
        state = read_weights(self.bundle, self.config)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise RespiscanError(f"{self.bundle}: weights do not fit the model in config.json ({str(e).splitlines()[0]})") from e
        self.net.eval()
        self.bf16 = bf16_supported() if bf16 is None else bf16

    @property
    def modalities(self) -> list[str]:
        return list(self.spec.modalities)

    def _check_modality(self, modality: str) -> None:
        if modality not in self.spec.modalities:
            raise RespiscanError(f"this bundle was trained without {modality} images; it accepts: {', '.join(self.modalities)}")

    def prepare(self, image: ImageInput, modality: str) -> np.ndarray:
        """A file path, or a grey uint8 array, preprocessed as in training."""
        if isinstance(image, np.ndarray):
            return self.preprocess_config.apply(image, modality)
        return load_preprocessed(image, modality, self.preprocess_config)

    def probabilities(self, images: np.ndarray, modality: str) -> np.ndarray:
        """p(COVID) for preprocessed uint8 images (N, size, size) of one modality."""
        self._check_modality(modality)
        logits = predict_logits(lambda x: self.net(x, modality), torch.from_numpy(np.ascontiguousarray(images)),
                                batch_size=32, bf16=self.bf16)
        return 1 / (1 + np.exp(-logits.astype(np.float64)))

    def label(self, probability: float, kind: str) -> str:
        return CLASS_NAMES[int(probability >= self.thresholds.get(kind, 0.5))]

    def predict(self, xray: ImageInput | None = None, ct: ImageInput | None = None) -> dict:
        """One case: X-ray only, CT only, or both (then `probability` is the fused one)."""
        if xray is None and ct is None:
            raise RespiscanError("give an X-ray, a CT image, or both")
        result: dict = {"xray_probability": None, "ct_probability": None}
        for modality, image in (("xray", xray), ("ct", ct)):
            if image is not None:
                self._check_modality(modality)
                result[f"{modality}_probability"] = float(self.probabilities(self.prepare(image, modality)[None], modality)[0])
        given = [m for m in ("xray", "ct") if result[f"{m}_probability"] is not None]
        kind = "fused" if len(given) == 2 else given[0]
        result["probability"] = fuse([result[f"{m}_probability"] for m in given])
        result["label"] = self.label(result["probability"], kind)
        result["threshold"] = self.thresholds.get(kind, 0.5)
        return result

    def predict_samples(self, samples: list[Sample], strict: bool = False) -> tuple[list[dict], list[tuple[str, str]]]:
        """Rows (id, path, modality, probability, prediction) for many images, and the skipped ones."""
        unknown = sorted({s.modality for s in samples} - set(self.modalities))
        if unknown:
            raise RespiscanError(f"this bundle was trained without {', '.join(unknown)} images")
        rows, skipped = [], []
        for modality in self.modalities:
            group = [s for s in samples if s.modality == modality]
            if not group:
                continue
            images, kept, bad = load_dataset_images(group, self.preprocess_config, strict=strict, desc=f"read {modality}")
            skipped += bad
            for s, p in zip(kept, self.probabilities(images, modality)):
                rows.append({"id": s.id, "path": str(s.path), "modality": modality, "probability": float(p),
                             "prediction": self.label(float(p), modality)})
        return rows, skipped


def fuse(probabilities: list[float]) -> float:
    """Patient-level probability from the per-modality ones: their mean (documented in the bundle)."""
    return float(np.mean(probabilities))


def load(bundle: str | Path, bf16: bool | None = None) -> Pipeline:
    return Pipeline(bundle, bf16=bf16)



def write_predictions(path: str | Path, rows: list[dict]) -> None:
    write_rows(path, rows, ["id", "path", "modality", "probability", "prediction"])
