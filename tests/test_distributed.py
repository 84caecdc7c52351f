"""Two processes under torchrun (gloo on CPU) give the single-process result: DDP with sharded batches whose
gradients average to the whole batch's, sharded embedding extraction, and only rank 0 writing."""

import csv
import os
import subprocess
import sys

ARGS = ["--preset", "tiny", "--backbone", "test_convnext", "--image-size", "48", "--epochs", "2", "--seed", "1"]


def _probabilities(bundle):
    return {r["id"]: float(r["probability"]) for r in csv.DictReader(open(bundle / "validation_predictions.csv"))}


def test_two_process_ddp_matches_single_process(synth_data, tmp_path):
    # fp32 on every machine: bf16 convolutions round differently at the shard's batch size (16 vs 32), and two
    # epochs of training carry that on (0.14 in probability on an AMX machine, against 1.5e-4 in fp32), which
    # would hide a DDP mistake
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "RESPISCAN_BF16": "0"}
    single = subprocess.run([sys.executable, "-m", "respiscan", "train", str(synth_data),
                             "--out", str(tmp_path / "one"), *ARGS],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "respiscan", "train", str(synth_data), "--out", str(tmp_path / "two"), *ARGS],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = _probabilities(tmp_path / "one"), _probabilities(tmp_path / "two")
    assert one.keys() == two.keys()
    worst = max(abs(one[k] - two[k]) for k in one)
    # not bit-identical (gradients are summed in another order); a DDP mistake (unsynchronised ranks, one rank's
    # data only) costs far more
    assert worst < 5e-3, f"largest probability difference {worst:.2e}"
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith("."))


def _mlp_rank(rank: int, store: str, out: str, shard: bool) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        save_file({k: v.contiguous() for k, v in _fit_mlp(shard).items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _fit_mlp(shard: bool) -> dict:
    import torch

    from respiscan.models.mlp import TaskSpecificMLP
    from respiscan.training.loop import ClassifierFit, train_classifier

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1280, generator=gen)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = TaskSpecificMLP("xray")
    train_classifier(model, x[:64], y[:64], x[64:], y[64:], ClassifierFit(epochs=3, patience=3, batch_size=32),
                     seed=0, shard=shard)
    return model.state_dict()


def test_unsharded_mlp_stage_trains_on_every_rank_as_one_process(tmp_path):
    """shard=False (the MLP stages): each rank's model equals the single-process one exactly; sharding the
    batches instead changes it (BatchNorm sees half a batch), which is why the MLP stages do not shard."""
    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    single = _fit_mlp(shard=False)
    for shard in (False, True):
        out = tmp_path / f"mlp-{shard}"
        mp.spawn(_mlp_rank, args=(str(tmp_path / f"store-{shard}"), str(out), shard), nprocs=2)
        ranks = [load_file(f"{out}.{r}") for r in (0, 1)]
        same = all(torch.equal(ranks[r][k], single[k]) for r in (0, 1) for k in single)
        assert same is (not shard), shard
