"""The network's structure as data (no torch): what a bundle records so that any engine can rebuild it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from respiscan.errors import RespiscanError
from respiscan.records import Record

# "source_adversarial": the plain shared MLP trained against a discriminator of the acquisition source
SharedKind = Literal["plain", "adversarial", "source_adversarial", "none"]
SHARED_KINDS: tuple[str, ...] = get_args(SharedKind)


@dataclass(frozen=True)
class ModelSpec(Record):
    """Everything needed to rebuild the network's structure (weights come from the bundle)."""

    modalities: list[str] = field(default_factory=lambda: ["xray", "ct"])
    task_backbones: dict[str, str] = field(default_factory=lambda: {"xray": "resnet18", "ct": "resnet18"})
    # None: the task-specific embedding model of each modality also feeds the shared MLP (faster presets)
    shared_backbones: dict[str, str] | None = None
    shared: SharedKind = "plain"

    def __post_init__(self) -> None:
        if self.shared not in SHARED_KINDS:
            raise RespiscanError(f"unknown shared kind {self.shared!r}; accepted: {', '.join(SHARED_KINDS)}")
