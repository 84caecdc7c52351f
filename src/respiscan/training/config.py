"""Training configuration and presets; stored as JSON in every bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from respiscan.data.preprocess import PreprocessConfig
from respiscan.errors import RespiscanError
from respiscan.models.spec import ModelSpec
from respiscan.training.loop import ClassifierFit


@dataclass
class TrainConfig:
    preset: str = "fast"
    model: ModelSpec = field(default_factory=ModelSpec)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    pretrained: bool | str = False  # False, True (timm hub) or a local weights file / folder
    seed: int = 0
    val_fraction: float = 0.15
    backbone_fit: ClassifierFit = field(default_factory=lambda: ClassifierFit(
        epochs=24, patience=24, batch_size=32, lr=2e-3, weight_decay=0.05, warmup_epochs=1, select="last"))
    # lr 1e-3 at batch 64 with early stopping: the reference's held-out AUC in a tenth of its epochs (benchmark)
    mlp_fit: ClassifierFit = field(default_factory=lambda: ClassifierFit(
        epochs=60, patience=12, batch_size=64, lr=1e-3, weight_decay=1e-3, warmup_epochs=1))
    adversarial_epochs: int = 30
    adversarial_finetune: str = "covid"  # "covid" (default) or "modality" (the reference's choice)
    augment: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        nested = {"model": ModelSpec, "preprocess": PreprocessConfig, "backbone_fit": ClassifierFit,
                  "mlp_fit": ClassifierFit}
        kwargs = {}
        for f in fields(cls):
            if f.name in d:
                kwargs[f.name] = nested[f.name](**d[f.name]) if f.name in nested else d[f.name]
        return cls(**kwargs)


def preset(name: str) -> TrainConfig:
    """Named starting points: `fast` (default, CPU), `seed` (the reference's four backbones), `tiny` (tests, demo)."""
    if name == "fast":
        return TrainConfig()
    if name == "seed":
        return TrainConfig(preset="seed", model=ModelSpec(
            task_backbones={"xray": "efficientnet_b0", "ct": "efficientnet_b1"},
            shared_backbones={"xray": "resnet50", "ct": "resnetv2_50"}))
    if name == "tiny":
        return TrainConfig(
            preset="tiny", model=ModelSpec(task_backbones={"xray": "resnet18", "ct": "resnet18"}),
            preprocess=PreprocessConfig(size=96),
            backbone_fit=ClassifierFit(epochs=12, patience=5, batch_size=32, lr=2e-3, weight_decay=0.05),
            mlp_fit=ClassifierFit(epochs=30, patience=8, batch_size=64, lr=3e-4, weight_decay=1e-3),
            adversarial_epochs=10)
    raise RespiscanError(f"unknown preset {name!r}; accepted: fast, seed, tiny")
