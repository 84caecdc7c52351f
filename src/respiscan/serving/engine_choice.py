"""The fastest engine that is still correct, per modality: measured on the bundle's own graphs and images.

Which engine is fastest depends on the backbone and the CPU (onnxruntime beats torch bf16 on efficientnet_b0 and
loses on ResNets on the same machine), and bf16 can move probabilities, so `respiscan export --choose-engine`
times torch (bf16 where the CPU has it, and fp32), onnxruntime and OpenVINO (when installed) on validation images
(the bundle's splits.csv; synthetic phantoms when those files are absent), and records per modality the fastest
whose probabilities agree with torch fp32 within TOLERANCE. `serving.load(..., "auto")` runs that choice.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from respiscan.bundle import SPLITS_FILE, Bundle, EngineChoice, EngineName, EngineTrial, Precision
from respiscan.data.images import load_dataset_images
from respiscan.data.samples import Sample
from respiscan.errors import RespiscanError
from respiscan.extras import MissingExtra
from respiscan.serving.pipeline import BasePipeline, Outputs

TOLERANCE = 1e-2  # largest |p - p_torch_fp32| an engine may show on the check images (as for bf16 at training)
CHECK_IMAGES = 64  # per modality: enough to time full batches and to see bf16's drift
REPEATS = 3  # timed passes over the check images; the median counts


@dataclass(frozen=True)
class Candidate:
    engine: EngineName
    precision: Precision


@dataclass(frozen=True)
class CheckImages:
    images: dict[str, np.ndarray]  # modality -> preprocessed uint8 (N, size, size)
    description: str


def check_images(bundle: Bundle, n: int = CHECK_IMAGES) -> CheckImages:
    """Up to `n` validation images per modality from the bundle's splits.csv, or, where the data is gone,
    deterministic synthetic phantoms at the bundle's size (they still show whether two engines agree)."""
    cfg = bundle.config.preprocess
    found: dict[str, list[Sample]] = {m: [] for m in bundle.config.model.modalities}
    splits = bundle.path / SPLITS_FILE
    if splits.is_file():
        with open(splits, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                m, path = row.get("modality"), Path(row.get("path") or "")
                if row.get("split") == "val" and m in found and len(found[m]) < n and path.is_file():
                    found[m].append(Sample(row["id"], path, m, -1, "val"))
    images, described = {}, []
    for m, samples in found.items():
        arr = load_dataset_images(samples, cfg, desc=f"check {m}")[0] if samples else np.zeros((0,))
        if len(arr):
            # a small validation split is repeated up to n: timing needs full batches, agreement all images
            images[m] = np.resize(arr, (max(n, len(arr)), *arr.shape[1:]))
            described.append(f"{len(arr)} {m} validation images" + (f" (repeated to {n})" if len(arr) < n else ""))
        else:
            images[m] = _phantoms(m, cfg, n)
            described.append(f"{n} synthetic {m} phantoms (validation images not found)")
    return CheckImages(images, "; ".join(described))


def _phantoms(modality: str, cfg, n: int) -> np.ndarray:
    from respiscan.data.synth import make_image

    rng = np.random.default_rng(0)
    return np.stack([cfg.apply(make_image(modality, i % 2 == 1, cfg.size, rng)[0], modality) for i in range(n)])


def candidates(bf16: bool) -> list[Candidate]:
    """torch fp32 first: it is the reference every other engine is compared with."""
    return [Candidate("torch", "fp32"), *([Candidate("torch", "bf16")] if bf16 else []), Candidate("onnx", "fp32"),
            Candidate("openvino", "fp32")]


def open_engine(bundle: Bundle, candidate: Candidate) -> BasePipeline:
    """The pipeline of one candidate; MissingExtra or RespiscanError when it cannot run here."""
    if candidate.engine == "onnx":
        from respiscan.serving.onnx_engine import OnnxPipeline

        return OnnxPipeline(bundle)
    if candidate.engine == "openvino":
        from respiscan.serving.openvino_engine import OpenVinoPipeline

        return OpenVinoPipeline(bundle)
    from respiscan.serving.torch_engine import Pipeline

    return Pipeline(bundle, bf16=candidate.precision == "bf16")


def img_s(pipe: BasePipeline, images: np.ndarray, modality: str, repeats: int) -> float:
    """Images per second of one engine on one modality's images (median of `repeats` passes, after a warm-up
    pass for kernel selection and memory of this batch shape)."""
    pipe.outputs(images, modality)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.outputs(images, modality)
        times.append(time.perf_counter() - t0)
    return len(images) / statistics.median(times)


def choose_engines(bundle: str | Path | Bundle, check: CheckImages | None = None, *, repeats: int = REPEATS,
                   tolerance: float = TOLERANCE) -> dict[str, EngineChoice]:
    """Time every candidate on each modality's check images and pick the fastest that agrees with torch fp32."""
    from respiscan.runtime import bf16_supported

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    check = check or check_images(bundle)
    trials: dict[str, list[EngineTrial]] = {m: [] for m in check.images}
    reference: dict[str, np.ndarray] = {}
    for candidate in candidates(bf16_supported()):
        try:
            pipe = open_engine(bundle, candidate)
        except RespiscanError as e:  # a missing extra, or graphs not exported
            for m in check.images:
                trials[m].append(EngineTrial(candidate.engine, candidate.precision, "unavailable", note=str(e)))
            continue
        precision = getattr(pipe, "precision", candidate.precision)
        for m, images in check.images.items():
            p = pipe.outputs(images, m).probability
            reference.setdefault(m, p)  # torch fp32 runs first
            diff = float(np.abs(p - reference[m]).max()) if len(p) else 0.0
            speed = img_s(pipe, images, m, repeats)
            trials[m].append(EngineTrial(candidate.engine, precision, "agrees" if diff <= tolerance else "disagrees",
                                         img_s=speed, max_abs_difference=diff))
    choices = {}
    for m, tried in trials.items():
        best = max((t for t in tried if t.status == "agrees"), key=lambda t: t.img_s)
        choices[m] = EngineChoice(best.engine, best.precision, tolerance, check.description, tried)
    return choices


def record_engine_choice(bundle: str | Path, check: CheckImages | None = None) -> dict[str, EngineChoice]:
    """Measure and write the choice into config.json (the rest of the config as it was)."""
    from dataclasses import replace

    opened = Bundle.open(bundle)
    choices = choose_engines(opened, check)
    opened.save_config(replace(opened.config, engines=choices,
                               unknown={k: v for k, v in opened.config.unknown.items() if k != "engines"}))
    return choices


def describe_choice(choice: EngineChoice) -> str:
    """One line: what `auto` runs, and what each engine measured."""
    tried = "; ".join(f"{t.engine} {t.precision} " + (f"{t.img_s:.1f} img/s, max |dp| {t.max_abs_difference:.1e}"
                                                       if t.img_s is not None else t.status) for t in choice.trials)
    return f"auto runs {choice.engine} {choice.precision} ({tried})"


class PerModalityPipeline(BasePipeline):
    """Each modality on its own engine, as recorded: what `auto` loads when the choices differ by modality."""

    def __init__(self, bundle: Bundle, engines: dict[str, BasePipeline]):
        super().__init__(bundle)
        self.engines = engines

    def outputs(self, images: np.ndarray, modality: str) -> Outputs:
        self.check_modality(modality)
        return self.engines[modality].outputs(images, modality)


def load_chosen(bundle: Bundle, bf16: bool | None = None) -> BasePipeline | None:
    """The recorded choice as one pipeline, or None when it is not recorded or cannot run here (a missing
    extra, or a bf16 choice on a CPU without bf16): then `auto` falls back to its plain rule."""
    chosen = bundle.config.engines
    if not chosen or any(m not in chosen for m in bundle.config.model.modalities):
        return None
    wanted = {m: Candidate(chosen[m].engine, chosen[m].precision) for m in bundle.config.model.modalities}
    if bf16 is not None:  # an explicit precision asked for the torch engine wins over the recorded one
        wanted = {m: Candidate(c.engine, "bf16" if bf16 else "fp32") if c.engine == "torch" else c
                  for m, c in wanted.items()}
    if any(c.engine == "torch" and c.precision == "bf16" for c in wanted.values()):
        from respiscan.runtime import bf16_supported

        if not bf16_supported():
            return None
    engines: dict[Candidate, BasePipeline] = {}
    try:
        for c in dict.fromkeys(wanted.values()):
            engines[c] = open_engine(bundle, c)
    except MissingExtra:  # any other error (a tampered graph) is the bundle's, and must be seen
        return None
    if len(engines) == 1:
        return next(iter(engines.values()))
    return PerModalityPipeline(bundle, {m: engines[c] for m, c in wanted.items()})
