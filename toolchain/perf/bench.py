"""Measure models on this host and predict them on a profile, side by side, with budget verdicts.

Shared by the build's benchmark pass (every candidate, interleaved so noise hits all equally) and by
`toolchain bench` (one model or bundle). Measured numbers are host numbers; predicted numbers are
the calibrated predictor's when the profile has a calibration, else the roofline's, and every row
says which (`prediction`); on the host itself, measured and predicted sit side by side with the
prediction's error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.perf.graph_cost import analyze

from toolchain.perf.roofline import roofline_fraction
from toolchain.perf.estimate import budget_verdicts, estimate
from toolchain.runtime.measure import measure_latencies, measure_peak_rss
from toolchain.targets.profiles import Profile, resolve_target

__all__ = ["BenchSettings", "bench_models", "budget_verdicts"]


@dataclass(frozen=True)
class BenchSettings:
    seconds: float = 6.0
    min_runs: int = 300
    warmup: int = 30
    threads: int = 1  # one core: stable on a shared machine, and what a small model gets on a busy board
    measure_rss: bool = True


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
        on_target = estimate(cost, profile)
        on_host = on_target if profile.id == host.id else estimate(cost, host)
        stats = measured[name]
        size = Path(path).stat().st_size
        row: dict[str, Any] = {
            "bytes": size,
            "latency_ms_p50_host": round(stats.p50_ms, 5), "latency_ms_p90_host": round(stats.p90_ms, 5),
            "latency_ms_p99_host": round(stats.p99_ms, 5), "runs_host": stats.runs,
            "latency_ms_predicted": round(on_target.latency_ms, 5),
            "latency_ms_predicted_roofline": round(on_target.roofline.latency_ms, 5),
            "prediction": "calibrated" if on_target.calibrated else "roofline", "prediction_basis": on_target.basis,
            "latency_ms_predicted_host": round(on_host.latency_ms, 5),
            "prediction_host": "calibrated" if on_host.calibrated else "roofline",
            "prediction_error_host": round(on_host.latency_ms / stats.p50_ms - 1.0, 5),
            "roofline_fraction_host": round(roofline_fraction(on_host.roofline.roofline_ms, stats.p50_ms), 5),
            "flops": cost.flops, "parameters": cost.param_count,
            "peak_memory_mb_predicted": round(on_target.memory_mb, 4), "memory_basis": on_target.memory_basis,
        }
        if settings.measure_rss:
            rss = measure_peak_rss(Path(path), tuple(input_shape), threads=settings.threads)
            row.update({k: rss[k] for k in ("process_peak_rss_mb", "baseline_rss_mb", "model_rss_mb")})
        # A calibrated prediction is of the whole serving process; the roofline's is of the model's
        # tensors only, so the measured model RSS on this host bounds it from below.
        # A microcontroller's arena has no host analogue, so no host RSS bounds it.
        memory = (on_target.memory_mb if on_target.memory_basis in ("process", "tensor arena")
                  else max(on_target.memory_mb, row.get("model_rss_mb", 0.0)))
        row["budget"] = budget_verdicts(profile, on_target.latency_ms, size, memory)
        results[name] = row
    return results
