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
          shared: Optional[str] = typer.Option(None, help="Shared MLP: plain, adversarial or none."),
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
          cache_dir: Optional[Path] = typer.Option(None, help="Keep preprocessed images here between runs.")) -> None:
    """Train every stage and write a self-contained bundle."""
    from respiscan.training.config import preset as make_preset
    from respiscan.training.trainer import train as run_train

    cfg = make_preset(preset).with_overrides(seed=seed, shared=shared, backbone=backbone, image_size=image_size,
                                             epochs=epochs, pretrained=str(weights) if weights else pretrained)
    bundle = run_train(data, out, cfg, strict=strict, resume=resume, cache_dir=cache_dir, device=device)
    typer.echo(f"bundle written to {bundle}")


@app.command()
def predict(bundle: Path = typer.Argument(..., help="Bundle folder."),
            xray: Optional[Path] = typer.Option(None, help="Chest X-ray image."),
            ct: Optional[Path] = typer.Option(None, help="CT slice image."),
            data: Optional[Path] = typer.Option(None, help="Batch: a data folder/manifest, or a plain folder with "
                                                           "--modality."),
            modality: Optional[str] = typer.Option(None, help="Modality of a plain image folder given to --data."),
            out: Optional[Path] = typer.Option(None, help="Batch: CSV to write (default predictions.csv); "
                                                          "with a CT volume: its per-slice scores."),
            as_json: bool = typer.Option(False, "--json", help="One JSON object per case."),
            engine: str = typer.Option("auto", help="torch, onnx, or auto (onnx when the bundle has been exported)."),
            explain: Optional[Path] = typer.Option(None, help="Write Grad-CAM overlays of each input image here."),
            strict: bool = typer.Option(False, help="Fail on unreadable images.")) -> None:
    """Predict one case (--xray and/or --ct) or a batch (--data)."""
    from respiscan.serving import load as load_pipeline

    if data is None and xray is None and ct is None:
        raise RespiscanError("give --xray and/or --ct, or --data for a batch")
    pipe = load_pipeline(bundle, engine)
    if data is None:
        result = pipe.predict(xray=xray, ct=ct)
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
                typer.echo(f"{m:5s} p(COVID) = {result[f'{m}_probability']:.4f}")
        if "ct_volume" in result:
            v = result["ct_volume"]
            typer.echo(f"      CT volume: {v['n_lung_slices']} of {v['n_slices']} slices contain lung; "
                       f"{v['aggregation']} (k={v['k']})")
        typer.echo(f"label: {result['label']} (p = {result['probability']:.4f}, threshold {result['threshold']:.3f})")
        for path in result.get("explanations", []):
            typer.echo(f"Grad-CAM: {path}")
        return
    from respiscan.data.samples import discover, folder_samples
    from respiscan.serving.pipeline import write_predictions

    samples = folder_samples(data, modality) if modality else discover(data)
    rows, skipped = pipe.predict_samples(samples, strict=strict)
    _report_skipped(skipped)
    target = out or Path("predictions.csv")
    write_predictions(target, rows)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
    typer.echo(f"{len(rows)} predictions written to {target}", err=as_json)


@app.command()
def evaluate(bundle: Path = typer.Argument(..., help="Bundle folder."),
             data: list[Path] = typer.Argument(..., help="Data folder(s) or manifest(s); their test split is used."),
             out: Optional[Path] = typer.Option(None, help="Output folder (default BUNDLE/evaluation)."),
             strict: bool = typer.Option(False, help="Fail on unreadable images.")) -> None:
    """Metrics on the test split, per modality and fused (COVID is the positive class)."""
    from respiscan.evaluation.evaluate import evaluate as run_evaluate

    results = run_evaluate(bundle, data, out, strict=strict)
    _report_skipped([(s["id"], s["reason"]) for s in results["skipped"]])
    for name, m in [*results["modalities"].items(), *([("fused", results["fused"])] if "fused" in results else [])]:
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
        typer.echo(f"{name:5s} n={m['n']:4d} AUC={auc} acc={m['accuracy']:.3f} sens={_fmt(m['sensitivity'])} "
                   f"spec={_fmt(m['specificity'])} F1={_fmt(m['f1'])}")
    typer.echo(f"written to {out or Path(bundle) / 'evaluation'} (report: {results['report']['html']})")


@app.command()
def audit(data: list[Path] = typer.Argument(..., help="Data folder(s) or manifest(s); several are audited together."),
          out: Optional[Path] = typer.Option(None, help="Folder for audit.json."),
          near_threshold: int = typer.Option(2, help="Largest perceptual-hash distance counted as a near duplicate."),
          strict: bool = typer.Option(False, help="Exit 2 when an image appears in two splits.")) -> None:
    """Duplicates across splits, class balance per split and source, source/label confounds."""
    from respiscan.data.audit import audit as run_audit
    from respiscan.data.audit import check_strict, format_audit
    from respiscan.data.samples import discover
    from respiscan.utils import write_json

    result = run_audit(discover(data), near_threshold=near_threshold)
    typer.echo(format_audit(result))
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
             resume: bool = typer.Option(False, help="Reuse finished folds and stages in OUT.")) -> None:
    """External validation: one model per fold, each scored on the source (or groups) it left out."""
    from respiscan.experiments.crossval import BY, run_crossval
    from respiscan.training.config import preset as make_preset

    if by not in BY:
        raise RespiscanError(f"unknown --by {by!r}; accepted: {', '.join(BY)}")
    result = run_crossval(data, out, make_preset(preset).with_overrides(seed=seed, epochs=epochs), by=by,
                          folds=folds, resume=resume)
    for r in result["folds"]:
        typer.echo(f"{r['held_out']:28s} {r['modality']:5s} n={r['n']:4d} AUC={_fmt(r['auc'])} "
                   f"sens={_fmt(r['sensitivity'])} spec={_fmt(r['specificity'])} ECE={_fmt(r['ece'])} "
                   f"(in-source validation AUC {_fmt(r['in_source_val_auc'])})")
    typer.echo(f"table: {Path(out) / 'crossval.md'}")


@app.command()
def significance(data: Path = typer.Argument(..., help="Data folder or manifest."),
                 out: Path = typer.Option(..., "--out", "-o", help="Folder for runs, tables and summary."),
                 runs: int = typer.Option(5, help="Seeds per configuration (at least 2)."),
                 preset: str = typer.Option("fast", help="Training preset of every run."),
                 seed: int = typer.Option(0, help="First seed.")) -> None:
    """Full model vs task-specific only vs adversarial shared, over seeds: ANOVA, paired, DeLong, McNemar."""
    from respiscan.experiments.significance import run_significance
    from respiscan.training.config import preset as make_preset

    summary = run_significance(data, out, runs, make_preset(preset).with_overrides(seed=seed))
    for m, result in summary["anova"].items():
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
           opset: int = typer.Option(17, help="ONNX opset.")) -> None:
    """Write the bundle's network as ONNX graphs (one per modality) for fast, torch-free prediction."""
    from respiscan.serving.export import export_onnx

    for modality, path in export_onnx(bundle, opset=opset).items():
        typer.echo(f"{modality}: {path}")


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
    typer.echo(f"thresholds    {config.thresholds} (chosen on validation)")
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
    typer.echo(f"weights       sha256 {config.weights_sha256}")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


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
