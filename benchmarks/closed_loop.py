"""The closed loop on a simulated fleet: covariate shift -> fleet alarm -> retrain -> canary -> fleet.

One run of `toolchain.build.closed_loop` (the scenario, shared with its test): a local mosquitto, the
fleet monitor, N simulated devices serving the embedded digits example, and the autopilot; every input
of every device shifts by 1.5 standard deviations 20 s in, and the autopilot retrains, rebuilds with the
same gates and rolls out (one canary, then the rest).

Measured: fleet accuracy per window before the shift, under it, and after the rollout (from the
simulator's ground truth), and the loop's time from the shift to the last device updated.
Targets (the fleet issue): accuracy after the rollout >= 95% of before the shift; the whole loop <= 10 min.

    python benchmarks/closed_loop.py [--devices 20] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console

from _common import print_table, target, write_results
from toolchain.build.closed_loop import closed_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a shorter simulation (the loop must still close)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-closed-loop-") as scratch:
        run = closed_loop(Path(scratch), devices=args.devices, duration_s=100.0 if args.quick else 240.0,
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
