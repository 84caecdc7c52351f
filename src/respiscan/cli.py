"""The `respiscan` command: a thin layer that parses, calls the library and prints.

Bad input ends with one line on stderr and exit code 2 (a traceback only with --debug).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from respiscan.errors import RespiscanError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="COVID-19 detection from chest X-rays and CT slices (multi-modal multi-task learning).")
_state = {"debug": False}


CROP_HELP = ("ct_body (the presets'): crop CT to the patient's outline, blanking frames, text and the table "
             "outside it; ct_lungs: CT to the box around the lungs; body: both modalities; none.")
AUGMENT_HELP = "Scratch backbones: affine, scanner (affine + intensity profile, resolution, noise) or none."
BALANCE_HELP = "source_class: every (source, class) weighs the same in each stage's batches; none."
CROSSFIT_HELP = "Share of train kept from the backbone for the MLP stages (0: off)."
WEAK_AUC = 0.6  # `calibrate`: below it, a site's images are ranked too poorly for any threshold to help
BACKBONE_ADVERSARY_HELP = ("Weight of a source discriminator's confusion loss on scratch backbones' features "
                           "(needs two training sources per modality; 0: off).")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


@app.command()
def synth(out: Path = typer.Argument(..., help="Folder to create (reference layout + manifest.csv)."),
          n_per_class: int = typer.Option(50, help="Images per class and modality (train + test), per site."),
          size: int = typer.Option(224, help="Image side in pixels."),
          seed: int = typer.Option(0),
          sites: int = typer.Option(0, help="Write this many sites (OUT/site0, ...), each with its own look."),
          confound: float = typer.Option(0.0, help="0-1: skew each site's COVID share (site-label correlation)."),
          ) -> None:
    """Write a synthetic data set of X-ray-like and CT-like phantoms (with --sites: one folder per site)."""
    from respiscan.data.synth import generate

    generate(out, n_per_class=n_per_class, size=size, seed=seed, sites=sites, confound=confound)
    if sites < 2:
        typer.echo(f"synthetic data written to {out}")
        return
    folders = " ".join(str(p) for p in sorted(Path(out).iterdir()) if p.is_dir())
    typer.echo(f"{sites} synthetic sites written to {out} (looks and COVID shares: {Path(out) / 'sites.json'}); "
               f"train on them with: respiscan train {folders} --out BUNDLE")


@app.command()
def preprocess(data: Path = typer.Argument(..., help="Data folder or manifest."),
               out: Path = typer.Argument(..., help="New folder for the preprocessed images (same layout)."),
               size: int = typer.Option(224),
               strict: bool = typer.Option(False, help="Fail on unreadable images.")) -> None:
    """Write preprocessed copies (CLAHE, CT opening, resize) in the same layout; the originals are untouched."""
    from respiscan.data.export import write_preprocessed

    n, skipped = write_preprocessed(data, out, size=size, strict=strict)
    _report_skipped(skipped)
    typer.echo(f"{n} preprocessed images written to {out}")


@app.command()
def train(data: list[Path] = typer.Argument(..., help="Data folder(s) (reference layout, manifest.csv, or "
                                             "train/test.csv); several are read together, one source each."),
          out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
          preset: str = typer.Option("fast", help="fast (default, CPU), seed (the reference's backbones), tiny."),
          shared: Optional[str] = typer.Option(None, help="Shared MLP: plain, adversarial, source_adversarial "
                                               "(against the acquisition source) or none."),
          backbone: Optional[str] = typer.Option(None, help="Backbone of every embedding model: a timm name, or "
                                                 "torchxrayvision's xrv:densenet121-res224-all (the xrv extra)."),
          image_size: Optional[int] = typer.Option(None, help="Input size in pixels (331 for NASNetLarge)."),
          epochs: Optional[int] = typer.Option(None, help="Maximum epochs of the embedding-model stage."),
          pretrained: bool = typer.Option(False, help="Use timm's (or torchxrayvision's) pretrained weights "
                                                      "(downloads; frozen backbone)."),
          weights: Optional[Path] = typer.Option(None, help="Local pretrained weights file, or a folder of "
                                                            "<backbone>.* files."),
          seed: int = typer.Option(0), strict: bool = typer.Option(False, help="Fail on unreadable images."),
          resume: bool = typer.Option(False, help="Continue from the last finished stage in OUT."),
          device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
          cache_dir: Optional[Path] = typer.Option(None, help="Keep preprocessed images here between runs."),
          crop: Optional[str] = typer.Option(None, help=CROP_HELP), augment: Optional[str] = typer.Option(
              None, help=AUGMENT_HELP), balance: Optional[str] = typer.Option(None, help=BALANCE_HELP),
          crossfit: Optional[float] = typer.Option(None, help=CROSSFIT_HELP),
          backbone_adversary: Optional[float] = typer.Option(None, help=BACKBONE_ADVERSARY_HELP),
          operating_point: str = typer.Option("sensitivity=0.90", help="Threshold rule, chosen on the calibration "
                                              "split: youden, sensitivity=T or specificity=T (default: screening, "
                                              "sensitivity 0.90)."),
          calibrate_on: str = typer.Option("cross-fitted", help="Images that fit the calibration and choose the "
                                           "thresholds: cross-fitted (the calibration split, plus the validation "
                                           "split scored by MLP stages that chose their epochs on the calibration "
                                           "split) or calibration (that split alone).")) -> None:
    """Train every stage and write a self-contained bundle."""
    from respiscan.training.config import preset as make_preset
    from respiscan.training.trainer import train as run_train

    cfg = make_preset(preset).with_overrides(seed=seed, shared=shared, backbone=backbone, image_size=image_size,
                                             epochs=epochs, pretrained=str(weights) if weights else pretrained,
                                             operating_point=operating_point, calibrate_on=calibrate_on)
    cfg = cfg.with_site_methods(crop=crop, augment=augment, balance=balance, crossfit=crossfit,
                                backbone_adversary=backbone_adversary)
    bundle = run_train(data, out, cfg, strict=strict, resume=resume, cache_dir=cache_dir, device=device)
    typer.echo(f"bundle written to {bundle}")


@app.command()
def predict(bundle: Path = typer.Argument(..., help="Bundle folder."),
            xray: Optional[Path] = typer.Option(None, help="Chest X-ray image."),
            ct: Optional[Path] = typer.Option(None, help="CT slice image."),
            data: Optional[Path] = typer.Option(None, help="Batch: a data folder/manifest, or a plain folder with "
                                                           "--modality."),
            modality: Optional[str] = typer.Option(None, help="Modality of a plain image folder given to --data."),
            out: Optional[Path] = typer.Option(None, help="Batch: CSV to write (default predictions.csv; a rerun "
                                                          "skips the ids already in it); with a CT volume: its "
                                                          "per-slice scores."),
            as_json: bool = typer.Option(False, "--json", help="One JSON object per case."),
            engine: str = typer.Option("auto", help="torch, onnx, openvino, or auto (the engine `export "
                                                    "--choose-engine` recorded, else onnx when exported)."),
            explain: Optional[Path] = typer.Option(None, help="Write Grad-CAM overlays of each input image here."),
            strict: bool = typer.Option(False, help="Fail on unreadable images."),
            tta: int = typer.Option(1, help="Average this many test-time augmentations (small affine and "
                                            "intensity changes, no flips) and report their spread; 1: off."),
            operating_point: Optional[str] = typer.Option(None, help="For this run, thresholds by another rule "
                                                          "on the bundle's calibration scores: youden, "
                                                          "sensitivity=T or specificity=T.")) -> None:
    """Predict one case (--xray and/or --ct) or a batch (--data)."""
    from respiscan.serving import load as load_pipeline

    if data is None and xray is None and ct is None:
        raise RespiscanError("give --xray and/or --ct, or --data for a batch")
    given = [m for m, image in (("xray", xray), ("ct", ct)) if image is not None]
    pipe = load_pipeline(bundle, engine, few_images=data is None, modalities=given if data is None else None)
    if operating_point:
        pipe.use_operating_point(operating_point)
    if data is None:
        result = pipe.predict(xray=xray, ct=ct, tta=tta)
        _warn_shift(result)
        if explain:
            from respiscan.serving.explain import explain as write_gradcam
            from respiscan.serving.torch_engine import Pipeline

            images = {"xray": xray} if xray else {}
            if ct and "ct_volume" not in result:  # Grad-CAM explains single images, not volumes
                images["ct"] = ct
            result["explanations"] = [str(p) for p in write_gradcam(Pipeline(bundle), images, explain)]
        if "ct_volume" in result and out:
            from respiscan.utils import write_rows

            write_rows(out, result["ct_volume"]["slices"], ["index", "lung", "lung_fraction", "probability"])
            typer.echo(f"per-slice scores written to {out}", err=as_json)
        if as_json:
            typer.echo(json.dumps(result))
            return
        for m in ("xray", "ct"):
            if result[f"{m}_probability"] is not None:
                spread = f" (TTA x{tta}, sd {result[f'{m}_tta_std']:.4f})" if f"{m}_tta_std" in result else ""
                typer.echo(f"{m:5s} p(COVID) = {result[f'{m}_probability']:.4f}{spread}")
        if "ct_volume" in result:
            v = result["ct_volume"]
            typer.echo(f"      CT volume: {v['n_lung_slices']} of {v['n_slices']} slices contain lung; "
                       f"{v['aggregation']} (k={v['k']})")
        typer.echo(f"label: {result['label']} (p = {result['probability']:.4f}, threshold {result['threshold']:.3f}, "
                   f"operating point {result['operating_point']})")
        for path in result.get("explanations", []):
            typer.echo(f"Grad-CAM: {path}")
        return
    from respiscan.serving.stream import stream_predictions

    target = out or Path("predictions.csv")
    result = stream_predictions(pipe, data, target, modality=modality, strict=strict, tta=tta)
    _report_skipped(result.skipped)
    if result.flagged:
        typer.echo(f"warning: {result.flagged} image(s) are unlike the bundle's training images "
                   f"(in_distribution false in {target}): do not trust their predictions", err=True)
    for m, shift in result.set_shift.items():
        typer.echo(("warning: " if shift.shifted else "") + shift.sentence(f"{m} in {target}"), err=True)
    if result.total and as_json:
        import csv

        with open(target, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                typer.echo(json.dumps(r))
    resumed = f" ({result.already} kept from an earlier run)" if result.already else ""
    if result.total:  # rank 0 under torchrun, or the only process
        typer.echo(f"{result.total} predictions written to {target}{resumed}", err=as_json)


@app.command()
def evaluate(bundle: Path = typer.Argument(..., help="Bundle folder."),
             data: list[Path] = typer.Argument(..., help="Data folder(s) or manifest(s); their test split is used."),
             out: Optional[Path] = typer.Option(None, help="Output folder (default BUNDLE/evaluation)."),
             strict: bool = typer.Option(False, help="Fail on unreadable images."),
             prevalence: Optional[float] = typer.Option(None, help="COVID share where the bundle is deployed "
                                                        "(0-1): report PPV and NPV at it.")) -> None:
    """Metrics on the test split, per modality and fused (COVID is the positive class)."""
    from respiscan.evaluation.evaluate import evaluate as run_evaluate

    results = run_evaluate(bundle, data, out, strict=strict, prevalence=prevalence)
    _report_skipped([(s["id"], s["reason"]) for s in results["skipped"]])
    for name, m in [*results["modalities"].items(), *([("fused", results["fused"])] if "fused" in results else [])]:
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
        flagged = f" shift-flagged={m['shift_flagged']:.3f}" if m.get("shift_flagged") is not None else ""
        if shift := m.get("set_shift"):
            flagged += f" set-shift-AUC={shift['auc']:.3f}" + (" (shifted)" if shift["shifted"] else "")
        typer.echo(f"{name:5s} n={m['n']:4d} AUC={auc} acc={m['accuracy']:.3f} sens={_fmt(m['sensitivity'])} "
                   f"spec={_fmt(m['specificity'])} F1={_fmt(m['f1'])}{flagged}")
        cal = m["calibration"]
        floor = cal["after"]["ece_if_calibrated"]
        typer.echo(f"      calibration ECE {cal['before']['ece']:.3f} -> {cal['after']['ece']:.3f} "
                   f"(a calibrated model: {floor['mean']:.3f}, up to {floor['q95']:.3f}, on these images), log-loss "
                   f"{cal['before']['log_loss']:.3f} -> {cal['after']['log_loss']:.3f}")
        for target, v in m["at_sensitivity"].items():
            typer.echo(f"      at sensitivity {target} (threshold {v['threshold']:.3f} from calibration): "
                       f"sens={_fmt(v['sensitivity'])} spec={_fmt(v['specificity'])}")
        if "at_prevalence" in m:
            v = m["at_prevalence"]
            typer.echo(f"      at prevalence {v['prevalence']:g}: PPV={_fmt(v['ppv'])} NPV={_fmt(v['npv'])}")
    typer.echo(f"written to {out or Path(bundle) / 'evaluation'} (report: {results['report']['html']})")


@app.command()
def calibrate(bundle: Path = typer.Argument(..., help="Bundle folder."),
              data: list[Path] = typer.Argument(..., help="Labelled data folder(s) of the site; their non-test "
                                                          "splits are used."),
              out: Path = typer.Option(..., help="New bundle folder to write (must not exist)."),
              operating_point: Optional[str] = typer.Option(None, help="Threshold rule: youden, sensitivity=T or "
                                                            "specificity=T (default: the bundle's)."),
              engine: str = typer.Option("auto", help="torch, onnx, openvino, or auto."),
              strict: bool = typer.Option(False, help="Fail on unreadable images.")) -> None:
    """Refit the calibration maps and thresholds on a site's own labelled images: a new bundle, same network."""
    from respiscan.evaluation.recalibrate import recalibrate

    result = recalibrate(bundle, data, out, operating_point=operating_point, engine=engine, strict=strict)
    _report_skipped(result.skipped)
    for r in result.refits:
        typer.echo(f"{r.modality:5s} n={r.n} ({r.n_positive} COVID; {', '.join(r.sources)}): AUC {r.roc_auc:.3f}, "
                   f"threshold {r.threshold_before:.3f} -> {r.threshold_after:.3f} ({result.point}), specificity there "
                   f"{_fmt(r.specificity_before)} -> {_fmt(r.specificity_after)}, ECE {r.ece_before:.3f} -> "
                   f"{r.ece_after:.3f} (on the images fitted on)")
        if r.roc_auc < WEAK_AUC:
            typer.echo(f"warning: the network ranks this site's {r.modality} images at AUC {r.roc_auc:.3f}: no map or "
                       "threshold makes it useful here", err=True)
    for why in result.kept:
        typer.echo(f"kept the bundle's map and threshold for {why}")
    typer.echo(f"written to {result.bundle}; score it with `respiscan evaluate {result.bundle} DATA` (test splits)")


@app.command()
def audit(data: list[Path] = typer.Argument(..., help="Data folder(s) or manifest(s); several are audited together."),
          out: Optional[Path] = typer.Option(None, help="Folder for audit.json."),
          similarity: Optional[float] = typer.Option(None, help="Aligned similarity (0.83-1) from which two images "
                                                     "count as near-duplicates [default: 0.88]."),
          as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON instead of a summary."),
          strict: bool = typer.Option(False, help="Exit 2 on a label conflict, a copy across splits or a group in "
                                      "two splits.")) -> None:
    """Copies and patients across splits, label conflicts, shortcut baselines, class balance, source confounds."""
    from respiscan.data.audit import NEAR_SIMILARITY, check_strict, format_audit
    from respiscan.data.audit import audit as run_audit
    from respiscan.data.samples import discover
    from respiscan.utils import write_json

    result = run_audit(discover(data), similarity=NEAR_SIMILARITY if similarity is None else similarity,
                       progress=not as_json)
    typer.echo(json.dumps(result, indent=2) if as_json else format_audit(result))
    if out:
        write_json(Path(out) / "audit.json", result)
    if strict:
        check_strict(result)


@app.command()
def crossval(data: list[Path] = typer.Argument(..., help="Data folder(s); each folder is a source unless its "
                                               "manifest names them."),
             out: Path = typer.Option(..., "--out", "-o", help="Folder for folds, crossval.md/.csv/.json."),
             by: str = typer.Option("source", help="source: leave each source out in turn; group: grouped "
                                    "K-fold (--folds)."),
             folds: int = typer.Option(5, help="K for --by group."),
             preset: str = typer.Option("fast", help="Training preset of every fold."),
             epochs: Optional[int] = typer.Option(None, help="Maximum epochs of the embedding-model stage."),
             seed: int = typer.Option(0),
             shared: Optional[str] = typer.Option(None, help="Shared MLP: plain, adversarial, source_adversarial "
                                                  "or none."),
             crop: Optional[str] = typer.Option(None, help=CROP_HELP), augment: Optional[str] = typer.Option(
                 None, help=AUGMENT_HELP), balance: Optional[str] = typer.Option(None, help=BALANCE_HELP),
             crossfit: Optional[float] = typer.Option(None, help=CROSSFIT_HELP),
             backbone_adversary: Optional[float] = typer.Option(None, help=BACKBONE_ADVERSARY_HELP),
             modality: Optional[str] = typer.Option(None, help="Cross-validate this modality only (xray or ct)."),
             resume: bool = typer.Option(False, help="Reuse finished folds and stages in OUT."),
             card: Optional[Path] = typer.Option(None, help="Add the folds' results to this bundle's model card "
                                                 "(a bundle trained with the same settings).")) -> None:
    """External validation: one model per fold, each scored on the source (or groups) it left out."""
    from respiscan.card import record_crossval, require_same_settings
    from respiscan.data.samples import parse_modality
    from respiscan.experiments.crossval import BY, run_crossval
    from respiscan.training.config import preset as make_preset

    if by not in BY:
        raise RespiscanError(f"unknown --by {by!r}; accepted: {', '.join(BY)}")
    cfg = make_preset(preset).with_overrides(seed=seed, epochs=epochs, shared=shared).with_site_methods(
        crop=crop, augment=augment, balance=balance, crossfit=crossfit, backbone_adversary=backbone_adversary)
    if card is not None:
        require_same_settings(card, cfg.to_dict())
    result = run_crossval(data, out, cfg, by=by, folds=folds, resume=resume,
                          modality=parse_modality(modality, "--modality") if modality else None)
    for r in result["folds"]:
        typer.echo(f"{r['held_out']:28s} {r['modality']:5s} n={r['n']:4d} AUC={_fmt(r['auc'])} "
                   f"sens={_fmt(r['sensitivity'])} spec={_fmt(r['specificity'])} ECE={_fmt(r['ece'])} "
                   f"(in-source validation AUC {_fmt(r['in_source_val_auc'])}; network-free baselines: border "
                   f"{_fmt(r['border_baseline_auc'])}, intensity {_fmt(r['intensity_baseline_auc'])})")
    typer.echo(f"table: {Path(out) / 'crossval.md'}")
    if card is not None:
        typer.echo(f"model card: {record_crossval(card, result).path / 'MODEL_CARD.md'}")


@app.command()
def significance(data: Path = typer.Argument(..., help="Data folder or manifest."),
                 out: Path = typer.Option(..., "--out", "-o", help="Folder for runs, tables and summary."),
                 runs: int = typer.Option(5, help="Seeds per configuration (at least 2)."),
                 preset: str = typer.Option("fast", help="Training preset of every run."),
                 seed: int = typer.Option(0, help="First seed."),
                 reanalyse: bool = typer.Option(False, help="Recompute the tests from the runs already in --out "
                                                            "(runs.csv, predictions.csv), training nothing.")) -> None:
    """Full model vs task-specific only vs adversarial shared, over seeds: Friedman, paired, DeLong, McNemar (Holm)."""
    from respiscan.experiments.significance import PRIMARY, run_significance
    from respiscan.experiments.significance import reanalyse as reanalyse_runs
    from respiscan.training.config import preset as make_preset

    summary = (reanalyse_runs(data, out) if reanalyse
               else run_significance(data, out, runs, make_preset(preset).with_overrides(seed=seed)))
    for m, result in summary["paired"][PRIMARY].items():
        typer.echo(f"{m}: {result['sentence']}")
    typer.echo(f"summary: {Path(out) / 'summary.md'}")


@app.command()
def demo(out: Path = typer.Option(Path("respiscan-demo"), help="Folder for the demo's data, bundle and results."),
         n_per_class: int = typer.Option(150, help="Synthetic cases per class."), seed: int = typer.Option(0)) -> None:
    """Synthesise data, train the whole pipeline, evaluate it and predict one pair (a few minutes on a CPU)."""
    from respiscan.experiments.demo import run_demo

    run_demo(out, n_per_class=n_per_class, seed=seed)


@app.command()
def export(bundle: Path = typer.Argument(..., help="Bundle folder."),
           opset: int = typer.Option(17, help="ONNX opset."),
           choose_engine: bool = typer.Option(False, help="Also time torch, onnxruntime and OpenVINO on validation "
                                              "images and record, per modality, the fastest that agrees with "
                                              "torch fp32 (the `auto` engine then runs it).")) -> None:
    """Write the bundle's network as ONNX graphs (one per modality) for fast, torch-free prediction."""
    from respiscan.serving.export import export_onnx

    for modality, path in export_onnx(bundle, opset=opset).items():
        typer.echo(f"{modality}: {path}")
    if choose_engine:
        from respiscan.serving.engine_choice import describe_choice, record_engine_choice

        for modality, choice in record_engine_choice(bundle).items():
            typer.echo(f"{modality}: {describe_choice(choice)}")


@app.command()
def inspect(xray: Path = typer.Argument(..., help="One chest X-ray image."),
            ct: Path = typer.Argument(..., help="One CT slice image."),
            out: Path = typer.Option(Path("panel.png"), help="PNG to write.")) -> None:
    """The reference's sample-processing panel (thresholds, blurs, morphology, edges, equalisation)."""
    from respiscan.data.inspect_panel import sample_panel
    from respiscan.data.io import read_image

    typer.echo(f"panel written to {sample_panel(read_image(xray, 'xray'), read_image(ct, 'ct'), out)}")


@app.command()
def info(bundle: Path = typer.Argument(..., help="Bundle folder.")) -> None:
    """What a bundle is: model, preprocessing, thresholds, training data fingerprint, versions, metrics."""
    from dataclasses import asdict

    from respiscan.bundle import Bundle

    config = Bundle.open(bundle).config
    model, data, check = config.model, config.data, config.bf16_check
    typer.echo(f"bundle        {bundle} (format {config.format_version}, respiscan {config.respiscan_version})")
    typer.echo(f"modalities    {', '.join(model.modalities)}")
    typer.echo(f"backbones     task {model.task_backbones}; shared {model.shared_backbones or 'same as task'}")
    typer.echo(f"shared MLP    {model.shared}")
    typer.echo(f"preprocess    {asdict(config.preprocess)}")
    typer.echo(f"thresholds    {config.thresholds}")
    for kind, record in (config.operating_points or {}).items():
        typer.echo(f"operating     {kind}: {record.point} on the {record.chosen_on}")
    for m in model.modalities:
        c = config.calibration_of(m)
        typer.echo(f"calibration   {m}: {c.method} (slope {c.slope:.3f}, intercept {c.intercept:.3f})")
    typer.echo(f"data          {data.path}  {asdict(data.fingerprint)}")
    typer.echo(f"data counts   {data.counts}")
    typer.echo(f"sources       {data.transfer_note()}")
    if data.skipped:
        typer.echo(f"skipped       {len(data.skipped)} unreadable image(s)")
    typer.echo(f"training      seed {config.training.get('seed')}, {config.train_seconds} s")
    typer.echo(f"versions      {config.versions}")
    for m, metrics in config.validation_metrics.items():
        typer.echo(f"validation    {m}: AUC {_fmt(metrics.get('roc_auc'))}, accuracy {_fmt(metrics.get('accuracy'))}")
    typer.echo("bf16          " + ("not measured: the torch engine runs fp32" if check is None else
               f"max |p_bf16 - p_fp32| {check.max_abs_difference:.2e} on validation (tolerance "
               f"{check.tolerance:g}): the torch engine runs {check.prediction_default}"))
    typer.echo("onnx          " + (f"graphs for {', '.join(config.onnx.graphs)} (opset {config.onnx.opset})"
                                   if config.onnx else "not exported (`respiscan export` writes the graphs)"))
    typer.echo("engines       " + ("; ".join(f"{m}: {c.engine} {c.precision}" for m, c in config.engines.items())
                                   if config.engines else "not chosen (`respiscan export --choose-engine` times them)"))
    ood = config.ood
    typer.echo("shift         " + ("none (the bundle predates the shift detector)" if ood is None else
               f"{ood.method} on the {ood.space}; flags {ood.false_alarm_rate:.0%} of validation images by design ("
               + ", ".join(f"{m}: {t.val_flagged:.1%} of {t.n_val}" for m, t in ood.modalities.items()) + ")"))
    typer.echo(f"weights       sha256 {config.weights_sha256}")


@app.command()
def card(bundle: Path = typer.Argument(..., help="Bundle folder.")) -> None:
    """The bundle's model card: intended use, data, validation, results, calibration, limitations."""
    from respiscan.bundle import Bundle
    from respiscan.card import build_card, render_card

    opened = Bundle.open(bundle)
    typer.echo(render_card(opened.config.model_card or build_card(opened), opened.config))


@app.command()
def serve(bundle: Path = typer.Argument(..., help="Bundle folder."),
          host: str = typer.Option("127.0.0.1", help="Address to bind; any but loopback needs --token-file."),
          port: int = typer.Option(8000, help="TCP port (0: any free one, printed)."),
          token_file: Optional[Path] = typer.Option(None, help="Bearer tokens, one `NAME TOKEN` line each; "
                                                    "every /v1 request then needs one."),
          workers: int = typer.Option(2, help="Threads reading and preprocessing uploads (the engine scores "
                                      "their cases in batches, in a thread of its own)."),
          engine: str = typer.Option("auto", help="torch, onnx, or auto (onnx when the bundle has been exported)."),
          audit_log: Path = typer.Option(Path("respiscan-audit.jsonl"), help="Append-only JSON-lines audit log."),
          max_body_mb: int = typer.Option(64, help="Largest request body, in MiB (larger: 413)."),
          max_batch: int = typer.Option(32, help="Most cases of concurrent requests scored in one engine call."),
          batch_window_ms: float = typer.Option(2.0, help="How long a case waits for others to batch with when "
                                                "the engine is idle, in ms.")) -> None:
    """REST API (/v1, OpenAPI at /docs) and a web page at / (the serve extra); SIGTERM finishes in-flight requests."""
    from respiscan.serving.batcher import BatchConfig
    from respiscan.serving.server import Limits
    from respiscan.serving.server import serve as run_server

    run_server(bundle, host=host, port=port, token_file=token_file, workers=workers, engine=engine,
               audit_log=audit_log, limits=Limits(max_body_bytes=max_body_mb * 2**20),
               batch=BatchConfig(max_batch, batch_window_ms / 1000), announce=typer.echo)


@app.command()
def listen(bundle: Path = typer.Argument(..., help="Bundle folder."),
           port: int = typer.Option(11112, help="TCP port to listen on."),
           ae_title: str = typer.Option("RESPISCAN", "--ae-title", help="This receiver's AE title."),
           forward: Optional[str] = typer.Option(None, help="Send each SR by C-STORE to HOST:PORT:AET."),
           out: Path = typer.Option(Path("respiscan-sr"), help="Folder for the SRs (one subfolder per study)."),
           host: str = typer.Option("127.0.0.1", help="Address to bind; DICOM has no authentication."),
           series_timeout: float = typer.Option(10.0, help="Seconds without a new instance after which a CT "
                                                "series is complete (else: when the sender releases)."),
           engine: str = typer.Option("auto", help="torch, onnx, or auto (onnx when the bundle has been exported)."),
           explain: bool = typer.Option(False, "--explain", help="Also a Grad-CAM Secondary Capture beside each SR "
                                        "(written and forwarded; predicts with the torch engine, as Grad-CAM needs).")
           ) -> None:
    """DICOM C-STORE receiver: a Structured Report for each X-ray instance and CT series received."""
    import logging

    from respiscan.serving import load as load_pipeline
    from respiscan.serving.listen import ListenConfig, Peer
    from respiscan.serving.listen import listen as receive

    config = ListenConfig(out=out, port=port, host=host, ae_title=ae_title, series_timeout=series_timeout,
                          forward=Peer.parse(forward) if forward else None, explain=explain)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    receive(load_pipeline(bundle, engine), config)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _warn_shift(result: dict) -> None:
    """One line on stderr per input that the bundle's shift detector finds unlike its training images."""
    for m, name in (("xray", "X-ray"), ("ct", "CT")):
        if result.get(f"{m}_in_distribution") is False:
            typer.echo(f"warning: the {name} input is unlike the bundle's training {name} images (shift score "
                       f"{result[f'{m}_ood_score']:.2f} > 1; wrong modality, another kind of image or another "
                       "site?): do not trust this prediction", err=True)


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    for _, reason in skipped:
        typer.echo(f"warning: skipped {reason}", err=True)
    if skipped:
        typer.echo(f"warning: {len(skipped)} unreadable image(s) skipped", err=True)


def main() -> None:
    """Console entry point: click handles usage errors (exit 2); ours become one line and exit 2 too."""
    try:
        app()
    except RespiscanError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
