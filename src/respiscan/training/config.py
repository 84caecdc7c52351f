"""Training configuration and presets, as data: frozen dataclasses stored as JSON in every bundle.

Frozen, so that no stage can change the caller's configuration; `with_overrides` gives a changed copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from respiscan.data.preprocess import PreprocessConfig
from respiscan.errors import RespiscanError
from respiscan.models.spec import ModelSpec, SharedKind
from respiscan.records import Record

Select = Literal["best", "last"]
FinetuneTarget = Literal["covid", "modality"]


@dataclass(frozen=True)
class ClassifierFit(Record):
    """Settings of a binary-classifier stage (BCE on logits, AdamW, warm-up + cosine schedule)."""

    epochs: int = 100
    patience: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    # "best": keep the epoch with the best validation AUC (early stopping); "last": run the whole schedule and
    # keep its end, for stages whose small validation split is too noisy to pick an epoch (scratch backbones)
    select: Select = "best"

    def __post_init__(self) -> None:
        if self.select not in ("best", "last"):
            raise RespiscanError(f"unknown selection rule {self.select!r}; accepted: best, last")


@dataclass(frozen=True)
class TrainConfig(Record):
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
    adversarial_finetune: FinetuneTarget = "covid"  # the reference fine-tuned on "modality"
    augment: bool = True

    def __post_init__(self) -> None:
        if self.adversarial_finetune not in ("covid", "modality"):
            raise RespiscanError(f"unknown adversarial fine-tune target {self.adversarial_finetune!r}; "
                                 "accepted: covid, modality")

    def with_overrides(self, *, seed: int | None = None, shared: SharedKind | None = None,
                       backbone: str | None = None, image_size: int | None = None, epochs: int | None = None,
                       pretrained: bool | str | None = None) -> "TrainConfig":
        """A copy with the command line's overrides (None keeps a setting); `backbone` replaces every embedding
        model, task-specific and shared, by one backbone per modality."""
        cfg = self
        if seed is not None:
            cfg = replace(cfg, seed=seed)
        if shared is not None:
            cfg = replace(cfg, model=replace(cfg.model, shared=shared))
        if backbone is not None:
            cfg = replace(cfg, model=replace(cfg.model, shared_backbones=None,
                                             task_backbones={m: backbone for m in cfg.model.task_backbones}))
        if image_size is not None:
            cfg = replace(cfg, preprocess=replace(cfg.preprocess, size=image_size))
        if epochs is not None:
            cfg = replace(cfg, backbone_fit=replace(cfg.backbone_fit, epochs=epochs))
        if pretrained is not None:
            cfg = replace(cfg, pretrained=pretrained)
        return cfg


PRESETS: dict[str, TrainConfig] = {
    "fast": TrainConfig(),
    "seed": TrainConfig(preset="seed", model=ModelSpec(
        task_backbones={"xray": "efficientnet_b0", "ct": "efficientnet_b1"},
        shared_backbones={"xray": "resnet50", "ct": "resnetv2_50"})),
    "tiny": TrainConfig(
        preset="tiny", model=ModelSpec(task_backbones={"xray": "resnet18", "ct": "resnet18"}),
        preprocess=PreprocessConfig(size=96),
        backbone_fit=ClassifierFit(epochs=12, patience=5, batch_size=32, lr=2e-3, weight_decay=0.05),
        mlp_fit=ClassifierFit(epochs=30, patience=8, batch_size=64, lr=3e-4, weight_decay=1e-3),
        adversarial_epochs=10),
}
"""Named starting points: `fast` (default, CPU), `seed` (the reference's four backbones), `tiny` (tests, demo)."""


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise RespiscanError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]
