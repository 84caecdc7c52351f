"""respiscan's speed on this machine against the reference stack, in one run on the same images, as one table.

    python benchmarks/benchmark.py [--data ../shared/data/realdev] [--bundle BUNDLE] [--stream-bundle BUNDLE]
                                   [--peers .venv-peers/bin/python] [--quick]

Measures: matmul peak (bf16, fp32); the default preset's backbone training step against that peak; per preset
backbone, each raw engine's forward (torch fp32, torch bf16 + channels_last where the CPU has bf16, onnxruntime,
OpenVINO when installed) and respiscan's embedding including decoding + preprocessing on the fastest of them; the
reference stack (TF/Keras, benchmarks/peers.py, run in its own venv) embedding the same images and fitting the
task-specific MLP on the same embeddings; with --bundle, the engine choice, prediction latency (warm, and cold as a
new process), batch prediction from files against the fastest engine's raw rate; with --stream-bundle, the peak RSS
of streaming prediction over synthetic manifests of 10k and 100k rows. Without the peers it says so and prints no
ratio against them. --quick shrinks every measurement so the script can be checked in a few minutes; its numbers are
not the ones to publish.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported; progress bars would bury the table

import argparse
import csv
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch

from respiscan.data.images import iter_batches, load_dataset_images
from respiscan.data.samples import Sample, discover
from respiscan.models.backbone import EmbeddingNet
from respiscan.models.mlp import TaskSpecificMLP
from respiscan.runtime import autocast, bf16_supported, predict_logits
from respiscan.training.config import PRESETS, TrainConfig
from respiscan.training.loop import ClassifierFit, auc, train_classifier

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "realdev"
DEFAULT_PEERS = ROOT / ".venv-peers" / "bin" / "python"
PEERS_INSTALL = "python3 -m venv .venv-peers && .venv-peers/bin/pip install -r benchmarks/requirements-peers.txt"
REFERENCE_EPOCHS = 100  # the reference's fit(): 100 epochs at batch 32
BATCH = 32  # raw forward batch, as the reference's predict()
STREAM_ROWS = (10_000, 100_000)
FILES = 128  # images each backbone embeds from files, and the reference stack from memory


def preset_backbones() -> list[str]:
    """Every timm backbone a preset names, in preset order."""
    names: dict[str, None] = {}
    for config in PRESETS.values():
        spec = config.model
        for backbones in (spec.task_backbones, spec.shared_backbones or {}):
            names.update(dict.fromkeys(backbones.values()))
    return list(names)


class Table:
    """Rows of (stage, measurement, respiscan, compared with, ratio); ratio > 1 means respiscan is faster."""

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

    def note(self, line: str) -> None:
        self.ratios.append(f"- {line}")
        print(f"  {line}", file=sys.stderr, flush=True)

    def print(self) -> None:
        header = ("stage", "measurement", "respiscan", "compared with", "ratio")
        lines = [header, ("---",) * 5, *self.rows]
        print("\n".join("| " + " | ".join(row) + " |" for row in lines))
        if self.ratios:
            print("\nTargets and ratios (higher = respiscan faster):\n" + "\n".join(self.ratios))


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


def bench_training(table: Table, peak_gflops: float | None, bf16: bool, repeats: int) -> None:
    """The default preset's backbone stage, one step (forward, backward, AdamW; batch 32 at 224 px, bf16 autocast +
    channels_last where the CPU has bf16, as in training): its rate, and its FLOP/s as counted by torch against
    the bf16 matmul peak measured in this run (the roofline the issue asks for)."""
    from torch.utils.flop_counter import FlopCounterMode

    name = PRESETS["fast"].model.task_backbones["xray"]
    net = EmbeddingNet(name).train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3)
    images = torch.randint(0, 256, (BATCH, 224, 224), dtype=torch.uint8)
    targets = torch.randint(0, 2, (BATCH,)).float()

    def step() -> None:
        with autocast(bf16):
            logits = net(images)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    with FlopCounterMode(display=False) as counter:
        step()
    seconds = median_seconds(step, repeats, warmup=2)
    gflops = counter.get_total_flops() / seconds / 1e9
    share = f", {gflops / peak_gflops:.0%} of the bf16 matmul peak" if peak_gflops and bf16 else ""
    table.add("train", f"{name} backbone step, batch {BATCH}, 224 px, {'bf16' if bf16 else 'fp32'} (forward + "
              f"backward + AdamW; {counter.get_total_flops() / BATCH / 1e9:.1f} GFLOP an image)",
              f"{BATCH / seconds:.1f} img/s = {gflops:.0f} GFLOP/s{share}")


def pick(samples: list[Sample], n: int, split: str, modalities: tuple[str, ...] = ("xray", "ct")) -> list[Sample]:
    """n samples shared evenly by the modalities (data sets list one modality first), from `split` when it has any."""
    out = []
    for i, m in enumerate(modalities):
        group = [s for s in samples if s.modality == m]
        group = [s for s in group if s.split == split] or group
        out += group[:n // len(modalities) + (n % len(modalities) if i == 0 else 0)]
    return out


# --- raw engines of one backbone: the same embedding network (uint8 in, 1280-d out) on each runtime ---------------

class _Embed(torch.nn.Module):
    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images)


@dataclass(frozen=True)
class RawEngine:
    name: str
    run: Callable[[np.ndarray], np.ndarray]  # uint8 (N, S, S) -> embeddings, in batches of BATCH


def raw_engines(net: EmbeddingNet, work: Path, bf16: bool) -> list[RawEngine]:
    """torch fp32, torch bf16 + channels_last (with bf16 units), onnxruntime and OpenVINO (when installed) on the
    ONNX graph of the same network."""
    import onnxruntime

    engines = []

    def torch_run(use_bf16: bool) -> Callable[[np.ndarray], np.ndarray]:
        model = net.to(memory_format=torch.channels_last) if use_bf16 else net

        @torch.inference_mode()
        def run(images: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(images)
            with autocast(use_bf16):
                return torch.cat([model.embed(x[i:i + BATCH]).float() for i in range(0, len(x), BATCH)]).numpy()
        return run

    engines.append(RawEngine("torch fp32", torch_run(False)))
    if bf16:
        engines.append(RawEngine("torch bf16 + channels_last", torch_run(True)))
    path = work / "embed.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Embed(net).eval(), (torch.zeros((2, 224, 224), dtype=torch.uint8),), str(path),
                          dynamo=False, opset_version=17, input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    engines.append(RawEngine("onnxruntime fp32", lambda a: np.concatenate(
        [session.run(None, {"images": a[i:i + BATCH]})[0] for i in range(0, len(a), BATCH)])))
    try:
        import openvino
    except ImportError:
        return engines
    compiled = openvino.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    precision = "bf16" if compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16 else "fp32"
    engines.append(RawEngine(f"OpenVINO {precision}", lambda a: np.concatenate(
        [compiled(a[i:i + BATCH])[0] for i in range(0, len(a), BATCH)])))
    return engines


def bench_backbones(table: Table, samples: list[Sample], peers: dict | None, files: int, repeats: int,
                    quick: bool, work: Path) -> None:
    """Per preset backbone: every raw engine on random images, then respiscan's reader + the fastest engine on
    the same files the reference stack embeds, against the raw rate and against TF/Keras."""
    bf16 = bf16_supported()
    n_raw, reps = (8, 1) if quick else (BATCH * 2, repeats)
    chosen = pick(samples, files, "train")
    config = PRESETS["fast"].preprocess  # what the default bundle reads with: 224 px, CT cropped to the body
    random_images = np.random.default_rng(0).integers(0, 256, (n_raw, 224, 224), dtype=np.uint8)
    list(iter_batches(chosen, config))  # the files into the page cache, as for every later reader
    for name in preset_backbones():
        net = EmbeddingNet(name).eval()
        rates = {}
        engines = raw_engines(net, work, bf16)
        for engine in engines:
            rates[engine.name] = n_raw / median_seconds(lambda: engine.run(random_images), reps)
            table.add(name, f"raw {engine.name}, batch {BATCH}, random images", f"{rates[engine.name]:.1f} img/s")
        fastest = max(rates, key=rates.get)
        run = next(e for e in engines if e.name == fastest).run
        run(random_images[:BATCH])  # the same warm-up the raw measurement had

        def embed_files() -> int:
            n = 0
            for batch in iter_batches(chosen, config, 64):
                run(batch.images)
                n += len(batch.images)
            return n

        t0 = time.perf_counter()
        n = embed_files()
        rate = n / (time.perf_counter() - t0)
        table.add(name, f"respiscan embedding incl. decoding + preprocessing ({n} files, {fastest})",
                  f"{rate:.1f} img/s", f"raw {fastest} {rates[fastest]:.1f} img/s", rate / rates[fastest],
                  f"{name}: embedding incl. decoding vs the fastest raw engine (target >= 0.85)")
        keras_rate = (peers or {}).get("embed_img_s", {}).get(name)
        if keras_rate:
            table.add(name, "respiscan embedding incl. decoding vs the reference stack's embedding",
                      f"{rate:.1f} img/s", f"TF/Keras {keras_rate:.1f} img/s", rate / keras_rate,
                      f"{name}: embedding incl. decoding vs TF/Keras (target >= 2.0 for efficientnet_b0, resnet50)")
        del net


def bench_read(table: Table, samples: list[Sample], quick: bool, work: Path) -> None:
    chosen = pick(samples, 16 if quick else 512, "train")
    config = PRESETS["fast"].preprocess
    t0 = time.perf_counter()
    _, kept, _ = load_dataset_images(chosen, config, cache_dir=work, desc="read")
    read_s = time.perf_counter() - t0  # includes writing the cache, as a first training run does
    t0 = time.perf_counter()
    load_dataset_images(chosen, config, cache_dir=work, desc="read")
    cached_s = time.perf_counter() - t0
    table.add("read", f"decode + preprocess {len(kept)} images (the fast preset's: 224 px, CT body crop), threads",
              f"{len(kept) / read_s:.1f} img/s")
    table.add("read", "the same from the preprocessed-image cache", f"{len(kept) / cached_s:.1f} img/s")


# --- the reference stack (peers) -----------------------------------------------------------------------------------

def mlp_task(seed: int) -> tuple[torch.Tensor, ...]:
    """800 train / 200 validation / 2000 held-out random 1280-d embeddings with a learnable, noisy label."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, 1280, generator=gen)
    y = ((x @ torch.randn(1280, generator=gen)) / 1280**0.5 + 0.5 * torch.randn(3000, generator=gen) > 0).long()
    return x[:800], y[:800], x[800:1000], y[800:1000], x[1000:], y[1000:]


def run_peers(python: Path, work: Path, args: list[str]) -> dict:
    """benchmarks/peers.py in the peers' venv; its JSON result."""
    out = work / "peers.json"
    proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "peers.py"), *args, "--out", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the peers failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def peers_embed(python: Path, samples: list[Sample], files: int, repeats: int, work: Path) -> dict:
    """The reference stack's embedding of the images bench_backbones reads, for each backbone Keras has."""
    chosen = pick(samples, files, "train")
    images, _, _ = load_dataset_images(chosen, PRESETS["fast"].preprocess, desc="read")
    np.save(work / "images.npy", images)
    names = [b for b in preset_backbones() if b in ("efficientnet_b0", "efficientnet_b1", "resnet50", "resnetv2_50")]
    return run_peers(python, work, ["--images", str(work / "images.npy"), "--backbones", ",".join(names),
                                    "--repeats", str(repeats)])


def peers_mlp(python: Path, draws: tuple[int, ...], quick: bool, work: Path) -> dict:
    """The reference stack's Keras fit() of the task-specific MLP on the draws bench_mlp fits too."""
    arrays = {}
    for d in draws:
        for key, value in zip(("x", "y", "xv", "yv", "xt", "yt"), mlp_task(d)):
            arrays[f"{key}{d}"] = value.numpy().astype(np.float32 if key.startswith("x") else np.int64)
    np.savez(work / "mlp.npz", n_draws=len(draws), **arrays)
    return run_peers(python, work, ["--mlp", str(work / "mlp.npz"), "--epochs", "2" if quick else
                                    str(REFERENCE_EPOCHS)])["mlp_fit"]


def bench_mlp(table: Table, settings: ClassifierFit, peers: dict | None, quick: bool, draws: tuple[int, ...]) -> None:
    """The task-specific MLP trained the reference's way (100 epochs, batch 32) and respiscan's way, on the draws
    the reference stack fits too. Speed counts only at equal accuracy: validation AUC (the best of 100 epochs is an
    optimistic pick) and AUC on 2000 held-out embeddings, both averaged over the draws."""
    reference_like = ClassifierFit(epochs=REFERENCE_EPOCHS, patience=REFERENCE_EPOCHS, batch_size=32, lr=1e-3,
                                   weight_decay=1e-4)
    keras = peers
    baseline = (f"Keras fit {keras['seconds']:.1f} s ({keras['epochs']} epochs; AUC val {keras['val_auc']:.3f}, "
                f"held-out {keras['held_out_auc']:.3f})" if keras else "")
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
                  f"{mean(epochs):.0f} epochs; AUC val {mean(val_auc):.3f}, held-out {mean(test_auc):.3f} "
                  f"(mean of {len(draws)} draws)", f"{mean(seconds):.1f} s", baseline,
                  keras["seconds"] / mean(seconds) if keras else None,
                  f"task MLP fit, {label}, vs Keras fit()" if keras else None)


# --- a bundle: engine choice, latency, batch prediction, streaming -------------------------------------------------

def cold_predict(bundle: Path, case: dict[str, Path], engine: str) -> float:
    """Seconds for a new process to predict one case with `respiscan predict --engine ENGINE`."""
    cmd = [sys.executable, "-m", "respiscan", "predict", str(bundle), "--json", "--engine", engine,
           *(arg for m, path in case.items() for arg in (f"--{m}", str(path)))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"respiscan predict failed: {proc.stderr.strip()}")
    return time.perf_counter() - t0


def exported_copy(bundle: Path, work: Path, table: Table, label: str) -> Path:
    from respiscan.bundle import Bundle
    from respiscan.serving.export import export_onnx

    copy = work / label
    shutil.copytree(bundle, copy)
    if not Bundle.open(copy).has_onnx:
        t0 = time.perf_counter()
        export_onnx(copy)
        table.add("export", f"ONNX export + verification ({label}, temporary copy)",
                  f"{time.perf_counter() - t0:.1f} s")
    return copy


def bench_bundle(table: Table, bundle: Path, samples: list[Sample], quick: bool, work: Path) -> None:
    from respiscan.serving import load
    from respiscan.serving.engine_choice import describe_choice, open_engine, record_engine_choice

    bundle = exported_copy(bundle, work, table, "bundle")
    t0 = time.perf_counter()
    choices = record_engine_choice(bundle)
    table.add("export", "engine choice (`export --choose-engine`)", f"{time.perf_counter() - t0:.1f} s")
    for m, choice in choices.items():
        table.add("engine choice", f"{m}: {describe_choice(choice)}", f"{choice.engine} {choice.precision}")
    auto = load(bundle)
    modalities = tuple(auto.modalities)
    case = {s.modality: s.path for s in pick(samples, len(modalities), "test", modalities)}
    what = " + ".join({"xray": "X-ray", "ct": "CT"}[m] for m in modalities)
    repeats = 2 if quick else 10
    seconds = median_seconds(lambda: auto.predict(**case), repeats)
    table.add("predict", f"warm, one {what} case, auto engine", f"{seconds * 1000:.0f} ms")
    for engine in ("torch", "onnx"):
        runs = [cold_predict(bundle, case, engine) for _ in range(1 if quick or engine == "torch" else 5)]
        cold = statistics.median(runs)
        table.add("predict", f"cold (new process), one case, `respiscan predict --engine {engine}`", f"{cold:.2f} s",
                  "target 0.6 s" if engine == "onnx" else "")
        if engine == "onnx":
            table.note(f"cold `respiscan predict --engine onnx`: {cold:.2f} s, median of {len(runs)} "
                       f"(target < 0.6 s: {'met' if cold < 0.6 else 'not met'})")

    chosen = pick(samples, 16 if quick else 256, "test", modalities)
    groups = {m: [s for s in chosen if s.modality == m] for m in modalities}
    images = {m: load_dataset_images(g, auto.preprocess_config, desc="read")[0] for m, g in groups.items()}
    n = sum(len(a) for a in images.values())
    raw = {}
    for trial in next(iter(choices.values())).trials:
        if trial.status == "unavailable" or (trial.engine, trial.precision) in raw:
            continue
        from respiscan.serving.engine_choice import Candidate

        pipe = open_engine(auto.bundle, Candidate(trial.engine, trial.precision))
        for m, arr in images.items():
            pipe.outputs(arr[:BATCH], m)
        seconds = median_seconds(lambda: [pipe.outputs(arr, m) for m, arr in images.items()], 1 if quick else 3, 0)
        raw[(trial.engine, trial.precision)] = n / seconds
        table.add("batch predict", f"{n} preprocessed images, raw {trial.engine} {trial.precision}",
                  f"{n / seconds:.1f} img/s")
    fastest = max(raw, key=raw.get)
    auto.predict_samples(chosen[:BATCH])  # warm-up
    t0 = time.perf_counter()
    rows, _ = auto.predict_samples(chosen)
    rate = len(rows) / (time.perf_counter() - t0)
    table.add("batch predict", f"`predict --data`: {len(rows)} files incl. decoding, auto engine", f"{rate:.1f} img/s",
              f"raw {' '.join(fastest)} {raw[fastest]:.1f} img/s", rate / raw[fastest],
              "batch prediction (predict --data) vs the fastest engine's raw rate (target >= 0.85)")


def stream_rss(table: Table, bundle: Path, samples: list[Sample], quick: bool, work: Path) -> None:
    """Peak RSS of `respiscan predict --data MANIFEST` over manifests of 10k and 100k rows (hard links to a few
    images, so each row has its own id): streaming must not grow with the rows."""
    bundle = exported_copy(bundle, work, table, "stream-bundle")
    few = pick(samples, 8, "test")
    rss = {}
    for rows in (200, 2000) if quick else STREAM_ROWS:
        folder = work / f"stream-{rows}"
        (folder / "img").mkdir(parents=True)
        with open(folder / "manifest.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "modality", "label", "split"])
            for i in range(rows):
                s = few[i % len(few)]
                name = f"{i:07d}{s.path.suffix}"
                os.link(s.path, folder / "img" / name)
                w.writerow([f"img/{name}", s.modality, s.label, "test"])
        out = folder / "preds.csv"
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(folder / "rss"), sys.executable, "-m",
                               "respiscan", "predict", str(bundle), "--data", str(folder / "manifest.csv"), "--out",
                               str(out), "--engine", "onnx"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"streaming prediction failed: {proc.stderr.strip()[-2000:]}")
        seconds = time.perf_counter() - t0
        rss[rows] = int((folder / "rss").read_text().split()[-1]) / 1024
        table.add("stream predict", f"`predict --data` over a {rows:,}-row manifest: peak RSS ({rows / seconds:.0f} "
                  "img/s)", f"{rss[rows]:.0f} MiB")
        shutil.rmtree(folder)
    small, large = sorted(rss)
    table.note(f"streaming peak RSS {small:,} -> {large:,} rows: {rss[small]:.0f} -> {rss[large]:.0f} MiB "
               f"({rss[large] / rss[small]:.2f}x; target: flat)")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import onnxruntime

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        import openvino
        ov = f"OpenVINO {openvino.__version__.split('-')[0]}"
    except ImportError:
        ov = "no OpenVINO"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"timm {timm.__version__}, onnxruntime {onnxruntime.__version__}, {ov}, "
            f"bf16 {'yes' if bf16_supported() else 'no'}, load average {load}, {date.today()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data folder or manifest (default: realdev)")
    parser.add_argument("--bundle", type=Path, help="a trained bundle, for the prediction measurements")
    parser.add_argument("--stream-bundle", type=Path, help="a bundle for the streaming RSS measurement (a small one: "
                        "it predicts 110k images)")
    parser.add_argument("--peers", type=Path, default=DEFAULT_PEERS, help="python of the peers' venv")
    parser.add_argument("--files", type=int, default=FILES, help="images each backbone embeds from files")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per raw-engine measurement")
    parser.add_argument("--draws", type=int, default=1, help="embedding draws each MLP fit is averaged over")
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
    draws = tuple(range(1 if args.quick else args.draws))
    files = 16 if args.quick else args.files
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        peers = peers_embed(args.peers, samples, files, args.repeats, work) if args.peers.is_file() else None
        if peers is None:
            table.note(f"the reference stack is not installed ({args.peers} missing): no ratio against it; "
                       f"install it with `{PEERS_INSTALL}`")
        else:
            table.note("reference stack measured in this run: TensorFlow {tensorflow}, Keras {keras}".format(
                **peers["versions"]))
        # without bf16 units a bf16 matmul is emulated: minutes to learn nothing
        peak: dict[str, float] = {}
        for dtype, label in ((torch.bfloat16, "bf16"),) * bf16_supported() + ((torch.float32, "fp32"),):
            n = 1024 if args.quick else 4096
            peak[label] = matmul_gflops(dtype, n, 2 if args.quick else 5)
            table.add("matmul", f"{label} {n}x{n} GFLOP/s", f"{peak[label]:.0f}")
        bench_training(table, peak.get("bf16"), bf16_supported(), 2 if args.quick else args.repeats)
        bench_read(table, samples, args.quick, work)
        bench_backbones(table, samples, peers, files, args.repeats, args.quick, work)
        if args.bundle:
            bench_bundle(table, args.bundle, samples, args.quick, work)
        if args.stream_bundle:
            stream_rss(table, args.stream_bundle, discover(training_data(args.stream_bundle) or args.data),
                       args.quick, work)
        keras_fit = peers_mlp(args.peers, draws, args.quick, work) if peers is not None else None
        bench_mlp(table, settings, keras_fit, args.quick, draws)
    print(f"\nrespiscan benchmark{' (--quick: not for publishing)' if args.quick else ''}, data {args.data}"
          f"{f', bundle {args.bundle}' if args.bundle else ''}\n{machine()}\n")
    table.print()


def training_data(bundle: Path) -> Path | None:
    """The data folder a bundle was trained on, when it is still there (its images fit the bundle's size)."""
    from respiscan.bundle import Bundle

    paths = Bundle.open(bundle).config.data.paths or [Bundle.open(bundle).config.data.path]
    return Path(paths[0]) if paths and Path(paths[0]).exists() else None


if __name__ == "__main__":
    main()
