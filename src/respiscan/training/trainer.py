"""Train the whole pipeline, stage by stage, and write a bundle.

Stages: embedding model(s) per modality -> embeddings -> task-specific MLP per modality -> shared MLP (plain or
adversarial) over both modalities -> head per modality. Each finished stage is saved atomically under
`OUT/.stages/`, so `resume=True` continues from the last finished one. The test split is never loaded here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from respiscan.bundle import save_bundle
from respiscan.data.images import load_dataset_images
from respiscan.data.samples import (CLASS_NAMES, MODALITIES, Sample, carve_validation, check_trainable, discover,
                                   fingerprint, write_manifest)
from respiscan.errors import RespiscanError
from respiscan.data.audit import audit, check_strict
from respiscan.models.network import MMTLNet
from respiscan.training import distributed
from respiscan.training.config import TrainConfig, preset
from respiscan.runtime import BF16_TOLERANCE, bf16_difference, bf16_supported, predict_logits, resolve_device
from respiscan.training.loop import train_classifier
from respiscan.training.stages import embed_images, finetune_adversarial, train_adversarial, train_embedder
from respiscan.utils import atomic_write, package_versions, seed_everything, write_json, write_rows

log = logging.getLogger(__name__)
XRAY, CT = MODALITIES


class StageStore:
    """Finished stages as safetensors files; a stage found here is loaded instead of trained.

    A stage's file name carries a hash of everything it depends on (data, seed, settings of it and of the
    stages before it), so a changed configuration never picks up a stale stage, and runs that differ only in
    later stages (e.g. shared plain vs adversarial) reuse the earlier ones.
    """

    def __init__(self, folder: Path, clear: bool):
        self.folder = folder
        if distributed.is_main():
            if folder.exists() and clear:
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
        distributed.barrier()

    @staticmethod
    def key(name: str, *depends_on: object) -> str:
        digest = hashlib.sha1(json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{name}-{digest}"

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def epoch_checkpoint(self, key: str) -> Path:
        """Where an unfinished stage keeps its last finished epoch."""
        return self.folder / f"{key}.epoch.safetensors"

    def load_module(self, key: str, module: nn.Module, *logs: Path) -> bool:
        """Load a finished stage and put its training logs where this run's logs go."""
        if not self._path(key).is_file():
            return False
        module.load_state_dict(load_file(str(self._path(key))))
        for log_path in logs:
            kept = self.folder / f"{key}.{log_path.name}"
            if kept.is_file() and distributed.is_main():
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(log_path, "wb") as f:
                    f.write(kept.read_bytes())
        log.info("reusing finished stage %s", key)
        return True

    def save_module(self, key: str, module: nn.Module, *logs: Path) -> None:
        """Save a finished stage with copies of its logs (a run that reuses the stage reports them too)."""
        for log_path in logs:
            if log_path.is_file() and distributed.is_main():
                with atomic_write(self.folder / f"{key}.{log_path.name}", "wb") as f:
                    f.write(log_path.read_bytes())
        self.save_tensors(key, module.state_dict())

    def load_tensors(self, key: str) -> dict[str, torch.Tensor] | None:
        return load_file(str(self._path(key))) if self._path(key).is_file() else None

    def save_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if not distributed.is_main():
            return
        with atomic_write(self._path(key), "wb") as f:
            f.write(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def _split(samples: list[Sample], images: np.ndarray, modality: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = [i for i, s in enumerate(samples) if s.modality == modality and s.split == split]
    return torch.from_numpy(images[idx]), torch.tensor([samples[i].label for i in idx], dtype=torch.float32)


def train(data: str | Path, out: str | Path, config: TrainConfig | None = None, *, strict: bool = False,
          resume: bool = False, cache_dir: str | Path | None = None, stages_dir: str | Path | None = None,
          device: str = "cpu") -> Path:
    """Train every stage on DATA's train split (validation carved from it) and write a bundle to OUT.

    `resume` reuses the finished stages in OUT/.stages; `stages_dir` names a folder of stages kept and
    shared between runs (used by `significance`, which trains several configurations on the same data).
    """
    cfg = config or preset("fast")
    out = Path(out)
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    samples = carve_validation(discover(data), cfg.val_fraction, cfg.seed)
    check_trainable(samples, str(data))
    fit_samples = [s for s in samples if s.split in ("train", "val")]
    cfg.model.modalities = [m for m in MODALITIES if any(s.modality == m for s in fit_samples)]
    torch_device = resolve_device(distributed.setup(device))
    net = MMTLNet(cfg.model, pretrained=cfg.pretrained).to(torch_device)
    found = audit(samples, progress=distributed.is_main())
    for warning in found["warnings"] if distributed.is_main() else []:
        print(f"audit: {warning}")
    if strict:
        check_strict(found)
    store = StageStore(Path(stages_dir) if stages_dir else out / ".stages", clear=not (resume or stages_dir))
    logs = out / "logs"
    images, fit_samples, skipped = load_dataset_images(
        fit_samples, cfg.preprocess, strict=strict, cache_dir=Path(cache_dir) if cache_dir else None)
    for _, reason in skipped:
        print(f"warning: skipped {reason}")
    check_trainable(fit_samples, str(data))
    bf16 = bf16_supported(torch_device)
    frozen = cfg.pretrained is not False
    splits = {(m, sp): _split(fit_samples, images, m, sp) for m in cfg.model.modalities for sp in ("train", "val")}
    del images

    data_fingerprint = fingerprint(samples)
    base = (data_fingerprint["samples_sha256"], cfg.seed, cfg.val_fraction, cfg.preprocess.to_dict(),
            str(cfg.pretrained), cfg.augment, asdict(cfg.backbone_fit))
    keys = {name: store.key(name, base, backbone) for name, backbone in (
        (k, e.backbone.default_cfg.get("architecture")) for k, e in net.embedders.items())}
    mlp = (keys, asdict(cfg.mlp_fit))
    keys.update({f"task_mlp_{m}": store.key(f"task_mlp_{m}", mlp) for m in cfg.model.modalities})
    shared_settings = (mlp, cfg.model.shared, cfg.adversarial_epochs, cfg.adversarial_finetune)
    keys["shared"] = store.key(f"shared_{cfg.model.shared}", shared_settings)
    keys.update({f"head_{m}": store.key(f"head_{m}", shared_settings) for m in cfg.model.modalities})

    # Stage 1: embedding models, then the embeddings they give (cached: the later stages train on these).
    emb: dict[tuple[str, str], torch.Tensor] = {}
    for key, embedder in net.embedders.items():
        modality = key.split("_", 1)[1]
        stage_log = logs / f"embedding_{key}.csv"
        if not store.load_module(keys[key], embedder, stage_log):
            train_embedder(embedder, splits[modality, "train"], splits[modality, "val"], cfg.backbone_fit,
                           frozen=frozen, augment=cfg.augment, bf16=bf16, seed=cfg.seed,
                           log_path=stage_log, checkpoint_path=store.epoch_checkpoint(keys[key]),
                           desc=f"embedding model {key} ({embedder.backbone.default_cfg.get('architecture', '')})")
            store.save_module(keys[key], embedder, stage_log)
            store.epoch_checkpoint(keys[key]).unlink(missing_ok=True)
        cached = store.load_tensors(f"embeddings_{keys[key]}")
        if cached is None:
            cached = {sp: embed_images(embedder, splits[modality, sp][0], bf16, desc=f"embed {key} {sp}")
                      for sp in ("train", "val")}
            store.save_tensors(f"embeddings_{keys[key]}", cached)
        for sp, tensor in cached.items():
            if not torch.isfinite(tensor).all():
                raise RespiscanError(f"{store.folder}: {key} embeddings ({sp}) contain NaN or inf (diverged training or "
                                     "a damaged stage file); train again without --resume")
            emb[key, sp] = tensor
    labels = {(m, sp): splits[m, sp][1] for m in cfg.model.modalities for sp in ("train", "val")}
    shared_key = {m: f"shared_{m}" if f"shared_{m}" in net.embedders else f"task_{m}" for m in cfg.model.modalities}

    # Stage 2: task-specific MLP per modality.
    for m in cfg.model.modalities:
        stage_log = logs / f"task_mlp_{m}.csv"
        if not store.load_module(keys[f"task_mlp_{m}"], net.task[m], stage_log):
            train_classifier(net.task[m], emb[f"task_{m}", "train"], labels[m, "train"], emb[f"task_{m}", "val"],
                             labels[m, "val"], cfg.mlp_fit, seed=cfg.seed, log_path=stage_log, shard=False,
                             desc=f"task-specific MLP {m}")
            store.save_module(keys[f"task_mlp_{m}"], net.task[m], stage_log)

    # Stage 3: shared MLP over both modalities.
    shared_logs = [logs / f"shared_{cfg.model.shared}.csv"] + [logs / "shared_finetune.csv"] * (cfg.model.shared == "adversarial")
    if net.shared is not None and not store.load_module(keys["shared"], net.shared, *shared_logs):
        both = {sp: (torch.cat([emb[shared_key[m], sp] for m in cfg.model.modalities]),
                     torch.cat([labels[m, sp] for m in cfg.model.modalities]),
                     torch.cat([torch.full((len(labels[m, sp]),), float(m == XRAY)) for m in cfg.model.modalities]))
                for sp in ("train", "val")}
        if cfg.model.shared == "plain":
            train_classifier(net.shared, both["train"][0], both["train"][1], both["val"][0], both["val"][1],
                             cfg.mlp_fit, seed=cfg.seed, log_path=shared_logs[0], desc="shared MLP", shard=False)
        else:
            train_adversarial(net.shared, both["train"][0], both["train"][2], both["val"][0], both["val"][2],
                              cfg.adversarial_epochs, cfg.mlp_fit, seed=cfg.seed, log_path=shared_logs[0])
            target = 1 if cfg.adversarial_finetune == "covid" else 2
            finetune_adversarial(net.shared, (both["train"][0], both["train"][target]),
                                 (both["val"][0], both["val"][target]), cfg.mlp_fit, seed=cfg.seed,
                                 log_path=shared_logs[1])
        store.save_module(keys["shared"], net.shared, *shared_logs)

    # Stage 4: heads on [task-specific ; shared].
    net.eval()
    head_x: dict[tuple[str, str], torch.Tensor] = {}
    for m in cfg.model.modalities:
        for sp in ("train", "val"):
            task_e, shared_e = emb[f"task_{m}", sp], emb[shared_key[m], sp]
            with torch.no_grad():
                head_x[m, sp] = net.head_features(m, task_e.to(torch_device), shared_e.to(torch_device)).cpu()
        stage_log = logs / f"head_{m}.csv"
        if not store.load_module(keys[f"head_{m}"], net.heads[m], stage_log):
            train_classifier(net.heads[m], head_x[m, "train"], labels[m, "train"], head_x[m, "val"], labels[m, "val"],
                             cfg.mlp_fit, seed=cfg.seed, log_path=stage_log, desc=f"head {m}", shard=False)
            store.save_module(keys[f"head_{m}"], net.heads[m], stage_log)
    net.eval()

    # Validation probabilities -> operating thresholds and validation metrics (never the test split).
    from respiscan.metrics import binary_metrics, choose_threshold

    thresholds, val_metrics, val_rows = {}, {}, []
    for m in cfg.model.modalities:
        y = labels[m, "val"].numpy()
        p = 1 / (1 + np.exp(-predict_logits(net.heads[m], head_x[m, "val"], device=torch_device).astype(np.float64)))
        thresholds[m] = float(choose_threshold(y, p)) if len(np.unique(y)) == 2 else 0.5
        val_metrics[m] = binary_metrics(y, p, thresholds[m])
        val_ids = [s.id for s in fit_samples if s.modality == m and s.split == "val"]
        val_rows += [{"id": i, "modality": m, "label": CLASS_NAMES[int(t)], "probability": float(q)}
                     for i, t, q in zip(val_ids, y, p)]
    thresholds["fused"] = 0.5
    # Prediction may use bf16 only if it keeps this bundle's validation probabilities close to fp32's.
    bf16_check = None
    if bf16 and distributed.is_main():
        diff = max(bf16_difference(lambda x, m=m: net(x, m), splits[m, "val"][0], torch_device)
                   for m in cfg.model.modalities)
        bf16_check = {"max_abs_difference": diff, "tolerance": BF16_TOLERANCE, "images": "validation split",
                      "prediction_default": "bf16" if diff <= BF16_TOLERANCE else "fp32"}
    counts = Counter(f"{s.modality}/{s.split}/{CLASS_NAMES[s.label]}" for s in fit_samples)
    config = {
        "model": cfg.model.to_dict(), "preprocess": cfg.preprocess.to_dict(), "class_names": list(CLASS_NAMES),
        "positive_class": "COVID", "thresholds": thresholds, "fusion": "mean of the per-modality probabilities",
        "training": cfg.to_dict(), "versions": package_versions(),
        "data": {"path": str(Path(data).resolve()), "fingerprint": data_fingerprint, "counts": dict(sorted(counts.items())),
                 "skipped": [{"id": i, "reason": r} for i, r in skipped]},
        "audit": {k: found[k] for k in ("n_images", "cross_split_duplicates", "near_threshold", "confounds", "warnings")},
        "validation_metrics": val_metrics, "bf16_check": bf16_check, "train_seconds": round(time.perf_counter() - t_start, 1),
    }
    if not distributed.is_main():
        return out
    save_bundle(out, net, config)
    write_json(out / "metrics.json", {"split": "validation", "metrics": val_metrics, "thresholds": thresholds})
    write_rows(out / "validation_predictions.csv", val_rows)
    write_manifest(samples, out / "splits.csv")
    if not stages_dir:
        shutil.rmtree(store.folder, ignore_errors=True)
    return out
