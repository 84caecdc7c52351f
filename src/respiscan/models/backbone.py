"""Transfer-learning embedding models: any timm backbone + GAP + Dense(1280) + LeakyReLU + Dense(1).

The model takes the preprocessed uint8 grey image and normalises it itself, so the normalisation travels
with the saved weights (timm's lesson: preprocessing belongs to the model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from respiscan.errors import RespiscanError

EMBED_DIM = 1280
LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default, as in the reference


def create_backbone(name: str, pretrained: bool | str | Path = False) -> nn.Module:
    """A timm feature extractor with one input channel and no classifier (pooled features out).

    `pretrained` is False, True (timm's hub weights) or a local weights file (offline use).
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise RespiscanError(f"unknown backbone {name!r}{hint}")
    kwargs: dict = {"num_classes": 0, "in_chans": 1}
    if isinstance(pretrained, (str, Path)) and str(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise RespiscanError(f"{path}: pretrained weights file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RespiscanError(f"backbone {name!r}: could not load pretrained weights ({first})") from e


class EmbeddingNet(nn.Module):
    """Backbone + Dense(1280) + LeakyReLU (the embedding) + Dense(1) (COVID logit)."""

    def __init__(self, backbone_name: str, pretrained: bool | str | Path = False):
        super().__init__()
        self.backbone = create_backbone(backbone_name, pretrained).to(memory_format=torch.channels_last)
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean = float(sum(cfg.get("mean", (0.5,))) / len(cfg.get("mean", (0.5,))))
        std = float(sum(cfg.get("std", (0.25,))) / len(cfg.get("std", (0.25,))))
        self.register_buffer("mean", torch.tensor(mean * 255.0))
        self.register_buffer("std", torch.tensor(std * 255.0))
        self.dense = nn.Linear(self.backbone.num_features, EMBED_DIM)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.out = nn.Linear(EMBED_DIM, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) or (B, 1, H, W) uint8 -> normalised float (B, 1, H, W), channels_last."""
        x = images if images.ndim == 4 else images.unsqueeze(1)
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalise(images))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(features.float()))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(images)).squeeze(-1)
