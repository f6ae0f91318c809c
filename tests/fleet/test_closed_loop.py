"""The closed loop on the simulator (the fleet issue's acceptance run, without its timing target, which
lives in benchmarks/closed_loop.py): 20 simulated devices, a covariate shift, the monitor's alarm, the
autopilot's retrain and rollout, and the fleet's accuracy back."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolchain.build.closed_loop import closed_loop

pytestmark = pytest.mark.slow  # trains, and runs a fleet of 20 simulated devices


def test_a_shifted_fleet_is_retrained_and_recovers(tmp_path: Path) -> None:
    run = closed_loop(tmp_path, devices=20, onset_s=15.0, shift=1.5, duration_s=110.0)
    assert run["cycle_error"] is None, run["cycle_error"]
    assert run["new_version"] == 2 and run["versions_on_devices"] == [2]  # every device runs the retrained model
    before, drifted, after = run["accuracy_before"], run["accuracy_drifted"], run["accuracy_after"]
    assert before > 0.95 and drifted < 0.8 * before  # the shift really hurt
    assert after >= 0.95 * before, (before, drifted, after)  # ... and the loop repaired it
    events = run["events"]
    assert events.index("fleet_drift_alarm") < events.index("autopilot_triggered") < events.index("autopilot_built") \
        < events.index("autopilot_rolled_out")
    assert run["alarm_s"] >= run["onset_s"] and "fleet_drift_cleared" in events[events.index("autopilot_built"):]
