"""The stages of the method, each a thin use of the one training loop (`train_classifier` / `fit`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from respiscan.models.backbone import EmbeddingNet
from respiscan.models.mlp import AdversarialSharedMLP, Discriminator
from respiscan.runtime import autocast, device_of, minibatches
from respiscan.training import distributed
from respiscan.training.config import Augment
from respiscan.training.loop import ClassifierFit, FitResult, SourceAdversary, auc, fit, train_classifier

# images per no-grad forward pass: efficientnet_b0's bf16 kernels ran ~15 % slower at 64 than at 32 (the batch
# the raw forward was measured at), and no preset backbone gains from more
INFERENCE_BATCH = 32


def random_affine(images: torch.Tensor, gen: torch.Generator, max_rotate: float = 10.0, max_scale: float = 0.1,
                  max_shift: float = 0.06, max_gain: float = 0.1) -> torch.Tensor:
    """Light augmentation for scratch-trained backbones: rotation, scale, shift, brightness/contrast.

    Batched, with parameters per image drawn from `gen`: torchvision's v2 transforms draw one set per call from
    the global generator, so a batch would share them and a per-image loop is slower.
    """
    x = (images if images.ndim == 4 else images.unsqueeze(1)).float()
    n = len(x)
    u = lambda: torch.rand(n, generator=gen) * 2 - 1  # noqa: E731  (uniform in [-1, 1])
    angle, scale = u() * math.radians(max_rotate), 1 + u() * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u() * max_shift], 1), torch.stack([sin, cos, u() * max_shift], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + u() * max_gain).view(-1, 1, 1, 1) + mean * (1 + u() * max_gain).view(-1, 1, 1, 1)
    return x.clamp(0, 255)


def scanner_look(images: torch.Tensor, gen: torch.Generator, max_gamma: float = 1.4, min_scale: float = 0.5,
                 max_noise: float = 0.04) -> torch.Tensor:
    """What different scanners and export pipelines do to one image, drawn per image: intensity profile (gamma
    in [1/max_gamma, max_gamma]), resolution (down to `min_scale` and back) and detector noise (sd up to
    `max_noise` of the range). Float images in [0, 255] in and out, after `random_affine`."""
    x = (images if images.ndim == 4 else images.unsqueeze(1)).float() / 255.0
    n, size = len(x), x.shape[-2:]
    u = torch.rand(n, 3, generator=gen)
    x = x.clamp(0, 1) ** torch.exp((u[:, 0] * 2 - 1) * math.log(max_gamma)).view(-1, 1, 1, 1)
    scales = min_scale + (1 - min_scale) * u[:, 1]
    x = torch.cat([F.interpolate(F.interpolate(img[None], scale_factor=float(s), mode="area"), size=size,
                                 mode="bilinear", align_corners=False) for img, s in zip(x, scales)])
    x = x + torch.randn(x.shape, generator=gen) * (u[:, 2] * max_noise).view(-1, 1, 1, 1)
    return (x * 255.0).clamp(0, 255)


def scanner_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return scanner_look(random_affine(images, gen), gen)


class _DenseOnFeatures(nn.Module):
    """An embedding model's Dense(1280) + LeakyReLU + Dense(1) applied to cached backbone features."""

    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.out(self.net.embed_features(feats)).squeeze(-1)


@torch.no_grad()
def _rows(fn, images: torch.Tensor, bf16: bool, batch_size: int, desc: str, dim: int) -> torch.Tensor:
    """`fn` over all images in batches; under torchrun each rank does its shard and the rows are gathered."""
    net = fn.__self__
    net.eval()
    device = device_of(net)
    mine = distributed.shard(torch.arange(len(images)))
    out = []
    for idx in tqdm(list(minibatches(len(mine), batch_size)), desc=desc, unit="batch", leave=False,
                    **distributed.quiet()):
        with autocast(bf16, device):
            out.append(fn(images[mine[idx]].to(device)).float().cpu())
    return distributed.gather_rows(torch.cat(out) if out else torch.zeros(0, dim), len(images))


@torch.no_grad()
def backbone_features(net: EmbeddingNet, images: torch.Tensor, bf16: bool, batch_size: int = INFERENCE_BATCH,
                      desc: str = "features") -> torch.Tensor:
    return _rows(net.features, images, bf16, batch_size, desc, net.backbone.num_features)


def train_embedder(net: EmbeddingNet, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                   settings: ClassifierFit, *, frozen: bool, augment: Augment, bf16: bool, seed: int,
                   log_path: Path | None, desc: str, checkpoint_path: Path | None = None,
                   weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                   adversary: SourceAdversary | None = None) -> FitResult:
    """Stage 1. A frozen (pretrained) backbone's features never change, so they are computed once and only the
    dense layers train on them; a backbone without pretrained weights is trained whole, with augmentation
    (`augment`: none, affine, or affine + scanner look) and, given an `adversary`, against the source."""
    if frozen:
        net.backbone.requires_grad_(False)
        f_train = backbone_features(net, train[0], bf16, desc=f"{desc} features")
        f_val = backbone_features(net, val[0], bf16, desc=f"{desc} features")
        return train_classifier(_DenseOnFeatures(net), f_train, train[1], f_val, val[1], settings, seed=seed,
                                params=[*net.dense.parameters(), *net.out.parameters()], log_path=log_path, desc=desc,
                                **balanced(weights))
    net.backbone.requires_grad_(True)
    return train_classifier(net, train[0], train[1], val[0], val[1], settings, seed=seed, bf16=bf16,
                            augment=AUGMENTS[augment], log_path=log_path, desc=desc,
                            checkpoint_path=checkpoint_path, adversary=adversary, **balanced(weights))


def balanced(weights: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor | None]:
    """train_classifier's arguments for (train, validation) balance weights."""
    return {"weights": weights[0], "val_weights": weights[1]} if weights else {}


AUGMENTS = {"none": None, "affine": random_affine, "scanner": scanner_augment}


@torch.no_grad()
def embed_images(net: EmbeddingNet, images: torch.Tensor, bf16: bool, batch_size: int = INFERENCE_BATCH,
                 desc: str = "embed") -> torch.Tensor:
    """The 1280-d embeddings (LeakyReLU output) of a set of preprocessed images."""
    return _rows(net.embed, images, bf16, batch_size, desc, net.dense.out_features)


def train_adversarial(shared: AdversarialSharedMLP, emb: torch.Tensor, modality: torch.Tensor, emb_val: torch.Tensor,
                      modality_val: torch.Tensor, epochs: int, settings: ClassifierFit, *, seed: int,
                      log_path: Path | None, desc: str = "adversarial") -> FitResult:
    """Generator vs modality discriminator (X-ray 1, CT 0): the generator learns to make the discriminator
    see the inverted modality, which pushes its output towards modality-invariant features. The discriminator
    is the stage's adversary only: it is discarded afterwards and never ships in a bundle."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = device_of(shared)
    g, d = shared.generator, Discriminator(emb.shape[1]).to(device)
    opt_g = torch.optim.AdamW(g.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    opt_d = torch.optim.AdamW(d.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    modality, modality_val = modality.float(), modality_val.float()

    def train_epoch(epoch: int) -> dict[str, float]:
        sums = np.zeros(2)
        count = 0
        for idx in minibatches(len(emb), settings.batch_size, gen):
            x, m = emb[idx].to(device), modality[idx].to(device)
            d_loss = F.binary_cross_entropy_with_logits(d(g(x).detach()), m)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            g_loss = F.binary_cross_entropy_with_logits(d(g(x)), 1 - m)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            sums += [g_loss.item() * len(idx), d_loss.item() * len(idx)]
            count += len(idx)
        return {"gen_loss": sums[0] / count, "disc_loss": sums[1] / count}

    def validate() -> dict[str, float]:
        logits = d(g(emb_val.to(device))).cpu().numpy()
        m = modality_val.numpy()
        return {"val_disc_acc": float(((logits > 0) == m).mean()), "val_disc_auc": auc(m, logits)}

    return fit(shared, epochs=epochs, train_epoch=train_epoch, validate=validate, monitor=None,
               patience=epochs, log_path=log_path, desc=desc)


def finetune_adversarial(shared: AdversarialSharedMLP, train: tuple[torch.Tensor, torch.Tensor],
                         val: tuple[torch.Tensor, torch.Tensor], settings: ClassifierFit, *, seed: int,
                         log_path: Path | None, desc: str = "shared fine-tune") -> FitResult:
    """Train LeakyReLU + 640 + LeakyReLU + Dense(1) on the frozen generator's output."""
    shared.generator.requires_grad_(False)
    params = [p for n, p in shared.named_parameters() if not n.startswith("generator.")]
    result = train_classifier(shared, *train, *val, settings, seed=seed, params=params, log_path=log_path, desc=desc,
                              shard=False)
    shared.generator.requires_grad_(True)
    return result
