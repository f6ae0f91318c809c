"""The closed loop with real parts: agents serving through a covariate shift, the fleet monitor raising the
alarm, the autopilot retraining from the running model's checkpoint on fresh data and rolling the new
version out over MQTT (canary, then the rest), and the fleet's alarm clearing on the new model."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from sklearn.datasets import load_digits

from tests.agent_helpers import running_agent
from tests.conftest import REPO, Build, provision_device
from tests.fleet_helpers import wait_until
from toolchain.deploy.broker import ManagedBroker
from toolchain.core.config import load_config
from toolchain.build.autopilot import Autopilot, latest_checkpoint
from toolchain.fleet.monitor import FleetMonitor
from toolchain.fleet.store import FleetStore
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push import RolloutSettings, rollout
from toolchain.targets.profiles import resolve_target

RETRAIN = """
[retrain]
data = "npz:fresh.npz"
trigger_share = 0.5
trigger_seconds = 1
canary = 1
cooldown_s = 0
"""
PROBATION = "[probation]\nrequests = 1000\nseconds = 2\n"  # short probations: the rollout's verdicts come quickly


def inverted_digits() -> tuple[np.ndarray, np.ndarray]:
    """The shift: the camera's polarity flipped (dark digits on a bright ground), labels unchanged."""
    digits = load_digits()
    return (16.0 - digits.data.astype(np.float32)).reshape(-1, 1, 8, 8), digits.target.astype(np.int64)


def test_drift_retrain_redeploy_closes_the_loop(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copyfile(REPO / "examples" / "digits" / "model.py", project / "model.py")
    (project / "toolchain.toml").write_text((REPO / "examples" / "digits" / "toolchain.toml").read_text() + RETRAIN)
    x, y = inverted_digits()
    np.savez(project / "fresh.npz", x=x, y=y)
    out = tmp_path / "dist"
    out.mkdir()
    for built in (default_build.bundle, default_build.bundle.with_suffix(".pt")):  # the running model's build
        shutil.copyfile(built, out / built.name)
    assert latest_checkpoint(out, "digits") == out / default_build.bundle.with_suffix(".pt").name

    stop = threading.Event()
    with FleetMonitor(broker.url, tmp_path / "fleet.sqlite", fleet="lab", alarm_threshold=0.5) as monitor, \
            running_agent(provision_device(tmp_path / "d1", default_build, broker.url, "dev-1", window_s=1, extra=PROBATION)) as (one, _), \
            running_agent(provision_device(tmp_path / "d2", default_build, broker.url, "dev-2", window_s=1, extra=PROBATION)) as (two, _), \
            FleetStore(tmp_path / "fleet.sqlite", create=False) as store:  # the autopilot's own connection, as in its CLI

        def traffic() -> None:  # both devices see the inverted images from now on
            rng = np.random.default_rng(0)
            while not stop.is_set():
                for agent in (one, two):
                    agent.infer(x[rng.integers(0, len(x), 50)])
                time.sleep(0.05)

        def accuracy(agent) -> float:
            return float((agent.infer(x[:600]).classes == y[:600]).mean())

        before = accuracy(one)
        feeder = threading.Thread(target=traffic, daemon=True)
        feeder.start()
        try:
            wait_until(lambda: monitor.store.fleet_alarms().get("lab", {}).get("active"), 60, "the fleet drift alarm")
            settings = RolloutSettings(canary=1, broker=BrokerLogin(broker.url), pubkey=default_build.pubkey,
                                       probation_timeout_s=60)
            pilot = Autopilot(load_config(project / "toolchain.toml"), resolve_target("jetson"), store, "lab", out,
                              lambda bundle, devices, decide: rollout(bundle, "lab", devices, settings, on_decision=decide),
                              console=Console(quiet=True))
            wait_until(lambda: pilot.tick() is not None, 30, "the autopilot's trigger")
            [cycle] = pilot.cycles
            assert cycle.error is None, cycle.error
            assert cycle.version == 2 and cycle.rollout_state == "completed"
            assert one.model.bundle.version == two.model.bundle.version == 2
            after = accuracy(one)
            wait_until(lambda: not monitor.store.fleet_alarms()["lab"]["active"], 60, "the alarm to clear on the new model")
        finally:
            stop.set()
            feeder.join(10)
        kinds = [e["type"] for e in reversed(store.recent_events(limit=100, fleet="lab", device="*"))]
    assert before < 0.5 < 0.9 < after, (before, after)  # the shift broke the old model; the new one handles it
    steps = [k for k in kinds if k.startswith("autopilot_")]
    assert steps[:4] == ["autopilot_triggered", "autopilot_retraining", "autopilot_built", "autopilot_rollout_started"]
    assert steps[-1] == "autopilot_rolled_out" and "autopilot_rollout_push" in steps
    assert kinds.index("fleet_drift_alarm") < kinds.index("autopilot_triggered") < kinds.index("fleet_drift_cleared")
    assert (out / "digits-2-jetson-orin-nano.pt").exists()  # the next cycle warm-starts from this one


def test_autopilot_bad_input_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    db = tmp_path / "fleet.sqlite"
    args = ["toolchain", "fleet", "autopilot", "--target", "jetson", "--fleet", "lab", "--broker", "mqtt://127.0.0.1:1",
            "--db", str(db), "--out", str(tmp_path / "dist")]
    missing = run_cli(*args, "--config", str(REPO / "examples" / "digits" / "toolchain.toml"))
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"error: no fleet database at {db}; start `toolchain fleet monitor --db {db}` first")
    FleetStore(db).close()
    no_policy = run_cli(*args, "--config", str(REPO / "examples" / "digits" / "toolchain.toml"))
    assert no_policy.returncode == 2 and len(no_policy.stderr.strip().splitlines()) == 1
    assert "has no [retrain] section" in no_policy.stderr
    assert not (tmp_path / "dist").exists()
