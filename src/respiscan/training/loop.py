"""The one training loop every stage uses: epochs, validation, best checkpoint, early stopping, CSV log."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from respiscan.models.mlp import SourceDiscriminator
from respiscan.runtime import autocast, batches_per_epoch, device_of, minibatches, predict_logits, save_tensors
from respiscan.training import distributed
from respiscan.training.config import ClassifierFit
from respiscan.utils import write_rows


def auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score, sample_weight=weights)) if len(np.unique(y)) == 2 else float("nan")


@dataclass(frozen=True)
class SourceAdversary:
    """Domain-adversarial training for a stage: a source discriminator learns the source from the model's
    features, while the features are pushed to leave it guessing (cross-entropy to the uniform distribution,
    Tzeng et al. 2015's domain confusion; a reversed gradient, Ganin et al. 2016, diverged at weight 3 in our
    tests), with weight ramped from 0 to `weight` over the schedule (2 / (1 + e^-10p) - 1).

    The discriminator is class-conditional (one source guess per class, the row's own class is used): where
    sources differ in their COVID share, an unconditional one would also erase the disease, which then tells
    the source; conditioned on the class, only what the source adds beyond the class is hidden."""

    sources: torch.Tensor  # source index of every training row
    n_sources: int
    weight: float = 1.0

    def scale(self, progress: float) -> float:
        return self.weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


class _WithAdversary(nn.Module):
    """model + discriminator as one module, so that DDP, checkpoints and best-epoch states cover both.
    Returns the COVID logit, the discriminator's view of the detached features (trains the discriminator) and
    its frozen view of the live ones (trains the features only)."""

    def __init__(self, model: nn.Module, adversary: SourceAdversary):
        super().__init__()
        self.model = model
        self.discriminator = SourceDiscriminator(model.out.in_features, 2 * adversary.n_sources).to(device_of(model))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feature, logit = self.model.forward_with_features(x)
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return (logit, self.discriminator(feature.detach()),
                torch.func.functional_call(self.discriminator, frozen, (feature,)))


@dataclass
class FitResult:
    best_epoch: int
    best: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


class EpochCheckpoint:
    """The state needed to continue a stage after its last finished epoch: model, optimizer, scheduler, random
    generators, history and best model, as safetensors + JSON metadata (our own files are not pickled either)."""

    def __init__(self, path: Path, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 generator: torch.Generator):
        self.path, self.optimizer, self.scheduler, self.generator = path, optimizer, scheduler, generator

    def save(self, model: nn.Module, epoch: int, history: list[dict], best_epoch: int, best_score: tuple,
             best_state: dict | None) -> None:
        if not distributed.is_main():
            return
        opt = self.optimizer.state_dict()
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"best/{k}": v for k, v in (best_state or {}).items()})
        opt_meta: dict = {}
        for i, state in opt["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    tensors[f"opt/{i}/{k}"] = v
                else:
                    opt_meta[f"{i}/{k}"] = v
        tensors["rng/generator"] = self.generator.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        meta = {"epoch": epoch, "history": history, "best_epoch": best_epoch, "best_score": list(best_score),
                "has_best": best_state is not None, "param_groups": opt["param_groups"], "opt_meta": opt_meta,
                "scheduler": self.scheduler.state_dict()}
        save_tensors(self.path, tensors, metadata={"state": json.dumps(meta)})

    def load(self, model: nn.Module) -> tuple[int, list[dict], int, tuple, dict | None] | None:
        """Restore everything and return (epoch, history, best_epoch, best_score, best_state), or None."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        device = device_of(model)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        state: dict = {}
        for k, v in [*((k[4:], v) for k, v in tensors.items() if k.startswith("opt/")), *meta["opt_meta"].items()]:
            i, name = k.split("/", 1)
            state.setdefault(int(i), {})[name] = v  # load_state_dict moves each to its parameter's device
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        for group in self.optimizer.param_groups:  # safetensors stored them contiguous; fused kernels need the
            for p in group["params"]:              # parameter's own strides (channels_last convolutions)
                for k, v in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        self.optimizer.state[p][k] = torch.empty_like(p).copy_(v)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.generator.set_state(tensors["rng/generator"])
        torch.set_rng_state(tensors["rng/torch"])
        best = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best/")} if meta["has_best"] else None
        return meta["epoch"], meta["history"], meta["best_epoch"], tuple(meta["best_score"]), best


def fit(model: nn.Module, *, epochs: int, train_epoch: Callable[[int], dict[str, float]],
        validate: Callable[[], dict[str, float]] | None = None, monitor: str | None = "val_auc", patience: int = 10,
        log_path: Path | None = None, desc: str = "train", checkpoint: EpochCheckpoint | None = None) -> FitResult:
    """Run `train_epoch` until `epochs` or `patience` epochs without a better `monitor`; restore the best.

    `monitor` is maximised unless its name ends in "loss". Without `validate` or `monitor` every epoch runs
    and the last one is kept. With `checkpoint`, each finished epoch is saved and a saved one is resumed.
    """
    minimise = bool(monitor and monitor.endswith("loss"))
    best_score = (math.inf, 0.0) if minimise else (-math.inf, 0.0)
    best_state, best_epoch, start = None, 0, 1
    history: list[dict[str, float]] = []
    restored = checkpoint.load(model) if checkpoint else None
    if restored:
        last, history, best_epoch, best_score, best_state = restored
        start = last + 1
    best_row = history[best_epoch - 1] if best_epoch else {}
    bar = tqdm(range(start, epochs + 1), desc=desc, unit="epoch", initial=start - 1, total=epochs,
               **distributed.quiet())
    for epoch in bar:
        if history and epoch - best_epoch > patience:
            break
        t0 = time.perf_counter()
        model.train()
        row: dict[str, float] = {"epoch": epoch, **train_epoch(epoch)}
        if validate is not None:
            model.eval()
            with torch.no_grad():
                row.update(validate())
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        score = row.get(monitor or "", float("nan"))
        if not minimise and "val_loss" in row:  # ties (e.g. AUC 1.0) go to the lower validation loss
            score = (score, -row["val_loss"])
        else:
            score = (score, 0.0)
        better = score < best_score if minimise else score > best_score
        improved = validate is None or monitor is None or (not math.isnan(score[0]) and better)
        if improved:
            best_score, best_epoch, best_row = score, epoch, row
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds")}, refresh=False)
        if log_path:
            write_log(log_path, history)
        if checkpoint:
            checkpoint.save(model, epoch, history, best_epoch, best_score, best_state)
        if epoch - best_epoch >= patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, best_row, history)


def write_log(path: Path, history: list[dict[str, float]]) -> None:
    if distributed.is_main():
        write_rows(path, history, list(dict.fromkeys(k for row in history for k in row)))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Step s runs at lr * (s + 1) / warmup_steps while s < warmup_steps, then lr * (1 + cos(pi * progress)) / 2
    with progress going from 0 to 1 over the remaining steps."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    if not warmup_steps:
        return CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, total_iters=warmup_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def train_classifier(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                     y_val: torch.Tensor, settings: ClassifierFit, *, seed: int = 0, bf16: bool = False,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                     params: list[nn.Parameter] | None = None, log_path: Path | None = None,
                     desc: str = "train", checkpoint_path: Path | None = None, shard: bool = True,
                     weights: torch.Tensor | None = None, val_weights: torch.Tensor | None = None,
                     adversary: SourceAdversary | None = None) -> FitResult:
    """Fit `model(x) -> logit` with BCE; model selection on validation AUC (never on test).

    `weights` draws each epoch's rows in proportion to them (balanced sampling) and `val_weights` weighs the
    validation rows the same way, so that the epoch chosen is not the one that best exploits a source-class
    correlation the sampling removed from training; `adversary` adds a source
    discriminator on the model's features (`forward_with_features`) that the features learn to confuse.

    Under torchrun with `shard`, each rank takes its shard of every batch and the loss is scaled so that DDP's
    gradient average equals the single-process gradient of the whole batch. Without `shard` (the small MLP
    stages, where communication would cost more than it saves and per-shard BatchNorm statistics would change
    the result) every rank trains the same model on the same batches, exactly as a single process does.
    """
    torch.manual_seed(seed)  # dropout draws from the global generator: same seed, same stage, resumed or not
    gen = torch.Generator().manual_seed(seed)
    device = device_of(model)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    fitted = _WithAdversary(model, adversary) if adversary else model
    if adversary:
        params = [*params, *fitted.discriminator.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    steps_per_epoch = max(1, batches_per_epoch(len(x_train), settings.batch_size))
    scheduler = warmup_cosine(optimizer, settings.epochs * steps_per_epoch, settings.warmup_epochs * steps_per_epoch)
    y_train = y_train.float()
    sharded = shard and distributed.active()
    step_model = DistributedDataParallel(fitted) if sharded else fitted
    total_steps = settings.epochs * steps_per_epoch
    world = distributed.world() if sharded else 1

    def train_epoch(epoch: int) -> dict[str, float]:
        total, count, source_hits = 0.0, 0, 0
        batches = minibatches(len(x_train), settings.batch_size, gen, weights)
        for step, idx in enumerate(tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", unit="batch",
                                        leave=False, disable=True if steps_per_epoch < 20 or not distributed.is_main()
                                        else None)):
            xb = augment(x_train[idx], gen) if augment else x_train[idx]
            mine = distributed.shard(torch.arange(len(idx))) if sharded else torch.arange(len(idx))
            with autocast(bf16, device):
                out = step_model(xb[mine].to(device, non_blocking=True))
            logits = (out[0] if adversary else out).float()
            loss_sum = F.binary_cross_entropy_with_logits(logits, y_train[idx][mine].to(device), reduction="sum")
            if adversary:
                weight = adversary.scale(((epoch - 1) * steps_per_epoch + step) / total_steps)
                source = adversary.sources[idx][mine].to(device)
                own = y_train[idx][mine].long().to(device)
                guess, seen = (t.float().view(len(own), 2, -1)[torch.arange(len(own)), own] for t in out[1:])
                confusion = -F.log_softmax(seen, dim=1).mean(dim=1).sum()
                loss_sum = loss_sum + F.cross_entropy(guess, source, reduction="sum") + weight * confusion
                source_hits += int((guess.argmax(1) == source).sum())
            optimizer.zero_grad(set_to_none=True)
            (loss_sum * world / len(idx)).backward()
            optimizer.step()
            scheduler.step()
            total += loss_sum.item()
            count += len(mine)
        if sharded:
            total, count, source_hits = distributed.all_sum([total, count, source_hits])
        row = {"train_loss": total / max(count, 1), "lr": scheduler.get_last_lr()[0]}
        if adversary:  # near chance (1 / n_sources) once the features hide the source
            row["train_source_acc"] = source_hits / max(count, 1)
        return row

    def validate() -> dict[str, float]:
        distributed.sync_buffers(model)
        logits = predict_logits(model, x_val, bf16=bf16, device=device)
        yv, w = y_val.numpy(), None if val_weights is None else val_weights.numpy() / val_weights.numpy().mean()
        loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), y_val.float(),
                                                  weight=None if w is None else torch.from_numpy(w).float()).item()
        return {"val_loss": loss, "val_auc": auc(yv, logits, w),
                "val_acc": float(np.average((logits > 0) == yv, weights=w))}

    monitor = "val_auc" if len(np.unique(y_val.numpy())) == 2 else "val_loss"
    if settings.select == "last":
        monitor = None
    checkpoint = EpochCheckpoint(checkpoint_path, optimizer, scheduler, gen) if checkpoint_path else None
    return fit(fitted, epochs=settings.epochs, train_epoch=train_epoch, validate=validate if len(x_val) else None,
               monitor=monitor, patience=settings.patience, log_path=log_path, desc=desc, checkpoint=checkpoint)
