"""Train the whole pipeline, stage by stage, and write a bundle.

Stages: embedding model(s) per modality -> embeddings -> task-specific MLP per modality -> shared MLP (one of
the shared-feature kinds) over both modalities -> head per modality -> calibration and operating thresholds on
the calibration split (carved from train by group; no stage fits or early-stops on it) -> shift detector on the
task-specific embeddings (training/shift.py) -> bundle + model card.
Each finished stage is saved atomically under `OUT/.stages/`, so `resume=True` continues from the last
finished one. The test split is never loaded here.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from respiscan.bundle import LOGS, SPLITS_FILE, Bundle, save_bundle
from respiscan.calibration import Calibration, OperatingPoint
from respiscan.card import write_card
from respiscan.data.audit import audit, check_strict, source_of
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
    pair_cases,
    write_manifest,
)
from respiscan.errors import RespiscanError
from respiscan.metrics import ChosenThreshold, binary_metrics, fit_calibration, operating_threshold
from respiscan.models.network import MMTLNet
from respiscan.runtime import BF16_TOLERANCE, bf16_difference, bf16_supported, predict_logits, resolve_device
from respiscan.training import distributed
from respiscan.training.config import TrainConfig, preset
from respiscan.training.loop import SourceAdversary, train_classifier
from respiscan.training.shared import SHARED_FITS, SharedData, log_names
from respiscan.training.shift import FittedOod, fit_ood, write_ood
from respiscan.training.stages import balanced, embed_images, train_embedder
from respiscan.training.store import StageStore
from respiscan.utils import package_versions, seed_everything, write_json, write_rows

FIT_SPLITS = ("train", "val")  # what the stages fit and early-stop on; test is never loaded here
CALIBRATION = "calib"  # carved from train like validation; read only to calibrate and choose thresholds
MIN_CALIBRATION_CASES = 10  # of each class, to fit a calibration map (fewer: probabilities stay as they are)
CROSSFIT = "crossfit"  # the part of train kept from the backbone stage for the MLP stages (TrainConfig.crossfit)
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
    rows: dict[tuple[str, str], list[Sample]]  # the samples behind each (modality, split) of `images`, in order

    def labels(self, modality: str, split: str) -> torch.Tensor:
        return self.images[modality, split][1]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(sp for _, sp in self.images))

    @property
    def mlp_split(self) -> str:
        """What the MLP stages fit: the cross-fitting part of train (kept from the backbone), else train."""
        return CROSSFIT if CROSSFIT in self.splits else "train"

    def strata(self, modalities: list[str], split: str) -> tuple[list[str], list[str]]:
        """Per row of `split` (the modalities' rows concatenated in order): its modality:source, and that
        with its class; the first names the sources an adversary sees, the second balances sampling."""
        rows = [s for m in modalities for s in self.rows[m, split]]
        sources = [f"{s.modality}:{source_of(s)}" for s in rows]
        return sources, [f"{src}|{s.label}" for src, s in zip(sources, rows)]

    def balance_weights(self, modalities: list[str], split: str) -> torch.Tensor:
        """Sampling weights that give every (modality, source, class) the same total weight."""
        strata = self.strata(modalities, split)[1]
        counts = Counter(strata)
        return torch.tensor([1.0 / counts[k] for k in strata], dtype=torch.float64)

    def adversary(self, modalities: list[str], split: str, weight: float) -> SourceAdversary | None:
        """A source adversary over `split`'s rows, or None when it has one source only (nothing to hide)."""
        sources = self.strata(modalities, split)[0]
        names = sorted(set(sources))
        if weight <= 0 or len(names) < 2:
            return None
        codes = torch.tensor([names.index(src) for src in sources], dtype=torch.long)
        return SourceAdversary(codes, len(names), weight)


@dataclass
class Validation:
    """Calibration maps and operating thresholds (chosen on the calibration split), the validation split's
    metrics at those thresholds, and both splits' predictions (calibrated, and as the network gave them)."""

    thresholds: dict[str, float]
    metrics: dict[str, dict]
    rows: list[dict]
    calibration: dict[str, Calibration]
    operating_points: dict[str, dict]
    calibration_rows: list[dict]


def fit_samples_of(data: DataPaths, cfg: TrainConfig, samples: list[Sample] | None = None) -> list[Sample]:
    """Every sample (discovered unless given), with the validation and calibration splits carved from train by
    group (validation first, so its carving is the one earlier versions made)."""
    samples = carve_validation(discover(data) if samples is None else samples, cfg.val_fraction, cfg.seed)
    if cfg.calibration_fraction:
        samples = carve_validation(samples, cfg.calibration_fraction, cfg.seed + 2, into=CALIBRATION)
    check_trainable(samples, describe(data))
    return samples


def prepare_data(samples: list[Sample], cfg: TrainConfig, *, strict: bool, cache_dir: Path | None,
                 where: str) -> FitData:
    """Audit, then read + preprocess the train and validation images of the model's modalities."""
    found = audit(samples, progress=distributed.is_main())
    for line in [f"error: {e}" for e in found["errors"]] + found["warnings"] if distributed.is_main() else []:
        print(f"audit: {line}")
    if strict:
        check_strict(found)
    fit_samples = [s for s in samples if s.split in (*FIT_SPLITS, CALIBRATION)]
    images, fit_samples, skipped = load_dataset_images(fit_samples, cfg.preprocess, strict=strict, cache_dir=cache_dir)
    for _, reason in skipped:
        print(f"warning: skipped {reason}")
    check_trainable(fit_samples, where)
    held = crossfit_ids(fit_samples, cfg.crossfit, cfg.seed) if cfg.crossfit else set()
    parts = [CROSSFIT if s.id in held else s.split for s in fit_samples]
    splits, rows = {}, {}
    for m in cfg.model.modalities:
        for sp in FIT_SPLITS + ((CROSSFIT,) if held else ()) + ((CALIBRATION,) if CALIBRATION in parts else ()):
            idx = [i for i, s in enumerate(fit_samples) if s.modality == m and parts[i] == sp]
            rows[m, sp] = [fit_samples[i] for i in idx]
            splits[m, sp] = (torch.from_numpy(images[idx]),
                             torch.tensor([fit_samples[i].label for i in idx], dtype=torch.float32))
    return FitData(samples, fit_samples, splits, skipped, found, fingerprint(samples), rows)


def crossfit_ids(samples: list[Sample], fraction: float, seed: int) -> set[str]:
    """Ids of a group-aware, source x class stratified `fraction` of the train samples (validation's carving)."""
    carved = carve_validation([s for s in samples if s.split == "train"], fraction, seed + 1)
    return {s.id for s in carved if s.split == "val"}


def stage_keys(store: StageStore, net: MMTLNet, cfg: TrainConfig, data: FitData) -> dict[str, str]:
    """Each stage's key hashes everything it depends on: data, seed, its settings and the earlier stages'."""
    base = (data.fingerprint["samples_sha256"], cfg.seed, cfg.val_fraction, cfg.preprocess.to_dict(),
            str(cfg.pretrained), cfg.augment, cfg.backbone_fit.to_dict(), cfg.balance, cfg.backbone_source_adversary,
            cfg.crossfit)
    keys = {name: store.key(name, base, e.backbone.default_cfg.get("architecture"))
            for name, e in net.embedders.items()}
    mlp = (dict(keys), cfg.mlp_fit.to_dict())
    keys.update({f"task_mlp_{m}": store.key(f"task_mlp_{m}", mlp) for m in cfg.model.modalities})
    shared_settings = (mlp, cfg.model.shared, cfg.adversarial_epochs, cfg.adversarial_finetune,
                       cfg.shared_source_adversary)
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
            frozen = cfg.pretrained is not False
            train_embedder(embedder, data.images[modality, "train"], data.images[modality, "val"], cfg.backbone_fit,
                           frozen=frozen, augment=cfg.augment, bf16=bf16, seed=cfg.seed,
                           log_path=stage_log, checkpoint_path=store.epoch_checkpoint(keys[key]),
                           desc=f"embedding model {key} ({embedder.backbone.default_cfg.get('architecture', '')})",
                           weights=_weights(cfg, data, [modality], "train"),
                           adversary=None if frozen else data.adversary([modality], "train",
                                                                        cfg.backbone_source_adversary))
            store.save_module(keys[key], embedder, stage_log)
            store.epoch_checkpoint(keys[key]).unlink(missing_ok=True)
        cached = store.load_tensors(f"embeddings_{keys[key]}")
        if cached is None:
            cached = {sp: embed_images(embedder, data.images[modality, sp][0], bf16, desc=f"embed {key} {sp}")
                      for sp in data.splits}
            store.save_tensors(f"embeddings_{keys[key]}", cached)
        for sp, tensor in cached.items():
            if not torch.isfinite(tensor).all():
                raise RespiscanError(f"{store.folder}: {key} embeddings ({sp}) contain NaN or inf "
                                     "(diverged training or a damaged stage file); train again without --resume")
            emb[key, sp] = tensor
    return emb


def _weights(cfg: TrainConfig, data: FitData, modalities: list[str], split: str
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Balance weights of `split` (what a stage fits) and of validation (what chooses its epoch), or None."""
    if cfg.balance == "none":
        return None
    return data.balance_weights(modalities, split), data.balance_weights(modalities, "val")


def _shared_input(net: MMTLNet, modality: str) -> str:
    """The embedding the shared MLP reads for a modality: its own shared embedder's, else the task one's."""
    return f"shared_{modality}" if f"shared_{modality}" in net.embedders else f"task_{modality}"


def train_task_mlps(net: MMTLNet, cfg: TrainConfig, data: FitData, emb: dict, store: StageStore,
                    keys: dict[str, str], logs: Path) -> None:
    """Stage 2: the task-specific MLP of each modality, on its own embeddings."""
    fit = data.mlp_split
    for m in cfg.model.modalities:
        stage_log = logs / f"task_mlp_{m}.csv"
        if not store.load_module(keys[f"task_mlp_{m}"], net.task[m], stage_log):
            train_classifier(net.task[m], emb[f"task_{m}", fit], data.labels(m, fit), emb[f"task_{m}", "val"],
                             data.labels(m, "val"), cfg.mlp_fit, seed=cfg.seed, log_path=stage_log, shard=False,
                             desc=f"task-specific MLP {m}", **balanced(_weights(cfg, data, [m], fit)))
            store.save_module(keys[f"task_mlp_{m}"], net.task[m], stage_log)


def train_shared(net: MMTLNet, cfg: TrainConfig, data: FitData, emb: dict, store: StageStore,
                 keys: dict[str, str], logs: Path) -> None:
    """Stage 3: the shared MLP over both modalities' embeddings, trained as its kind says (training/shared.py)."""
    if net.shared is None:
        return
    stage_logs = [logs / f"{name}.csv" for name in log_names(cfg.model.shared)]
    if store.load_module(keys["shared"], net.shared, *stage_logs):
        return
    modalities, fit = cfg.model.modalities, data.mlp_split
    pooled = {sp: SharedData(
        embeddings=torch.cat([emb[_shared_input(net, m), sp] for m in modalities]),
        covid=torch.cat([data.labels(m, sp) for m in modalities]),
        modality=torch.cat([torch.full((len(data.labels(m, sp)),), float(m == XRAY)) for m in modalities]),
        weights=data.balance_weights(modalities, sp) if cfg.balance != "none" else None,
        adversary=data.adversary(modalities, sp, cfg.shared_source_adversary))
        for sp in (fit, "val")}
    SHARED_FITS[cfg.model.shared](net.shared, pooled[fit], pooled["val"], cfg, stage_logs)
    store.save_module(keys["shared"], net.shared, *stage_logs)


def train_heads(net: MMTLNet, cfg: TrainConfig, data: FitData, emb: dict, store: StageStore, keys: dict[str, str],
                logs: Path, device: torch.device) -> dict[tuple[str, str], torch.Tensor]:
    """Stage 4: a head per modality on [task-specific ; shared] features; returns those features."""
    net.eval()
    head_x: dict[tuple[str, str], torch.Tensor] = {}
    fit = data.mlp_split
    for m in cfg.model.modalities:
        for sp in data.splits:
            with torch.no_grad():
                head_x[m, sp] = net.head_features(m, emb[f"task_{m}", sp].to(device),
                                                  emb[_shared_input(net, m), sp].to(device)).cpu()
        stage_log = logs / f"head_{m}.csv"
        if not store.load_module(keys[f"head_{m}"], net.heads[m], stage_log):
            train_classifier(net.heads[m], head_x[m, fit], data.labels(m, fit), head_x[m, "val"],
                             data.labels(m, "val"), cfg.mlp_fit, seed=cfg.seed, log_path=stage_log, desc=f"head {m}",
                             shard=False, **balanced(_weights(cfg, data, [m], fit)))
            store.save_module(keys[f"head_{m}"], net.heads[m], stage_log)
    net.eval()
    return head_x


def operating_point_record(chosen: ChosenThreshold, chosen_on: str) -> dict:
    """The bundle's record of one threshold (bundle.OperatingPointRecord)."""
    return {"point": {"rule": chosen.point.rule, "target": chosen.point.target}, "threshold": chosen.threshold,
            "ci": chosen.ci, "chosen_on": chosen_on, "n": chosen.n, "n_positive": chosen.n_positive,
            "sensitivity": chosen.sensitivity, "specificity": chosen.specificity,
            "scores": {"scores": chosen.scores.scores, "positives": chosen.scores.positives,
                       "negatives": chosen.scores.negatives}}


def _both_classes(labels: np.ndarray) -> bool:
    return 0 < labels.sum() < len(labels)


def _swap_validation_and_calibration(data: FitData, emb: dict) -> tuple[FitData, dict]:
    """The same data with the validation and calibration splits' roles exchanged."""
    def swap(sp: str) -> str:
        return {"val": CALIBRATION, CALIBRATION: "val"}.get(sp, sp)

    return (replace(data, images={(m, swap(sp)): v for (m, sp), v in data.images.items()},
                    rows={(m, swap(sp)): v for (m, sp), v in data.rows.items()}),
            {(k, swap(sp)): v for (k, sp), v in emb.items()})


def cross_fitted_validation(net: MMTLNet, cfg: TrainConfig, data: FitData, emb: dict, store: StageStore,
                            keys: dict[str, str], logs: Path, device: torch.device) -> dict[str, np.ndarray]:
    """Per modality, the validation split's uncalibrated probabilities from a twin of the MLP stages that
    selected its epochs on the calibration split instead: images no stage of their scorer chose anything on, so
    calibration and thresholds rest on both splits (the calibration split alone held 72 realdev CT slices).
    Empty when that does not hold: the backbones selected epochs on validation (`select="best"`), or a
    modality's calibration split lacks MIN_CALIBRATION_CASES of a class to select epochs on."""
    if cfg.calibrate_on != "cross-fitted" or (cfg.pretrained is False and cfg.backbone_fit.select != "last"):
        return {}
    for m in cfg.model.modalities:
        y = data.labels(m, CALIBRATION).numpy() if (m, CALIBRATION) in data.images else np.zeros(0)
        if min(y.sum(), len(y) - y.sum()) < MIN_CALIBRATION_CASES:
            return {}
    twin = net.mlp_twin(cfg.seed).to(device)
    swapped, swapped_emb = _swap_validation_and_calibration(data, emb)
    twin_keys = {k: v if k in net.embedders else store.key(f"{k}_twin", v) for k, v in keys.items()}
    twin_logs = logs / "cross-fitted"
    train_task_mlps(twin, cfg, swapped, swapped_emb, store, twin_keys, twin_logs)
    train_shared(twin, cfg, swapped, swapped_emb, store, twin_keys, twin_logs)
    head_x = train_heads(twin, cfg, swapped, swapped_emb, store, twin_keys, twin_logs, device)
    return {m: expit(predict_logits(twin.heads[m], head_x[m, CALIBRATION], device=device).astype(np.float64))
            for m in cfg.model.modalities}


def choose_thresholds(net: MMTLNet, cfg: TrainConfig, data: FitData, head_x: dict, device: torch.device,
                      twin_val: dict[str, np.ndarray] | None = None) -> Validation:
    """Per modality, a calibration map and the operating threshold (`cfg.operating_point`, with its bootstrap CI)
    on the calibration split, which no stage fitted or early-stopped on, joined by the validation split where
    `twin_val` scores it (cross_fitted_validation); then the fused probability's threshold, the same way, on
    those images' X-ray/CT pairs. Where the calibration split lacks a class, the probabilities stay uncalibrated
    and the threshold comes from the validation split, and the bundle says so."""
    point = OperatingPoint.parse(cfg.operating_point)
    twin_val = twin_val or {}
    thresholds, metrics, rows, cal_rows = {}, {}, [], []
    calibration: dict[str, Calibration] = {}
    points: dict[str, dict] = {}
    calibrated: dict[str, dict[str, float]] = {}  # sample id -> calibrated p on the images calibrated on
    pooled_rows: dict[str, list[Sample]] = {}
    for m in cfg.model.modalities:
        raw = {sp: expit(predict_logits(net.heads[m], head_x[m, sp], device=device).astype(np.float64))
               for sp in ("val", CALIBRATION) if (m, sp) in head_x}
        pool = [(s, q, CALIBRATION, "model") for s, q in zip(data.rows.get((m, CALIBRATION), []),
                                                             raw.get(CALIBRATION, []))]
        if m in twin_val:
            pool += [(s, q, "val", "cross-fitted twin") for s, q in zip(data.rows[m, "val"], twin_val[m])]
        y_cal = np.array([s.label for s, *_ in pool], dtype=np.float64)
        raw_cal = np.array([q for _, q, *_ in pool])
        if _both_classes(y_cal):
            described = f"{len(y_cal)} {m} images ({int(y_cal.sum())} COVID)"
            fitted_on = (f"calibration split scored by the model + validation split scored by a twin of its MLP "
                         f"stages that selected epochs on the calibration split: {described}" if m in twin_val else
                         f"calibration split: {described}, carved from train by group; no stage fitted or "
                         "stopped on it")
            if min(y_cal.sum(), len(y_cal) - y_cal.sum()) >= MIN_CALIBRATION_CASES:
                calibration[m] = fit_calibration(y_cal, raw_cal, cfg.calibration, fitted_on=fitted_on)
            else:  # a map fitted on a handful of cases follows their noise (a slope of 3e5 on 2 images)
                calibration[m] = Calibration("identity", fitted_on=f"not calibrated: the calibration images are "
                                                                    f"{described}, fewer than {MIN_CALIBRATION_CASES} "
                                                                    "of a class")
            chosen_rows, y, where = [s for s, *_ in pool], y_cal, fitted_on
            p_chosen = p_cal = calibration[m].apply(raw_cal)
        else:
            calibration[m] = Calibration("identity", fitted_on="not calibrated: the calibration split has no "
                                                                f"{m} images of both classes")
            chosen_rows, where = data.rows[m, "val"], ("validation split (the calibration split lacked a class; "
                                                       "validation also chose the epochs)")
            y, p_chosen, p_cal = data.labels(m, "val").numpy(), raw["val"], raw_cal
        if _both_classes(y):
            chosen = operating_threshold(y, p_chosen, point, groups=[s.group or s.id for s in chosen_rows],
                                         seed=cfg.seed)
            thresholds[m], points[m] = chosen.threshold, operating_point_record(chosen, where)
        else:
            thresholds[m] = 0.5  # one class only: nothing to choose a threshold on
        p_val = calibration[m].apply(raw["val"])
        metrics[m] = binary_metrics(data.labels(m, "val").numpy(), p_val, thresholds[m])
        rows += [{"id": s.id, "modality": m, "label": CLASS_NAMES[s.label], "probability": float(q),
                  "uncalibrated_probability": float(r)} for s, q, r in zip(data.rows[m, "val"], p_val, raw["val"])]
        cal_rows += [{"id": s.id, "modality": m, "label": CLASS_NAMES[s.label], "split": sp, "scored_by": by,
                      "probability": float(q), "uncalibrated_probability": float(r)}
                     for (s, r, sp, by), q in zip(pool, p_cal)]
        if _both_classes(y_cal):
            calibrated[m] = {s.id: float(q) for s, q in zip(chosen_rows, p_chosen)}
            pooled_rows[m] = chosen_rows
    if len(cfg.model.modalities) > 1:
        thresholds["fused"], fused = fused_threshold(pooled_rows, calibrated, thresholds, point, cfg.seed)
        if fused:
            points["fused"] = fused
    return Validation(thresholds, metrics, rows, calibration, points, cal_rows)


def fused_threshold(pooled_rows: dict[str, list[Sample]], calibrated: dict[str, dict[str, float]],
                     thresholds: dict[str, float], point: OperatingPoint, seed: int) -> tuple[float, dict | None]:
    """The fused probability's threshold, chosen like the modalities' on the calibrated images' X-ray/CT pairs of
    one patient (a shared group id). Without such pairs of both classes: the mean of the per-modality thresholds,
    the fused value of a case at both modalities' operating points (images of different patients paired by label
    would say nothing about fusion; evaluate does not pair them either)."""
    pairs, _ = pair_cases(*(pooled_rows.get(m, []) for m in MODALITIES), seed=seed)
    pairs = [(x, c) for x, c in pairs if x.group and x.group == c.group]
    y = np.array([x.label for x, _ in pairs])
    if not _both_classes(y):
        return float(np.mean([thresholds[m] for m in MODALITIES])), None
    fused = np.array([(calibrated["xray"][x.id] + calibrated["ct"][c.id]) / 2 for x, c in pairs])
    chosen = operating_threshold(y, fused, point, groups=[x.group for x, _ in pairs], seed=seed)
    return chosen.threshold, operating_point_record(chosen, f"calibrated images, X-ray/CT pairs of one patient: "
                                                      f"{len(pairs)} pairs ({int(y.sum())} COVID), mean of "
                                                      "calibrated probabilities")


def fit_shift_detector(cfg: TrainConfig, data: FitData, emb: dict) -> FittedOod:
    """Stage 5: the "unlike my training images" detector on the task-specific embeddings and the image
    statistics (training/shift.py), fitted on train; its thresholds come from the validation and calibration
    images together, which no statistic was fitted on (a 95th percentile of ~100 validation images alone is
    noisy)."""
    def of(splits: tuple[str, ...]) -> tuple[dict, dict]:
        parts = {m: [sp for sp in splits if (m, sp) in data.images] for m in cfg.model.modalities}
        return ({m: np.concatenate([emb[f"task_{m}", sp].numpy() for sp in sps]) for m, sps in parts.items()},
                {m: np.concatenate([data.images[m, sp][0].numpy() for sp in sps]) for m, sps in parts.items()})

    (train, train_images), (check, check_images) = of(("train",)), of(("val", CALIBRATION))
    return fit_ood(train, check, train_images, check_images)


def check_bf16(net: MMTLNet, cfg: TrainConfig, data: FitData, device: torch.device) -> dict | None:
    """How far bf16 moves the validation probabilities: prediction may use bf16 only within BF16_TOLERANCE."""
    diff = max(bf16_difference(lambda x, m=m: net(x, m), data.images[m, "val"][0], device)
               for m in cfg.model.modalities)
    return {"max_abs_difference": diff, "tolerance": BF16_TOLERANCE, "images": "validation split",
            "prediction_default": "bf16" if diff <= BF16_TOLERANCE else "fp32"}


def write_bundle(out: Path, net: MMTLNet, cfg: TrainConfig, data_path: DataPaths, data: FitData,
                 validation: Validation, bf16_check: dict | None, seconds: float, ood: FittedOod) -> Path:
    """The bundle: shift statistics, weights + config, then metrics.json, validation predictions and the split
    of every image."""
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
        "audit": {k: data.audit[k] for k in ("n_images", "cross_split_duplicates", "similarity", "label_conflicts",
                                             "similar_across_splits", "groups_across_splits", "ungrouped",
                                             "shortcuts", "confounds", "errors", "warnings")},
        "validation_metrics": validation.metrics, "bf16_check": bf16_check, "train_seconds": round(seconds, 1),
        "ood": write_ood(out, ood),
        "calibration": {m: asdict(c) for m, c in validation.calibration.items()},
        "operating_points": validation.operating_points,
    }
    save_bundle(out, net, config)
    write_json(out / "metrics.json", {"split": "validation", "metrics": validation.metrics,
                                      "thresholds": validation.thresholds})
    write_rows(out / "validation_predictions.csv", validation.rows)
    write_rows(out / "calibration_predictions.csv", validation.calibration_rows,
               ["id", "modality", "label", "split", "scored_by", "probability", "uncalibrated_probability"])
    write_manifest(data.samples, out / SPLITS_FILE)
    write_card(Bundle.open(out))
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
    twin_val = cross_fitted_validation(net, cfg, fit_data, emb, store, keys, logs, torch_device)
    validation = choose_thresholds(net, cfg, fit_data, head_x, torch_device, twin_val)
    ood = fit_shift_detector(cfg, fit_data, emb)
    if not distributed.is_main():
        return out
    bf16_check = check_bf16(net, cfg, fit_data, torch_device) if bf16 else None
    write_bundle(out, net, cfg, data, fit_data, validation, bf16_check, time.perf_counter() - t_start, ood)
    if not stages_dir:
        shutil.rmtree(store.folder, ignore_errors=True)
    return out
