"""`toolchain calibrate --target host`: measure generated model variants here and fit the predictor.

The variants (`toolchain.perf.variants`) are split, per family and precision, into a fit set and a
held-out set *before* anything is measured; both are measured in one interleaved session (so the
machine's load drifts over both alike), the predictor is fitted on the fit set only, and its errors
on the held-out set are recorded in the calibration file as `validation`. Those are the numbers to
trust: errors on the fit set flatter any model.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from toolchain.perf.calibration import Calibration
from toolchain.perf.cost_types import GraphCost
from toolchain.perf.graph_cost import analyze
from toolchain.errors import ToolchainError
from toolchain.targets.hostprobe import fingerprint
from toolchain.runtime.measure import measure_latencies, measure_peak_rss
from toolchain.perf.predictor import LatencyModel, Peaks, error_summary, evaluate, relative_errors, rounded, share_within
from toolchain.perf.predictor_fit import LatencySample, MemorySample, fit_memory, fit_shrunk
from toolchain.targets.profiles import Profile
from toolchain.export.tflite import require_tflite_extra
from toolchain.perf.variants import VariantSpec, sample_specs, split_specs, write_tflite_variant, write_variant

CACHE_CANDIDATES_MB = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
MEMORY_TOLERANCE = 0.20


@dataclass(frozen=True)
class CalibrationSettings:
    """How much to measure. The default takes about 2 minutes on a 2-core machine, `quick` about
    30 s; held-out accuracy grows with the variants fitted (benchmarks/predictor.py: ~85% within
    10% at 120 fitted; 90-97% at 180 and 97.5-99% at 240 over seeds 0-2, a kernel group seen in only a
    handful of fitted models being what misses; ~94% at 360 when last measured)."""

    variants: int = 320  # the fit has ~100 parameters: it needs a few hundred models
    held_out_fraction: float = 0.25
    seconds: float = 60.0  # interleaved latency measurement of all variants together
    memory_variants: int = 24  # peak RSS is measured in a fresh process per model: ~0.4 s each
    seed: int = 0
    threads: int = 1
    runtime: str = "onnxruntime"  # "litert": the variants are converted to .tflite and run by LiteRT

    @classmethod
    def quick(cls, seed: int = 0, runtime: str = "onnxruntime") -> CalibrationSettings:
        return cls(variants=224, seconds=16.0, memory_variants=8, seed=seed, runtime=runtime)


@dataclass
class VariantResult:
    """One measured variant, and whether the fit saw it."""

    spec: VariantSpec
    path: Path
    cost: GraphCost
    p50_ms: float
    runs: int
    held_out: bool
    rss: dict[str, Any] | None = None
    predicted_ms: float | None = None
    predicted_model_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        row = {"name": self.spec.name, "family": self.spec.family, "precision": self.spec.precision,
               "held_out": self.held_out, "flops": self.cost.flops, "kernels": self.cost.kernel_ops,
               "weights_mb": round(self.cost.weights_bytes / 2**20, 4), "p50_ms": round(self.p50_ms, 6), "runs": self.runs}
        if self.predicted_ms is not None:
            row.update(predicted_ms=round(self.predicted_ms, 6), latency_error=round(self.predicted_ms / self.p50_ms - 1, 5))
        if self.rss is not None:
            row.update(model_rss_mb=self.rss["model_rss_mb"], process_peak_rss_mb=self.rss["process_peak_rss_mb"])
        if self.rss is not None and self.predicted_model_mb is not None:
            row.update(predicted_model_mb=round(self.predicted_model_mb, 3),
                       memory_error=round(self.predicted_model_mb / self.rss["model_rss_mb"] - 1, 5))
        return row


@dataclass
class HostCalibration:
    calibration: Calibration
    results: list[VariantResult] = field(default_factory=list)


class _Stage:
    """One progress-bar task of a stage longer than a second (nothing without a console)."""

    def __init__(self, progress: Progress | None, label: str, total: float) -> None:
        self.progress = progress
        self.task = progress.add_task(label, total=total) if progress is not None else None

    def advance(self, steps: float = 1.0) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=steps)

    def set(self, completed: float) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=completed)

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)


def _progress(console: Console | None) -> Progress | None:
    if console is None:
        return None
    return Progress(TextColumn("  {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console, transient=True)


def check_measurable(profile: Profile) -> None:
    """Only the profile of this machine can be calibrated by measuring here."""
    if profile.raw.get("measured") is not True:
        raise ToolchainError(f"profile '{profile.id}' is a board, not this machine: calibrate it from what its devices "
                             f"reported, `toolchain calibrate --target {profile.id} --from-fleet DB --models DIR`")


def calibrate_host(profile: Profile, settings: CalibrationSettings = CalibrationSettings(),
                   console: Console | None = None, workdir: Path | None = None) -> HostCalibration:
    """Generate, measure and fit; the returned calibration is not written anywhere yet."""
    check_measurable(profile)
    specs = sample_specs(settings.variants, seed=settings.seed)
    _, held_specs = split_specs(specs, settings.held_out_fraction, seed=settings.seed)
    held = {s.name for s in held_specs}
    with tempfile.TemporaryDirectory(prefix="toolchain-calibrate-", dir=workdir) as scratch:
        progress = _progress(console)
        with progress or nullcontext():
            results = _measure(specs, held, Path(scratch), settings, progress)
    return fit_variants(profile, results, settings)


def generate_variants(specs: list[VariantSpec], folder: Path, settings: CalibrationSettings,
                      progress: Progress | None) -> dict[str, Path]:
    """Each spec's model file, in the format of the runtime being calibrated."""
    paths: dict[str, Path] = {}
    if settings.runtime == "litert":
        require_tflite_extra("calibrating LiteRT")
    write = write_tflite_variant if settings.runtime == "litert" else write_variant
    with _Stage(progress, f"generating {len(specs)} model variants", len(specs)) as stage:
        for spec in specs:
            paths[spec.name] = write(spec, folder, seed=settings.seed)
            stage.advance()
    return paths


def _measure(specs: list[VariantSpec], held: set[str], folder: Path, settings: CalibrationSettings,
             progress: Progress | None) -> list[VariantResult]:
    paths = generate_variants(specs, folder, settings, progress)
    with _Stage(progress, f"measuring latency, interleaved ({settings.seconds:.0f} s)", 1.0) as stage:
        stats = measure_latencies(paths, {s.name: s.input_shape for s in specs}, min_runs=30,
                                  max_seconds=settings.seconds, threads=settings.threads, seed=settings.seed,
                                  on_round=stage.set)
    results = [VariantResult(s, paths[s.name], analyze(paths[s.name]), stats[s.name].p50_ms, stats[s.name].runs,
                             s.name in held) for s in specs]
    chosen = _memory_subset(results, settings.memory_variants)
    with _Stage(progress, f"measuring peak memory of {len(chosen)} variants", len(chosen)) as stage:
        for result in chosen:
            result.rss = measure_peak_rss(result.path, result.spec.input_shape, threads=settings.threads)
            stage.advance()
    return results


def _memory_subset(results: list[VariantResult], count: int) -> list[VariantResult]:
    """Memory is measured on a spread of weight sizes, from both the fit and the held-out set."""
    chosen: list[VariantResult] = []
    for held_out in (False, True):
        pool = sorted((r for r in results if r.held_out == held_out), key=lambda r: r.cost.weights_bytes)
        share = max(2, round(count * (0.3 if held_out else 0.7)))
        step = max(1, len(pool) // share)
        chosen += pool[::step][:share]
    return chosen


def fit_variants(profile: Profile, results: list[VariantResult], settings: CalibrationSettings,
                 source: str = "variants", threads: int | None = None, host: bool = True) -> HostCalibration:
    """Fit latency and memory on the fit set, validate on the held-out set. `source`, `threads`: how the
    results were measured (a device names its own); `host`: they were measured here (the calibration then
    carries this machine's fingerprint)."""
    peaks = Peaks.of(profile)
    fit_set = [r for r in results if not r.held_out]
    held_set = [r for r in results if r.held_out]
    latency, report, selection = fit_shrunk([LatencySample(r.spec.name, r.cost, r.p50_ms) for r in fit_set], peaks,
                                            LatencyModel.roofline(profile), cache_mb=CACHE_CANDIDATES_MB,
                                            seed=settings.seed)
    for result, predicted in zip(results, evaluate([r.cost for r in results], peaks, latency)):
        result.predicted_ms = float(predicted)
    memory_fit = [r for r in fit_set if r.rss and r.rss["model_rss_mb"] > 0]  # a device's in-process delta can be 0
    memory, memory_report = fit_memory([MemorySample(r.spec.name, r.cost, r.rss["model_rss_mb"], r.rss["baseline_rss_mb"])
                                        for r in memory_fit if r.rss]) if memory_fit else (None, {"samples": 0})
    for result in results:
        result.predicted_model_mb = memory.model_mb(result.cost) if memory else None
    latency_errors = relative_errors({r.spec.name: r.predicted_ms or 0.0 for r in held_set},
                                     {r.spec.name: r.p50_ms for r in held_set})
    memory_held = [r for r in held_set if r.rss and r.rss["model_rss_mb"] > 0] if memory else []
    memory_errors = relative_errors({r.spec.name: r.predicted_model_mb or 0.0 for r in memory_held},
                                    {r.spec.name: r.rss["model_rss_mb"] for r in memory_held if r.rss})
    validation = {
        "held_out": sorted(r.spec.name for r in held_set),
        "latency": {**error_summary(latency_errors), "errors": rounded(latency_errors)},
        "memory": {**error_summary(memory_errors), "within_20pct": share_within(memory_errors, MEMORY_TOLERANCE),
                   "errors": rounded(memory_errors)},
    }
    fit = {**report.to_dict(), "selection": selection, "fitted": sorted(r.spec.name for r in fit_set),
           "memory": rounded(memory_report),
           "seconds": settings.seconds, "variants": len(results)}
    calibration = Calibration(profile=profile.id, source=source, threads=settings.threads if threads is None else threads,
                              peaks=peaks, latency=latency, memory=memory, fit=rounded(fit), validation=rounded(validation),
                              fingerprint=fingerprint() if host else None, runtime=settings.runtime)
    return HostCalibration(calibration, results)
