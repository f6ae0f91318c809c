"""Measure models on this host and predict them on a profile, side by side, with budget verdicts.

Shared by the build's benchmark pass (every candidate, interleaved so noise hits all equally) and by
`toolchain bench` (one model or bundle). Measured numbers are host numbers; predicted numbers are
the roofline model's for the target; the report always says which is which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.costmodel import analyze, predict, roofline_fraction
from toolchain.measure import measure_latencies, measure_peak_rss
from toolchain.targets import Profile, resolve_target

MB = 1024 * 1024


@dataclass(frozen=True)
class BenchSettings:
    seconds: float = 6.0
    min_runs: int = 300
    warmup: int = 30
    threads: int = 1  # one core: stable on a shared machine, and what a small model gets on a busy board
    measure_rss: bool = True


def budget_verdicts(profile: Profile, latency_ms: float, size_bytes: int, memory_mb: float) -> dict[str, dict[str, Any]]:
    """Each budget of the profile against the predicted value: {value, budget, met}."""
    checks = {"latency_ms": latency_ms, "model_mb": size_bytes / MB, "ram_mb": memory_mb}
    return {key: {"value": round(value, 4), "budget": getattr(profile.budget, key), "met": value <= getattr(profile.budget, key)}
            for key, value in checks.items()}


def bench_models(models: dict[str, Path], profile: Profile, input_shape: tuple[int, ...],
                 settings: BenchSettings = BenchSettings(), seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per model: host latency percentiles, size, RSS, predicted latency/memory, roofline fraction, verdicts."""
    host = resolve_target("host")
    measured = measure_latencies(models, tuple(input_shape), dtype=np.float32, warmup=settings.warmup,
                                 min_runs=settings.min_runs, max_seconds=settings.seconds,
                                 threads=settings.threads, seed=seed)
    results = {}
    for name, path in models.items():
        cost = analyze(path)
        on_target, on_host = predict(cost, profile), predict(cost, host)
        stats = measured[name]
        size = Path(path).stat().st_size
        row: dict[str, Any] = {
            "bytes": size,
            "latency_ms_p50_host": round(stats.p50_ms, 5), "latency_ms_p90_host": round(stats.p90_ms, 5),
            "latency_ms_p99_host": round(stats.p99_ms, 5), "runs_host": stats.runs,
            "latency_ms_predicted": round(on_target.latency_ms, 5),
            "latency_ms_predicted_host": round(on_host.latency_ms, 5),
            "roofline_fraction_host": round(roofline_fraction(on_host.roofline_ms, stats.p50_ms), 5),
            "flops": cost.flops, "parameters": cost.param_count,
            "peak_memory_mb_predicted": round(on_target.peak_memory_mb, 4),
        }
        if settings.measure_rss:
            rss = measure_peak_rss(Path(path), tuple(input_shape), threads=settings.threads)
            row.update({k: rss[k] for k in ("process_peak_rss_mb", "baseline_rss_mb", "model_rss_mb")})
        memory = max(row["peak_memory_mb_predicted"], row.get("model_rss_mb", 0.0))
        row["budget"] = budget_verdicts(profile, on_target.latency_ms, size, memory)
        results[name] = row
    return results
