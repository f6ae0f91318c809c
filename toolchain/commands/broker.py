"""`toolchain broker start|stop`: a local mosquitto for development, with passwords, ACL and persistence; a
site broker bridged to a central one (`--bridge-to`, `toolchain.deploy.bridge`)."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Annotated, Optional

import typer

from toolchain.deploy.bridge import BRIDGE_USER, BridgeSettings
from toolchain.deploy.broker import OPERATOR, ManagedBroker
from toolchain.errors import ToolchainError

app = typer.Typer(help="Run a local MQTT broker (mosquitto) with per-device passwords and an ACL.", no_args_is_help=True)
DEFAULT_DIR = Path(".edge-broker")


def _account(broker: ManagedBroker, user: str, password_file: Path) -> None:
    """Create `user` with a random password written to `password_file` (0600), once per broker folder."""
    if password_file.exists():
        return
    password = secrets.token_urlsafe(24)
    broker.add_user(user, password)
    password_file.touch(mode=0o600)
    password_file.write_text(password + "\n")


def _bridge(broker: ManagedBroker, url: Optional[str], user: Optional[str], password_file: Optional[Path],
            ca_file: Optional[Path]) -> None:
    """Set the site's bridge from the options (its client id, the name of its queue at the central broker, is kept)."""
    if url is None:
        if user is not None or password_file is not None or ca_file is not None:
            raise ToolchainError("--bridge-user, --bridge-password-file and --bridge-ca-file need --bridge-to URL")
        return
    settings = BridgeSettings(url, user, None if password_file is None else str(password_file.resolve()),
                              None if ca_file is None else str(ca_file.resolve()))
    if broker.bridge is not None:
        settings = dataclasses.replace(settings, client_id=broker.bridge.client_id)
    settings.check()
    settings.password()  # a missing or empty password file is refused before anything starts
    broker.bridge = settings


@app.command()
def start(
    dir: Annotated[Path, typer.Option("--dir", help="broker folder: config, passwords, ACL, persistence, log")] = DEFAULT_DIR,
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    tls: Annotated[bool, typer.Option(help="MQTT over TLS (mqtts://) with a generated CA")] = False,
    anonymous: Annotated[bool, typer.Option(help="no passwords, no ACL (tests only)")] = False,
    accept_bridges: Annotated[bool, typer.Option(
        help=f"central broker: create the account site bridges log in with ({BRIDGE_USER}, password in DIR/bridge.password)")] = False,
    bridge_to: Annotated[Optional[str], typer.Option(
        help="site broker: bridge the fleet's topics to this central broker (mqtt://HOST:PORT or mqtts://HOST:PORT), "
             "QoS 1, queued while the link is down")] = None,
    bridge_user: Annotated[Optional[str], typer.Option(help=f"the bridge's account on the central broker (e.g. {BRIDGE_USER})")] = None,
    bridge_password_file: Annotated[Optional[Path], typer.Option(help="file holding that account's password")] = None,
    bridge_ca_file: Annotated[Optional[Path], typer.Option(help="CA certificate that signed the central broker's (mqtts://)")] = None,
) -> None:
    """Start mosquitto in the background; the operator's password is written to DIR/operator.password."""
    try:
        broker = ManagedBroker.load(dir)
    except ToolchainError:  # a new folder
        broker = ManagedBroker(dir, port=port, host=host, authenticated=not anonymous, tls=tls)
    _bridge(broker, bridge_to, bridge_user, bridge_password_file, bridge_ca_file)
    if accept_bridges and not broker.authenticated:
        raise ToolchainError("--accept-bridges needs a broker with passwords (not --anonymous)")
    broker.save()
    if broker.authenticated:
        _account(broker, OPERATOR, dir / "operator.password")
        if accept_bridges:
            _account(broker, BRIDGE_USER, dir / "bridge.password")
    broker.start(detach=True)
    print(f"broker {broker.url} running (pid {broker.running_pid()}), folder {dir}")
    if broker.authenticated:
        print(f"operator: user {OPERATOR}, password in {dir / 'operator.password'}")
    if (dir / "bridge.password").exists():
        print(f"site bridges: user {BRIDGE_USER}, password in {dir / 'bridge.password'}")
    if broker.bridge is not None:
        print(f"bridged to {broker.bridge.url} as {broker.bridge.client_id} (fleet topics both ways, QoS 1, queued)")
    if broker.tls:
        print(f"CA certificate for clients: {broker.ca_file}")


@app.command()
def stop(dir: Annotated[Path, typer.Option("--dir", help="broker folder")] = DEFAULT_DIR) -> None:
    """Stop the broker started from DIR."""
    broker = ManagedBroker.load(dir)
    print(f"broker {broker.url} stopped" if broker.stop() else f"no broker was running from {dir}")
