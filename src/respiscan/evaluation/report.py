"""report.md and report.html for one evaluation: what a reader needs to judge the numbers without the code.

Both files are rendered from one list of blocks, so they say the same thing; the HTML embeds the figures as
base64 PNGs and needs no other file (it can be mailed or attached to a paper's supplement as it is).
"""

from __future__ import annotations

import base64
import csv
import html
from datetime import datetime, timezone
from pathlib import Path

from respiscan import __version__
from respiscan.bundle import SPLITS_FILE, Bundle, BundleConfig
from respiscan.data.audit import SHORTCUT_AUC_LIMIT, SHORTCUT_MODEL_GAP, class_balance, source_of
from respiscan.data.samples import CLASS_NAMES, Sample
from respiscan.metrics import SCALAR_METRICS
from respiscan.training.config import TrainConfig
from respiscan.utils import atomic_write

KIND_NAMES = {"xray": "X-ray", "ct": "CT", "fused": "Fused"}
METRIC_NAMES = {
    "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy",
    "sensitivity": "Sensitivity (COVID cases caught)", "specificity": "Specificity (Non_COVID cases cleared)",
    "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1", "mcc": "MCC", "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)", "brier": "Brier score (lower is better)",
    "ece": "ECE, 10 bins (lower is better; no CI, see Calibration)",
}
PLOT_CAPTIONS = {
    "roc": "ROC curves. The open marker is the operating point at the bundle's threshold.",
    "pr": "Precision-recall curves; the dashed line is what a random ranking scores (the COVID prevalence).",
    "confusion": "Confusion matrices at the bundle's thresholds; colour is the fraction of the true class.",
    "reliability": "Reliability diagram: observed COVID frequency against predicted probability, for the "
                   "calibrated probabilities and, marked (uncalibrated), the network's own; below, cases per bin "
                   "(sparse bins are noisy).",
    "training_curves": "Training curves per stage (losses left axis, validation scores right axis). Stages "
                       "reused from an earlier run with the same settings have no curve here.",
}
SHARED_TEXT = {
    "plain": "plain: one MLP trained on X-ray and CT embeddings together, on COVID labels",
    "adversarial": "adversarial: a generator trained against a modality discriminator (towards modality-invariant "
                   "features), then frozen and fine-tuned on {finetune} labels",
    "source_adversarial": "source-adversarial: one MLP on X-ray and CT embeddings, trained on COVID labels while "
                          "a class-conditional discriminator of the acquisition source is left guessing",
    "none": "none: task-specific features only (ablation without shared features)",
}
FINETUNE_TEXT = {"covid": "COVID", "modality": "modality (the reference's choice; it can undo the invariance)"}
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; line-height: 1.45;
       max-width: 62rem; margin: 2rem auto; padding: 0 1rem; }
h1 { border-bottom: 2px solid #2a6; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f2f5f3; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9rem; color: #555; }
"""

Block = tuple  # ("h1" | "h2" | "h3" | "p", text) | ("ul", [text]) | ("table", header, rows) | ("img", caption, file)


def read_splits(bundle: Path) -> list[Sample]:
    """The samples the bundle was trained, validated and tested on (BUNDLE/splits.csv); [] when it has none."""
    path = Path(bundle) / SPLITS_FILE
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [Sample(r["id"], Path(r["path"]), r["modality"], CLASS_NAMES.index(r["label"]), r["split"],
                       r["group"] or None, r["source"] or None) for r in csv.DictReader(f)]


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_ci(m: dict, name: str) -> str:
    ci = m["ci"].get(name)
    return _num(m[name]) + ("" if ci is None or m[name] is None else f" ({ci[0]:.3f} to {ci[1]:.3f})")


def _balance_table(balance: dict[str, dict]) -> Block:
    rows = [[key, str(c["Non_COVID"]), str(c["COVID"]), str(c["n"]), f"{c['covid_fraction']:.2f}"]
            for key, c in balance.items()]
    return ("table", ["Modality / split / source", "Non_COVID", "COVID", "Total", "COVID share"], rows)


def _metric_table(columns: dict[str, dict]) -> Block:
    """Metric rows, one column per prediction kind (or source): value (CI)."""
    rows = [["Cases (COVID)", *(f"{m['n']} ({m['n_positive']})" for m in columns.values())],
            ["Threshold", *(f"{m['threshold']:.3f}" for m in columns.values())]]
    rows += [[METRIC_NAMES[name], *(_with_ci(m, name) for m in columns.values())] for name in SCALAR_METRICS]
    rows.append(["Confusion TP / FP / FN / TN", *(
        "{tp} / {fp} / {fn} / {tn}".format(**m["confusion_matrix"]) for m in columns.values())])
    if any(m.get("shift_flagged") is not None for m in columns.values()):
        rows.append(["Flagged unlike the training images (shift detector)",
                     *(_num(m.get("shift_flagged")) for m in columns.values())])
    if any(m.get("set_shift") for m in columns.values()):
        rows.append(["Unlike the training images as a set: shift AUC (0.5 = like validation)",
                     *(_set_shift(m.get("set_shift")) for m in columns.values())])
    return ("table", ["Metric", *columns], rows)


def _set_shift(shift: dict | None) -> str:
    if not shift:
        return "n/a"
    interval = f"{shift['auc']:.3f} ({shift['ci'][0]:.3f} to {shift['ci'][1]:.3f})"
    return interval + (", shifted" if shift["shifted"] else "")


def _shifted_sets(kinds: dict[str, dict]) -> list[str]:
    """A warning for every modality or source whose images, as a set, are unlike the training images."""
    sets = [(KIND_NAMES[k], m) for k, m in kinds.items()]
    sets += [(f"{KIND_NAMES[k]}, {name}", s) for k, m in kinds.items() for name, s in m.get("by_source", {}).items()]
    return [f"Warning: {what}: the test images are unlike the training images as a set (shift AUC "
            f"{m['set_shift']['auc']:.3f}, 95 % CI {m['set_shift']['ci'][0]:.3f} to {m['set_shift']['ci'][1]:.3f}, "
            "where 0.5 is as alike as the validation images; the detector flags "
            f"{m['shift_flagged']:.0%} of them one by one). The bundle's calibration and threshold were fitted "
            "on images unlike these and may not hold for them."
            for what, m in sets if (m.get("set_shift") or {}).get("shifted")]


def _summary(kinds: dict[str, dict], results: dict) -> list[Block]:
    items = [f"{KIND_NAMES[k]}: ROC AUC {_with_ci(m, 'roc_auc')}, sensitivity {_with_ci(m, 'sensitivity')}, "
             f"specificity {_with_ci(m, 'specificity')} at threshold {m['threshold']:.3f} "
             f"(n = {m['n']}, {m['n_positive']} COVID)." for k, m in kinds.items()]
    items += _shifted_sets(kinds)
    if "fusion" in results and "fused" not in results:
        items.append(results["fusion"]["sentence"])
    ci = results["ci"]
    percentile = [f"{KIND_NAMES[k]}: " + ", ".join(METRIC_NAMES[name] for name, how in m["ci_method"].items()
                                                    if how == "percentile")
                  for k, m in kinds.items() if "percentile" in m["ci_method"].values()]
    where = ("; percentile intervals, where BCa is undefined (e.g. a resample without the metric, or no spread "
             "when one group is left out): " + "; ".join(percentile)) if percentile else ""
    return [("h2", "Summary"), ("ul", items),
            ("p", f"Brackets hold {100 * ci['confidence']:g}% confidence intervals ({ci['method']}, "
                  f"{ci['n_resamples']} resamples of {ci['resampled']}, seed {ci['seed']}){where}.")]


def _data(results: dict, bundle: Bundle) -> list[Block]:
    data, fp = bundle.config.data, bundle.config.data.fingerprint
    fitted = [s for s in read_splits(bundle.path) if s.split != "test"]
    blocks: list[Block] = [
        ("h2", "Data"),
        ("p", f"The model was trained on {data.path} ({fp.n_samples} images listed; listing sha256 "
              f"{fp.samples_sha256[:16]}, file contents sha256 {fp.files_sha256[:16]}). The validation "
              "split was carved from the training split, keeping each patient (group id, where the data gives "
              "one) on one side; it chose the best epochs and the thresholds. The test split was used for nothing "
              "but this report."),
        ("h3", "Training and validation images (bundle splits.csv)")]
    if fitted:
        blocks.append(_balance_table(class_balance(fitted, lambda s: f"{s.modality} / {s.split} / {source_of(s)}")))
    else:
        blocks.append(("p", "Not available: the bundle has no splits.csv."))
    blocks += [("h3", f"Test images evaluated ({results['data']})"), _balance_table(results["test_set"])]
    return blocks


def _pretrained(value: bool | str) -> str:
    if value is False:
        return "none: backbones trained from scratch on the training split"
    if value is True:
        return "ImageNet weights from the timm hub; backbone frozen"
    return f"local weights {value}; backbone frozen"


def _threshold_rule(config: BundleConfig, kind: str) -> str:
    record = (config.operating_points or {}).get(kind)
    if record is not None:
        ci = ("" if record.ci is None
              else f"; 95 % bootstrap CI of the threshold {record.ci[0]:.3f} to {record.ci[1]:.3f}")
        return f"{record.point.describe()} ({record.point}) on the {record.chosen_on}{ci}"
    if config.operating_points is not None:  # trained with operating points: this kind could not have one
        return ("mean of the per-modality thresholds (no X-ray/CT pairs of one patient to choose it on)"
                if kind == "fused" else "default 0.5: the calibration and validation splits had one class only")
    if kind == "fused":
        return "applied to the mean of the per-modality probabilities; fixed, not tuned on validation"
    val = config.validation_metrics.get(kind)
    if val and 0 < val["n_positive"] < val["n"]:
        return (f"Youden's J (maximum sensitivity + specificity - 1) on the validation split "
                f"(n = {val['n']}, {val['n_positive']} COVID)")
    return "default 0.5: the validation split had one class only, so no threshold could be chosen"


def _floor(scores: dict) -> str:
    floor = scores.get("ece_if_calibrated")  # absent from results written before it existed
    return "n/a" if floor is None else f"{floor['mean']:.3f}, up to {floor['q95']:.3f} (p = {floor['p_value']:.2f})"


def _trust(kinds: dict[str, dict], config: BundleConfig) -> list[Block]:
    """Calibration before and after, the fixed-sensitivity operating points and, when asked, PPV/NPV at a
    deployment's prevalence."""
    def pair(m: dict, name: str) -> str:
        return f"{m['calibration']['before'][name]:.3f} -> {m['calibration']['after'][name]:.3f}"

    method = {k: config.calibration_of(k).method if k != "fused" else "mean of the calibrated modalities"
              for k in kinds}
    blocks: list[Block] = [
        ("h2", "Calibration and operating points"),
        ("p", "Calibration maps the network's probabilities so that, among cases given p, a share p has COVID; it "
              "was fitted on images that chose nothing in the model that scored them (the bundle's calibration split; "
              "by default also its validation split, scored by a twin of the MLP stages that chose their epochs on "
              "the calibration split; the model card says which), and it keeps every ranking (ROC AUC) unchanged. "
              "Each cell: uncalibrated -> calibrated, on the test split. "
              "ECE has a floor on a test split this size: the last column is the ECE a perfectly calibrated model "
              "with the calibrated probabilities would show on these images (mean, 95th percentile; consistency "
              "resampling), and the p-value of the calibrated ECE against it (small: miscalibrated)."),
        ("table", ["Prediction", "Calibration", "ECE", "Brier score", "Log-loss", "ECE if calibrated (p)"],
         [[KIND_NAMES[k], method[k], pair(m, "ece"), pair(m, "brier"), pair(m, "log_loss"),
           _floor(m["calibration"]["after"])] for k, m in kinds.items() if "calibration" in m])]
    fixed = [[KIND_NAMES[k], target, f"{v['threshold']:.3f}", _with_ci(v, "sensitivity"), _with_ci(v, "specificity")]
             for k, m in kinds.items() for target, v in m.get("at_sensitivity", {}).items()]
    if fixed:
        blocks += [("p", "Screening operating points: the threshold the bundle's calibration scores give for each "
                         "target sensitivity (chosen there, never on test), and what it reaches on the test split."),
                   ("table", ["Prediction", "Target sensitivity", "Threshold", "Sensitivity on test (CI)",
                              "Specificity on test (CI)"], fixed)]
    else:
        blocks.append(("p", "No fixed-sensitivity operating points: the bundle stores no calibration scores (it "
                            "predates operating points)."))
    prevalence = [[KIND_NAMES[k], f"{v['prevalence']:g}", _with_ci(v, "ppv"), _with_ci(v, "npv")]
                  for k, m in kinds.items() if (v := m.get("at_prevalence"))]
    if prevalence:
        blocks += [("p", "At the prevalence given (--prevalence), from the sensitivity and specificity at the "
                         "bundle's threshold by Bayes' rule; the bounds combine the ends of their CIs."),
                   ("table", ["Prediction", "Prevalence", "PPV (bounds)", "NPV (bounds)"], prevalence)]
    return blocks


def _configuration(config: BundleConfig) -> list[Block]:
    model, pre = config.model, config.preprocess
    training = TrainConfig.from_dict(config.training) if config.training else None
    mods = model.modalities

    def per_modality(backbones: dict[str, str]) -> str:
        return "; ".join(f"{KIND_NAMES[m]}: {backbones[m]}" for m in mods)

    if model.shared == "none":
        shared_models = "not used"
    elif model.shared_backbones:
        shared_models = per_modality(model.shared_backbones)
    else:
        shared_models = "the task-specific ones (one embedding model per modality feeds both MLPs)"
    opening = f"CT only: {pre.ct_opening}x{pre.ct_opening} morphological opening; " if pre.ct_opening else ""
    crop = {"none": "", "body": "cropped to the body outline", "ct_body": "CT cropped to the body outline",
            "ct_lungs": "CT cropped to the box around the lungs"}[pre.crop]
    if crop:
        crop += f" (found at {pre.outline_side} px); " if pre.outline_side else "; "
    rows = [
        ["Modalities", ", ".join(KIND_NAMES[m] for m in mods)],
        ["Task-specific embedding models", per_modality(model.task_backbones)],
        ["Shared-feature embedding models", shared_models],
        ["Shared features", SHARED_TEXT[model.shared].format(
            finetune=FINETUNE_TEXT[training.adversarial_finetune if training else "covid"])],
        ["Pretrained weights", _pretrained(training.pretrained if training else False)],
        ["Preprocessing", f"grey; {crop}CLAHE clip {pre.clahe_clip:g}, {pre.clahe_tiles}x{pre.clahe_tiles} tiles; "
                          f"{opening}resized to {pre.size}x{pre.size}; DICOM CT window centre "
                          f"{pre.dicom_ct_center:g} HU, width {pre.dicom_ct_width:g} HU"],
    ]
    if training:
        rows.append(["Training", f"preset {training.preset}, seed {training.seed}, embedding models up to "
                                 f"{training.backbone_fit.epochs} epochs, MLPs up to "
                                 f"{training.mlp_fit.epochs} epochs (best validation epoch kept), "
                                 f"augmentation {training.augment}, balance {training.balance}, validation fraction "
                                 f"{training.val_fraction:g}"])
    versions = config.versions
    rows.append(["Software (training)", ", ".join(f"{k} {versions[k]}" for k in ("respiscan", "torch", "timm")
                                                  if k in versions) or "not recorded"])
    thresholds = [[KIND_NAMES[k], f"{t:.3f}", _threshold_rule(config, k)] for k, t in config.thresholds.items()]
    return [("h2", "Configuration"), ("table", ["Setting", "Value"], rows),
            ("h3", "Operating thresholds (COVID when p >= threshold)"),
            ("table", ["Prediction", "Threshold", "How it was chosen"], thresholds)]


def _metrics(results: dict, kinds: dict[str, dict]) -> list[Block]:
    blocks: list[Block] = [
        ("h2", "Metrics on the test split"),
        ("p", "COVID is the positive class. Each cell: point estimate (confidence interval, as in the summary). "
              "n/a: undefined on these cases (the warnings say why)."),
        _metric_table({KIND_NAMES[k]: m for k, m in kinds.items()})]
    for k, m in kinds.items():
        if "by_source" in m:
            blocks += [("h3", f"{KIND_NAMES[k]} by source"), _metric_table(m["by_source"])]
    return blocks


def _fused(results: dict) -> list[Block]:
    return [("h2", "Fused prediction"), ("p", results["fusion"]["sentence"])] if "fusion" in results else []


def _audit(results: dict) -> list[Block]:
    """What the data audit at training found: errors, warnings, and the shortcut baselines beside the model."""
    audit = results.get("audit")
    if not audit:
        return []
    blocks: list[Block] = [
        ("h2", "Audit"),
        ("p", f"What the data audit found when train checked its {audit['n_images']} images for copies, label "
              "conflicts, patients across splits, shortcut baselines and source confounds.")]
    if audit["errors"]:
        blocks += [("h3", "Errors"), ("ul", audit["errors"])]
    if audit["warnings"]:
        blocks += [("h3", "Warnings"), ("ul", audit["warnings"])]
    if not audit["errors"] and not audit["warnings"]:
        blocks.append(("p", "It found no problems."))
    if audit["shortcuts"]:
        rows = [[f"{KIND_NAMES[b['modality']]}: {b['features']} ({b['fitted']})", f"{b['auc']:.3f}",
                 _num(b["model_auc"]), "yes" if b["warning"] else ""] for b in audit["shortcuts"]]
        blocks += [("h3", "Shortcut baselines"),
                   ("p", "Small models fitted on the training images that see no anatomy (the outer 5 % of the "
                         "image, seven intensity statistics, or file metadata), scored on the test split; a warning "
                         f"at test AUC {SHORTCUT_AUC_LIMIT} or within {SHORTCUT_MODEL_GAP} of the model. The "
                         "model's AUC is n/a where this test split is not the one the baselines were scored on."),
                   ("table", ["Baseline", "Test AUC", "Model's test AUC", "Warning"], rows)]
    return blocks


def _warnings(results: dict, config: BundleConfig, kinds: dict[str, dict]) -> list[Block]:
    items = list(results.get("warnings", []))
    items += [f"{KIND_NAMES[k]}: {w}" for k, m in kinds.items() for w in m["warnings"]]
    for where, reasons in (("the test set", [s["reason"] for s in results["skipped"]]),
                           ("training", [s.reason for s in config.data.skipped])):
        if reasons:
            items.append(f"{len(reasons)} unreadable image(s) skipped in {where}, e.g. {reasons[0]}")
    audit = results.get("audit")
    if audit:
        items.append(f"Data audit of {audit['n_images']} images: {audit['cross_split_duplicates']} duplicate "
                     f"pair(s) across splits, {len(audit['errors'])} error(s) and {len(audit['warnings'])} "
                     "warning(s) (section Audit).")
    else:
        items.append("No data audit is recorded in the bundle: run `respiscan audit DATA` to look for duplicate "
                     "images across splits and for source/label confounds before trusting these numbers.")
    return [("h2", "Warnings"), ("ul", items)]


def render_markdown(blocks: list[Block]) -> str:
    """Markdown for a list of blocks (also used for the significance summary)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            lines += ["| " + " | ".join(map(cell, block[1])) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in block[2]] + [""]
        else:  # img
            lines += [f"![{block[2]}]({block[2]})", "", f"*{block[1]}*", ""]
    return "\n".join(lines)


def _html(blocks: list[Block], folder: Path) -> str:
    e = html.escape
    parts: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:  # img
            data = base64.b64encode((folder / block[2]).read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(block[2])}">'
                         f"<figcaption>{e(block[1])}</figcaption></figure>")
    title = e(blocks[0][1])
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def write_report(results: dict, bundle: Bundle, out: Path) -> tuple[Path, Path]:
    """Write OUT/report.md and OUT/report.html from evaluate()'s results (figures must already be in OUT)."""
    out, config = Path(out), bundle.config
    kinds = {**results["modalities"], **({"fused": results["fused"]} if "fused" in results else {})}
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [
        ("h1", "respiscan evaluation report"),
        ("p", f"Bundle {results['bundle']}, evaluated on the test split of {results['data']} by respiscan "
              f"{__version__} on {generated}. COVID is the positive class."),
        *_summary(kinds, results), *_data(results, bundle), *_configuration(config),
        *_metrics(results, kinds), *_trust(kinds, config),
        ("h2", "Figures"), *(("img", PLOT_CAPTIONS[name], file) for name, file in results["plots"].items()),
        *([] if results["plots"] else [("p", "No figures were drawn for this evaluation.")]),
        *_fused(results), *_audit(results), *_warnings(results, config, kinds)]
    md, page = out / "report.md", out / "report.html"
    with atomic_write(md, "w", encoding="utf-8") as f:
        f.write(render_markdown(blocks))
    with atomic_write(page, "w", encoding="utf-8") as f:
        f.write(_html(blocks, out))
    return md, page
