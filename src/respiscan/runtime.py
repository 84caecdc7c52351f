"""Where and how tensors run, for training and serving alike: device choice, bf16 autocast, batched forward.

It sits below `training/` and `serving/`, so that prediction never imports the training loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from respiscan.errors import RespiscanError
from respiscan.utils import atomic_write

BF16_TOLERANCE = 1e-2  # largest |p_bf16 - p_fp32| for which prediction may run in bf16


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """bf16 autocast pays off where the hardware has bf16 matrix units (AVX512-BF16/AMX on CPU, CUDA).
    RESPISCAN_BF16=0 turns it off for training and the torch engine: fp32 numbers that do not depend on whether
    a machine has such units (OpenVINO chooses its own precision; `export --choose-engine` checks it)."""
    if os.environ.get("RESPISCAN_BF16", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if enabled else nullcontext()


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', or 'auto' (CUDA when present); asking for a missing GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise RespiscanError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RespiscanError(f"device {name!r} was asked for but this machine has no such CUDA device; "
                             "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise RespiscanError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None,
                weights: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Index batches; shuffled when a generator is given. A last batch of one is dropped (BatchNorm).

    With `weights` (and a generator), an epoch is n indices drawn with replacement in proportion to them:
    balanced sampling, same number of batches."""
    if weights is not None and generator is not None:
        order = torch.multinomial(weights.double(), n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        if generator is not None and len(idx) < 2:
            continue
        yield idx


def batches_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `minibatches(n, batch_size, generator)` yields: an lr schedule must span exactly these."""
    return sum(1 for start in range(0, n, batch_size) if min(batch_size, n - start) >= 2)


def tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes; tensors detached and copied to contiguous CPU memory, as safetensors needs."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file, written atomically: an interrupted run leaves the previous file, never half a new one."""
    with atomic_write(path, "wb") as f:
        f.write(tensor_bytes(tensors, metadata))
    return Path(path)


@torch.no_grad()
def predict_logits(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256,
                   bf16: bool = False, device: torch.device | str = "cpu") -> np.ndarray:
    """Batched logits on `device`, returned as a CPU float32 array."""
    out = []
    for idx in minibatches(len(x), batch_size):
        with autocast(bf16, device):
            out.append(fn(x[idx].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def bf16_difference(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    device: torch.device | str = "cpu") -> float:
    """Largest difference of the probabilities sigmoid(fn(x)) between bf16 autocast and fp32: bf16 is only
    worth its speed where it does not move the probabilities a reader sees."""
    p = [torch.sigmoid(torch.from_numpy(predict_logits(fn, x, 32, bf16, device)).double()) for bf16 in (True, False)]
    return float((p[0] - p[1]).abs().max()) if len(x) else 0.0


