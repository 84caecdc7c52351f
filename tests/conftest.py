"""Shared fixtures: a small synthetic data set and a bundle trained on it with timm's tiny test backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
REALDEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "realdev"


def tiny_config(shared: str = "plain", seed: int = 0):
    """Smallest configuration that still runs every stage (nnU-Net's '5 epochs' trainer idea)."""
    from respiscan.data.preprocess import PreprocessConfig
    from respiscan.models.network import ModelSpec
    from respiscan.training.config import TrainConfig
    from respiscan.training.loop import ClassifierFit

    return TrainConfig(
        preset="test", seed=seed,
        model=ModelSpec(task_backbones={"xray": "test_resnet", "ct": "test_resnet"}, shared=shared),
        preprocess=PreprocessConfig(size=64),
        backbone_fit=ClassifierFit(epochs=2, patience=2, batch_size=16, lr=2e-3),
        mlp_fit=ClassifierFit(epochs=3, patience=3, batch_size=32, lr=1e-3),
        adversarial_epochs=2)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    from respiscan.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "data", n_per_class=12, size=64, seed=1, progress=False)


@pytest.fixture(scope="session")
def bundle(synth_data, tmp_path_factory) -> Path:
    from respiscan.training.trainer import train

    return train(synth_data, tmp_path_factory.mktemp("bundle") / "bundle", tiny_config())
