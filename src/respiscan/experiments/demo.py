"""`respiscan demo`: the whole method end to end on built-in synthetic data, in a few minutes on a CPU."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from respiscan.data.synth import generate
from respiscan.evaluation.evaluate import evaluate
from respiscan.serving.torch_engine import Pipeline
from respiscan.training.config import TrainConfig, preset
from respiscan.training.trainer import train


def demo_config(seed: int = 0) -> TrainConfig:
    """The tiny preset with its backbones run to the end of their schedule, as `fast` does: the demo's validation
    split (32 images a modality) is too noisy to choose an epoch by (it kept X-ray epoch 2 of 12: test AUC 0.48)."""
    tiny = preset("tiny").with_overrides(seed=seed)
    return replace(tiny, backbone_fit=replace(tiny.backbone_fit, select="last"))


def run_demo(out: str | Path, n_per_class: int = 150, seed: int = 0, size: int = 128) -> dict:
    """synth -> train (`demo_config`) -> evaluate on the test split -> predict one X-ray/CT pair."""
    out = Path(out)
    t0 = time.perf_counter()
    data, bundle = out / "data", out / "bundle"
    if data.exists():
        shutil.rmtree(data)
    print(f"[1/4] synthesising {n_per_class} cases per class and modality in {data}")
    generate(data, n_per_class=n_per_class, size=size, seed=seed)
    print(f"[2/4] training every stage -> {bundle}")
    train(data, bundle, demo_config(seed))
    print("[3/4] evaluating on the test split")
    results = evaluate(bundle, data, out / "evaluation")
    for name, m in [*results["modalities"].items(), ("fused", results.get("fused"))]:
        if m:
            print(f"      {name:5s} AUC {m['roc_auc']:.3f}  accuracy {m['accuracy']:.3f}  "
                  f"sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}")
    xray = sorted((data / "X_Ray_Test" / "COVID").glob("*.png"))[0]
    ct = data / "CT_Scan_Test" / "COVID" / xray.name
    print(f"[4/4] predicting one pair: {xray.relative_to(out)} + {ct.relative_to(out)}")
    result = Pipeline(bundle).predict(xray=xray, ct=ct)
    print("      " + json.dumps(result))
    print(f"done in {time.perf_counter() - t0:.0f} s. data: {data}  bundle: {bundle}  "
          f"evaluation: {out / 'evaluation'}")
    return {"bundle": bundle, "evaluation": results, "prediction": result}
