"""respiscan's speed on this machine, in one run on the same images, printed as one Markdown table.

    python benchmarks/benchmark.py [--data ../shared/data/realdev] [--bundle BUNDLE] [--quick]

Measures: matmul peak (bf16, fp32); per default backbone, raw timm forward (fp32; bf16 + channels_last) and
respiscan's embedding including reading + preprocessing, against the reference's TF/Keras numbers; the MLP stage's
training time against the reference's Keras fit; and, with --bundle, prediction latency (warm, and cold as a new
process), batch throughput and bf16/ONNX agreement for the torch and ONNX engines. A bundle without ONNX graphs is
exported into a temporary copy. --quick shrinks every measurement so the script can be checked in about a minute;
its numbers are not the ones to publish.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported; progress bars would bury the table

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import timm
import torch

from respiscan.data.images import load_dataset_images
from respiscan.data.preprocess import PreprocessConfig
from respiscan.data.samples import Sample, discover
from respiscan.models.backbone import EmbeddingNet
from respiscan.models.mlp import TaskSpecificMLP
from respiscan.runtime import autocast, bf16_supported, predict_logits
from respiscan.training.config import TrainConfig
from respiscan.training.loop import ClassifierFit, auc, train_classifier
from respiscan.training.stages import embed_images

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "realdev"
BACKBONES = ("resnet18", "efficientnet_b0", "resnet50")
# the reference's TF/Keras stack on this machine (DESIGN.md): forward img/s at 224 px, and the task-specific
# MLP's Keras fit (800 X-ray embeddings, 100 epochs, batch 32)
REFERENCE_IMG_S = {"efficientnet_b0": 61.6, "resnet50": 24.7}
REFERENCE_MLP_FIT_S, REFERENCE_MLP_EPOCHS = 57.6, 100


class Table:
    """Rows of (stage, measurement, respiscan, baseline, ratio); ratio > 1 means respiscan is faster."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.ratios: list[str] = []

    def add(self, stage: str, what: str, value: str, baseline: str = "", ratio: float | None = None,
            summary: str | None = None) -> None:
        shown = "" if ratio is None else f"**{ratio:.2f}x**"
        self.rows.append((stage, what, value, baseline, shown))
        print(f"  {stage}: {what}: {value} {baseline} {shown}".rstrip(), file=sys.stderr, flush=True)
        if summary and ratio is not None:
            self.ratios.append(f"- {summary}: **{ratio:.2f}x**")

    def print(self) -> None:
        header = ("stage", "measurement", "respiscan", "baseline", "ratio")
        lines = [header, ("---",) * 5, *self.rows]
        print("\n".join("| " + " | ".join(row) + " |" for row in lines))
        if self.ratios:
            print("\nRatios (higher = respiscan faster):\n" + "\n".join(self.ratios))


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats) / 1e9


@torch.inference_mode()
def raw_forward_img_s(name: str, batch: int, repeats: int, bf16: bool) -> float:
    """Plain timm forward at 224 px, one channel, no classifier: the ceiling for respiscan's embedding."""
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=0).eval()
    x = torch.randn(batch, 1, 224, 224)
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with autocast(bf16):
            model(x)

    return batch / median_seconds(run, repeats)


def pick(samples: list[Sample], n: int, split: str, modalities: tuple[str, ...] = ("xray", "ct")) -> list[Sample]:
    """n samples shared evenly by the modalities (data sets list one modality first), from `split` when it has any."""
    out = []
    for i, m in enumerate(modalities):
        group = [s for s in samples if s.modality == m]
        group = [s for s in group if s.split == split] or group
        out += group[:n // len(modalities) + (n % len(modalities) if i == 0 else 0)]
    return out


def bench_compute(table: Table, samples: list[Sample], quick: bool, bf16: bool, work: Path) -> None:
    n = 1024 if quick else 4096
    reps = 2 if quick else 5
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        table.add("matmul", f"{label} {n}x{n} GFLOP/s", f"{matmul_gflops(dtype, n, reps):.0f}")

    batch, reps = (8, 1) if quick else (32, 3)
    chosen = pick(samples, 16 if quick else 512, "train")
    config = PreprocessConfig(size=224)
    t0 = time.perf_counter()
    images, kept, _ = load_dataset_images(chosen, config, cache_dir=work, desc="read")
    read_s = time.perf_counter() - t0  # includes writing the cache, as a first training run does
    t0 = time.perf_counter()
    load_dataset_images(chosen, config, cache_dir=work, desc="read")
    cached_s = time.perf_counter() - t0
    table.add("read", f"decode + preprocess {len(kept)} images (224 px), threads", f"{len(kept) / read_s:.1f} img/s")
    table.add("read", "the same from the preprocessed-image cache", f"{len(kept) / cached_s:.1f} img/s")
    tensor = torch.from_numpy(images)
    for name in BACKBONES:
        fp32 = raw_forward_img_s(name, batch, reps, bf16=False)
        fast = raw_forward_img_s(name, batch, reps, bf16=bf16)
        ref = REFERENCE_IMG_S.get(name)
        table.add(name, f"raw timm fp32, batch {batch}", f"{fp32:.1f} img/s")
        table.add(name, f"raw timm {'bf16 + channels_last' if bf16 else 'fp32 (no bf16 here)'}, batch {batch}",
                  f"{fast:.1f} img/s", f"TF/Keras {ref} img/s" if ref else "", fast / ref if ref else None,
                  f"{name} forward vs TF/Keras" if ref else None)
        net = EmbeddingNet(name).eval()
        embed_images(net, tensor[:64], bf16)  # one-time oneDNN set-up for the batch shape, as the raw warm-up
        t0 = time.perf_counter()
        embed_images(net, tensor, bf16)
        embed_s = time.perf_counter() - t0
        end_to_end = len(kept) / (read_s + embed_s)
        table.add(name, "respiscan embedding incl. decoding + preprocessing", f"{end_to_end:.1f} img/s",
                  f"raw {fast:.1f} img/s", end_to_end / fast, f"{name} embedding incl. decoding vs own raw forward")
        from_cache = len(kept) / (cached_s + embed_s)
        table.add(name, "respiscan embedding from the cache", f"{from_cache:.1f} img/s", f"raw {fast:.1f} img/s",
                  from_cache / fast, f"{name} embedding from the cache vs own raw forward")
        if ref:
            table.add(name, "respiscan embedding incl. decoding", f"{end_to_end:.1f} img/s", f"TF/Keras {ref} img/s",
                      end_to_end / ref, f"{name} embedding incl. decoding vs TF/Keras forward")
        del net


def mlp_task(seed: int) -> tuple[torch.Tensor, ...]:
    """800 train / 200 validation / 2000 held-out random 1280-d embeddings with a learnable, noisy label."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, 1280, generator=gen)
    y = ((x @ torch.randn(1280, generator=gen)) / 1280**0.5 + 0.5 * torch.randn(3000, generator=gen) > 0).long()
    return x[:800], y[:800], x[800:1000], y[800:1000], x[1000:], y[1000:]


def bench_mlp(table: Table, settings: ClassifierFit, quick: bool) -> None:
    """The task-specific MLP trained the reference's way (100 epochs, batch 32) and respiscan's way (fp32, as the
    trainer does), on the same draws. Speed counts only at equal accuracy: validation AUC (the issue's yardstick; the
    best of 100 epochs is an optimistic pick) and AUC on 2000 held-out embeddings, both averaged over the draws."""
    reference_like = ClassifierFit(epochs=REFERENCE_MLP_EPOCHS, patience=REFERENCE_MLP_EPOCHS, batch_size=32, lr=1e-3,
                                   weight_decay=1e-4)
    draws = (0,) if quick else (0, 1, 2)
    for label, fit_settings in (("reference settings", reference_like), ("respiscan settings", settings)):
        if quick:
            fit_settings = replace(fit_settings, epochs=2, patience=2)
        seconds, epochs, val_auc, test_auc = [], [], [], []
        for draw in draws:
            x, y, xv, yv, xt, yt = mlp_task(draw)
            torch.manual_seed(0)
            model = TaskSpecificMLP("xray")
            t0 = time.perf_counter()
            result = train_classifier(model, x, y, xv, yv, fit_settings, seed=0, desc="mlp")
            seconds.append(time.perf_counter() - t0)
            epochs.append(len(result.history))
            val_auc.append(result.best.get("val_auc", float("nan")))
            test_auc.append(auc(yt.numpy(), predict_logits(model, xt)))
        mean = statistics.fmean
        table.add("task MLP fit", f"{label}: batch {fit_settings.batch_size}, lr {fit_settings.lr:g}, "
                  f"{mean(epochs):.0f} epochs; AUC val {mean(val_auc):.3f}, "
                  f"held-out {mean(test_auc):.3f} (mean of {len(draws)} draws)", f"{mean(seconds):.1f} s",
                  f"Keras {REFERENCE_MLP_FIT_S} s (100 epochs)", REFERENCE_MLP_FIT_S / mean(seconds),
                  f"task MLP fit, {label}, vs Keras fit()")


def cold_predict(bundle: Path, case: dict[str, Path], engine: str) -> tuple[float, str]:
    """Seconds for a new process to predict one case: `respiscan predict --engine ...`, else an equivalent."""
    cli = [sys.executable, "-m", "respiscan", "predict", str(bundle), "--json",
           *(arg for m, path in case.items() for arg in (f"--{m}", str(path)))]
    t0 = time.perf_counter()
    proc = subprocess.run([*cli, "--engine", engine], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return seconds, f"`respiscan predict --engine {engine}`"
    if "--engine" not in proc.stderr:
        raise RuntimeError(f"respiscan predict failed: {proc.stderr.strip()}")
    if engine == "torch":  # before --engine existed, predict was the torch engine
        command, how = cli, "`respiscan predict`"
    else:
        kwargs = {m: str(path) for m, path in case.items()}
        code = (f"from respiscan.serving.onnx_engine import OnnxPipeline; "
                f"print(OnnxPipeline({str(bundle)!r}).predict(**{kwargs!r}))")
        command, how = [sys.executable, "-c", code], "`python -c` with OnnxPipeline (no --engine yet)"
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cold prediction failed: {proc.stderr.strip()}")
    return time.perf_counter() - t0, how


def bench_bundle(table: Table, bundle: Path, samples: list[Sample], quick: bool, work: Path) -> None:
    from respiscan.bundle import Bundle
    from respiscan.serving.export import export_onnx
    from respiscan.serving.onnx_engine import OnnxPipeline
    from respiscan.serving.torch_engine import Pipeline

    if not Bundle.open(bundle).has_onnx:
        copy = work / "bundle"
        shutil.copytree(bundle, copy)
        t0 = time.perf_counter()
        export_onnx(copy)
        table.add("export", "ONNX export + verification (temporary copy)", f"{time.perf_counter() - t0:.1f} s")
        bundle = copy
    bf16 = bf16_supported()
    engines = {"torch bf16" if bf16 else "torch fp32": Pipeline(bundle, bf16=bf16), "onnx fp32": OnnxPipeline(bundle)}
    modalities = tuple(engines["onnx fp32"].modalities)
    case = {s.modality: s.path for s in pick(samples, len(modalities), "test", modalities)}
    what = " + ".join({"xray": "X-ray", "ct": "CT"}[m] for m in modalities)
    repeats = 2 if quick else 10
    for name, pipe in engines.items():
        seconds = median_seconds(lambda: pipe.predict(**case), repeats)
        table.add("predict", f"warm, one {what} case, {name}", f"{seconds * 1000:.0f} ms")
    cold = {}
    for engine in ("torch", "onnx"):
        runs = [cold_predict(bundle, case, engine) for _ in range(1 if quick else 3)]
        cold[engine] = statistics.median(s for s, _ in runs)
        table.add("predict", f"cold (new process), one case, {runs[0][1]}", f"{cold[engine]:.2f} s")
    table.add("predict", "cold, ONNX vs torch", f"{cold['onnx']:.2f} s", f"torch {cold['torch']:.2f} s",
              cold["torch"] / cold["onnx"], "cold one-case prediction, ONNX vs torch engine")

    chosen = pick(samples, 16 if quick else 256, "test", modalities)
    images = {m: load_dataset_images([s for s in chosen if s.modality == m], engines["onnx fp32"].preprocess_config,
                                     desc="read")[0] for m in modalities}
    n = sum(len(a) for a in images.values())
    engines["torch fp32"] = Pipeline(bundle, bf16=False)
    probabilities, speed = {}, {}
    for name, pipe in engines.items():
        for m, arr in images.items():
            pipe.probabilities(arr[:2], m)
        t0 = time.perf_counter()
        probabilities[name] = np.concatenate([pipe.probabilities(arr, m) for m, arr in images.items()])
        speed[name] = n / (time.perf_counter() - t0)
        table.add("batch predict", f"{n} preprocessed images, {name}", f"{speed[name]:.1f} img/s")
    table.add("batch predict", "ONNX vs torch fp32", f"{speed['onnx fp32']:.1f} img/s",
              f"torch fp32 {speed['torch fp32']:.1f} img/s", speed["onnx fp32"] / speed["torch fp32"],
              "batch prediction, ONNX vs torch fp32")
    if "torch bf16" in engines:
        table.add("batch predict", "ONNX vs torch bf16", f"{speed['onnx fp32']:.1f} img/s",
                  f"torch bf16 {speed['torch bf16']:.1f} img/s", speed["onnx fp32"] / speed["torch bf16"],
                  "batch prediction, ONNX vs torch bf16")
        diff = np.abs(probabilities["torch bf16"] - probabilities["torch fp32"]).max()
        table.add("agreement", "max abs difference of p(COVID), torch bf16 vs fp32", f"{diff:.2e}")
        check = engines["onnx fp32"].config.bf16_check
        if check:
            table.add("agreement", "the bundle's own bf16 check (validation split, at training) -> torch engine "
                      f"default {check.prediction_default}", f"{check.max_abs_difference:.2e}",
                      f"tolerance {check.tolerance:g}")
    diff = np.abs(probabilities["onnx fp32"] - probabilities["torch fp32"]).max()
    table.add("agreement", "max abs difference of p(COVID), ONNX vs torch fp32", f"{diff:.2e}")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"onnxruntime {onnxruntime.__version__}, bf16 {'yes' if bf16_supported() else 'no'}, load average {load}")


def bench_training(table: Table, bundle: Path) -> None:
    """The bundle's own record of its training: total wall time and each stage's epochs and seconds."""
    import csv

    from respiscan.bundle import Bundle

    recorded = Bundle.open(bundle).config.train_seconds
    table.add("training", "whole training of this bundle (recorded in config.json)",
              "not recorded" if recorded is None else f"{recorded / 60:.1f} min")
    for log in sorted((bundle / "logs").glob("*.csv")):
        rows = list(csv.DictReader(open(log)))
        seconds = sum(float(r["seconds"]) for r in rows)
        table.add("training", f"stage {log.stem}", f"{len(rows)} epochs, {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data folder or manifest (default: realdev)")
    parser.add_argument("--bundle", type=Path, help="a trained bundle, for the prediction measurements")
    parser.add_argument("--quick", action="store_true", help="few images and iterations: checks the script runs")
    args = parser.parse_args()

    samples = discover(args.data)
    settings = TrainConfig().mlp_fit
    if args.bundle:
        from respiscan.bundle import Bundle

        settings = TrainConfig.from_dict(Bundle.open(args.bundle).config.training).mlp_fit
    print(f"machine at start: {machine()}", file=sys.stderr)
    table = Table()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        bench_compute(table, samples, args.quick, bf16_supported(), Path(work))
    bench_mlp(table, settings, args.quick)
    if args.bundle:
        bench_training(table, args.bundle)
        with tempfile.TemporaryDirectory() as work:
            bench_bundle(table, args.bundle, samples, args.quick, Path(work))
    print(f"\nrespiscan benchmark{' (--quick: not for publishing)' if args.quick else ''}, data {args.data}"
          f"{f', bundle {args.bundle}' if args.bundle else ''}\n{machine()}\n")
    table.print()


if __name__ == "__main__":
    main()
