"""The training loop's pieces: the warm-up + cosine schedule, its exact resume, the batch count it spans."""

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from respiscan.runtime import batches_per_epoch, minibatches, save_tensors
from respiscan.training.loop import EpochCheckpoint, warmup_cosine


def _formula(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _steps(model: nn.Module, optimizer, scheduler, n: int, seed: int) -> list[float]:
    """Train `n` steps on random data; the lr each step ran at."""
    data = torch.Generator().manual_seed(seed)
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        loss = model(torch.randn(8, 3, generator=data)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("total, warmup", [(40, 5), (12, 1), (6, 6), (20, 0), (1, 1)])
def test_warmup_cosine_follows_the_formula(total, warmup):
    model = nn.Linear(3, 1)
    optimizer = _optimizer(model)
    lrs = _steps(model, optimizer, warmup_cosine(optimizer, total, warmup), total, seed=0)
    assert lrs == pytest.approx([0.01 * _formula(s, total, warmup) for s in range(total)], rel=1e-9, abs=1e-15)


def test_scheduler_resumes_exactly_from_an_epoch_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = _optimizer(model)
    scheduler = warmup_cosine(optimizer, 30, 4)
    generator = torch.Generator().manual_seed(1)
    _steps(model, optimizer, scheduler, 7, seed=2)  # stops inside the cosine part
    checkpoint = EpochCheckpoint(tmp_path / "epoch.safetensors", optimizer, scheduler, generator)
    checkpoint.save(model, 1, [{"epoch": 1}], 1, (0.5, 0.0), None)
    expected = _steps(model, optimizer, scheduler, 23, seed=3)

    resumed = nn.Linear(3, 1)
    optimizer = _optimizer(resumed)
    scheduler = warmup_cosine(optimizer, 30, 4)
    checkpoint = EpochCheckpoint(tmp_path / "epoch.safetensors", optimizer, scheduler, torch.Generator())
    assert checkpoint.load(resumed)[0] == 1
    assert _steps(resumed, optimizer, scheduler, 23, seed=3) == expected
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


@pytest.mark.parametrize("batch_size", [1, 2, 8, 32])
def test_batches_per_epoch_counts_what_minibatches_yields(batch_size):
    for n in range(70):
        assert batches_per_epoch(n, batch_size) == len(list(minibatches(n, batch_size, torch.Generator())))


def test_save_tensors_writes_contiguous_cpu_copies_with_metadata(tmp_path):
    weight = torch.arange(12.0).reshape(3, 4).requires_grad_()
    path = save_tensors(tmp_path / "t.safetensors", {"w": weight, "wt": weight.t()}, metadata={"note": "x"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "x"}
        assert torch.equal(f.get_tensor("wt"), weight.detach().t())
    with pytest.raises(AttributeError):  # fails before the file is touched: the previous one stays whole
        save_tensors(path, {"w": "not a tensor"})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"w", "wt"}
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
