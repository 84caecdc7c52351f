"""Several processes (GPUs or nodes) under `torchrun`: DistributedDataParallel for the backbone stage, sharded
embedding extraction, and only rank 0 writing files. Without torchrun every function is a no-op."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str) -> str:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def quiet() -> dict:
    """tqdm keyword arguments: progress bars on rank 0 only."""
    return {} if is_main() else {"disable": True}


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of a batch (every rank sees the same batch, so augmentation stays in step)."""
    return indices[rank()::world()]


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows computed by every rank for `shard(arange(n))`, put back in their original order."""
    if not active():
        return local
    parts: list = [None] * world()
    dist.all_gather_object(parts, local.cpu())
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere, so every rank validates (and stops) alike."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
