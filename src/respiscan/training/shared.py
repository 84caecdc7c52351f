"""How each shared-feature kind trains (its module is in models/mlp.py SHARED_MODULES).

Every kind gets the same `SharedData`: both modalities' embeddings pooled, with COVID labels and modality
labels, so that a new kind (e.g. one that plays against the acquisition source) is one function here plus
its registration in SHARED_FITS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from respiscan.training.config import TrainConfig
from respiscan.training.loop import SourceAdversary, train_classifier
from respiscan.training.stages import finetune_adversarial, train_adversarial


@dataclass(frozen=True)
class SharedData:
    """One split of the shared stage's input: embeddings of both modalities, COVID labels, modality (X-ray 1),
    sampling weights (balanced sampling, else None) and the source adversary (None with a single source)."""

    embeddings: torch.Tensor
    covid: torch.Tensor
    modality: torch.Tensor
    weights: torch.Tensor | None = None
    adversary: SourceAdversary | None = None


def log_names(kind: str) -> list[str]:
    """The training-log files a kind writes (logs/<name>.csv), in the order it writes them."""
    return [f"shared_{kind}"] + ["shared_finetune"] * (kind == "adversarial")


def fit_plain(module: nn.Module, train: SharedData, val: SharedData, cfg: TrainConfig, logs: list[Path]) -> None:
    train_classifier(module, train.embeddings, train.covid, val.embeddings, val.covid, cfg.mlp_fit, seed=cfg.seed,
                     log_path=logs[0], desc="shared MLP", shard=False, weights=train.weights,
                     val_weights=val.weights)


def fit_source_adversarial(module: nn.Module, train: SharedData, val: SharedData, cfg: TrainConfig,
                           logs: list[Path]) -> None:
    """The plain shared MLP on COVID labels while a discriminator, through gradient reversal, tries to tell the
    acquisition source from its features: the reference's adversarial idea turned on the site instead of the
    modality. With one training source there is nothing to hide and it trains as the plain kind."""
    if train.adversary is None:
        print("warning: shared kind source_adversarial with a single training source trains as plain")
    train_classifier(module, train.embeddings, train.covid, val.embeddings, val.covid, cfg.mlp_fit, seed=cfg.seed,
                     log_path=logs[0], desc="shared MLP (source-adversarial)", shard=False, weights=train.weights,
                     val_weights=val.weights, adversary=train.adversary)


def fit_adversarial(module: nn.Module, train: SharedData, val: SharedData, cfg: TrainConfig,
                    logs: list[Path]) -> None:
    """The reference's adversarial game against a modality discriminator, then a fine-tune of the layers on
    top of the frozen generator (on COVID labels by default; the reference used the modality labels)."""
    train_adversarial(module, train.embeddings, train.modality, val.embeddings, val.modality, cfg.adversarial_epochs,
                      cfg.mlp_fit, seed=cfg.seed, log_path=logs[0])
    target = "covid" if cfg.adversarial_finetune == "covid" else "modality"
    finetune_adversarial(module, (train.embeddings, getattr(train, target)), (val.embeddings, getattr(val, target)),
                         cfg.mlp_fit, seed=cfg.seed, log_path=logs[1])


SharedFit = Callable[[nn.Module, SharedData, SharedData, TrainConfig, list[Path]], None]
SHARED_FITS: dict[str, SharedFit] = {"plain": fit_plain, "adversarial": fit_adversarial,
                                     "source_adversarial": fit_source_adversarial}
