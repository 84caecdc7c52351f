"""The whole multi-modal multi-task network as one module, so one safetensors file holds every stage."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from respiscan.errors import RespiscanError
from respiscan.models.backbone import EmbeddingNet
from respiscan.models.mlp import FEATURE_DIM, SHARED_MODULES, Head, TaskSpecificMLP
from respiscan.models.spec import ModelSpec


def resolve_weights(pretrained: bool | str | Path, backbone: str) -> bool | str:
    """`pretrained` may be a bool, one weights file, or a folder of `<backbone>.<ext>` files."""
    if isinstance(pretrained, bool):
        return pretrained
    path = Path(pretrained)
    if path.is_dir():
        hits = sorted(p for p in path.iterdir() if p.name.split(".")[0] == backbone.split(".")[0])
        if not hits:
            raise RespiscanError(f"{path}: no weights file named {backbone}.* for backbone {backbone!r}")
        return str(hits[0])
    return str(path)


class NetOutput(NamedTuple):
    logits: torch.Tensor  # (B,)
    embedding: torch.Tensor  # (B, 1280), float32


class MMTLNet(nn.Module):
    def __init__(self, spec: ModelSpec, pretrained: bool | str | Path = False):
        super().__init__()
        self.spec = spec
        names = {f"task_{m}": spec.task_backbones[m] for m in spec.modalities}
        if spec.shared_backbones and spec.shared != "none":
            names.update({f"shared_{m}": spec.shared_backbones[m] for m in spec.modalities})
        self.embedders = nn.ModuleDict({k: EmbeddingNet(v, resolve_weights(pretrained, v)) for k, v in names.items()})
        self.task = nn.ModuleDict({m: TaskSpecificMLP(m) for m in spec.modalities})
        shared = SHARED_MODULES[spec.shared]
        self.shared = shared() if shared is not None else None
        head_in = FEATURE_DIM if self.shared is None else 2 * FEATURE_DIM
        self.heads = nn.ModuleDict({m: Head(head_in) for m in spec.modalities})

    def mlp_twin(self, seed: int) -> "MMTLNet":
        """A copy with the same embedding models and freshly initialised MLPs (task-specific, shared, heads):
        cross-fitting trains those again, selected on other images, to score the images this one selected on."""
        twin = copy.deepcopy(self)
        torch.manual_seed(seed)
        for part in (twin.task, twin.shared, twin.heads):
            for layer in part.modules() if part is not None else ():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
        return twin

    def task_embedder(self, modality: str) -> EmbeddingNet:
        return self.embedders[f"task_{modality}"]

    def shared_embedder(self, modality: str) -> EmbeddingNet:
        key = f"shared_{modality}"
        return self.embedders[key] if key in self.embedders else self.task_embedder(modality)

    def head_features(self, modality: str, task_embedding: torch.Tensor,
                      shared_embedding: torch.Tensor | None) -> torch.Tensor:
        """[task-specific 640 ; shared 640] (task-specific only when the shared stage is off)."""
        parts = [self.task[modality].features(task_embedding)]
        if self.shared is not None:
            parts.append(self.shared.features(shared_embedding))
        return torch.cat(parts, dim=1)

    def forward(self, images: torch.Tensor, modality: str) -> torch.Tensor:
        """COVID logits for a batch of preprocessed uint8 images of one modality."""
        return self.logits_and_embedding(images, modality).logits

    def logits_and_embedding(self, images: torch.Tensor, modality: str) -> NetOutput:
        """The logits and the task-specific 1280-d embedding they came from (the shift detector's input)."""
        task_embedding = self.task_embedder(modality).embed(images).float()
        shared_embedding = None
        if self.shared is not None:
            same = self.shared_embedder(modality) is self.task_embedder(modality)
            shared_embedding = task_embedding if same else self.shared_embedder(modality).embed(images).float()
        logits = self.heads[modality](self.head_features(modality, task_embedding, shared_embedding))
        return NetOutput(logits, task_embedding)
