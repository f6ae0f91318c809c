"""Re-fitting a board's predictor from fleet telemetry: a real SQLite fleet database (FleetStore), real
signed bundles, latencies that come from measured onnxruntime runs on this host, slowed down the way a
slower board would be."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from runtime_agent.bundle import bundle_filename, write_bundle
from runtime_agent.signing import load_private_key, write_keypair
from runtime_agent.sketch import LatencySketch
from tests.conftest import run_cli
from toolchain.fleet.calibrate import calibrate_from_fleet, fleet_observations
from toolchain.perf.calibration import read_calibration
from toolchain.perf.cost_types import MIB
from toolchain.perf.graph_cost import analyze
from toolchain.errors import ToolchainError
from toolchain.fleet.store import FleetStore, TelemetryRecord
from toolchain.runtime.measure import measure_latencies
from toolchain.targets.profiles import resolve_target
from toolchain.perf.variants import VariantSpec, write_variant

BOARD_SLOWDOWN, AGENT_OVERHEAD_MS, AGENT_RSS_MB = 3.0, 0.05, 150.0
VERSIONS = {1: VariantSpec("cnn", 16, 1, 3, 16, "fp32"), 2: VariantSpec("cnn", 32, 2, 3, 24, "fp32"),
            3: VariantSpec("cnn", 32, 2, 3, 24, "int8"), 4: VariantSpec("mobile", 64, 2, 3, 32, "fp32"),
            5: VariantSpec("mlp", 512, 2, 1, 256, "fp32")}


@dataclass(frozen=True)
class Fleet:
    db: Path
    models: Path
    pubkey: Path
    device_ms: dict[int, float]  # the p50 the pi5 devices reported per model version
    onnx: dict[int, Path]


def _bundle(folder: Path, key: Path, version: int, model: Path) -> Path:
    manifest = {"format": 1, "name": "blobs", "version": version, "target": "raspberry-pi-5", "created": "2026-01-01T00:00:00Z",
                "artifacts": [{"path": "model.onnx", "format": "onnx", "precision": VERSIONS[version].precision,
                               "runtime": "onnxruntime", "role": "model"}],
                "input": {"name": "input", "shape": [1, *VERSIONS[version].input_shape], "dtype": "float32"},
                "labels": [str(i) for i in range(10)], "metrics": {}, "reference": {}, "provenance": {}}
    return write_bundle(folder / bundle_filename("blobs", version, "raspberry-pi-5"), manifest,
                        {"model.onnx": model.read_bytes()}, load_private_key(key))


def _window(device: str, seq: int, version: int, latency_ms: float, rss_mb: float, rng: np.random.Generator) -> TelemetryRecord:
    sketch = LatencySketch()
    sketch.add_many(latency_ms * rng.lognormal(0.0, 0.03, size=400))
    summary = sketch.summary()
    return TelemetryRecord(fleet="lab", device=device, seq=seq, window_start=1000.0 + 10 * seq, window_end=1010.0 + 10 * seq,
                           model_version=version, n=400, requests=400, errors=0, rss_mb=rss_mb, p50=summary["p50"],
                           p90=summary["p90"], p99=summary["p99"], sketch=sketch.to_dict(), drift={}, alarm=False)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("fleet-calibration")
    private, public = write_keypair(root / "keys")
    onnx = {v: write_variant(spec, root / "onnx") for v, spec in VERSIONS.items()}
    measured = measure_latencies({str(v): p for v, p in onnx.items()}, {str(v): s.input_shape for v, s in VERSIONS.items()},
                                 min_runs=50, max_seconds=1.0)
    device_ms = {v: BOARD_SLOWDOWN * measured[str(v)].p50_ms + AGENT_OVERHEAD_MS for v in VERSIONS}
    models = root / "bundles"
    models.mkdir()
    for version, path in onnx.items():
        _bundle(models, private, version, path)
    rng = np.random.default_rng(0)
    db = root / "fleet.sqlite"
    with FleetStore(db) as store:
        # two Pi 5s (one reporting the profile by its alias) ran every version; a Jetson ran one, 100x faster
        for device, profile in (("pi-a", "raspberry-pi-5"), ("pi-b", "pi5"), ("orin", "jetson-orin-nano")):
            store.update_status("lab", device, "online", model_name="blobs", model_version=max(VERSIONS), profile=profile)
        seq = 0
        for version, cost_path in onnx.items():
            weights_mb = analyze(cost_path).weights_bytes / MIB
            for device in ("pi-a", "pi-b"):
                for _ in range(2):
                    seq += 1
                    store.insert_telemetry(_window(device, seq, version, device_ms[version], AGENT_RSS_MB + weights_mb, rng))
        store.insert_telemetry(_window("orin", 1, 2, device_ms[2] / 100, 400.0, rng))
    return Fleet(db, models, public, device_ms, onnx)


def test_observations_merge_the_profile_devices_windows(fleet: Fleet) -> None:
    observations = fleet_observations(fleet.db, resolve_target("raspberry-pi-5"))
    assert [(o.model_name, o.model_version) for o in observations] == [("blobs", v) for v in sorted(VERSIONS)]
    for o in observations:
        assert o.devices == 2 and o.windows == 4 and o.requests == 1600  # the Jetson's window is not mixed in
        assert o.p50_ms == pytest.approx(fleet.device_ms[o.model_version], rel=0.03)


def test_refit_from_fleet_beats_the_prior_and_reports_held_out_errors(fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_TOOLCHAIN_CALIBRATION", str(tmp_path / "none-yet"))
    calibration = calibrate_from_fleet(resolve_target("pi5"), fleet.db, fleet.models, fleet.pubkey)
    assert calibration.profile == "raspberry-pi-5" and calibration.source == "fleet" and calibration.fingerprint is None
    fit = calibration.fit
    assert "uncalibrated roofline" in fit["prior"]
    assert fit["samples"] == len(VERSIONS) and not fit["missing_bundles"]
    assert fit["median_abs_error"] < fit["prior_errors"]["median_abs_error"]
    assert fit["median_abs_error"] < 0.25
    validation = calibration.validation
    assert validation["method"] == "leave-one-out" and len(validation["latency"]["errors"]) == len(VERSIONS)
    # the agent's RSS re-fits the runtime baseline: devices reported 150 MB + the weights
    assert calibration.memory.runtime_baseline_mb == pytest.approx(AGENT_RSS_MB, abs=1.0)


def test_cli_calibrates_from_fleet_and_compare_uses_it(fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TOOLCHAIN_CALIBRATION", str(tmp_path / "calibration"))
    result = run_cli("toolchain", "calibrate", "--target", "pi5", "--from-fleet", str(fleet.db), "--models", str(fleet.models),
                     "--pubkey", str(fleet.pubkey), check=True)
    written = Path(result.stdout.strip().splitlines()[-1])
    assert written == tmp_path / "calibration" / "raspberry-pi-5.json"
    assert read_calibration(written).source == "fleet" and "(leave-one-out)" in result.stdout
    compared = run_cli("toolchain", "targets", "compare", str(fleet.onnx[2]), "--targets", "pi5,pi4", "--json", check=True)
    rows = {row["target"]: row for row in json.loads(compared.stdout)["targets"]}
    assert rows["raspberry-pi-5"]["prediction"] == "calibrated" and rows["raspberry-pi-4"]["prediction"] == "roofline"
    # the devices' RSS made the memory prediction one of the whole serving process
    cost = analyze(fleet.onnx[2])
    assert rows["raspberry-pi-5"]["memory_basis"] == "process" and rows["raspberry-pi-4"]["memory_basis"] != "process"
    assert rows["raspberry-pi-5"]["memory_mb"] == pytest.approx(AGENT_RSS_MB + cost.peak_memory_bytes / MIB, abs=1.0)
    assert rows["raspberry-pi-5"]["latency_ms"] == pytest.approx(fleet.device_ms[2], rel=0.3)


@pytest.mark.parametrize("args, message", [
    (["--target", "pi5", "--from-fleet", "{db}"], "--from-fleet DB and --models DIR go together"),
    (["--target", "jetson-nano", "--from-fleet", "{db}", "--models", "{models}"], "no latency telemetry from devices with profile 'jetson-nano'"),
    (["--target", "pi5", "--from-fleet", "{tmp}/missing.sqlite", "--models", "{models}"], "no fleet database at"),
    (["--target", "pi5", "--from-fleet", "{db}", "--models", "{tmp}"], "none of the reported models"),
    (["--target", "pi5"], "is a board, not this machine"),
])
def test_bad_fleet_calibration_input_is_one_line_and_writes_nothing(fleet: Fleet, tmp_path: Path, args: list[str],
                                                                     message: str) -> None:
    out = tmp_path / "out.json"
    filled = [a.format(db=fleet.db, models=fleet.models, tmp=tmp_path) for a in args]
    result = run_cli("toolchain", "calibrate", *filled, "--pubkey", str(fleet.pubkey), "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists() and result.stdout == ""


def test_refit_needs_bundles_that_verify(fleet: Fleet, tmp_path: Path) -> None:
    _, other = write_keypair(tmp_path / "other-keys")
    with pytest.raises(ToolchainError, match="cannot use .*blobs-1-raspberry-pi-5.bundle"):
        calibrate_from_fleet(resolve_target("pi5"), fleet.db, fleet.models, other)
