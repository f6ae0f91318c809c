"""The closed loop on a simulated fleet: covariate shift -> fleet alarm -> retrain -> canary -> fleet.

The fleet issue's acceptance run, end to end with the real parts: a local mosquitto, the fleet
monitor writing its SQLite database, N simulated devices (`toolchain fleet simulate`: the real agent
code, only inference replayed, every request with its ground-truth label) serving the embedded digits
example, and the autopilot (`toolchain fleet autopilot`'s engine) reading the monitor's database. At
`onset_s` every input value of every device shifts by `shift` standard deviations; the simulator keeps
a file of fresh labelled samples of what the devices now see, which the project's `[retrain] data`
names. The autopilot retrains from the running model's checkpoint, rebuilds with the same gates and
rolls out (one canary, then the rest).

It lives in the package, not in a script, because two callers run the same scenario: the test that
the loop closes (tests/fleet/test_closed_loop.py) and the benchmark that times it
(benchmarks/closed_loop.py).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from runtime_agent.signing import write_keypair
from toolchain.build.autopilot import Autopilot
from toolchain.build.workflow import build
from toolchain.core.config import load_config
from toolchain.deploy.broker import ManagedBroker, free_port
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push import RolloutSettings, rollout
from toolchain.fleet.monitor import FleetMonitor
from toolchain.fleet.sim.simulate import SimulationSettings, simulate
from toolchain.fleet.store import FleetStore
from toolchain.resources import default_config
from toolchain.targets.profiles import resolve_target

FLEET = "loop"
RETRAIN = """
[retrain]
data = "npz:{fresh}"
trigger_share = 0.5
trigger_seconds = {trigger_s}
canary = 1
cooldown_s = 3600
"""


def log(console: Console, message: str) -> None:
    console.print(f"[closed-loop {time.strftime('%H:%M:%S')}] {message}", markup=False, highlight=False)


def project(root: Path, trigger_s: float) -> Path:
    """The embedded digits example with a [retrain] policy reading the simulator's fresh-data file."""
    folder = root / "project"
    folder.mkdir(parents=True)
    example = default_config()
    shutil.copyfile(example.parent / "model.py", folder / "model.py")
    text = example.read_text()
    (folder / "toolchain.toml").write_text(text + RETRAIN.format(fresh=root / "fresh.npz", trigger_s=trigger_s))
    return folder / "toolchain.toml"


def mean_accuracy(timeline: list[dict[str, Any]], start: float, end: float) -> float | None:
    """Request-weighted accuracy of the windows wholly inside [start, end) (simulation seconds)."""
    rows = [r for r in timeline if r["from_s"] >= start and r["to_s"] <= end and r["n"]]
    n = sum(r["n"] for r in rows)
    return sum(r["correct"] for r in rows) / n if n else None


def closed_loop(root: Path, *, devices: int = 20, onset_s: float = 20.0, shift: float = 1.5, duration_s: float = 180.0,
                rate: float = 300.0, window_s: float = 1.0, trigger_s: float = 3.0, seed: int = 0,
                console: Console | None = None) -> dict[str, Any]:
    """Build the running model, then run fleet + monitor + autopilot until the simulation ends; returns what
    happened (accuracies, times, the autopilot's cycle and events)."""
    console = console or Console(stderr=True, quiet=True)
    keys, out = root / "keys", root / "dist"
    private, public = write_keypair(keys)
    config_path = project(root, trigger_s)
    config, profile = load_config(config_path), resolve_target("jetson")
    started = time.perf_counter()
    artifact, _ = build(config, profile, out, seed=seed, key_path=private, console=console)
    first_build_s = time.perf_counter() - started
    bundle = artifact.outputs["bundle"]
    log(console, f"version 1 built in {first_build_s:.0f} s ({artifact.shipped.name}, accuracy {artifact.shipped.metrics['accuracy']:.4f})")

    broker = ManagedBroker(root / "broker", port=free_port(), authenticated=False).start()
    try:
        db = root / "fleet.sqlite"
        with FleetMonitor(broker.url, db, fleet=FLEET, alarm_threshold=config.retrain.trigger_share), \
                FleetStore(db, create=False) as store:
            def deploy(new_bundle: Path, targets: list[str], decide: Any) -> Any:
                plan = RolloutSettings(canary=config.retrain.canary, broker=BrokerLogin(broker.url), pubkey=public,
                                       probation_timeout_s=120)
                return rollout(new_bundle, FLEET, targets, plan, on_decision=decide)

            pilot = Autopilot(config, profile, store, FLEET, out, deploy, key_path=private, seed=seed, console=console)
            settings = SimulationSettings(devices=devices, broker=broker.url, bundle=bundle, pubkey=public, fleet=FLEET,
                                          drift=(f"all={shift}@{onset_s}",), duration_s=duration_s, rate=rate,
                                          window_s=window_s, seed=seed, processes=1, fresh_data=root / "fresh.npz")
            results: list[Any] = []
            simulation = threading.Thread(target=lambda: results.append(simulate(settings)), name="simulator", daemon=True)
            simulation.start()
            log(console, f"{devices} simulated devices for {duration_s:.0f} s, shift all={shift} at {onset_s:.0f} s")
            while simulation.is_alive():
                if not pilot.cycles:
                    pilot.tick()
                simulation.join(0.5)
            events = [e for e in reversed(store.recent_events(limit=1000, fleet=FLEET, device="*"))]
            statuses = {d["device"]: d["model_version"] for d in store.devices(FLEET)}
    finally:
        broker.stop()
    if not results:
        raise RuntimeError("the simulation did not finish")
    result = results[0]
    t0 = result.t0
    cycle = pilot.cycles[0] if pilot.cycles else None
    times: dict[str, float] = {}
    for e in events:  # oldest first: each type's first occurrence, in simulation seconds
        times.setdefault(e["type"], e["received_at"] - t0)
    done_s = cycle.finished - t0 if cycle and cycle.error is None else None
    return {
        "devices": devices, "onset_s": onset_s, "shift": shift, "duration_s": duration_s, "first_build_s": first_build_s,
        "alarm_s": times.get("fleet_drift_alarm"), "trigger_s": times.get("autopilot_triggered"),
        "built_s": times.get("autopilot_built"), "rolled_out_s": done_s, "cleared_s": times.get("fleet_drift_cleared"),
        "loop_s": done_s - onset_s if done_s is not None else None,
        "cycle_error": cycle.error if cycle else "no cycle ran", "new_version": cycle.version if cycle else None,
        "versions_on_devices": sorted(set(statuses.values())),
        "accuracy_before": mean_accuracy(result.timeline, 0.0, onset_s),
        "accuracy_drifted": mean_accuracy(result.timeline, onset_s + window_s, times.get("autopilot_rollout_started", duration_s)),
        "accuracy_after": mean_accuracy(result.timeline, done_s + window_s, duration_s) if done_s is not None else None,
        "events": [e["type"] for e in events], "timeline": result.timeline,
    }
