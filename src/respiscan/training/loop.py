"""The one training loop every stage uses: epochs, validation, best checkpoint, early stopping, CSV log."""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from respiscan.utils import write_rows


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """bf16 autocast pays off where the hardware has bf16 matrix units (AVX512-BF16/AMX on CPU, CUDA)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if enabled else nullcontext()


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', or 'auto' (CUDA when present); asking for a missing GPU is a clear error."""
    from respiscan.errors import RespiscanError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise RespiscanError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RespiscanError(f"device {name!r} was asked for but this machine has no such CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise RespiscanError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan")


@dataclass
class FitResult:
    best_epoch: int
    best: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def fit(model: nn.Module, *, epochs: int, train_epoch: Callable[[int], dict[str, float]],
        validate: Callable[[], dict[str, float]] | None = None, monitor: str | None = "val_auc", patience: int = 10,
        log_path: Path | None = None, desc: str = "train") -> FitResult:
    """Run `train_epoch` until `epochs` or `patience` epochs without a better `monitor`; restore the best.

    `monitor` is maximised unless its name ends in "loss". Without `validate` or `monitor` every epoch runs
    and the last one is kept.
    """
    minimise = bool(monitor and monitor.endswith("loss"))
    best_score = (math.inf, 0.0) if minimise else (-math.inf, 0.0)
    best_state, best_epoch, best_row = None, 0, {}
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch")
    for epoch in bar:
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
        improved = validate is None or monitor is None or (not math.isnan(score[0]) and (score < best_score if minimise else score > best_score))
        if improved:
            best_score, best_epoch, best_row = score, epoch, row
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds")}, refresh=False)
        if log_path:
            write_log(log_path, history)
        if epoch - best_epoch >= patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, best_row, history)


def write_log(path: Path, history: list[dict[str, float]]) -> None:
    write_rows(path, history, list(dict.fromkeys(k for row in history for k in row)))


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches; shuffled when a generator is given. A last batch of one is dropped (BatchNorm)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        if generator is not None and len(idx) < 2:
            continue
        yield idx


@torch.no_grad()
def predict_logits(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256,
                   bf16: bool = False, device: torch.device | str = "cpu") -> np.ndarray:
    """Batched logits on `device`, returned as a CPU float32 array."""
    out = []
    for idx in minibatches(len(x), batch_size):
        with autocast(bf16, device):
            out.append(fn(x[idx].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class ClassifierFit:
    """Settings of a binary-classifier stage (BCE on logits, AdamW, warm-up + cosine schedule)."""

    epochs: int = 100
    patience: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1


def train_classifier(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                     y_val: torch.Tensor, settings: ClassifierFit, *, seed: int = 0, bf16: bool = False,
                     augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                     params: list[nn.Parameter] | None = None, log_path: Path | None = None,
                     desc: str = "train") -> FitResult:
    """Fit `model(x) -> logit` with BCE; model selection on validation AUC (never on test)."""
    torch.manual_seed(seed)  # dropout draws from the global generator: same seed, same stage, resumed or not
    gen = torch.Generator().manual_seed(seed)
    device = device_of(model)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    steps_per_epoch = max(1, len(x_train) // settings.batch_size)
    scheduler = warmup_cosine(optimizer, settings.epochs * steps_per_epoch, settings.warmup_epochs * steps_per_epoch)
    y_train = y_train.float()

    def train_epoch(epoch: int) -> dict[str, float]:
        total, count = 0.0, 0
        batches = minibatches(len(x_train), settings.batch_size, gen)
        for idx in tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", unit="batch", leave=False,
                        disable=steps_per_epoch < 20):
            xb = augment(x_train[idx], gen) if augment else x_train[idx]
            with autocast(bf16, device):
                logits = model(xb.to(device, non_blocking=True)).float()
            loss = F.binary_cross_entropy_with_logits(logits, y_train[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
            count += len(idx)
        return {"train_loss": total / max(count, 1), "lr": scheduler.get_last_lr()[0]}

    def validate() -> dict[str, float]:
        logits = predict_logits(model, x_val, bf16=bf16, device=device)
        yv = y_val.numpy()
        loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), y_val.float()).item()
        return {"val_loss": loss, "val_auc": auc(yv, logits), "val_acc": float(((logits > 0) == yv).mean())}

    monitor = "val_auc" if len(np.unique(y_val.numpy())) == 2 else "val_loss"
    return fit(model, epochs=settings.epochs, train_epoch=train_epoch, validate=validate if len(x_val) else None,
               monitor=monitor, patience=settings.patience, log_path=log_path, desc=desc)
