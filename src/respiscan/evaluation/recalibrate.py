"""Local recalibration: a bundle's calibration maps and operating thresholds refitted on labelled images of the
site where it is used, written as a new bundle with the same network.

A model trained elsewhere carries its training sites' score distribution: on CT of another collection the
default's threshold called nearly every slice COVID (README "Across sites"), and its probabilities were off by
0.3-0.5 (ECE). A monotone map and a threshold refitted on the site's own images fix what can be fixed without
retraining, the meaning of a probability and the operating point; the ranking, and so the AUC, stays the
network's. Only non-test images are read, so `evaluate` on the same folders then scores images the new maps
never saw.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from respiscan.bundle import Bundle, BundleConfig
from respiscan.calibration import OperatingPoint
from respiscan.card import write_card
from respiscan.data.audit import source_of
from respiscan.data.samples import CLASS_NAMES, DataPaths, Sample, describe, discover
from respiscan.errors import RespiscanError
from respiscan.metrics import expected_calibration_error, fit_calibration, operating_threshold
from respiscan.serving import Engine
from respiscan.serving import load as load_pipeline
from respiscan.training.trainer import MIN_CALIBRATION_CASES, fused_threshold, operating_point_record
from respiscan.utils import write_rows

LOCAL_FILE = "local_calibration.csv"  # in the new bundle: the images it was recalibrated on, and their scores
KEPT_OUT = ("evaluation",)  # results measured at the old maps and thresholds, which no longer hold


@dataclass(frozen=True)
class Refit:
    """One modality's refit, as `calibrate` reports it (ECE on the images it was fitted on: in-sample)."""

    modality: str
    n: int
    n_positive: int
    sources: list[str]
    roc_auc: float  # the network's ranking of these images: fitted on nothing of the site, so an honest estimate
    threshold_before: float
    threshold_after: float
    ece_before: float
    ece_after: float
    specificity_before: float | None  # on these images, at each threshold
    specificity_after: float | None


@dataclass(frozen=True)
class Recalibration:
    bundle: Path
    point: str
    refits: list[Refit]
    kept: list[str]  # modalities whose maps and thresholds stayed the bundle's, and why
    skipped: list[tuple[str, str]]


def _specificity(y: np.ndarray, p: np.ndarray, threshold: float) -> float | None:
    negatives = y == 0
    return float((p[negatives] < threshold).mean()) if negatives.any() else None


def recalibrate(bundle: str | Path, data: DataPaths, out: str | Path, *, operating_point: str | None = None,
                engine: Engine = "auto", strict: bool = False, samples: list[Sample] | None = None,
                seed: int = 0) -> Recalibration:
    """Score the non-test images of `data` with `bundle`, refit each modality's calibration map (the bundle's
    method) and threshold (`operating_point`, default the bundle's rule) on them, and write the bundle with those
    to `out`, which must not exist. A modality with fewer than MIN_CALIBRATION_CASES of a class keeps its map and
    threshold (re-chosen on its stored scores when the rule changes). `samples` replaces discovering `data`."""
    source, out = Bundle.open(bundle), Path(out)
    if out.exists():
        raise RespiscanError(f"{out}: already exists; recalibration writes a new bundle folder")
    config = source.config
    records = config.operating_points or {}
    if operating_point is None and not records:
        raise RespiscanError(f"{source.path}: the bundle records no operating-point rule; give --operating-point")
    point = (OperatingPoint.parse(operating_point) if operating_point is not None
             else next(iter(records.values())).point)
    pipe = load_pipeline(source.path, engine)
    local = [s for s in (discover(data) if samples is None else samples)
             if s.split != "test" and s.modality in pipe.modalities]
    if not local:
        raise RespiscanError(f"{describe(data)}: no non-test images for the bundle's modalities "
                             f"({', '.join(pipe.modalities)}); recalibration never reads a test split")
    rows, skipped = pipe.predict_samples(local, strict=strict)
    raw = {r["id"]: r["uncalibrated_probability"] for r in rows}
    document = config.to_dict()
    document.pop("model_card", None)
    calibration, thresholds = document.setdefault("calibration", {}), dict(document["thresholds"])
    points = document.setdefault("operating_points", {})
    method = config.training.get("calibration", "platt")
    refits, kept, csv_rows, pooled, calibrated = [], [], [], {}, {}
    for m in pipe.modalities:
        mine = [s for s in local if s.modality == m and s.id in raw]
        y = np.array([s.label for s in mine], dtype=np.float64)
        n_pos = int(y.sum())
        if min(n_pos, len(y) - n_pos) < MIN_CALIBRATION_CASES:
            kept.append(f"{m}: {len(y)} images ({n_pos} COVID), fewer than {MIN_CALIBRATION_CASES} of a class")
            if operating_point is not None and m in records:
                thresholds[m] = records[m].scores.threshold(point)
            continue
        sources = sorted({source_of(s) for s in mine})
        p_raw = np.array([raw[s.id] for s in mine])
        where = (f"local images of {', '.join(sources)} ({describe(data)}, non-test splits): {len(y)} {m} images "
                 f"({n_pos} COVID), by `respiscan calibrate` from {source.path.name}, the network unchanged")
        fitted = fit_calibration(y, p_raw, method, fitted_on=where)
        p_cal = fitted.apply(p_raw)
        chosen = operating_threshold(y, p_cal, point, groups=[s.group or s.id for s in mine], seed=seed)
        before = config.calibration_of(m).apply(p_raw)
        refits.append(Refit(m, len(y), n_pos, sources, float(roc_auc_score(y, p_raw)), config.thresholds[m],
                            chosen.threshold, expected_calibration_error(y, before),
                            expected_calibration_error(y, p_cal), _specificity(y, before, config.thresholds[m]),
                            _specificity(y, p_cal, chosen.threshold)))
        calibration[m] = asdict(fitted)
        thresholds[m], points[m] = chosen.threshold, operating_point_record(chosen, where)
        pooled[m], calibrated[m] = mine, {s.id: float(q) for s, q in zip(mine, p_cal)}
        csv_rows += [{"id": s.id, "path": str(s.path), "modality": m, "label": CLASS_NAMES[s.label],
                      "probability": float(q), "uncalibrated_probability": float(r)}
                     for s, q, r in zip(mine, p_cal, p_raw)]
    if not refits:
        raise RespiscanError(f"{describe(data)}: too few labelled non-test images to recalibrate ({'; '.join(kept)})")
    if "fused" in thresholds:
        points.pop("fused", None)
        if len(pooled) == len(pipe.modalities):
            thresholds["fused"], fused = fused_threshold(pooled, calibrated, thresholds, point, seed)
            if fused:
                points["fused"] = fused
        else:
            thresholds["fused"] = float(np.mean([thresholds[m] for m in pipe.modalities]))
    document["thresholds"] = thresholds
    new_config = BundleConfig.from_dict(document, out / "config.json")
    _write_copy(source, new_config, out, csv_rows)
    return Recalibration(out, str(point), refits, kept, skipped)


def _write_copy(source: Bundle, config: BundleConfig, out: Path, rows: list[dict]) -> None:
    """The bundle's files (not its evaluation results) with `config`, assembled beside `out` and renamed into
    place, so that `out` is either absent or complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(source.path, partial, ignore=shutil.ignore_patterns(*KEPT_OUT), dirs_exist_ok=True)
        write_rows(partial / LOCAL_FILE, rows, ["id", "path", "modality", "label", "probability",
                                                "uncalibrated_probability"])
        write_card(Bundle(partial, source.config).save_config(config), [])
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

