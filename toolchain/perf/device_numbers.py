"""A board's own measurements of the build's candidates (`toolchain build --measure-on DEVICE`), next to
the host measurement and the prediction.

The benchmark pass hands every candidate file to a `DeviceTimer` (made by the build command from
`toolchain.deploy.device_bench`: one signed benchmark job, timed by the device's agent in its own
runtime) and records what came back here, in each candidate's metrics:
`latency_ms_{p50,p90,p99}_device`, `device_rss_mb`, `device_error` (a candidate the device could not run)
and `prediction_error_device` (predicted / measured on the device - 1: how far the profile's predictor
was from the board). The gate then compares candidates on the device's p50 alone (`device_speedup`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from toolchain.errors import ToolchainError

# model name -> file in; the device's stored result out (toolchain.deploy.device_bench.bench_on_device)
DeviceTimer = Callable[[dict[str, Path]], dict[str, Any]]
DEVICE_P50 = "latency_ms_p50_device"


def record_device_numbers(metrics: dict[str, dict[str, Any]], result: dict[str, Any]) -> dict[str, Any]:
    """Write the device's numbers into each candidate's `metrics` (by name); return the run's summary for
    the report (device, profile, where the result is stored, the job's settings)."""
    for name, candidate in metrics.items():
        row = result["models"].get(name)
        if row is None or row.get("error"):
            candidate["device_error"] = (row or {}).get("error") or "the device returned no result for it"
            continue
        candidate.update({"latency_ms_p50_device": row["p50_ms"], "latency_ms_p90_device": row["p90_ms"],
                          "latency_ms_p99_device": row["p99_ms"], "device_rss_mb": row.get("rss_mb"),
                          "device_model_rss_mb": row.get("model_rss_mb")})
        if candidate.get("latency_ms_predicted"):
            candidate["prediction_error_device"] = round(candidate["latency_ms_predicted"] / row["p50_ms"] - 1, 4)
        if candidate.get("latency_ms_p50_host"):
            candidate["host_error_device"] = round(candidate["latency_ms_p50_host"] / row["p50_ms"] - 1, 4)
    return {key: result.get(key) for key in ("device", "fleet", "profile", "stored", "settings", "seconds")}


def device_speedup(incumbent: dict[str, Any], candidate: dict[str, Any]) -> float | None:
    """How much faster `candidate` ran than `incumbent` on the device; None when the build did not measure on one."""
    if DEVICE_P50 not in incumbent and "device_error" not in incumbent:
        return None
    if "device_error" in incumbent:
        raise ToolchainError(f"the device could not run the incumbent candidate: {incumbent['device_error']}")
    return incumbent[DEVICE_P50] / candidate[DEVICE_P50]
