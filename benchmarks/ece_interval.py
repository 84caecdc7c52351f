"""Why `evaluate` gives ECE no bootstrap interval: coverage of the true ECE by bootstrap intervals of binned ECE,
and how often the consistency test (`ece_if_calibrated`) calls a model miscalibrated, by simulation.

    python benchmarks/ece_interval.py [--n 200] [--trials 150]

A model's logit is a miscalibrated copy of the true one (slope 0.9, shift 0, 0.3, 0.6); the true binned ECE is
taken on 2,000,000 cases. Prints a Markdown table: per shift, the true ECE, the mean estimate at n, the share of
trials whose 95 % interval holds the true ECE (BCa and percentile as scipy.stats.bootstrap computes them, and
the basic interval 2 ECE - quantiles), and the share where the consistency test gives p < 0.05.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats
from scipy.special import expit

from respiscan.metrics import ece_if_calibrated, expected_calibration_error


def _draw(n: int, shift: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    z = rng.normal(0.0, 2.0, n)
    return (rng.random(n) < expit(z)).astype(int), expit(0.9 * z + shift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="cases per simulated test split")
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"| shift | true ECE | mean ECE at n = {args.n} | BCa covers | percentile covers | basic covers "
          "| consistency test p < 0.05 |")
    print("|---|---|---|---|---|---|---|")
    for shift in (0.0, 0.3, 0.6):
        true = expected_calibration_error(*_draw(2_000_000, shift, rng))
        estimates, rejected = [], 0
        covered = {"BCa": 0, "percentile": 0, "basic": 0}
        for trial in range(args.trials):
            y, p = _draw(args.n, shift, rng)
            estimate = expected_calibration_error(y, p)
            estimates.append(estimate)
            rejected += ece_if_calibrated(y, p, seed=trial)["p_value"] < 0.05
            for method in ("BCa", "percentile", "basic"):
                ci = stats.bootstrap((y, p), expected_calibration_error, paired=True, vectorized=False,
                                     n_resamples=args.resamples, method=method, random_state=trial)
                covered[method] += ci.confidence_interval.low <= true <= ci.confidence_interval.high
        share = {k: v / args.trials for k, v in covered.items()}
        print(f"| {shift} | {true:.3f} | {np.mean(estimates):.3f} | {share['BCa']:.2f} | {share['percentile']:.2f} "
              f"| {share['basic']:.2f} | {rejected / args.trials:.2f} |", flush=True)


if __name__ == "__main__":
    main()
