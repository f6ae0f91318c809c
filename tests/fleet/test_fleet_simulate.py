"""The fleet simulator against a real mosquitto and the real `FleetMonitor`: simulated devices run the real
agent code (windows, drift, outbox, link) in spawned worker processes, the monitor stores what they send.

Times asserted are causal (an alarm is not raised before the drift that causes it), never speed limits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime_agent.drift import MIN_PSI_SAMPLES
from tests.conftest import Build, run_cli
from tests.fleet_helpers import started_monitor
from toolchain.deploy.broker import OPERATOR, ManagedBroker, free_port
from toolchain.core.config import load_config
from toolchain.core.data import load_dataset
from toolchain.errors import ToolchainError
from toolchain.fleet.sim.simulate import SimulationResult, SimulationSettings, simulate
from toolchain.fleet.store import FLEET_DEVICE

pytestmark = pytest.mark.slow  # runs simulated fleets (even its error cases start the simulator)

DRIFTED = "x20"  # a pixel that varies across digits (a constant one is refused, see the error tests)
ONSET_S = 3.0


def settings(build: Build, broker: ManagedBroker, **changes: Any) -> SimulationSettings:
    """A small, fast fleet: 0.5 s windows of ~300 requests (the PSI alarm needs MIN_PSI_SAMPLES = 200)."""
    base = dict(devices=5, broker=broker.url, bundle=build.bundle, pubkey=build.pubkey, fleet="simlab", window_s=0.5,
                rate=600, duration_s=6.0, seed=0, processes=1)
    return SimulationSettings(**{**base, **changes})


def stored_seqs(store: Any, fleet: str, device: str) -> list[int]:
    telemetry = [w["seq"] for w in store.telemetry(fleet, device)]
    events = [e["seq"] for e in store.recent_events(10_000, fleet=fleet, device=device)]
    return sorted(telemetry + events)


def test_a_drifted_fleet_is_stored_in_full_and_alarms_only_after_the_drift(default_build: Build, broker: ManagedBroker,
                                                                          tmp_path: Path) -> None:
    notices: list[tuple[float, str, dict]] = []
    monitor = started_monitor(broker, tmp_path / "fleet.sqlite", alarm_threshold=0.6,
                              on_notice=lambda kind, info: notices.append((time.time(), kind, info)))
    try:
        fresh = tmp_path / "fresh.npz"
        result = simulate(settings(default_build, broker, drift=(f"{DRIFTED}=3@{ONSET_S:g}",), fresh_data=fresh))
        store = monitor.store
        names = [f"sim-{i}" for i in range(1, 6)]
        assert [d["device"] for d in result.devices] == names
        # Every device came online (birth, before the start) and said goodbye (retained offline) at the end.
        online = {info["device"]: at for at, kind, info in notices if kind == "status" and info["state"] == "online"}
        assert set(online) == set(names) and max(online.values()) <= result.t0
        wait_for = time.monotonic() + 30
        while time.monotonic() < wait_for and sum(len(stored_seqs(store, "simlab", n)) for n in names) < result.messages["sent"]:
            time.sleep(0.05)
        assert {row["device"]: row["state"] for row in store.devices("simlab")} == dict.fromkeys(names, "offline")
        for device in result.devices:
            # Nothing lost, nothing left queued: every seq the outbox committed is in the monitor's database,
            assert device["pending"] == 0 and stored_seqs(store, "simlab", device["device"]) == \
                list(range(device["first_seq"], device["last_seq"] + 1))
            windows = store.telemetry("simlab", device["device"])
            # every served request is in exactly one telemetry window, and every window carries the model.
            assert len(windows) == device["windows"] and sum(w["n"] for w in windows) == device["requests"] == 3600
            assert {w["model_version"] for w in windows} == {1}
            accuracy = store.recent_events(10_000, fleet="simlab", device=device["device"], kind="accuracy")
            assert len(accuracy) == device["windows"]
            assert sum(e["payload"]["n"] for e in accuracy) == device["requests"]
            assert sum(e["payload"]["correct"] for e in accuracy) == device["correct"]
        # The fleet alarm: raised after the shift started, not before; it names the drifted feature.
        alarms = store.recent_events(100, fleet="simlab", device=FLEET_DEVICE, kind="fleet_drift_alarm")
        assert alarms and min(a["received_at"] for a in alarms) >= result.t0 + ONSET_S
        assert [kind for _, kind, _ in notices if kind.startswith("fleet")][0] == "fleet_drift_alarm"
        assert not any(kind == "fleet_drift_alarm" and at < result.t0 + ONSET_S for at, kind, _ in notices)
        drifted = [w for w in store.telemetry("simlab") if w["window_start"] >= result.t0 + ONSET_S and w["n"] >= MIN_PSI_SAMPLES]
        assert drifted and all(DRIFTED in w["drift"]["psi_over"] for w in drifted)
        # every drifted window is in alarm from the second on (a PSI crossing is a feature over twice in a row)
        for name in names:
            own = sorted((w for w in drifted if w["device"] == name), key=lambda w: w["seq"])
            assert own and all(w["alarm"] and DRIFTED in w["drift"]["psi_sustained"] for w in own[1:])
        # Ground truth: accuracy per drift phase, and the shift costs accuracy.
        before, after = result.phases
        assert (before["from_s"], before["to_s"], before["drift"]) == (0.0, ONSET_S, [])
        assert after["from_s"] == ONSET_S and after["drift"] == [f"{DRIFTED}=3@3"]
        assert before["n"] == after["n"] == 5 * 600 * 3
        assert before["accuracy"] > 0.95 and after["accuracy"] < before["accuracy"] - 0.01
        # The label-free estimate (calibrated confidences, in every window) next to that ground truth.
        windows = store.telemetry("simlab")
        for phase in (before, after):
            inside = [w for w in windows if phase["from_s"] <= w["window_start"] - result.t0 < phase["to_s"] - 0.5]
            estimate = sum(w["drift"]["estimated_accuracy"] * w["n"] for w in inside) / sum(w["n"] for w in inside)
            print(f"\nphase from {phase['from_s']:g} s: true accuracy {phase['accuracy']:.4f}, estimated {estimate:.4f}")
            assert abs(estimate - phase["accuracy"]) < 0.03
        assert sum(row["n"] for row in result.timeline) == 5 * 3600 and len(result.timeline) == 12
        # Fresh labelled samples for retraining: the build's own splits with the drift active at the end.
        data = load_dataset(load_config(None), seed=0)
        with np.load(fresh) as samples:
            shift = samples["x_test"].reshape(len(data.x_test), -1) - data.x_test.reshape(len(data.x_test), -1)
            column = int(DRIFTED[1:])
            assert np.allclose(shift[:, column], 3 * data.x_test.reshape(len(data.x_test), -1)[:, column].std(), rtol=1e-5)
            assert not np.delete(shift, column, axis=1).any() and (samples["y_test"] == data.y_test).all()
            assert len(samples["x"]) == len(data.x_train) + len(data.x_val)
            assert np.allclose(samples["x"].reshape(len(samples["x"]), -1)[:, column] - shift[0, column],
                               np.concatenate([data.x_train, data.x_val]).reshape(len(samples["x"]), -1)[:, column])
    finally:
        monitor.stop()


def test_the_same_seed_serves_the_same_requests(default_build: Build, broker: ManagedBroker) -> None:
    runs: list[SimulationResult] = [
        simulate(settings(default_build, broker, devices=2, duration_s=1.5, rate=200, drift=("all=0.5@0.5",), seed=seed))
        for seed in (7, 7, 8)]
    same, again, other = ([(r["n"], r["correct"]) for r in run.timeline] for run in runs)
    assert same == again and [n for n, _ in same] == [n for n, _ in other]
    assert [d["correct"] for d in runs[0].devices] == [d["correct"] for d in runs[1].devices]
    assert [(d["requests"], d["correct"]) for d in runs[0].devices] != [(d["requests"], d["correct"]) for d in runs[2].devices]


def test_devices_get_their_own_credentials_on_a_managed_broker(default_build: Build, tmp_path: Path) -> None:
    managed = ManagedBroker(tmp_path / "broker", port=free_port(), authenticated=True)
    managed.save()  # a folder as `toolchain broker start --dir` leaves it
    managed.write_config()
    managed.add_user(OPERATOR, "operator-secret")
    managed.start()
    monitor = None
    try:
        with pytest.raises(ToolchainError, match=r"^the broker refused simulated device sim-\d: Not authorized .*--broker-dir"):
            simulate(settings(default_build, managed, devices=2, duration_s=1.0))
        monitor = started_monitor(managed, tmp_path / "fleet.sqlite", username=OPERATOR, password="operator-secret")
        result = simulate(settings(default_build, managed, devices=3, duration_s=1.5, broker_dir=managed.directory))
        users = [line.split(":", 1)[0] for line in managed.password_file.read_text().splitlines()]
        assert users == [OPERATOR, "sim-1", "sim-2", "sim-3"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(monitor.store.telemetry("simlab")) < sum(d["windows"] for d in result.devices):
            time.sleep(0.05)
        assert {w["device"] for w in monitor.store.telemetry("simlab")} == {"sim-1", "sim-2", "sim-3"}
        assert monitor.stats["malformed"] == 0 and result.messages["pending"] == 0
    finally:
        if monitor is not None:
            monitor.stop()
        managed.stop()


HINT = "expected FEATURE=SHIFT@SECONDS, e.g. x21=1.5@30 (from 30 s on, add 1.5 standard deviations to feature x21)"


@pytest.mark.parametrize(("spec", "message"), [
    ("x20", f"--drift 'x20': {HINT}"),
    ("x20=1.5", f"--drift 'x20=1.5': {HINT}"),
    ("x20=abc@3", f"--drift 'x20=abc@3': SHIFT 'abc' is not a number of standard deviations; {HINT}"),
    ("x20=nan@3", f"--drift 'x20=nan@3': SHIFT 'nan' is not a number of standard deviations; {HINT}"),
    ("x20=1.5@-2", f"--drift 'x20=1.5@-2': SECONDS '-2' must be a time >= 0 after the start; {HINT}"),
    ("x20=0@3", "--drift 'x20=0@3': a shift of 0 standard deviations changes nothing"),
    ("pixel_3=1.5@3", "--drift 'pixel_3=1.5@3': unknown feature 'pixel_3'; the bundle's drift features are x0 .. x63, "
                      "or 'all' for every input value"),
    ("x0=1.5@3", "--drift 'x0=1.5@3': feature x0 is constant in the data (std 0), so a shift in standard deviations "
                 "changes nothing; pick a feature that varies"),
    ("x20=1.5@90s", "--drift 'x20=1.5@90s' starts at 90 s, after the simulation ends (--duration 60)"),
])
def test_bad_drift_specs_are_one_clear_line_and_write_nothing(default_build: Build, tmp_path: Path, spec: str,
                                                              message: str) -> None:
    work = tmp_path / "work"
    result = run_cli("toolchain", "fleet", "simulate", "--devices", "3", "--broker", "mqtt://127.0.0.1:1",
                     "--bundle", str(default_build.bundle), "--pubkey", str(default_build.pubkey),
                     "--work-dir", str(work), "--duration", "60", "--drift", "x21=1@5", "--drift", spec)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not work.exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--devices", "0"], "--devices must be between 1 and 100000, got 0"),
    (["--devices", "3", "--rate", "0"], "--rate must be requests per second per device in (0, 10000], got 0.0"),
    (["--devices", "3", "--processes", "4"], "--processes must be between 1 and --devices (3), got 4"),
    (["--devices", "3", "--fresh-data", "fresh.csv"], "--fresh-data must be a .npz file in an existing folder, got fresh.csv"),
])
def test_bad_options_are_one_clear_line(default_build: Build, tmp_path: Path, options: list[str], message: str) -> None:
    result = run_cli("toolchain", "fleet", "simulate", *options, "--broker", "mqtt://127.0.0.1:1",
                     "--bundle", str(default_build.bundle), "--pubkey", str(default_build.pubkey),
                     "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "work").exists()


def test_an_unreachable_broker_is_one_clear_line(default_build: Build) -> None:
    port = free_port()  # nothing listens there
    result = run_cli("toolchain", "fleet", "simulate", "--devices", "2", "--duration", "1", "--rate", "400",
                     "--window-s", "0.5", "--broker", f"mqtt://127.0.0.1:{port}", "--bundle", str(default_build.bundle),
                     "--pubkey", str(default_build.pubkey))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: cannot reach the broker at 127.0.0.1:{port} (Connection refused)"]
