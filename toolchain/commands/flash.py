"""`toolchain flash`: provision a device folder (agent.toml, credentials, trusted key, first bundle)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from toolchain.commands.options import DEFAULT_PUBKEY


def flash(
    device_dir: Annotated[Path, typer.Option(help="the device folder to provision")],
    device_id: Annotated[str, typer.Option(help="device id: MQTT client id and username")],
    bundle: Annotated[Path, typer.Option(help="the first bundle to install")],
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT or mqtts://HOST:PORT")],
    fleet: Annotated[str, typer.Option(help="fleet name")] = "default",
    pubkey: Annotated[Path, typer.Option(help="trusted public key")] = DEFAULT_PUBKEY,
    broker_dir: Annotated[Optional[Path], typer.Option(help="a `toolchain broker` folder: add the device's credentials there")] = None,
    port: Annotated[int, typer.Option(help="the agent's local REST port")] = 8080,
    window: Annotated[float, typer.Option(help="telemetry window, seconds")] = 10.0,
    force: Annotated[bool, typer.Option(help="re-flash an existing device (new credentials, new model)")] = False,
) -> None:
    """Provision a device: agent.toml, credentials, trusted key, first bundle, install script and systemd unit."""
    from toolchain.deploy.flash import flash as provision

    path = provision(device_dir, device_id, bundle, broker, fleet=fleet, pubkey=pubkey, broker_dir=broker_dir,
                     serve_port=port, window_s=window, force=force)
    print(f"provisioned {device_id} (fleet {fleet}) in {path}; start it with: edge-agent run --device-dir {path}")
