"""Train the whole pipeline, stage by stage, and write a bundle.

Stages: embedding model(s) per modality -> embeddings -> task-specific MLP per modality -> shared MLP (one of
the shared-feature kinds) over both modalities -> head per modality -> thresholds on validation -> bundle.
Each finished stage is saved atomically under `OUT/.stages/`, so `resume=True` continues from the last
finished one. The test split is never loaded here.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from respiscan.bundle import LOGS, SPLITS_FILE, save_bundle
from respiscan.data.audit import audit, check_strict
from respiscan.data.images import load_dataset_images
from respiscan.data.samples import (
    CLASS_NAMES,
    MODALITIES,
    DataPaths,
    Sample,
    carve_validation,
    check_trainable,
    count_by_source,
    data_paths,
    describe,
    discover,
    fingerprint,
    write_manifest,
)
from respiscan.errors import RespiscanError
from respiscan.metrics import binary_metrics, choose_threshold
from respiscan.models.network import MMTLNet
from respiscan.runtime import BF16_TOLERANCE, bf16_difference, bf16_supported, predict_logits, resolve_device
from respiscan.training import distributed
from respiscan.training.config import TrainConfig, preset
from respiscan.training.loop import train_classifier
from respiscan.training.shared import SHARED_FITS, SharedData, log_names
from respiscan.training.stages import embed_images, train_embedder
from respiscan.training.store import StageStore
from respiscan.utils import package_versions, seed_everything, write_json, write_rows

FIT_SPLITS = ("train", "val")  # what training reads; test is never loaded here
XRAY = MODALITIES[0]
Split = tuple[torch.Tensor, torch.Tensor]  # images or features, labels


@dataclass
class FitData:
    """What training sees: every sample (test included, for the record), the train/val ones that were read,
    and per (modality, split) the preprocessed images and labels."""

    samples: list[Sample]
    fit_samples: list[Sample]
    images: dict[tuple[str, str], Split]
    skipped: list[tuple[str, str]]
    audit: dict
    fingerprint: dict

    def labels(self, modality: str, split: str) -> torch.Tensor:
        return self.images[modality, split][1]


@dataclass
class Validation:
    """The operating thresholds and metrics chosen on the validation split, and its predictions."""

    thresholds: dict[str, float]
    metrics: dict[str, dict]
    rows: list[dict]


def fit_samples_of(data: DataPaths, cfg: TrainConfig, samples: list[Sample] | None = None) -> list[Sample]:
    """Every sample (discovered unless given), with the validation split carved from train by group."""
    samples = carve_validation(discover(data) if samples is None else samples, cfg.val_fraction, cfg.seed)
    check_trainable(samples, describe(data))
    return samples


def prepare_data(samples: list[Sample], cfg: TrainConfig, *, strict: bool, cache_dir: Path | None,
                 where: str) -> FitData:
    """Audit, then read + preprocess the train and validation images of the model's modalities."""
    found = audit(samples, progress=distributed.is_main())
    for warning in found["warnings"] if distributed.is_main() else []:
        print(f"audit: {warning}")
    if strict:
        check_strict(found)
    fit_samples = [s for s in samples if s.split in FIT_SPLITS]
    images, fit_samples, skipped = load_dataset_images(fit_samples, cfg.preprocess, strict=strict, cache_dir=cache_dir)
    for _, reason in skipped:
        print(f"warning: skipped {reason}")
    check_trainable(fit_samples, where)
    splits = {}
    for m in cfg.model.modalities:
        for sp in FIT_SPLITS:
            idx = [i for i, s in enumerate(fit_samples) if s.modality == m and s.split == sp]
            splits[m, sp] = (torch.from_numpy(images[idx]),
                             torch.tensor([fit_samples[i].label for i in idx], dtype=torch.float32))
    return FitData(samples, fit_samples, splits, skipped, found, fingerprint(samples))


def stage_keys(store: StageStore, net: MMTLNet, cfg: TrainConfig, data: FitData) -> dict[str, str]:
    """Each stage's key hashes everything it depends on: data, seed, its settings and the earlier stages'."""
    base = (data.fingerprint["samples_sha256"], cfg.seed, cfg.val_fraction, cfg.preprocess.to_dict(),
            str(cfg.pretrained), cfg.augment, cfg.backbone_fit.to_dict())
    keys = {name: store.key(name, base, e.backbone.default_cfg.get("architecture"))
            for name, e in net.embedders.items()}
    mlp = (dict(keys), cfg.mlp_fit.to_dict())
    keys.update({f"task_mlp_{m}": store.key(f"task_mlp_{m}", mlp) for m in cfg.model.modalities})
    shared_settings = (mlp, cfg.model.shared, cfg.adversarial_epochs, cfg.adversarial_finetune)
    keys["shared"] = store.key(f"shared_{cfg.model.shared}", shared_settings)
    keys.update({f"head_{m}": store.key(f"head_{m}", shared_settings) for m in cfg.model.modalities})
    return keys


def train_embedders(net: MMTLNet, cfg: TrainConfig, data: FitData, store: StageStore, keys: dict[str, str],
                    logs: Path, bf16: bool) -> dict[tuple[str, str], torch.Tensor]:
    """Stage 1: each embedding model, then the embeddings it gives (kept: the later stages train on these)."""
    emb: dict[tuple[str, str], torch.Tensor] = {}
    for key, embedder in net.embedders.items():
        modality = key.split("_", 1)[1]
        stage_log = logs / f"embedding_{key}.csv"
        if not store.load_module(keys[key], embedder, stage_log):
            train_embedder(embedder, data.images[modality, "train"], data.images[modality, "val"], cfg.backbone_fit,
                           frozen=cfg.pretrained is not False, augment=cfg.augment, bf16=bf16, seed=cfg.seed,
                           log_path=stage_log, checkpoint_path=store.epoch_checkpoint(keys[key]),
                           desc=f"embedding model {key} ({embedder.backbone.default_cfg.get('architecture', '')})")
            store.save_module(keys[key], embedder, stage_log)
            store.epoch_checkpoint(keys[key]).unlink(missing_ok=True)
        cached = store.load_tensors(f"embeddings_{keys[key]}")
        if cached is None:
            cached = {sp: embed_images(embedder, data.images[modality, sp][0], bf16, desc=f"embed {key} {sp}")
                      for sp in FIT_SPLITS}
            store.save_tensors(f"embeddings_{keys[key]}", cached)
        for sp, tensor in cached.items():
            if not torch.isfinite(tensor).all():
                raise RespiscanError(f"{store.folder}: {key} embeddings ({sp}) contain NaN or inf "
                                     "(diverged training or a damaged stage file); train again without --resume")
            emb[key, sp] = tensor
    return emb


def _shared_input(net: MMTLNet, modality: str) -> str:
    """The embedding the shared MLP reads for a modality: its own shared embedder's, else the task one's."""
    return f"shared_{modality}" if f"shared_{modality}" in net.embedders else f"task_{modality}"


def train_task_mlps(net: MMTLNet, cfg: TrainConfig, data: FitData, emb: dict, store: StageStore,
                    keys: dict[str, str], logs: Path) -> None:
    """Stage 2: the task-specific MLP of each modality, on its own embeddings."""
    for m in cfg.model.modalities:
        stage_log = logs / f"task_mlp_{m}.csv"
        if not store.load_module(keys[f"task_mlp_{m}"], net.task[m], stage_log):
            train_classifier(net.task[m], emb[f"task_{m}", "train"], data.labels(m, "train"), emb[f"task_{m}", "val"],
                             data.labels(m, "val"), cfg.mlp_fit, seed=cfg.seed, log_path=stage_log, shard=False,
                             desc=f"task-specific MLP {m}")
            store.save_module(keys[f"task_mlp_{m}"], net.task[m], stage_log)


def train_shared(net: MMTLNet, cfg: TrainConfig, data: FitData, emb: dict, store: StageStore,
                 keys: dict[str, str], logs: Path) -> None:
    """Stage 3: the shared MLP over both modalities' embeddings, trained as its kind says (training/shared.py)."""
    if net.shared is None:
        return
    stage_logs = [logs / f"{name}.csv" for name in log_names(cfg.model.shared)]
    if store.load_module(keys["shared"], net.shared, *stage_logs):
        return
    modalities = cfg.model.modalities
    pooled = {sp: SharedData(
        embeddings=torch.cat([emb[_shared_input(net, m), sp] for m in modalities]),
        covid=torch.cat([data.labels(m, sp) for m in modalities]),
        modality=torch.cat([torch.full((len(data.labels(m, sp)),), float(m == XRAY)) for m in modalities]))
        for sp in FIT_SPLITS}
    SHARED_FITS[cfg.model.shared](net.shared, pooled["train"], pooled["val"], cfg, stage_logs)
    store.save_module(keys["shared"], net.shared, *stage_logs)


def train_heads(net: MMTLNet, cfg: TrainConfig, data: FitData, emb: dict, store: StageStore, keys: dict[str, str],
                logs: Path, device: torch.device) -> dict[tuple[str, str], torch.Tensor]:
    """Stage 4: a head per modality on [task-specific ; shared] features; returns those features."""
    net.eval()
    head_x: dict[tuple[str, str], torch.Tensor] = {}
    for m in cfg.model.modalities:
        for sp in FIT_SPLITS:
            with torch.no_grad():
                head_x[m, sp] = net.head_features(m, emb[f"task_{m}", sp].to(device),
                                                  emb[_shared_input(net, m), sp].to(device)).cpu()
        stage_log = logs / f"head_{m}.csv"
        if not store.load_module(keys[f"head_{m}"], net.heads[m], stage_log):
            train_classifier(net.heads[m], head_x[m, "train"], data.labels(m, "train"), head_x[m, "val"],
                             data.labels(m, "val"), cfg.mlp_fit, seed=cfg.seed, log_path=stage_log, desc=f"head {m}",
                             shard=False)
            store.save_module(keys[f"head_{m}"], net.heads[m], stage_log)
    net.eval()
    return head_x


def choose_thresholds(net: MMTLNet, cfg: TrainConfig, data: FitData, head_x: dict,
                      device: torch.device) -> Validation:
    """Operating thresholds (Youden) and metrics on the validation split; never the test split."""
    thresholds, metrics, rows = {}, {}, []
    for m in cfg.model.modalities:
        y = data.labels(m, "val").numpy()
        p = expit(predict_logits(net.heads[m], head_x[m, "val"], device=device).astype(np.float64))
        thresholds[m] = float(choose_threshold(y, p)) if len(np.unique(y)) == 2 else 0.5
        metrics[m] = binary_metrics(y, p, thresholds[m])
        ids = [s.id for s in data.fit_samples if s.modality == m and s.split == "val"]
        rows += [{"id": i, "modality": m, "label": CLASS_NAMES[int(t)], "probability": float(q)}
                 for i, t, q in zip(ids, y, p)]
    thresholds["fused"] = 0.5
    return Validation(thresholds, metrics, rows)


def check_bf16(net: MMTLNet, cfg: TrainConfig, data: FitData, device: torch.device) -> dict | None:
    """How far bf16 moves the validation probabilities: prediction may use bf16 only within BF16_TOLERANCE."""
    diff = max(bf16_difference(lambda x, m=m: net(x, m), data.images[m, "val"][0], device)
               for m in cfg.model.modalities)
    return {"max_abs_difference": diff, "tolerance": BF16_TOLERANCE, "images": "validation split",
            "prediction_default": "bf16" if diff <= BF16_TOLERANCE else "fp32"}


def write_bundle(out: Path, net: MMTLNet, cfg: TrainConfig, data_path: DataPaths, data: FitData,
                 validation: Validation, bf16_check: dict | None, seconds: float) -> Path:
    """The bundle: weights + config, then metrics.json, validation predictions and the split of every image."""
    counts = Counter(f"{s.modality}/{s.split}/{CLASS_NAMES[s.label]}" for s in data.fit_samples)
    sources: dict[str, dict[str, int]] = {}
    for row in count_by_source(data.fit_samples):
        sources.setdefault(str(row["source"]), {})[f"{row['modality']}/{row['split']}/{row['label']}"] = int(row["n"])
    paths = [str(p.resolve()) for p in data_paths(data_path)]
    config = {
        "model": cfg.model.to_dict(), "preprocess": cfg.preprocess.to_dict(), "class_names": list(CLASS_NAMES),
        "positive_class": "COVID", "thresholds": validation.thresholds,
        "fusion": "mean of the per-modality probabilities", "training": cfg.to_dict(), "versions": package_versions(),
        "data": {"path": ", ".join(paths), "fingerprint": data.fingerprint, "counts": dict(sorted(counts.items())),
                 "skipped": [{"id": i, "reason": r} for i, r in data.skipped], "paths": paths, "sources": sources},
        "audit": {k: data.audit[k] for k in ("n_images", "cross_split_duplicates", "near_threshold", "confounds",
                                             "warnings")},
        "validation_metrics": validation.metrics, "bf16_check": bf16_check, "train_seconds": round(seconds, 1),
    }
    save_bundle(out, net, config)
    write_json(out / "metrics.json", {"split": "validation", "metrics": validation.metrics,
                                      "thresholds": validation.thresholds})
    write_rows(out / "validation_predictions.csv", validation.rows)
    write_manifest(data.samples, out / SPLITS_FILE)
    return out


def train(data: DataPaths, out: str | Path, config: TrainConfig | None = None, *, strict: bool = False,
          resume: bool = False, cache_dir: str | Path | None = None, stages_dir: str | Path | None = None,
          device: str = "cpu", samples: list[Sample] | None = None) -> Path:
    """Train every stage on DATA's train split (validation carved from it) and write a bundle to OUT.

    `resume` reuses the finished stages in OUT/.stages; `stages_dir` names a folder of stages kept and
    shared between runs (used by `significance`, which trains several configurations on the same data).
    `samples` replaces discovering DATA (crossval's folds). The caller's `config` is never changed.
    """
    cfg = config or preset("fast")
    out = Path(out)
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    all_samples = fit_samples_of(data, cfg, samples)
    modalities = [m for m in MODALITIES if any(s.modality == m and s.split in FIT_SPLITS for s in all_samples)]
    cfg = replace(cfg, model=replace(cfg.model, modalities=modalities))
    torch_device = resolve_device(distributed.setup(device))
    net = MMTLNet(cfg.model, pretrained=cfg.pretrained).to(torch_device)  # a bad backbone fails before long work
    fit_data = prepare_data(all_samples, cfg, strict=strict, cache_dir=Path(cache_dir) if cache_dir else None,
                            where=describe(data))
    store = StageStore(Path(stages_dir) if stages_dir else out / ".stages", clear=not (resume or stages_dir))
    keys = stage_keys(store, net, cfg, fit_data)
    logs = out / LOGS
    bf16 = bf16_supported(torch_device)

    emb = train_embedders(net, cfg, fit_data, store, keys, logs, bf16)
    train_task_mlps(net, cfg, fit_data, emb, store, keys, logs)
    train_shared(net, cfg, fit_data, emb, store, keys, logs)
    head_x = train_heads(net, cfg, fit_data, emb, store, keys, logs, torch_device)
    validation = choose_thresholds(net, cfg, fit_data, head_x, torch_device)
    if not distributed.is_main():
        return out
    bf16_check = check_bf16(net, cfg, fit_data, torch_device) if bf16 else None
    write_bundle(out, net, cfg, data, fit_data, validation, bf16_check, time.perf_counter() - t_start)
    if not stages_dir:
        shutil.rmtree(store.folder, ignore_errors=True)
    return out
