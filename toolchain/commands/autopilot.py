"""`toolchain fleet autopilot`: the closed loop drift -> retrain -> redeploy, run next to the fleet monitor.

It reads the database `toolchain fleet monitor` (or `dashboard`) keeps, and writes its steps into the
same file as fleet events, so the monitor's dashboard shows them. Mounted by `toolchain.commands.fleet`.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from runtime_agent.signing import PUBLIC_KEY_NAME, default_key_dir
from toolchain.commands.options import ClientCertOption, broker_login
from toolchain.errors import ToolchainError


def autopilot(
    config: Annotated[Path, typer.Option(help="the project's toolchain.toml, with a \\[retrain] section")],
    target: Annotated[str, typer.Option(help="device profile the fleet runs (id, alias or TOML file)")],
    fleet: Annotated[str, typer.Option(help="the fleet to watch and update")],
    broker: Annotated[str, typer.Option(help="MQTT broker for the pushes, mqtt://HOST:PORT or mqtts://HOST:PORT")],
    db: Annotated[str, typer.Option(help="the database `toolchain fleet monitor` writes (a file or a postgresql:// URL)")] = "fleet.sqlite",
    out: Annotated[Path, typer.Option(help="where the running model's build is (its checkpoint) and new builds go")] = Path("dist"),
    username: Annotated[Optional[str], typer.Option(help="broker user (the fleet operator account)")] = None,
    password_file: Annotated[Optional[Path], typer.Option(help="file holding the broker password")] = None,
    ca_file: Annotated[Optional[Path], typer.Option(help="CA certificate that signed the broker's (mqtts://)")] = None,
    client_cert: ClientCertOption = None,
    key: Annotated[Optional[Path], typer.Option(help="ed25519 private key that signs new bundles (default: the key folder's)")] = None,
    pubkey: Annotated[Path, typer.Option(help="the devices' trusted public key")] = default_key_dir() / PUBLIC_KEY_NAME,
    budget: Annotated[str, typer.Option(help="build budget: quick | standard | thorough")] = "quick",
    seed: Annotated[int, typer.Option(help="seed of the retraining builds")] = 0,
    interval: Annotated[float, typer.Option(help="seconds between looks at the fleet database")] = 2.0,
    cycles: Annotated[int, typer.Option(help="stop after this many retrain cycles (0: run until Ctrl-C)")] = 0,
) -> None:
    """Watch the fleet's drift alarm; when it holds (\\[retrain] trigger), retrain from the running model on
    fresh data, rebuild with the same gates, push canaries then the fleet. Every step is a fleet event."""
    from toolchain.core.config import load_config
    from toolchain.build.autopilot import Autopilot
    from toolchain.fleet.store import FleetStore
    from toolchain.deploy.push import RolloutSettings, rollout
    from toolchain.targets.profiles import resolve_target
    from toolchain.core.contract import BUDGETS

    if budget not in BUDGETS:
        raise ToolchainError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if interval <= 0 or cycles < 0:
        raise ToolchainError("--interval must be > 0 and --cycles >= 0")
    login = broker_login(broker, username, password_file, ca_file, client_cert)
    build_config, profile = load_config(config), resolve_target(target)
    policy = build_config.retrain
    console = Console(stderr=True)

    def deploy(bundle: Path, devices: list[str], on_decision: Any) -> Any:
        settings = RolloutSettings(canary=policy.canary, waves=policy.waves, pubkey=pubkey, broker=login)
        return rollout(bundle, fleet, devices, settings, on_decision=on_decision)

    with FleetStore(db, create=False) as store:
        pilot = Autopilot(build_config, profile, store, fleet, out, deploy, key_path=key, budget=budget, seed=seed,
                          console=console)

        def terminate(*_: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, terminate)
        print(f"autopilot on fleet {fleet}: retrain when >= {100 * policy.trigger_share:.0f}% of devices are in drift "
              f"alarm for {policy.trigger_seconds:g} s (database {store.path})", flush=True)
        try:
            while not cycles or len(pilot.cycles) < cycles:
                cycle = pilot.tick()
                if cycle is not None:
                    outcome = f"version {cycle.version} rolled out" if cycle.error is None else f"failed: {cycle.error}"
                    print(f"cycle {len(pilot.cycles)}: {outcome} in {cycle.finished - cycle.started:.0f} s", flush=True)
                else:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass
    if pilot.cycles and pilot.cycles[-1].error is not None:
        raise typer.Exit(1)
