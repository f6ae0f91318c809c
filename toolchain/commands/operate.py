"""`toolchain fleet rollback|config`: send an operator command to devices and print each one's answer.

The devices are named (`--device`, their fleet looked up from their retained status) or are every
device of `--fleet` with a retained status; an offline device cannot take a command (a device keeps no
MQTT session), so it is reported as not sent. One line per device; exit 1 when any device did not
carry the command out (refused, no answer, offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from toolchain.commands.options import BrokerOption, CaFileOption, ClientCertOption, PasswordFileOption, UsernameOption, broker_login
from toolchain.errors import ToolchainError

DeviceOption = Annotated[Optional[list[str]], typer.Option("--device", "-d", help="device id (repeatable)")]
FleetOption = Annotated[Optional[str], typer.Option(help="fleet name: alone, every device of the fleet; with --device, "
                                                          "the fleet of those devices (default: looked up)")]
TimeoutOption = Annotated[float, typer.Option(help="seconds to wait for the devices' answers")]


def _send(kind: str, fields: dict[str, Any], device: Optional[list[str]], fleet: Optional[str], broker: str,
          username: Optional[str], password_file: Optional[Path], ca_file: Optional[Path], client_cert: Optional[Path], timeout: float) -> None:
    from runtime_agent.protocol import ONLINE
    from toolchain.deploy.control import send_command
    from toolchain.deploy.push import PushClient, device_statuses, fleet_of_devices

    if not device and not fleet:
        raise ToolchainError("say which devices: --device ID (repeatable) or --fleet NAME")
    if timeout <= 0:
        raise ToolchainError(f"--timeout must be more than 0 seconds, got {timeout}")
    login = broker_login(broker, username, password_file, ca_file, client_cert)
    offline: list[str] = []
    with PushClient(login) as client:
        targets = list(dict.fromkeys(device or []))
        if targets:
            fleet = fleet_of_devices(client, targets, fleet)
        else:
            statuses = device_statuses(client, fleet)
            if not statuses:
                raise ToolchainError(f"no device of fleet {fleet!r} on {broker} (none has a retained status)")
            targets = [name for name, status in statuses.items() if status.get("state") == ONLINE]
            offline = [name for name in statuses if name not in targets]
        results = send_command(client, fleet, targets, kind, fields, timeout)
    for result in results:
        typer.echo(f"{result.fleet}/{result.device}: {result.state}: {result.detail} (cmd {result.command_id})")
    for name in offline:
        typer.echo(f"{fleet}/{name}: offline: not sent")
    failed = [r.device for r in results if not r.ok] + offline
    if failed:
        typer.echo(f"{kind} failed on {len(failed)} of {len(results) + len(offline)} device(s): {', '.join(failed)}", err=True)
        raise typer.Exit(1)


def rollback(
    broker: BrokerOption,
    device: DeviceOption = None,
    fleet: FleetOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
    client_cert: ClientCertOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Roll devices back to the model they ran before (a later push of the same version is still accepted)."""
    _send("rollback", {}, device, fleet, broker, username, password_file, ca_file, client_cert, timeout)


def config(
    broker: BrokerOption,
    window_s: Annotated[float, typer.Option(help="telemetry window, seconds (0.05 .. 86400)")],
    device: DeviceOption = None,
    fleet: FleetOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
    client_cert: ClientCertOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Change devices' telemetry window while they run (until they restart: agent.toml keeps the default)."""
    _send("config", {"telemetry": {"window_s": window_s}}, device, fleet, broker, username, password_file, ca_file, client_cert,
          timeout)
