"""`toolchain calibrate --target BOARD --from-fleet DB --models DIR`: re-fit a board's predictor from
what its devices reported.

A board cannot be measured here, but a deployed fleet measures it all day: every telemetry window
carries a latency sketch and the model version, every device's status its model name and profile.
So the latencies devices with this profile reported are merged per (model name, version) into one
p50 each (exact sketch merge, the same numbers `toolchain fleet status` shows), each is matched to
its bundle in DIR for the graph, and a few multipliers of the profile's current predictor (its
calibration, else the data-sheet roofline) are fitted to them: with a handful of models, only a
handful of numbers can be learned (`tied_parametrization`). The agent's resident memory (`rss_mb`)
re-fits the runtime's memory baseline the same way. With three or more models, each is also
predicted by a fit without it (leave-one-out), recorded as the calibration's `validation`.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from runtime_agent.bundle import read_bundle
from runtime_agent.errors import AgentError
from runtime_agent.signing import load_public_key
from toolchain.perf.calibration import Calibration, find_calibration
from toolchain.perf.cost_types import GraphCost
from toolchain.perf.graph_cost import analyze
from toolchain.errors import ToolchainError
from toolchain.fleet.store import FleetStore, merge_sketches
from toolchain.perf.predictor import LatencyModel, MemoryModel, Peaks, error_summary, evaluate, relative_errors, rounded
from toolchain.perf.predictor_fit import LatencySample, fit_latency, tied_parametrization
from toolchain.targets.profiles import Profile

FLEET_RIDGE = 1e-2  # a 2x move of one multiplier costs what a 10% miss on one model does


@dataclass(frozen=True)
class FleetObservation:
    """Merged telemetry of one model version on every device of the profile."""

    model_name: str
    model_version: int
    p50_ms: float
    windows: int
    requests: int
    devices: int
    rss_mb: float | None

    @property
    def key(self) -> str:
        return f"{self.model_name}@{self.model_version}"


def fleet_observations(db: Path, profile: Profile) -> list[FleetObservation]:
    """Per (model name, version): the merged p50 of every window of devices reporting `profile`."""
    names = {profile.id, *profile.aliases}
    with FleetStore(db, create=False) as store:
        devices = [d for d in store.devices() if d.get("profile") in names and d.get("model_name")]
        groups: dict[tuple[str, int], list[tuple[str, dict[str, Any]]]] = {}
        for device in devices:
            for window in store.telemetry(device["fleet"], device["device"]):
                version = window.get("model_version") or device.get("model_version")
                if version is not None and window.get("n"):
                    groups.setdefault((device["model_name"], int(version)), []).append((device["device"], window))
    observations = []
    for (name, version), windows in sorted(groups.items()):
        merged = merge_sketches(w["sketch"] for _, w in windows)
        p50 = merged.sketch.summary()["p50"]
        if not p50:
            continue
        rss = [w["rss_mb"] for _, w in windows if w.get("rss_mb")]
        observations.append(FleetObservation(name, version, float(p50), merged.windows, merged.sketch.count,
                                             len({d for d, _ in windows}), statistics.median(rss) if rss else None))
    return observations


def bundle_graphs(models_dir: Path, pubkey: Path, scratch: Path, runtime: str = "onnxruntime") -> dict[tuple[str, int], Path]:
    """(name, version) -> the verified model of every bundle in `models_dir` that `runtime` runs
    (ONNX for onnxruntime, `.tflite` for LiteRT: one runtime's latencies fit one calibration)."""
    if not models_dir.is_dir():
        raise ToolchainError(f"--models {models_dir} is not a folder of .bundle files")
    key = load_public_key(pubkey)
    graphs: dict[tuple[str, int], Path] = {}
    for path in sorted(models_dir.glob("*.bundle")):
        try:
            bundle = read_bundle(path, key)
        except AgentError as exc:
            raise ToolchainError(f"cannot use {path}: {exc}") from None
        fmt = bundle.model_artifact.get("format", "onnx")
        if fmt != ("tflite" if runtime == "litert" else "onnx"):
            continue
        out = scratch / f"{bundle.manifest['name']}-{bundle.version}.{fmt}"
        out.write_bytes(bundle.model_bytes)
        graphs[(bundle.manifest["name"], bundle.version)] = out
    return graphs


def calibrate_from_fleet(profile: Profile, db: Path, models_dir: Path, pubkey: Path,
                         runtime: str = "onnxruntime") -> Calibration:
    """Fit and return (not write) the profile's calibration from fleet telemetry and bundles."""
    observations = fleet_observations(db, profile)
    if not observations:
        raise ToolchainError(f"{db} holds no latency telemetry from devices with profile '{profile.id}' "
                             "(a device reports its profile in its status)")
    with tempfile.TemporaryDirectory(prefix="toolchain-fleet-calibrate-") as scratch:
        graphs = bundle_graphs(models_dir, pubkey, Path(scratch), runtime)
        costs = {o.key: analyze(graphs[(o.model_name, o.model_version)]) for o in observations
                 if (o.model_name, o.model_version) in graphs}
    missing = [o.key for o in observations if o.key not in costs]
    if not costs:
        raise ToolchainError(f"none of the reported models ({', '.join(missing)}) has a bundle in {models_dir}")
    used = [o for o in observations if o.key in costs]
    prior_calibration, prior_basis = find_calibration(profile, runtime)
    prior = prior_calibration.latency if prior_calibration else LatencyModel.roofline(profile)
    peaks = prior_calibration.peaks if prior_calibration else Peaks.of(profile)
    samples = [LatencySample(o.key, costs[o.key], o.p50_ms) for o in used]
    latency, report = fit_latency(samples, peaks, prior, tied_parametrization, ridge=FLEET_RIDGE)
    prior_errors = relative_errors(dict(zip(costs, evaluate(list(costs.values()), peaks, prior))),
                                   {o.key: o.p50_ms for o in used})
    memory = _memory(used, costs, prior_calibration.memory if prior_calibration else None)
    fit = {**report.to_dict(), "ridge": FLEET_RIDGE, "prior": prior_basis,
           "prior_errors": {**error_summary(prior_errors), "errors": prior_errors},
           "observations": [asdict(o) for o in used], "missing_bundles": missing}
    return Calibration(profile=profile.id, source="fleet", threads=prior_calibration.threads if prior_calibration else 1,
                       peaks=peaks, latency=latency, memory=memory, fit=rounded(fit),
                       validation=_leave_one_out(samples, peaks, prior), runtime=runtime)


def _memory(observations: list[FleetObservation], costs: dict[str, GraphCost], prior: MemoryModel | None) -> MemoryModel | None:
    """The prior's per-model memory terms, with the runtime baseline re-fitted to the devices' RSS."""
    model = prior or MemoryModel(0.0, 0.0, 1.0, 1.0)
    residuals = [o.rss_mb - model.model_mb(costs[o.key]) for o in observations if o.rss_mb is not None]
    if not residuals:
        return prior
    return replace(model, runtime_baseline_mb=max(0.0, statistics.median(residuals)))


def _leave_one_out(samples: list[LatencySample], peaks: Peaks, prior: LatencyModel) -> dict[str, Any] | None:
    """Each model predicted by a fit on the others: how the fit does on a model it has not seen."""
    if len(samples) < 3:
        return None
    errors = {}
    for i, sample in enumerate(samples):
        model, _ = fit_latency(samples[:i] + samples[i + 1:], peaks, prior, tied_parametrization, ridge=FLEET_RIDGE)
        errors[sample.name] = float(evaluate([sample.cost], peaks, model)[0]) / sample.latency_ms - 1.0
    return rounded({"method": "leave-one-out", "held_out": sorted(errors), "latency": {**error_summary(errors), "errors": errors}})
