"""The model card: what a bundle is for, what it was trained and validated on, how far to trust it.

Written into every bundle as MODEL_CARD.md and as `model_card` in config.json: by `train` (everything known at
training), then extended by `evaluate` and `crossval` with the results they measure, each labelled in-source
(a test split of a training source) or external (a source the bundle never saw). It sits just above bundle.py
and imports nothing else of respiscan's, so that training, evaluation and experiments can all write it.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from respiscan import __version__
from respiscan.bundle import SPLITS_FILE, Bundle, BundleConfig, CardResult, ModelCard, Setting
from respiscan.errors import RespiscanError
from respiscan.utils import atomic_write

CARD_FILE = "MODEL_CARD.md"
KIND_NAMES = {"xray": "X-ray", "ct": "CT", "fused": "Fused"}
INTENDED_USE = (
    "Research only. respiscan classifies chest X-ray and CT slice images as COVID-19 or Non-COVID to study "
    "multi-modal multi-task learning. It is not a medical device, has no regulatory clearance, and must not be "
    "used to diagnose, triage or treat anyone.")
SMALL_CALIBRATION = 100  # below this many images, calibration and thresholds are visibly uncertain


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_ci(value: float | None, ci: list[float] | None) -> str:
    return _num(value) + ("" if ci is None or value is None else f" ({ci[0]:.3f}-{ci[1]:.3f})")


def _patient_pairs(bundle: Path) -> bool | None:
    """Whether the training data links an X-ray and a CT of one patient (a shared group); None without splits.csv."""
    path = bundle / SPLITS_FILE
    if not path.is_file():
        return None
    groups: dict[str, set[str]] = {"xray": set(), "ct": set()}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("group") and row.get("split") != "test" and row.get("modality") in groups:
                groups[row["modality"]].add(row["group"])
    return bool(groups["xray"] & groups["ct"])


def _training_data(config: BundleConfig) -> list[str]:
    data, fp = config.data, config.data.fingerprint
    lines = [f"Data: {data.path}; {fp.n_samples} images listed (listing sha256 {fp.samples_sha256[:16]}, file "
             f"contents sha256 {fp.files_sha256[:16]})."]
    by_source = data.sources or {"(sources not recorded)": data.counts}
    for source, counts in by_source.items():
        cells: dict[tuple[str, str], dict[str, int]] = {}
        for key, n in counts.items():
            modality, split, label = key.split("/")
            cells.setdefault((modality, split), {}).setdefault(label, 0)
            cells[modality, split][label] += n
        for modality in dict.fromkeys(m for m, _ in cells):
            parts = [f"{split} {c.get('COVID', 0)} COVID / {c.get('Non_COVID', 0)} Non_COVID"
                     for (m, split), c in cells.items() if m == modality]
            lines.append(f"{source}, {KIND_NAMES.get(modality, modality)}: {'; '.join(parts)}.")
    if data.skipped:
        lines.append(f"{len(data.skipped)} unreadable image(s) skipped, e.g. {data.skipped[0].reason}.")
    return lines


def _validation(config: BundleConfig) -> list[str]:
    training = config.training
    val = training.get("val_fraction")
    lines = [f"Validation split: {val if val is not None else 'a share'} of train, carved by group (patient) and "
             "stratified by source and class; it chose every stage's epochs (early stopping)."]
    if config.calibration:
        lines.append(f"Calibration split: {training.get('calibration_fraction')} of the rest of train, carved the "
                     "same way; no stage fitted or early-stopped on it. It fitted the calibration and chose the "
                     "operating thresholds.")
        if any("twin" in config.calibration_of(m).fitted_on for m in config.model.modalities):
            lines.append("Cross-fitted: the validation split joined it, scored by a twin of the MLP stages that "
                         "chose its epochs on the calibration split (the backbones chose no epoch on validation), "
                         "so no image was scored by a model that selected anything on it.")
    else:
        lines.append("No calibration split: the bundle predates calibration; its thresholds were chosen on the "
                     "validation split, which also chose the epochs.")
    lines += ["Test split: read only by `respiscan evaluate`; its results are below, labelled in-source.",
              "Sources the bundle was not trained on are external; `respiscan crossval --by source` estimates "
              "transfer by training the same configuration without each source in turn."]
    return lines


def _calibration(config: BundleConfig) -> list[str]:
    lines = []
    for m in config.model.modalities:
        c = config.calibration_of(m)
        if c.method == "identity":
            lines.append(f"{KIND_NAMES[m]}: not calibrated ({c.fitted_on}).")
        else:
            lines.append(f"{KIND_NAMES[m]}: {c.method} scaling, p = sigmoid({c.slope:.3f} * logit(p_network) + "
                         f"{c.intercept:.3f}); fitted on the {c.fitted_on}.")
    if len(config.model.modalities) > 1:
        lines.append("Fused: the mean of the calibrated per-modality probabilities (not itself recalibrated).")
    return lines


def _operating_points(config: BundleConfig) -> list[str]:
    lines = []
    for kind, threshold in config.thresholds.items():
        record = (config.operating_points or {}).get(kind)
        if record is None:
            how = ("the mean of the per-modality thresholds" if kind == "fused" and config.operating_points
                   else "recorded without its rule (the bundle predates operating-point records)")
            lines.append(f"{KIND_NAMES[kind]}: threshold {threshold:.3f}, {how}.")
            continue
        ci = "" if record.ci is None else f" (95 % bootstrap CI {record.ci[0]:.3f}-{record.ci[1]:.3f})"
        lines.append(f"{KIND_NAMES[kind]}: threshold {threshold:.3f}{ci}, {record.point.describe()} "
                     f"({record.point}), on the {record.chosen_on}; there it reached sensitivity "
                     f"{_num(record.sensitivity)} and specificity {_num(record.specificity)}.")
    lines.append("COVID is predicted when p >= threshold. `respiscan predict --operating-point RULE` applies "
                 "another rule (youden, sensitivity=T, specificity=T) to the same calibration scores for one run.")
    return lines


def _shift_detector(config: BundleConfig) -> str:
    ood = config.ood
    if ood is None:
        return "None: this bundle has no shift detector, so it cannot warn about inputs unlike its training images."
    measured = ", ".join(f"{KIND_NAMES.get(m, m)} {t.val_flagged:.1%} of {t.n_val}" for m, t in ood.modalities.items())
    return (f"{ood.method}, in the {ood.space}; thresholds set for a {ood.false_alarm_rate:.0%} false-alarm rate "
            f"on held-out images of the training sources (measured there: {measured}).")


def _limitations(bundle: Bundle) -> list[str]:
    config = bundle.config
    lines = []
    by_modality = config.data.sources_by_modality()
    for m in config.model.modalities:
        names = by_modality.get(m, [])
        if not names:
            lines.append(f"{KIND_NAMES[m]}: training sources not recorded; transfer to other sites is unverified.")
        elif len(names) == 1:
            lines.append(f"{KIND_NAMES[m]}: trained on one source ({names[0]}) only: transfer to other sites is "
                         "unverified.")
    if len(config.model.modalities) > 1 and not _patient_pairs(bundle.path):
        lines.append("No X-ray/CT pairs of one patient in the training data: there is no patient-level fusion "
                     "result; the fused threshold is the mean of the per-modality thresholds, not measured on "
                     "patients.")
    for m in config.model.modalities:
        c = config.calibration_of(m)
        if c.method != "identity" and c.n < SMALL_CALIBRATION:
            lines.append(f"{KIND_NAMES[m]}: calibrated on {c.n} images only; calibration and threshold are "
                         "uncertain (see the threshold's CI).")
    lines.append("Labels are those of the public collections the images come from; a test split of the same "
                 "collection shares its acquisition, so in-source results overstate performance elsewhere.")
    return lines


def build_card(bundle: Bundle, results: list[CardResult] | None = None) -> ModelCard:
    """The card of a bundle as its config says now, with `results` (default: the results already on its card)."""
    config = bundle.config
    kept = list(config.model_card.results) if config.model_card and results is None else list(results or [])
    versions = {"respiscan (trained)": config.respiscan_version or "not recorded", **config.versions,
                "respiscan (card)": __version__}
    return ModelCard(INTENDED_USE, _training_data(config), _validation(config), _calibration(config),
                     _operating_points(config), _shift_detector(config), _limitations(bundle), versions, kept,
                     _today())


def write_card(bundle: Bundle, results: list[CardResult] | None = None) -> Bundle:
    """Rebuild the card, add `results` (replacing earlier ones for the same method, data, source and kind),
    and write it into config.json and MODEL_CARD.md; the bundle as it now is."""
    def key(r: CardResult) -> tuple:
        return r.method, r.data, r.source, r.kind

    new = {key(r): r for r in results or []}
    old = [r for r in (bundle.config.model_card.results if bundle.config.model_card else []) if key(r) not in new]
    card = build_card(bundle, [*old, *new.values()])
    saved = bundle.save_config(replace(bundle.config, model_card=card))
    with atomic_write(bundle.path / CARD_FILE, "w", encoding="utf-8") as f:
        f.write(render_card(card, saved.config))
    return saved


def setting_of(config: BundleConfig, kind: str, source: str) -> Setting:
    """In-source when every image's source is one the bundle trained that modality on; a fused case's source is
    "X-ray source + CT source" (or one name when both agree)."""
    trained = config.data.sources_by_modality()
    if not trained:
        return "unknown"
    parts = source.split(" + ") if kind == "fused" else [source]
    modalities = ["xray", "ct"] if kind == "fused" else [kind]
    if len(parts) == 1:
        parts = parts * len(modalities)
    return "in-source" if all(p in trained.get(m, []) for p, m in zip(parts, modalities)) else "external"


def evaluation_result(config: BundleConfig, kind: str, source: str, metrics: dict[str, Any], data: str) -> CardResult:
    """A card result from one of evaluate's metric blocks (binary_metrics plus `ci`)."""
    ci = metrics.get("ci", {})
    return CardResult(setting_of(config, kind, source), source, kind, "evaluate", data, metrics["n"],
                      metrics["n_positive"], metrics["roc_auc"], _interval(ci.get("roc_auc")), metrics["sensitivity"],
                      _interval(ci.get("sensitivity")), metrics["specificity"], _interval(ci.get("specificity")),
                      metrics["threshold"], metrics["ece"], _today(),
                      *((shift["auc"], shift["shifted"]) if (shift := metrics.get("set_shift")) else ()))


def crossval_results(result: dict[str, Any]) -> list[CardResult]:
    """Card results from `run_crossval`'s summary: each fold's model (same configuration as this bundle) on what
    it left out; external when the folds leave sources out."""
    setting: Setting = "external" if result.get("by") == "source" else "in-source"
    return [CardResult(setting, str(r["held_out"]).removeprefix("source "), r["modality"], "crossval",
                       f"crossval --by {result.get('by')}, fold {r['fold']} (a model of the same configuration "
                       f"trained without it{_baselines(r)})", r["n"], None, r["auc"],
                       None if r.get("auc_low") is None else [r["auc_low"], r["auc_high"]], r["sensitivity"], None,
                       r["specificity"], None, r.get("threshold"), r.get("ece"), _today())
            for r in result["folds"]]


def _baselines(row: dict[str, Any]) -> str:
    """The fold's network-free shortcut baselines on the same images, for the card's reader to compare."""
    named = [f"{k.removesuffix('_baseline_auc')} {v:.3f}" for k, v in row.items()
             if k.endswith("_baseline_auc") and v is not None]
    return f"; network-free baselines on the same images: {', '.join(named)}" if named else ""


def record_crossval(bundle: str | Path, result: dict[str, Any]) -> Bundle:
    """Add a crossval run's results to a bundle's card. The folds describe the bundle only if it was trained
    with their configuration (seed and modalities aside), so any other bundle is refused, naming what differs."""
    opened = require_same_settings(bundle, result["config"]) if "config" in result else Bundle.open(bundle)
    return write_card(opened, crossval_results(result))


def require_same_settings(bundle: str | Path, training: dict[str, Any]) -> Bundle:
    """The bundle, if it was trained with these settings (a TrainConfig's to_dict(); seed and modalities aside);
    else an error naming what differs. crossval checks before its first fold, not after the last."""
    opened = Bundle.open(bundle)
    differ = _differences(_comparable(opened.config.training), _comparable(training))
    if differ:
        raise RespiscanError(f"{opened.path}: trained with other settings than the crossval folds "
                             f"({', '.join(differ)}); its card would describe another model")
    return opened


def _comparable(training: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in training.items() if k != "seed"}
    out["model"] = {k: v for k, v in training.get("model", {}).items() if k != "modalities"}
    return out


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [where.rstrip(".")]


def _interval(ci) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def _results_table(results: list[CardResult]) -> list[str]:
    lines = ["| Prediction | Source | Data | n (COVID) | ROC AUC (95 % CI) | Sensitivity (CI) | Specificity (CI) | "
             "Threshold | ECE | Shift AUC as a set | Measured |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cases = f"{r.n}" + ("" if r.n_positive is None else f" ({r.n_positive})")
        threshold = "n/a" if r.threshold is None else f"{r.threshold:.3f}"
        shift = _num(r.set_shift_auc) + (" (shifted)" if r.set_shifted else "")
        lines.append(f"| {KIND_NAMES.get(r.kind, r.kind)} | {r.source} | {r.data} | {cases} | "
                     f"{_with_ci(r.roc_auc, r.roc_auc_ci)} | {_with_ci(r.sensitivity, r.sensitivity_ci)} | "
                     f"{_with_ci(r.specificity, r.specificity_ci)} | {threshold} | {_num(r.ece)} | {shift} | "
                     f"{r.date} |")
    return lines


def render_card(card: ModelCard, config: BundleConfig) -> str:
    """MODEL_CARD.md."""
    model = config.model
    lines = ["# Model card: respiscan bundle", "",
             f"{', '.join(KIND_NAMES[m] for m in model.modalities)} COVID-19 classifier; backbones "
             f"{', '.join(f'{KIND_NAMES[m]} {b}' for m, b in model.task_backbones.items())}; shared features "
             f"{model.shared}; preset {config.training.get('preset', 'not recorded')}. Card updated {card.updated}.",
             "", "## Intended use", "", card.intended_use, ""]

    def section(title: str, items: list[str]) -> None:
        lines.extend([f"## {title}", "", *(f"- {item}" for item in items), ""])

    section("Training data", card.training_data)
    section("Validation method", card.validation)
    groups: list[tuple[str, str, list[CardResult]]] = [
        ("In-source test results", "Test splits of the sources the bundle was trained on (95 % bootstrap CIs).",
         [r for r in card.results if r.method == "evaluate" and r.setting == "in-source"]),
        ("External results", "Sources the bundle was never trained on: what to expect at another site.",
         [r for r in card.results if r.method == "evaluate" and r.setting != "in-source"]),
        ("Cross-validation", "Models of this configuration, each scored on the source or fold it left out "
                             "(external when a source was left out).",
         [r for r in card.results if r.method == "crossval"])]
    for title, text, results in groups:
        lines += [f"## {title}", ""]
        if results:
            lines += [text, "", *_results_table(results), ""]
        else:
            lines += ["Not measured yet" + (": run `respiscan evaluate BUNDLE DATA`." if "test" in title.lower()
                                            or "External" in title else "."), ""]
    section("Calibration", card.calibration)
    section("Operating points", card.operating_points)
    lines += ["## Distribution-shift detector", "", card.shift_detector, ""]
    section("Known limitations", card.limitations)
    section("Versions", [f"{k}: {v}" for k, v in card.versions.items()])
    return "\n".join(lines)
