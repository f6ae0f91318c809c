"""`toolchain flash`: provision a device folder (agent.toml, credentials, trusted key, first bundle; with a TLS
broker folder also its CA and the device's client certificate)."""

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
    port: Annotated[Optional[int], typer.Option(
        help="the agent's local REST port (default: the device's own on a re-flash, else the lowest free one from "
             "8080 up that no other device folder beside it uses)")] = None,
    window: Annotated[float, typer.Option(help="telemetry window, seconds")] = 10.0,
    force: Annotated[bool, typer.Option(help="re-flash an existing device (new credentials, new model)")] = False,
    cert_days: Annotated[Optional[int], typer.Option(
        help="with a TLS --broker-dir: days the device's client certificate is valid (default 365; re-flash to renew)")] = None,
) -> None:
    """Provision a device: agent.toml, credentials, trusted key, first bundle, install script and systemd unit."""
    from toolchain.deploy.flash import flash as provision

    path = provision(device_dir, device_id, bundle, broker, fleet=fleet, pubkey=pubkey, broker_dir=broker_dir,
                     serve_port=port, window_s=window, force=force, cert_days=cert_days)
    from runtime_agent.config import load_agent_config

    serving = load_agent_config(path)
    print(f"provisioned {device_id} (fleet {fleet}) in {path}, REST on {serving.serve_host}:{serving.serve_port}; "
          f"start it with: edge-agent run --device-dir {path}")
