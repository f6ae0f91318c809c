"""`toolchain broker start|stop`: a local mosquitto for development, with passwords, ACL and persistence."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import typer

from toolchain.deploy.broker import OPERATOR, ManagedBroker
from toolchain.errors import ToolchainError

app = typer.Typer(help="Run a local MQTT broker (mosquitto) with per-device passwords and an ACL.", no_args_is_help=True)
DEFAULT_DIR = Path(".edge-broker")


@app.command()
def start(
    dir: Annotated[Path, typer.Option("--dir", help="broker folder: config, passwords, ACL, persistence, log")] = DEFAULT_DIR,
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    tls: Annotated[bool, typer.Option(help="MQTT over TLS (mqtts://) with a generated CA")] = False,
    anonymous: Annotated[bool, typer.Option(help="no passwords, no ACL (tests only)")] = False,
) -> None:
    """Start mosquitto in the background; the operator's password is written to DIR/operator.password."""
    try:
        broker = ManagedBroker.load(dir)
    except ToolchainError:  # a new folder
        broker = ManagedBroker(dir, port=port, host=host, authenticated=not anonymous, tls=tls)
        broker.save()
    password_file = dir / "operator.password"
    if broker.authenticated and not password_file.exists():
        password = secrets.token_urlsafe(24)
        broker.add_user(OPERATOR, password)
        password_file.touch(mode=0o600)
        password_file.write_text(password + "\n")
    broker.start(detach=True)
    print(f"broker {broker.url} running (pid {broker.running_pid()}), folder {dir}")
    if broker.authenticated:
        print(f"operator: user {OPERATOR}, password in {password_file}")
    if broker.tls:
        print(f"CA certificate for clients: {broker.ca_file}")


@app.command()
def stop(dir: Annotated[Path, typer.Option("--dir", help="broker folder")] = DEFAULT_DIR) -> None:
    """Stop the broker started from DIR."""
    broker = ManagedBroker.load(dir)
    print(f"broker {broker.url} stopped" if broker.stop() else f"no broker was running from {dir}")
