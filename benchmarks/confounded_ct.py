"""Does a method learn the finding when the source tells the label? Real CT, a planted source-class confound.

From the *train* splits of UCSD COVID-CT (realdev) and MosMed (sites), whole groups are drawn into an evaluation
part (about 50 slices per class and source: the confound is absent there) and a fit part that is confounded
(UCSD mostly COVID, MosMed mostly Non_COVID) or, as the control, not (about half COVID in each). Each method
trains on the fit part (`respiscan train`, its validation carved from it as always) and is scored on the
evaluation part: within each source (does it rank the finding?) and pooled. No test split is read.

    python benchmarks/confounded_ct.py --work /tmp/confounded --seeds 0 1 2

Takes about 1.5 min per training with `--preset tiny` on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

SOURCES = {"ucsd": "data/realdev", "mosmed": "data/sites/mosmed_ct"}  # under ../shared
# share of each source's remaining groups, per class, that goes into the fit part
PLANS = {"confounded": {"ucsd": {"COVID": 0.9, "Non_COVID": 0.2}, "mosmed": {"COVID": 0.12, "Non_COVID": 0.9}},
         "control": {"ucsd": {"COVID": 0.5, "Non_COVID": 0.45}, "mosmed": {"COVID": 0.2, "Non_COVID": 0.9}}}
METHODS = {"plain": [], "balance": ["--balance", "source_class"],
           "balance + source adversary": ["--balance", "source_class", "--shared", "source_adversarial"],
           "balance + backbone adversary": ["--balance", "source_class", "--backbone-adversary", "1"]}
EVAL_PER_CLASS = 50


def build(out: Path, plan: dict, shared: Path, seed: int = 0) -> Counter:
    """Write `out` (copies of the images and a manifest: fit rows as train, evaluation rows as test)."""
    rng, written = random.Random(seed), []
    for name, folder in SOURCES.items():
        root = shared / folder
        rows = [r for r in csv.DictReader(open(root / "manifest.csv"))
                if r["modality"] == "ct" and r["split"] == "train"]
        groups = sorted({r["group"] for r in rows})
        rng.shuffle(groups)
        for label in ("COVID", "Non_COVID"):
            mine = [r for r in rows if r["label"] == label]
            present = [g for g in groups if any(r["group"] == g for r in mine)]
            held, n = set(), 0
            for g in present:  # whole groups until EVAL_PER_CLASS slices of this class
                if n >= EVAL_PER_CLASS:
                    break
                held.add(g)
                n += sum(r["group"] == g for r in mine)
            rest = [g for g in present if g not in held]
            fit = set(rest[:max(1, round(plan[name][label] * len(rest)))])
            for r in mine:
                split = "test" if r["group"] in held else "train" if r["group"] in fit else None
                if split:
                    dst = Path(name) / label / Path(r["path"]).name
                    (out / dst).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(root / r["path"], out / dst)
                    written.append({"path": str(dst), "modality": "ct", "label": label, "split": split,
                                    "group": f"{name}:{r['group']}", "source": name})
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(written[0]))
        w.writeheader()
        w.writerows(written)
    return Counter((r["source"], r["split"], r["label"]) for r in written)


def run(data: Path, bundle: Path, options: list[str], seed: int, preset: str, cache: Path) -> dict[str, float]:
    respiscan = [sys.executable, "-m", "respiscan"]
    if not (bundle / "config.json").exists():
        subprocess.run([*respiscan, "train", str(data), "--preset", preset, "--seed", str(seed), "--out", str(bundle),
                        "--cache-dir", str(cache), *options], check=True, capture_output=True)
    report = bundle.with_name(bundle.name + "-eval")
    subprocess.run([*respiscan, "evaluate", str(bundle), str(data), "--out", str(report)], check=True,
                   capture_output=True)
    ct = json.loads((report / "metrics.json").read_text())["modalities"]["ct"]
    return {"pooled": ct["roc_auc"], **{s: v["roc_auc"] for s, v in ct["by_source"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    if not (args.shared / "data/realdev").exists() or not (args.shared / "data/sites/mosmed_ct").exists():
        sys.exit(f"needs {args.shared}/data/realdev and {args.shared}/data/sites/mosmed_ct")
    runs = [("control", "plain")] + [("confounded", m) for m in args.methods]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for plan in dict.fromkeys(p for p, _ in runs):
        data = args.work / plan
        if not (data / "manifest.csv").exists():
            counts = build(data, PLANS[plan], args.shared)
            print(plan, dict(sorted(counts.items())), flush=True)
    for plan, method in runs:
        for seed in args.seeds:
            tag = f"{plan}-{method.replace(' ', '').replace('+', '_')}-s{seed}"
            got = run(args.work / plan, args.work / "bundles" / tag, METHODS[method], seed, args.preset,
                      args.work / "cache")
            results.setdefault((plan, method), []).append(got)
            print(f"{plan:10s} {method:28s} seed {seed}: " + "  ".join(f"{k} {v:.3f}" for k, v in got.items()),
                  flush=True)
    print(f"\n| fit part | method | pooled AUC, mean (seeds {' / '.join(map(str, args.seeds))}) | UCSD | MosMed |")
    print("|---|---|---|---|---|")
    for (plan, method), rows in results.items():
        cells = [f"{statistics.mean(r[k] for r in rows):.3f} ({' / '.join(f'{r[k]:.2f}' for r in rows)})"
                 for k in ("pooled", "ucsd", "mosmed")]
        print(f"| {plan} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
