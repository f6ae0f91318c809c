"""Cost of the device's drift accounting: `DriftMonitor.update` per feature per served sample.

The agent calls `DriftMonitor.update(batch, predicted_classes)` on every request: bin each sample's
summary features against the bundle's reference edges, count the predicted classes, and feed the
per-sample monitored statistic to Page-Hinkley and the drifting score. Measured over requests of 1
sample (the realistic serving case: one request, one sample) and of 64 samples, on synthetic N(0, 1)
inputs with `n_features` raw features and a reference built like the host builds it.
Target: <= 10 us per feature per sample (batch of 1).

    python benchmarks/drift_cost.py [--quick] [--features 64] [--samples 20000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from _common import print_table, target, write_results
from runtime_agent.drift import DriftMonitor
from runtime_agent.reference import MAX_RAW_FEATURES, build_reference

TARGET_US_PER_FEATURE = 10.0
N_CLASSES = 10


def _monitor(n_features: int, seed: int) -> DriftMonitor:
    if n_features > MAX_RAW_FEATURES:
        raise ValueError(f"n_features must be <= {MAX_RAW_FEATURES} (raw features are monitored up to that), got {n_features}")
    rng = np.random.default_rng(seed)
    train = rng.standard_normal((5000, n_features))
    scores = np.eye(N_CLASSES)[rng.integers(0, N_CLASSES, len(train))]
    return DriftMonitor(build_reference(train, scores, "classification", N_CLASSES), (n_features,))


def measure_drift_cost(n_features: int = 64, samples: int = 20000, batch_size: int = 1, repeats: int = 3,
                       seed: int = 0) -> float:
    """Microseconds per feature per sample of `DriftMonitor.update` over requests of `batch_size` samples.

    Best of `repeats` timed passes over `samples` samples (after one untimed warm-up request); the
    window is reported (and reset) between passes, as the agent does every window.
    """
    monitor = _monitor(n_features, seed)
    rng = np.random.default_rng(seed + 1)
    data = rng.standard_normal((samples, n_features))
    classes = rng.integers(0, N_CLASSES, samples)
    batches = [(data[i:i + batch_size], classes[i:i + batch_size]) for i in range(0, samples, batch_size)]
    monitor.update(*batches[0])
    best = float("inf")
    for _ in range(repeats):
        monitor.window_report()
        update = monitor.update
        started = time.perf_counter()
        for batch, predicted in batches:
            update(batch, predicted)
        best = min(best, time.perf_counter() - started)
    return best / samples / n_features * 1e6


def measure_report_cost(n_features: int = 64, repeats: int = 20, seed: int = 0) -> float:
    """Microseconds for one `window_report()` (once per telemetry window, not per sample)."""
    monitor = _monitor(n_features, seed)
    data = np.random.default_rng(seed + 1).standard_normal((500, n_features))
    times = []
    for _ in range(repeats):
        monitor.update(data)
        started = time.perf_counter()
        monitor.window_report()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e6


def rows(n_features: int = 64, samples: int = 20000) -> list[dict[str, Any]]:
    out = []
    for batch_size in (1, 64):
        per_feature = measure_drift_cost(n_features, samples, batch_size)
        out.append({"batch": batch_size, "features": n_features, "samples": samples,
                    "us_per_sample": per_feature * n_features, "us_per_feature_per_sample": per_feature})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (finishes in seconds)")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args(argv)
    samples = args.samples or (5000 if args.quick else 20000)
    table = rows(args.features, samples)
    report_us = measure_report_cost(args.features)
    print(f"DriftMonitor.update cost, {args.features} features (window_report: {report_us:.0f} us per window)\n")
    print_table(table, ["batch", "features", "samples", "us_per_sample", "us_per_feature_per_sample"])
    single = next(r for r in table if r["batch"] == 1)
    write_results("drift_cost", table, {
        "drift update us per feature per sample (batch 1)":
            target(single["us_per_feature_per_sample"], "<=", TARGET_US_PER_FEATURE)},
        window_report_us=round(report_us, 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
