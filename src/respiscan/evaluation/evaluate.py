"""Evaluate a bundle on a data set's test split: per modality and fused, COVID as the positive class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from respiscan.data.samples import CLASS_NAMES, Sample, discover
from respiscan.errors import RespiscanError
from respiscan.evaluation.metrics import binary_metrics
from respiscan.inference import fuse
from respiscan.predict import Pipeline
from respiscan.utils import write_json, write_rows


def pair_cases(xray: list[Sample], ct: list[Sample], seed: int = 0) -> tuple[list[tuple[Sample, Sample]], str]:
    """X-ray/CT pairs for the fused probability: by shared group (patient) when the data has them, else
    same-label pseudo-pairs (seeded), which the report must call what they are."""
    by_group = {s.group: s for s in ct if s.group}
    pairs = [(x, by_group[x.group]) for x in xray if x.group in by_group and by_group[x.group].label == x.label]
    if pairs:
        return pairs, "patient (shared group id)"
    rng = np.random.default_rng(seed)
    pairs = []
    for label in (0, 1):
        xs = [s for s in xray if s.label == label]
        cs = [s for s in ct if s.label == label]
        rng.shuffle(xs)
        rng.shuffle(cs)
        pairs += list(zip(xs, cs))
    return pairs, "same-label pseudo-pairs (the data has no X-ray/CT pairs of one patient)"


def evaluate(bundle: str | Path, data: str | Path, out: str | Path | None = None, *, strict: bool = False,
             pipeline: Pipeline | None = None) -> dict:
    """Metrics on the test split; writes metrics.json and predictions.csv to `out` (default BUNDLE/evaluation)."""
    pipe = pipeline or Pipeline(bundle)
    out = Path(out) if out else Path(bundle) / "evaluation"
    test = [s for s in discover(data) if s.split == "test" and s.modality in pipe.modalities]
    if not test:
        raise RespiscanError(f"{data}: no test images for the bundle's modalities ({', '.join(pipe.modalities)})")
    rows, skipped = pipe.predict_samples(test, strict=strict)
    by_id = {s.id: s for s in test}
    prob = {r["id"]: r["probability"] for r in rows}
    for r in rows:
        r["label"] = CLASS_NAMES[by_id[r["id"]].label]
    results: dict = {"split": "test", "bundle": str(bundle), "data": str(data), "positive_class": "COVID",
                     "skipped": [{"id": i, "reason": why} for i, why in skipped], "modalities": {}}
    for m in pipe.modalities:
        ids = [r["id"] for r in rows if r["modality"] == m]
        if ids:
            y = np.array([by_id[i].label for i in ids])
            results["modalities"][m] = binary_metrics(y, np.array([prob[i] for i in ids]), pipe.thresholds.get(m, 0.5))
    if len(results["modalities"]) == 2:
        xs = [s for s in test if s.modality == "xray" and s.id in prob]
        cs = [s for s in test if s.modality == "ct" and s.id in prob]
        pairs, how = pair_cases(xs, cs)
        if pairs:
            y = np.array([x.label for x, _ in pairs])
            p = np.array([fuse([prob[x.id], prob[c.id]]) for x, c in pairs])
            results["fused"] = {"pairing": how, "n_pairs": len(pairs),
                                **binary_metrics(y, p, pipe.thresholds.get("fused", 0.5))}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", results)
    write_rows(out / "predictions.csv", rows, ["id", "path", "modality", "label", "probability", "prediction"])
    return results
