"""The closed loop: fleet drift -> retrain from the running model -> rebuild with the same gates -> roll out.

`Autopilot.tick()` reads the fleet database the monitor keeps. When the fleet's drift alarm has been
active for `[retrain] trigger_seconds` with at least `trigger_share` of the reporting devices in
alarm, one cycle runs:
1. warm start: the newest checkpoint of this project in the output folder (every build writes one);
2. retrain: a normal `toolchain build` of the same config, with `[data] source` replaced by
   `[retrain] data` (fresh labelled samples of what the devices see now) and the checkpoint as the
   starting point; the same passes and the same gate decide what ships, and the new bundle's drift
   reference describes the new data, so a successful rollout also clears the alarm;
3. rollout: canaries first, then waves (`toolchain.deploy.push.rollout`), each stage waiting for its
   devices' probation verdicts; a failed canary stops it;
4. cooldown: `cooldown_s` before the next trigger can fire, so the fleet can report on the new model.
Every step is a fleet event in the database (`autopilot_*`), so `fleet status` and the dashboard show
the loop as it runs, and a failure (a build that does not pass, a rollout that stops) is an event
with its reason, never a crash of the loop.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from toolchain.core.config import BuildConfig
from toolchain.errors import ToolchainError
from toolchain.fleet.store import FleetStore
from toolchain.targets.profiles import Profile

Deploy = Callable[[Path, list[str], Callable[[dict[str, Any]], None]], Any]  # (bundle, devices, on_decision) -> RolloutResult


def latest_checkpoint(out_dir: Path, project: str) -> Path | None:
    """The checkpoint of the highest bundle version of `project` in `out_dir`."""
    pattern = re.compile(rf"^{re.escape(project)}-(\d+)-.+\.pt$")
    found = [(int(m.group(1)), p) for p in out_dir.glob(f"{project}-*.pt") if (m := pattern.match(p.name))]
    return max(found)[1] if found else None


@dataclass
class Cycle:
    """One pass around the loop, for the caller and the tests."""

    started: float
    trigger: dict[str, Any]
    bundle: Path | None = None
    version: int | None = None
    rollout_state: str | None = None
    error: str | None = None
    finished: float | None = None


class Autopilot:
    def __init__(self, config: BuildConfig, profile: Profile, store: FleetStore, fleet: str, out_dir: Path,
                 deploy: Deploy, *, key_path: Path | None = None, budget: str = "quick", seed: int = 0,
                 console: Console | None = None, clock: Callable[[], float] = time.time) -> None:
        if config.retrain is None:
            raise ToolchainError(f"config {config.path} has no [retrain] section: the autopilot needs at least "
                                 "[retrain] data = \"<a source of fresh labelled samples>\"")
        self.config, self.policy = config, config.retrain
        self.profile, self.store, self.fleet, self.out_dir = profile, store, fleet, Path(out_dir)
        self.deploy, self.key_path, self.budget, self.seed = deploy, key_path, budget, seed
        self.console = console or Console(stderr=True)
        self.clock = clock
        self.cooldown_until = 0.0
        self.cycles: list[Cycle] = []

    def event(self, kind: str, **fields: Any) -> None:
        self.store.add_fleet_event(self.fleet, f"autopilot_{kind}", fields)
        self.console.print(f"{time.strftime('%H:%M:%S')} autopilot {self.fleet}: {kind} "
                           + " ".join(f"{k}={v}" for k, v in fields.items() if k != "devices"))

    def due(self) -> dict[str, Any] | None:
        """The fleet alarm that should start a cycle now, or None."""
        now = self.clock()
        alarm = self.store.fleet_alarms().get(self.fleet)
        if now < self.cooldown_until or not alarm or not alarm["active"]:
            return None
        if alarm["share"] < self.policy.trigger_share or now - alarm["changed_at"] < self.policy.trigger_seconds:
            return None
        return alarm

    def tick(self) -> Cycle | None:
        """Run a cycle when one is due; returns it (finished) or None."""
        alarm = self.due()
        return self.run_cycle(alarm) if alarm is not None else None

    def run_cycle(self, alarm: dict[str, Any]) -> Cycle:
        cycle = Cycle(started=self.clock(), trigger=alarm)
        self.cycles.append(cycle)
        self.event("triggered", share=round(alarm["share"], 4), in_alarm=alarm["in_alarm"], reporting=alarm["reporting"],
                   alarm_for_s=round(cycle.started - alarm["changed_at"], 1))
        try:
            self._retrain_and_deploy(cycle)
        except ToolchainError as exc:
            cycle.error = str(exc)
            self.event("failed", reason=str(exc))
        except Exception as exc:  # the loop outlives one bad cycle; the reason is an event, the trace in the log
            cycle.error = f"{type(exc).__name__}: {exc}"
            self.event("failed", reason=cycle.error, trace=traceback.format_exc(limit=3)[-500:])
        cycle.finished = self.clock()
        self.cooldown_until = cycle.finished + self.policy.cooldown_s
        return cycle

    def _retrain_and_deploy(self, cycle: Cycle) -> None:
        from toolchain.build.workflow import build

        checkpoint = latest_checkpoint(self.out_dir, self.config.project.name)
        if checkpoint is None:
            raise ToolchainError(f"no checkpoint of {self.config.project.name} in {self.out_dir} to warm-start from; "
                                 "build the running model there first (`toolchain build --out ...`)")
        fresh = self.config.model_copy(update={"data": self.config.data.model_copy(update={"source": self.policy.data})})
        self.event("retraining", warm_start=checkpoint.name, data=self.policy.data)
        artifact, _ = build(fresh, self.profile, self.out_dir, seed=self.seed, budget=self.budget, key_path=self.key_path,
                            console=self.console, warm_start=checkpoint)
        shipped = artifact.shipped
        cycle.bundle, cycle.version = artifact.outputs["bundle"], artifact.metrics["bundle"]["version"]
        self.event("built", version=cycle.version, bundle=cycle.bundle.name, shipped=shipped.name,
                   accuracy=round(shipped.metrics["accuracy"], 4), fp32_accuracy=round(artifact.reference.metrics["accuracy"], 4))
        devices = [d["device"] for d in self.store.devices(self.fleet) if d["state"] == "online"]
        if not devices:
            raise ToolchainError(f"fleet {self.fleet} has no online device to roll version {cycle.version} out to")
        self.event("rollout_started", version=cycle.version, devices=len(devices), canary=self.policy.canary)

        def decision(step: dict[str, Any]) -> None:
            self.event("rollout_" + step["action"], stage=step["stage"], devices=len(step["devices"]), reason=step["reason"])

        result = self.deploy(cycle.bundle, devices, decision)
        cycle.rollout_state = result.state
        if result.state != "completed":
            stops = [d["reason"] for d in result.decisions if d["action"] == "stop"]
            reason = stops[-1] if stops else (result.decisions[-1]["reason"] if result.decisions else "no decision recorded")
            raise ToolchainError(f"rollout of version {cycle.version} {result.state}: {reason}")
        self.event("rolled_out", version=cycle.version, devices=len(devices))
