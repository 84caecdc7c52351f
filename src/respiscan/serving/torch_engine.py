"""The torch engine: a bundle's network, run on preprocessed images (bf16 autocast where the CPU has it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from respiscan.bundle import Bundle, BundleConfig
from respiscan.errors import RespiscanError
from respiscan.models.backbone import EMBED_DIM
from respiscan.models.network import MMTLNet
from respiscan.runtime import bf16_supported, predict_logits
from respiscan.serving.pipeline import BasePipeline, Outputs


def bf16_allowed(config: BundleConfig) -> bool:
    """bf16 by default only where the CPU has bf16 units and training measured that bf16 keeps this bundle's
    validation probabilities within the recorded tolerance of fp32 (a bundle without that check runs fp32)."""
    return bf16_supported() and config.bf16_check is not None and config.bf16_check.allows_bf16


class Pipeline(BasePipeline):
    """The torch engine. `bf16=None` follows `bf16_allowed`; True/False force it."""

    def __init__(self, bundle: str | Path | Bundle, bf16: bool | None = None):
        super().__init__(bundle)
        self.net = MMTLNet(self.config.model, pretrained=False)
        try:
            self.net.load_state_dict(self.bundle.weights())
        except RuntimeError as e:
            raise RespiscanError(f"{self.bundle.path}: weights do not fit the model in config.json "
                                 f"({str(e).splitlines()[0]})") from e
        self.net.eval()
        self.bf16 = bf16_allowed(self.config) if bf16 is None else bf16

    def outputs(self, images: np.ndarray, modality: str) -> Outputs:
        self.check_modality(modality)

        def logit_and_embedding(x: torch.Tensor) -> torch.Tensor:  # one tensor, so predict_logits batches it
            out = self.net.logits_and_embedding(x, modality)
            return torch.cat([out.logits[:, None], out.embedding], dim=1)

        rows = predict_logits(logit_and_embedding, torch.from_numpy(np.ascontiguousarray(images)), batch_size=32,
                              bf16=self.bf16)
        if not len(rows):
            return Outputs(np.zeros(0), np.zeros((0, EMBED_DIM), np.float32))
        return Outputs(expit(rows[:, 0].astype(np.float64)), rows[:, 1:])
