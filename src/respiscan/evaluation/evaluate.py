"""Evaluate a bundle on a data set's test split: per modality and fused, COVID as the positive class.

Writes to OUT: metrics.json (point estimates; 95% bootstrap CIs, stratified by class, that resample patients
where the data names them, since images of one patient are not independent; a per-source breakdown when the
test images come from several sources; fused metrics only for X-ray/CT pairs of one patient), predictions.csv,
the paper figures (roc, pr, confusion, reliability, training_curves .png) and report.md / report.html, which
explain all of it to a reader without the code.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from respiscan.bundle import LOGS, Bundle, BundleConfig, OodDetector
from respiscan.calibration import OperatingPoint
from respiscan.card import evaluation_result, write_card
from respiscan.data.audit import class_balance, shortcut_baselines, shortcut_warnings, source_of
from respiscan.data.samples import CLASS_NAMES, DataPaths, Sample, describe, discover, pair_cases
from respiscan.errors import RespiscanError
from respiscan.evaluation.plots import plot_confusion, plot_pr, plot_reliability, plot_roc, plot_training_curves
from respiscan.evaluation.report import KIND_NAMES, read_splits, write_report
from respiscan.metrics import N_RESAMPLES, at_prevalence, binary_metrics, bootstrap_ci, calibration_scores
from respiscan.serving import Engine
from respiscan.serving import load as load_pipeline
from respiscan.serving.pipeline import BasePipeline, fuse
from respiscan.serving.shift import set_shift
from respiscan.utils import write_json, write_rows

CONFIDENCE = 0.95
FIXED_SENSITIVITIES = (0.90, 0.95)  # screening operating points reported beside the bundle's own
_STAGE_ORDER = ("embedding", "task_mlp", "shared", "head")  # training-curve panels in the order stages ran

Cases = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # labels, probabilities, groups, sources


def _scored(y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray, n_resamples: int, seed: int) -> dict:
    """binary_metrics plus `ci`, the bootstrap interval of every metric (resampling whole groups), and
    `ci_method`, which interval each is (BCa or percentile)."""
    boot = bootstrap_ci(y, p, threshold, groups=groups, n_resamples=n_resamples, confidence=CONFIDENCE, seed=seed)
    return {**binary_metrics(y, p, threshold), "ci": boot.intervals, "ci_method": boot.methods}


def _kind_metrics(cases: Cases, threshold: float, n_resamples: int, seed: int) -> dict:
    """Metrics with CIs; with several sources also per source, since a pooled score can hide a source that fails."""
    y, p, groups, sources = cases
    result = _scored(y, p, threshold, groups, n_resamples, seed)
    names = sorted(set(sources.tolist()))
    if len(names) > 1:
        result["by_source"] = {name: _scored(y[sources == name], p[sources == name], threshold,
                                             groups[sources == name], n_resamples, seed) for name in names}
    return result


def _add_shift(metrics: dict[str, dict], scored: list[Sample], rows: list[dict], detector: OodDetector | None) -> None:
    """Beside each modality's and source's metrics, the share of its images the shift detector flags as unlike
    the training images (`shift_flagged`) and whether they are, as a set (`set_shift`, serving/shift.py); both
    absent without a detector. Where a source's AUC drops, they say whether the bundle warned."""
    by_id = {r["id"]: r for r in rows}
    for m, result in metrics.items():
        mine = [s for s in scored if s.modality == m and by_id[s.id].get("in_distribution") is not None]
        if not mine:  # the fused kind, or a bundle without a detector
            continue
        parts = [(result, mine)] + [(by_source, [s for s in mine if source_of(s) == name])
                                    for name, by_source in result.get("by_source", {}).items()]
        for target, samples in parts:
            target["shift_flagged"] = (float(np.mean([not by_id[s.id]["in_distribution"] for s in samples]))
                                       if samples else None)
            shift = set_shift(detector, m, [by_id[s.id]["ood_score"] for s in samples]) if samples else None
            if shift is not None:
                target["set_shift"] = asdict(shift)


def _image_cases(samples: list[Sample], prob: dict[str, float]) -> Cases:
    return (np.array([s.label for s in samples]), np.array([prob[s.id] for s in samples]),
            np.array([s.group or s.id for s in samples]), np.array([source_of(s) for s in samples]))


def patient_pairs(xray: list[Sample], ct: list[Sample]) -> list[tuple[Sample, Sample]]:
    """X-ray/CT pairs of one patient (the same group id in both modalities). Images of different patients
    paired by label would average two draws of a known class: that measures nothing about fusion, so without
    shared ids there are no pairs and no fused result."""
    return [(x, c) for x, c in pair_cases(xray, ct)[0] if x.group and x.group == c.group]


def fused_clusters(pairs: list[tuple[Sample, Sample]]) -> np.ndarray:
    """Bootstrap cluster per fused case: the connected component of the graph whose nodes are X-ray groups
    and CT groups and whose edges are the pairs, so that cases sharing an X-ray patient or a CT patient
    (e.g. CT slices of one scan) are resampled together."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    xray = np.unique([x.group or x.id for x, _ in pairs], return_inverse=True)[1]
    ct = np.unique([c.group or c.id for _, c in pairs], return_inverse=True)[1]
    n_xray = int(xray.max()) + 1
    n = n_xray + int(ct.max()) + 1
    graph = coo_matrix((np.ones(len(pairs)), (xray, n_xray + ct)), shape=(n, n))
    return connected_components(graph, directed=False)[1][xray]


def _fused_cases(pairs: list[tuple[Sample, Sample]], prob: dict[str, float]) -> Cases:
    """A fused case's group is its connected component of patients; its source names both images' sources when
    they differ."""
    sources = [source_of(x) if source_of(x) == source_of(c) else f"{source_of(x)} + {source_of(c)}"
               for x, c in pairs]
    return (np.array([x.label for x, _ in pairs]), np.array([fuse([prob[x.id], prob[c.id]]) for x, c in pairs]),
            fused_clusters(pairs), np.array(sources))


def _fusion(pairs: list[tuple[Sample, Sample]]) -> dict:
    """How the fused cases were formed, as a record and a sentence for the report."""
    if not pairs:
        return {"pairing": None, "n_pairs": 0, "sentence": (
            "No fused (patient-level) result: no X-ray and CT image share a group (patient) id, so the data holds "
            "no X-ray/CT pair of one patient. Pairing images of different patients, e.g. by label, would average "
            "two draws of a known class and say nothing about fusion, so no fused metric is shown.")}
    patients = len({x.group for x, _ in pairs})
    return {"pairing": "patient (shared group id)", "n_pairs": len(pairs), "sentence": (
        f"The fused probability is the mean of a patient's X-ray and CT probabilities: {len(pairs)} pairs from "
        f"{patients} patients (same group id and label in both modalities); images without a partner of the "
        "other modality are left out of the fused metrics. Its bootstrap resamples connected groups of "
        "patients (X-ray group, CT group).")}


def _calibration(raw: Cases, calibrated: Cases) -> dict:
    """ECE, Brier and log-loss of the network's probabilities and of the calibrated ones, on the same cases."""
    return {"before": calibration_scores(raw[0], raw[1]), "after": calibration_scores(calibrated[0], calibrated[1])}


def _at_sensitivities(config: BundleConfig, kind: str, cases: Cases, n_resamples: int, seed: int) -> dict:
    """Per target sensitivity: the threshold the bundle's calibration scores give for it (never chosen on test),
    and the sensitivity and specificity it reaches on these cases, with CIs; {} for bundles without the scores."""
    y, p, groups, _ = cases
    out = {}
    for target in FIXED_SENSITIVITIES:
        try:
            threshold = config.thresholds_at(OperatingPoint("sensitivity", target))[kind]
        except RespiscanError:
            return {}
        m = _scored(y, p, threshold, groups, n_resamples, seed)
        keep = ("sensitivity", "specificity", "ppv", "npv")
        out[f"{target:.2f}"] = {"threshold": threshold, **{k: m[k] for k in keep},
                                "ci": {k: m["ci"].get(k) for k in keep}}
    return out


def _at_prevalence(m: dict, prevalence: float) -> dict:
    """PPV and NPV at `prevalence` from the sensitivity and specificity reached; the bounds combine the ends of
    their CIs (both metrics rise with each, so the bounds are conservative)."""
    ci_sens, ci_spec = m["ci"].get("sensitivity"), m["ci"].get("specificity")
    point = at_prevalence(m["sensitivity"], m["specificity"], prevalence)
    bounds = ([at_prevalence(ci_sens[i], ci_spec[i], prevalence) for i in (0, 1)]
              if ci_sens is not None and ci_spec is not None else None)
    return {"prevalence": prevalence, **point,
            "ci": {k: None if bounds is None or None in (bounds[0][k], bounds[1][k]) else [bounds[0][k], bounds[1][k]]
                   for k in ("ppv", "npv")}}


def _card_results(config: BundleConfig, cases: dict[str, Cases], metrics: dict[str, dict], data: str) -> list:
    """The model-card entries of this evaluation: per prediction kind and source (in-source or external)."""
    results = []
    for kind, c in cases.items():
        names = sorted(set(c[3].tolist()))
        blocks = [(names[0], metrics[kind])] if len(names) == 1 else list(metrics[kind]["by_source"].items())
        results += [evaluation_result(config, kind, name, block, data) for name, block in blocks]
    return results


def _training_logs(bundle: Path) -> dict[str, Path]:
    """BUNDLE/logs/*.csv by stage name, in the order the stages ran."""
    def order(path: Path) -> tuple[int, str]:
        stage = next((i for i, prefix in enumerate(_STAGE_ORDER) if path.stem.startswith(prefix)), len(_STAGE_ORDER))
        return stage, path.stem

    return {p.stem: p for p in sorted((bundle / LOGS).glob("*.csv"), key=order)}


def _plots(cases: dict[str, Cases], metrics: dict[str, dict], bundle: Path, out: Path,
           warnings: list[str], raw: dict[str, Cases]) -> dict[str, str]:
    """The figures beside metrics.json (file names by kind); a bundle without usable logs gets a warning instead.
    The reliability diagram shows each kind calibrated and, beside it, as the network gave it (`raw`)."""
    curves = {KIND_NAMES[k]: (c[0], c[1]) for k, c in cases.items()}
    reliability = {**curves, **{f"{KIND_NAMES[k]} (uncalibrated)": (c[0], c[1]) for k, c in raw.items()}}
    points = {KIND_NAMES[k]: metrics[k]["threshold"] for k in cases}
    files = [plot_roc(curves, out / "roc.png", points), plot_pr(curves, out / "pr.png", points),
             plot_confusion({KIND_NAMES[k]: metrics[k]["confusion_matrix"] for k in cases}, out / "confusion.png"),
             plot_reliability(reliability, out / "reliability.png")]
    logs = _training_logs(bundle)
    if not logs:
        warnings.append("Training curves are not shown: the bundle has no logs/*.csv.")
    else:
        try:
            files.append(plot_training_curves(logs, out / "training_curves.png"))
        except RespiscanError as e:
            warnings.append(f"Training curves are not shown: {e}.")
    return {f.stem: f.name for f in files}


def _seen_in_training(test: list[Sample], bundle: Path) -> list[str]:
    """Test images the bundle was trained or validated on (same file): their scores measure memory."""
    fitted = {Path(s.path).resolve() for s in read_splits(bundle) if s.split != "test"}
    return [s.id for s in test if Path(s.path).resolve() in fitted]


def _audit(config: BundleConfig, bundle: Path, test: list[Sample], metrics: dict[str, dict]) -> dict | None:
    """The data audit train recorded, with its shortcut baselines beside the test AUC just measured: per
    modality only where this test split is the one the baselines were scored on (the bundle's splits.csv),
    since a baseline and a model scored on different images say nothing about each other. None without one."""
    audit = config.audit
    if not audit:
        return None
    recorded = {m: {Path(s.path).resolve() for s in read_splits(bundle) if s.split == "test" and s.modality == m}
                for m in metrics}
    model_auc = {m: metrics[m]["roc_auc"] for m in recorded
                 if recorded[m] and recorded[m] == {Path(s.path).resolve() for s in test if s.modality == m}
                 and metrics[m]["roc_auc"] is not None}
    shortcuts = audit.get("shortcuts", {})
    without_model = set(shortcut_warnings(shortcuts))  # as train worded them; replaced by the ones below
    baselines = shortcut_baselines(shortcuts, model_auc)
    return {"n_images": audit["n_images"], "cross_split_duplicates": audit["cross_split_duplicates"],
            "errors": audit.get("errors", []), "label_conflicts": audit.get("label_conflicts", []),
            "warnings": [w for w in audit["warnings"] if w not in without_model]
            + [b.warning for b in baselines if b.warning],
            "shortcuts": [asdict(b) for b in baselines], "compared_with_model": sorted(model_auc)}


def evaluate(bundle: str | Path, data: DataPaths, out: str | Path | None = None, *, strict: bool = False,
             pipeline: BasePipeline | None = None, engine: Engine = "auto", n_resamples: int = N_RESAMPLES,
             seed: int = 0, figures: bool = True, samples: list[Sample] | None = None,
             prevalence: float | None = None) -> dict:
    """Metrics with CIs on the test split, figures and report; writes them to `out` (default BUNDLE/evaluation),
    and the results to the bundle's model card.

    Beside the metrics at the bundle's operating point: calibration before and after (ECE, Brier, log-loss),
    sensitivity and specificity at the thresholds the bundle's calibration scores give for FIXED_SENSITIVITIES,
    and with `prevalence` the PPV and NPV a deployment with that COVID share would see.

    The engine is chosen as `predict` chooses it (`serving.load`). `seed` seeds the bootstrap, so the same
    inputs give the same intervals. `figures=False` skips the plots (most of the time taken), for callers that
    evaluate many runs and report them together. `samples` replaces discovering DATA (crossval's folds).
    """
    bundle = Path(bundle)
    pipe = pipeline or load_pipeline(bundle, engine)
    out = Path(out) if out else bundle / "evaluation"
    test = [s for s in (discover(data) if samples is None else samples)
            if s.split == "test" and s.modality in pipe.modalities]
    if not test:
        raise RespiscanError(f"{describe(data)}: no test images for the bundle's modalities "
                             f"({', '.join(pipe.modalities)})")
    rows, skipped = pipe.predict_samples(test, strict=strict)
    by_id = {s.id: s for s in test}
    prob = {r["id"]: r["probability"] for r in rows}
    raw_prob = {r["id"]: r["uncalibrated_probability"] for r in rows}
    for r in rows:
        r["label"] = CLASS_NAMES[by_id[r["id"]].label]
    scored = [s for s in test if s.id in prob]
    results: dict = {"split": "test", "bundle": str(bundle), "data": describe(data), "positive_class": "COVID",
                     "skipped": [{"id": i, "reason": why} for i, why in skipped], "modalities": {}}
    cases = {m: _image_cases(mine, prob) for m in pipe.modalities if (mine := [s for s in scored if s.modality == m])}
    if len(cases) == 2:
        pairs = patient_pairs([s for s in scored if s.modality == "xray"], [s for s in scored if s.modality == "ct"])
        results["fusion"] = _fusion(pairs)
        if pairs:
            cases["fused"] = _fused_cases(pairs, prob)
            raw_fused = _fused_cases(pairs, raw_prob)
            results["fused"] = {"pairing": results["fusion"]["pairing"], "n_pairs": len(pairs)}
    metrics = {k: _kind_metrics(c, pipe.thresholds[k], n_resamples, seed) for k, c in cases.items()}
    raw = {k: raw_fused if k == "fused" else _image_cases([s for s in scored if s.modality == k], raw_prob)
           for k in cases}
    for k, m in metrics.items():
        m["operating_point"] = pipe.operating_point
        m["calibration"] = _calibration(raw[k], cases[k])
        m["at_sensitivity"] = _at_sensitivities(pipe.config, k, cases[k], n_resamples, seed)
        if prevalence is not None:
            m["at_prevalence"] = _at_prevalence(m, prevalence)
    _add_shift(metrics, scored, rows, pipe.config.ood)
    results["modalities"] = {m: metrics[m] for m in pipe.modalities if m in metrics}
    if "fused" in metrics:
        results["fused"].update(metrics["fused"])
    grouped = any(s.group for s in scored)
    results["ci"] = {"confidence": CONFIDENCE, "method": "bootstrap stratified by class, BCa where defined, else "
                     "percentile (per metric: ci_method)", "n_resamples": n_resamples, "seed": seed,
                     "resampled": "patients (group ids)" if grouped else "images"}
    results["test_set"] = class_balance(scored, lambda s: f"{s.modality} / test / {source_of(s)}")
    results["audit"] = _audit(pipe.config, bundle, test, results["modalities"])
    results["warnings"] = []
    seen = _seen_in_training(scored, bundle)
    if seen:
        results["warnings"].append(
            f"{len(seen)} test image(s) were in the bundle's training or validation split (e.g. {seen[0]}): their "
            "scores measure memory, not generalisation.")
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = _plots(cases, metrics, bundle, out, results["warnings"], raw) if figures else {}
    md, html = write_report(results, pipe.bundle, out)
    results["report"] = {"markdown": md.name, "html": html.name}
    write_json(out / "metrics.json", results)
    write_rows(out / "predictions.csv", rows, ["id", "path", "modality", "label", "probability", "prediction",
                                               "in_distribution", "ood_score", "uncalibrated_probability"])
    write_card(Bundle.open(bundle), _card_results(pipe.config, cases, metrics, describe(data)))
    return results
