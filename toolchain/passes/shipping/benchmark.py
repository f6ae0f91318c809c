"""Latency of every candidate on this host (interleaved, one run) and predicted on the target profile; with
`--measure-on DEVICE`, measured on that board too (toolchain.perf.device_numbers)."""

from __future__ import annotations

from typing import ClassVar

from toolchain.core.artifact import Artifact
from toolchain.perf.bench import BenchSettings, bench_models
from toolchain.perf.device_numbers import record_device_numbers
from toolchain.core.contract import BuildContext


class BenchmarkPass:
    name: ClassVar[str] = "benchmark"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        settings = BenchSettings(seconds=ctx.settings.bench_seconds, min_runs=ctx.settings.bench_min_runs)
        models = {c.name: c.path for c in artifact.candidates}
        with ctx.console.status(f"  measuring {len(models)} candidates interleaved (~{settings.seconds:.0f} s)"):
            results = bench_models(models, ctx.profile, ctx.dataset.input_shape, settings, seed=ctx.seed)
        for candidate in artifact.candidates:
            candidate.metrics.update(results[candidate.name])
            ctx.console.print(f"  {candidate.name:<16} host p50 {candidate.metrics['latency_ms_p50_host']:.4f} ms, "
                              f"p90 {candidate.metrics['latency_ms_p90_host']:.4f} ms; predicted on {ctx.profile.id} "
                              f"{candidate.metrics['latency_ms_predicted']:.4f} ms")
        artifact.metrics["benchmark"] = {"threads": settings.threads, "seconds": settings.seconds,
                                         "min_runs": settings.min_runs, "interleaved": True}
        if ctx.device_timer is not None:
            with ctx.console.status(f"  timing {len(models)} candidates on the device (--measure-on)"):
                device = record_device_numbers({c.name: c.metrics for c in artifact.candidates}, ctx.device_timer(models))
            artifact.metrics["benchmark"]["device"] = device
            for candidate in artifact.candidates:
                m = candidate.metrics
                ctx.console.print(f"  {candidate.name:<16} on {device['device']}: " + (
                    f"could not run: {m['device_error']}" if "device_error" in m else
                    f"p50 {m['latency_ms_p50_device']:.4f} ms (prediction {100 * m.get('prediction_error_device', 0):+.1f}%)"))
        return artifact
