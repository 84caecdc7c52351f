"""The torch engine: a bundle's network, run on preprocessed images (bf16 autocast where the CPU has it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from respiscan.bundle import read_weights
from respiscan.errors import RespiscanError
from respiscan.serving.pipeline import BasePipeline
from respiscan.models.network import MMTLNet
from respiscan.models.spec import ModelSpec
from respiscan.runtime import BF16_TOLERANCE, bf16_supported, predict_logits


def bf16_allowed(config: dict) -> bool:
    """bf16 by default only where the CPU has bf16 units and training measured that bf16 keeps this bundle's
    validation probabilities within BF16_TOLERANCE of fp32 (a bundle without that check runs fp32)."""
    check = config.get("bf16_check") or {}
    return bf16_supported() and check.get("max_abs_difference", float("inf")) <= check.get("tolerance", BF16_TOLERANCE)


class Pipeline(BasePipeline):
    """The torch engine. `bf16=None` follows `bf16_allowed`; True/False force it."""

    def __init__(self, bundle: str | Path, bf16: bool | None = None):
        super().__init__(bundle)
        self.net = MMTLNet(ModelSpec.from_dict(self.config["model"]), pretrained=False)
        try:
            self.net.load_state_dict(read_weights(self.bundle, self.config))
        except RuntimeError as e:
            raise RespiscanError(f"{self.bundle}: weights do not fit the model in config.json ({str(e).splitlines()[0]})") from e
        self.net.eval()
        self.bf16 = bf16_allowed(self.config) if bf16 is None else bf16

    def probabilities(self, images: np.ndarray, modality: str) -> np.ndarray:
        self.check_modality(modality)
        logits = predict_logits(lambda x: self.net(x, modality), torch.from_numpy(np.ascontiguousarray(images)),
                                batch_size=32, bf16=self.bf16)
        return 1 / (1 + np.exp(-logits.astype(np.float64)))
