"""Training configuration and presets, as data: frozen dataclasses stored as JSON in every bundle.

Frozen, so that no stage can change the caller's configuration; `with_overrides` gives a changed copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from respiscan.calibration import CalibrationMethod, OperatingPoint
from respiscan.data.preprocess import PreprocessConfig
from respiscan.errors import RespiscanError
from respiscan.models.spec import ModelSpec, SharedKind
from respiscan.records import Record

Select = Literal["best", "last"]
FinetuneTarget = Literal["covid", "modality"]
# scratch backbones: "affine" = rotation, scale, shift, brightness/contrast; "scanner" adds each scanner's
# intensity profile, resolution and noise (training/stages.py)
Augment = Literal["none", "affine", "scanner"]
Balance = Literal["none", "source_class"]
# "cross-fitted": the calibration split scored by the model plus the validation split scored by a twin of its MLP
# stages that selected epochs on the calibration split (trainer.cross_fitted_validation); "calibration": the
# calibration split alone
CalibrateOn = Literal["cross-fitted", "calibration"]


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
    augment: Augment | bool = "affine"  # bundles before crop/balance stored a bool (True: "affine")
    # "source_class": every stage draws its batches so that each (source, class) weighs the same
    balance: Balance = "none"
    # weight of a source discriminator's reversed gradient (DANN) in the backbone stage of scratch backbones
    # (0: off), and in the shared stage of the "source_adversarial" shared kind
    backbone_source_adversary: float = 0.0
    shared_source_adversary: float = 1.0
    # share of the train split (whole groups, per source x class) kept from the backbone stage for the MLP
    # stages, which then learn from embeddings of images the backbone never fitted (0: off)
    crossfit: float = 0.0
    # share of train (after validation, whole groups) kept from every stage to calibrate and choose thresholds on
    calibration_fraction: float = 0.15
    calibration: CalibrationMethod = "platt"
    calibrate_on: CalibrateOn = "cross-fitted"
    # screening: a missed COVID case costs more than a false alarm, and a sensitivity target is stable on a
    # small calibration split where Youden's argmax jumps (README, "Can I trust this prediction?")
    operating_point: str = "sensitivity=0.90"

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):
            object.__setattr__(self, "augment", "affine" if self.augment else "none")
        for name, value, accepted in (("adversarial fine-tune target", self.adversarial_finetune, FinetuneTarget),
                                      ("augmentation", self.augment, Augment), ("balance", self.balance, Balance)):
            if value not in get_args(accepted):
                raise RespiscanError(f"unknown {name} {value!r}; accepted: {', '.join(get_args(accepted))}")
        if self.backbone_source_adversary < 0 or self.shared_source_adversary < 0:
            raise RespiscanError("a source adversary's weight must be >= 0")
        if not 0.0 <= self.crossfit < 0.9:
            raise RespiscanError(f"crossfit={self.crossfit}; must be in [0, 0.9)")
        if not 0.0 <= self.calibration_fraction < 0.5:
            raise RespiscanError(f"calibration_fraction={self.calibration_fraction}; must be in [0, 0.5)")
        if self.calibration not in get_args(CalibrationMethod):
            raise RespiscanError(f"unknown calibration {self.calibration!r}; accepted: "
                                 f"{', '.join(get_args(CalibrationMethod))}")
        if self.calibrate_on not in get_args(CalibrateOn):
            raise RespiscanError(f"unknown calibrate_on {self.calibrate_on!r}; accepted: "
                                 f"{', '.join(get_args(CalibrateOn))}")
        OperatingPoint.parse(self.operating_point)

    def with_overrides(self, *, seed: int | None = None, shared: SharedKind | None = None,
                       backbone: str | None = None, image_size: int | None = None, epochs: int | None = None,
                       pretrained: bool | str | None = None, operating_point: str | None = None,
                       calibrate_on: CalibrateOn | None = None) -> "TrainConfig":
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
        if operating_point is not None:
            cfg = replace(cfg, operating_point=str(OperatingPoint.parse(operating_point)))
        if calibrate_on is not None:
            cfg = replace(cfg, calibrate_on=calibrate_on)
        return cfg

    def with_site_methods(self, *, crop: str | None = None, augment: str | None = None, balance: str | None = None,
                          crossfit: float | None = None, backbone_adversary: float | None = None) -> "TrainConfig":
        """A copy with the methods against site shortcuts the command line names (None keeps a setting)."""
        cfg = self
        if crop is not None:
            cfg = replace(cfg, preprocess=replace(cfg.preprocess, crop=crop))
        changes = {k: v for k, v in (("augment", augment), ("balance", balance), ("crossfit", crossfit),
                                     ("backbone_source_adversary", backbone_adversary)) if v is not None}
        return replace(cfg, **changes) if changes else cfg


# every preset crops CT to the body (README "Across sites"), finding the outline at 128 px (README "Speed"); tiny
# keeps the full-size outline that the README's tiny-preset figures were measured with
CROP_CT = PreprocessConfig(crop="ct_body", outline_side=128)
PRESETS: dict[str, TrainConfig] = {
    "fast": TrainConfig(preprocess=CROP_CT),
    "seed": TrainConfig(preset="seed", model=ModelSpec(
        task_backbones={"xray": "efficientnet_b0", "ct": "efficientnet_b1"},
        shared_backbones={"xray": "resnet50", "ct": "resnetv2_50"}), preprocess=CROP_CT),
    "tiny": TrainConfig(
        preset="tiny", model=ModelSpec(task_backbones={"xray": "resnet18", "ct": "resnet18"}),
        preprocess=PreprocessConfig(size=96, crop="ct_body"),
        backbone_fit=ClassifierFit(epochs=12, patience=5, batch_size=32, lr=2e-3, weight_decay=0.05),
        mlp_fit=ClassifierFit(epochs=30, patience=8, batch_size=64, lr=3e-4, weight_decay=1e-3),
        adversarial_epochs=10),
}
"""Named starting points: `fast` (default, CPU), `seed` (the reference's four backbones), `tiny` (tests, demo)."""


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise RespiscanError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]
