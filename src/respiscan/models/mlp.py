"""The MLP blocks of every stage, with the reference's layer sizes (DESIGN.md).

Each block has `features(x)` (the representation later stages use) and `forward(x)` (the logit it was
trained with), so one training loop and one prediction path serve them all.
"""

from __future__ import annotations

import torch
from torch import nn

from respiscan.models.backbone import EMBED_DIM, LEAKY_SLOPE

FEATURE_DIM = 640


def _stack(sizes: list[int], slope: float = LEAKY_SLOPE, dropout: float = 0.0, last_act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope))
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class _FeatureClassifier(nn.Module):
    """`body` gives the feature, `out` the logit."""

    body: nn.Module
    out: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature, logit) from one pass: what a source adversary reads, and the prediction."""
        feature = self.features(x)
        return feature, self.out(feature).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[1]


class TaskSpecificMLP(_FeatureClassifier):
    """BN, 1120, 960, 800, 640, BN, Dense(1); CT uses LeakyReLU(0.5) + Dropout(0.45) as the reference."""

    def __init__(self, modality: str, in_dim: int = EMBED_DIM):
        super().__init__()
        slope, dropout = (0.5, 0.45) if modality == "ct" else (LEAKY_SLOPE, 0.0)
        self.body = nn.Sequential(nn.BatchNorm1d(in_dim), _stack([in_dim, 1120, 960, 800, FEATURE_DIM], slope, dropout),
                                  nn.BatchNorm1d(FEATURE_DIM))
        self.out = nn.Linear(FEATURE_DIM, 1)


class SharedMLP(_FeatureClassifier):
    """Plain shared MLP 1280-960-800-640-1, trained on both modalities' embeddings with COVID labels."""

    def __init__(self, in_dim: int = EMBED_DIM):
        super().__init__()
        self.body = _stack([in_dim, 960, 800, FEATURE_DIM])
        self.out = nn.Linear(FEATURE_DIM, 1)


class Generator(nn.Module):
    """1280-960-640-960-1280: maps an embedding to a modality-invariant one."""

    def __init__(self, dim: int = EMBED_DIM):
        super().__init__()
        self.net = _stack([dim, 960, 640, 960, dim], last_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Discriminator(nn.Module):
    """1280-640-320-160-1: predicts the modality (X-ray 1, CT 0) from a generated embedding."""

    def __init__(self, dim: int = EMBED_DIM):
        super().__init__()
        self.net = _stack([dim, 640, 320, 160, 1], last_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class AdversarialSharedMLP(_FeatureClassifier):
    """Frozen generator + LeakyReLU + 640 + LeakyReLU + Dense(1); the 640-d layer is the shared feature."""

    def __init__(self, in_dim: int = EMBED_DIM):
        super().__init__()
        self.generator = Generator(in_dim)
        self.body = nn.Sequential(nn.LeakyReLU(LEAKY_SLOPE), nn.Linear(in_dim, FEATURE_DIM), nn.LeakyReLU(LEAKY_SLOPE))
        self.out = nn.Linear(FEATURE_DIM, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.generator(x))


class SourceDiscriminator(nn.Module):
    """Predicts the acquisition source from a feature. Training only (it never ships in a bundle): it learns the
    source while the features below it learn to leave it guessing (training/loop.py `SourceAdversary`)."""

    def __init__(self, dim: int, n_sources: int, hidden: int = 256):
        super().__init__()
        self.net = _stack([dim, hidden, n_sources], last_act=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature.float())


# Shared-feature kinds by name (ModelSpec.shared): the module each adds to the network, or None. A new kind is
# its module here, its training in training/shared.py, and its name in models/spec.py's SharedKind.
SHARED_MODULES: dict[str, type[_FeatureClassifier] | None] = {
    "plain": SharedMLP, "adversarial": AdversarialSharedMLP, "source_adversarial": SharedMLP, "none": None}


class Head(nn.Module):
    """Classifier on [task-specific 640 ; shared 640]: 320, 80, 20, 1."""

    def __init__(self, in_dim: int = 2 * FEATURE_DIM):
        super().__init__()
        self.net = _stack([in_dim, 320, 80, 20, 1], last_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
