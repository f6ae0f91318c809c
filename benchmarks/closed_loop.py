"""The closed loop on a simulated fleet: covariate shift -> fleet alarm -> retrain -> canary -> fleet.

One run, real parts: a local mosquitto, the fleet monitor writing its SQLite database, N simulated
devices (`toolchain fleet simulate`: the real agent code, only inference replayed, every request with its
ground-truth label) serving the embedded digits example, and the autopilot (`toolchain fleet autopilot`'s
engine) reading the monitor's database. At `--onset` seconds every input value of every device shifts by
`--shift` standard deviations; the simulator keeps a file of fresh labelled samples of what the devices
now see (`--fresh-data`), which the project's `[retrain] data` names. The autopilot retrains from the
running model's checkpoint, rebuilds with the same gates and rolls out (one canary, then the rest).

Measured: fleet accuracy per window before the shift, under it, and after the rollout (from the
simulator's ground truth), and the loop's time from the shift to the last device updated.
Targets (the fleet issue): accuracy after the rollout >= 95% of before the shift; the whole loop <= 10 min.

    python benchmarks/closed_loop.py [--devices 20] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import print_table, target, write_results  # noqa: E402
from toolchain.deploy.broker import ManagedBroker, free_port  # noqa: E402
from toolchain.core.config import load_config  # noqa: E402
from toolchain.build.autopilot import Autopilot  # noqa: E402
from toolchain.fleet.monitor import FleetMonitor  # noqa: E402
from toolchain.fleet.sim.simulate import SimulationSettings, simulate  # noqa: E402
from toolchain.fleet.store import FleetStore  # noqa: E402
from toolchain.deploy.push import rollout  # noqa: E402
from toolchain.targets.profiles import resolve_target  # noqa: E402
from toolchain.build.workflow import build  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLEET = "loop"
RETRAIN = """
[retrain]
data = "npz:{fresh}"
trigger_share = 0.5
trigger_seconds = {trigger_s}
canary = 1
cooldown_s = 3600
"""


def log(message: str) -> None:
    print(f"[closed-loop {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def project(root: Path, trigger_s: float) -> Path:
    """The embedded digits example with a [retrain] policy reading the simulator's fresh-data file."""
    folder = root / "project"
    folder.mkdir(parents=True)
    shutil.copyfile(REPO / "examples" / "digits" / "model.py", folder / "model.py")
    text = (REPO / "examples" / "digits" / "toolchain.toml").read_text()
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
    from runtime_agent.signing import write_keypair

    private, public = write_keypair(keys)
    config_path = project(root, trigger_s)
    config, profile = load_config(config_path), resolve_target("jetson")
    started = time.perf_counter()
    artifact, _ = build(config, profile, out, seed=seed, key_path=private, console=console)
    first_build_s = time.perf_counter() - started
    bundle = artifact.outputs["bundle"]
    log(f"version 1 built in {first_build_s:.0f} s ({artifact.shipped.name}, accuracy {artifact.shipped.metrics['accuracy']:.4f})")

    broker = ManagedBroker(root / "broker", port=free_port(), authenticated=False).start()
    try:
        db = root / "fleet.sqlite"
        with FleetMonitor(broker.url, db, fleet=FLEET, alarm_threshold=config.retrain.trigger_share) as monitor, \
                FleetStore(db, create=False) as store:
            def deploy(new_bundle: Path, targets: list[str], decide: Any) -> Any:
                return rollout(new_bundle, FLEET, targets, canary=config.retrain.canary, broker=broker.url, pubkey=public,
                               on_decision=decide, probation_timeout_s=120)

            pilot = Autopilot(config, profile, store, FLEET, out, deploy, key_path=private, seed=seed, console=console)
            settings = SimulationSettings(devices=devices, broker=broker.url, bundle=bundle, pubkey=public, fleet=FLEET,
                                          drift=(f"all={shift}@{onset_s}",), duration_s=duration_s, rate=rate,
                                          window_s=window_s, seed=seed, processes=1, fresh_data=root / "fresh.npz")
            results: list[Any] = []
            simulation = threading.Thread(target=lambda: results.append(simulate(settings)), name="simulator", daemon=True)
            simulation.start()
            log(f"{devices} simulated devices for {duration_s:.0f} s, shift all={shift} at {onset_s:.0f} s")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a shorter simulation (the loop must still close)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-closed-loop-") as scratch:
        run = closed_loop(Path(scratch), devices=args.devices, duration_s=150.0 if args.quick else 240.0,
                          console=Console(stderr=True))
    fmt = lambda v, digits=1: None if v is None else round(v, digits)  # noqa: E731
    rows = [{"measurement": name, "value": value, "unit": unit} for name, value, unit in (
        ("devices", run["devices"], ""), ("covariate shift (all inputs)", f"{run['shift']} sd at {run['onset_s']:.0f} s", ""),
        ("fleet accuracy before the shift", fmt(run["accuracy_before"], 4), ""),
        ("fleet accuracy under the shift (old model)", fmt(run["accuracy_drifted"], 4), ""),
        ("fleet accuracy after the rollout", fmt(run["accuracy_after"], 4), ""),
        ("fleet drift alarm", fmt(run["alarm_s"]), "s into the run"), ("autopilot triggered", fmt(run["trigger_s"]), "s"),
        ("new version built", fmt(run["built_s"]), "s"), ("rolled out to every device", fmt(run["rolled_out_s"]), "s"),
        ("fleet alarm cleared", fmt(run["cleared_s"]), "s"), ("loop: shift -> fleet updated", fmt(run["loop_s"]), "s"),
        ("versions on the devices at the end", str(run["versions_on_devices"]), ""))]
    print_table(rows, ["measurement", "value", "unit"])
    before, after = run["accuracy_before"], run["accuracy_after"]
    write_results("closed_loop", rows, {
        "accuracy_after_over_before": target((after or 0.0) / before, ">=", 0.95),
        "loop_seconds": target(run["loop_s"] if run["loop_s"] is not None else float("inf"), "<=", 600.0),
    }, mode="quick" if args.quick else "full", wall_seconds=round(time.perf_counter() - started, 1),
        run={k: v for k, v in run.items() if k != "timeline"}, timeline=run["timeline"])


if __name__ == "__main__":
    main()
