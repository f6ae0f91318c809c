"""`toolchain calibrate --target BOARD --from-device ID`: the generated variant set timed on the board itself.

The same variants, fit/held-out split and fit as `--target host` (toolchain.perf.calibrate_host), but
each variant is timed by the device's agent in its own runtime (`DeviceTimer`, made by the command from
`toolchain.deploy.device_bench`: signed benchmark jobs of `JOB_MODELS` variants each, so no job grows
large), and memory is what the agent's process gained loading each one. Unlike `--from-fleet`, which
can only learn a handful of multipliers from the few models a fleet serves, a device can time hundreds
of variants, so the whole predictor is fitted, as on the host.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console

from toolchain.errors import ToolchainError
from toolchain.perf.calibrate_host import (CalibrationSettings, HostCalibration, VariantResult, fit_variants,
                                           generate_variants)
from toolchain.perf.device_numbers import DeviceTimer
from toolchain.perf.graph_cost import analyze
from toolchain.perf.variants import sample_specs, split_specs
from toolchain.targets.profiles import Profile

JOB_MODELS = 32


def calibrate_device(profile: Profile, settings: CalibrationSettings, timer: DeviceTimer,
                     console: Console | None = None) -> HostCalibration:
    """Generate the variants, time them on the device, fit; the calibration is not written anywhere yet."""
    specs = sample_specs(settings.variants, seed=settings.seed)
    _, held_specs = split_specs(specs, settings.held_out_fraction, seed=settings.seed)
    held = {s.name for s in held_specs}
    rows, devices = {}, set()
    with tempfile.TemporaryDirectory(prefix="toolchain-calibrate-device-") as scratch:
        paths = generate_variants(specs, Path(scratch), settings, None)
        names = list(paths)
        for start in range(0, len(names), JOB_MODELS):
            chunk = {name: paths[name] for name in names[start:start + JOB_MODELS]}
            if console is not None:
                console.print(f"  timing variants {start + 1}-{start + len(chunk)} of {len(names)} on the device")
            result = timer(chunk)
            devices.add(result["device"])
            rows.update(result["models"])
        failed = {name: rows.get(name, {}).get("error", "no result") for name in names if "p50_ms" not in rows.get(name, {})}
        if failed:
            name, error = next(iter(failed.items()))
            raise ToolchainError(f"the device could not time {len(failed)} variant(s), e.g. {name}: {error}")
        results = [VariantResult(spec, paths[spec.name], analyze(paths[spec.name]), rows[spec.name]["p50_ms"],
                                 rows[spec.name]["runs"], spec.name in held, _rss(rows[spec.name])) for spec in specs]
        threads = {row["threads"] for row in rows.values()}
        return fit_variants(profile, results, settings, source=f"device {', '.join(sorted(devices))}",
                            threads=threads.pop() if len(threads) == 1 else None, host=False)


def _rss(row: dict) -> dict[str, float]:
    """What loading and running the variant added to the agent's resident memory, and the agent's own."""
    model = max(0.0, float(row.get("model_rss_mb") or 0.0))
    return {"model_rss_mb": model, "baseline_rss_mb": float(row["rss_mb"]) - model, "process_peak_rss_mb": float(row["rss_mb"])}
