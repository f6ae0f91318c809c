"""`toolchain broker start|stop`: a local mosquitto with passwords, ACL and persistence; a site broker bridged
to a central one (`--bridge-to`, `toolchain.deploy.bridge`).

TLS is the default (`--tls`): `mqtts://` with a CA generated in the broker folder and mutual TLS, so every
client needs a certificate from that CA (devices get theirs from `toolchain flash --broker-dir`, the
operator `DIR/operator.pem`, site bridges `DIR/bridge.pem`). Why by default: the fleet's traffic is
passwords, commands and signed models; on plain MQTT anyone on the path reads the passwords and can
replay them. `--insecure` is for a loopback lab only and says so on every start. A folder keeps the mode
it was created with (recorded in `broker.json`): flipping it would strand every device provisioned for
the other one, so a disagreeing flag is reported and ignored, never applied silently."""

from __future__ import annotations

import dataclasses
import secrets
import sys
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
            ca_file: Optional[Path], client_cert: Optional[Path]) -> None:
    """Set the site's bridge from the options (its client id, the name of its queue at the central broker, is kept)."""
    if url is None:
        if user is not None or password_file is not None or ca_file is not None or client_cert is not None:
            raise ToolchainError("--bridge-user, --bridge-password-file, --bridge-ca-file and --bridge-client-cert "
                                 "need --bridge-to URL")
        return

    def absolute(path: Optional[Path]) -> Optional[str]:
        return None if path is None else str(path.resolve())

    settings = BridgeSettings(url, user, absolute(password_file), absolute(ca_file), client_cert=absolute(client_cert))
    if broker.bridge is not None:
        settings = dataclasses.replace(settings, client_id=broker.bridge.client_id)
    settings.check()
    settings.password()  # a missing or empty password file is refused before anything starts
    broker.bridge = settings


INSECURE_WARNING = ("WARNING: this broker speaks plain MQTT (--insecure): passwords, commands and models cross the "
                    "network unencrypted and anyone on the path can read and replay them; use it on a loopback lab only")


def _mode(broker: ManagedBroker, tls: Optional[bool], new: bool) -> None:
    """Warn about plain MQTT; an existing folder keeps its mode against a disagreeing --tls/--insecure, and says so."""
    if not new and tls is not None and tls != broker.tls:
        kept = "TLS (mqtts://)" if broker.tls else "plain MQTT (--insecure)"
        print(f"note: {broker.directory} was created with {kept} and keeps it (its devices are provisioned for it); "
              f"ignoring {'--tls' if tls else '--insecure'}: start a new --dir to change it", file=sys.stderr)
    if not broker.tls:
        print(INSECURE_WARNING, file=sys.stderr)


@app.command()
def start(
    dir: Annotated[Path, typer.Option("--dir", help="broker folder: config, passwords, ACL, persistence, log")] = DEFAULT_DIR,
    port: Annotated[Optional[int], typer.Option(help="TCP port of a new folder (default 8883 with TLS, 1883 --insecure)")] = None,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    tls: Annotated[Optional[bool], typer.Option(
        "--tls/--insecure",
        help="a new folder: MQTT over TLS (mqtts://) with a generated CA and client certificates (default), or plain "
             "MQTT (--insecure: loopback labs only); an existing folder keeps its mode")] = None,
    anonymous: Annotated[bool, typer.Option(help="no passwords, no ACL (tests only)")] = False,
    accept_bridges: Annotated[bool, typer.Option(
        help=f"central broker: create the account site bridges log in with ({BRIDGE_USER}, password in DIR/bridge.password)")] = False,
    bridge_to: Annotated[Optional[str], typer.Option(
        help="site broker: bridge the fleet's topics to this central broker (mqtt://HOST:PORT or mqtts://HOST:PORT), "
             "QoS 1, queued while the link is down")] = None,
    bridge_user: Annotated[Optional[str], typer.Option(help=f"the bridge's account on the central broker (e.g. {BRIDGE_USER})")] = None,
    bridge_password_file: Annotated[Optional[Path], typer.Option(help="file holding that account's password")] = None,
    bridge_ca_file: Annotated[Optional[Path], typer.Option(help="CA certificate that signed the central broker's (mqtts://)")] = None,
    bridge_client_cert: Annotated[Optional[Path], typer.Option(
        help="the bridge's client certificate and key, one PEM (a central TLS broker's DIR/bridge.pem)")] = None,
) -> None:
    """Start mosquitto in the background; the operator's password is written to DIR/operator.password (and,
    with TLS, its client certificate to DIR/operator.pem)."""
    try:
        broker, new = ManagedBroker.load(dir), False
    except ToolchainError:  # a new folder
        secure = tls is not False
        broker, new = ManagedBroker(dir, port=(8883 if secure else 1883) if port is None else port, host=host,
                                    authenticated=not anonymous, tls=secure), True
    _bridge(broker, bridge_to, bridge_user, bridge_password_file, bridge_ca_file, bridge_client_cert)
    if accept_bridges and not broker.authenticated:
        raise ToolchainError("--accept-bridges needs a broker with passwords (not --anonymous)")
    _mode(broker, tls, new)
    broker.save()
    if broker.authenticated:
        _account(broker, OPERATOR, dir / "operator.password")
        if accept_bridges:
            _account(broker, BRIDGE_USER, dir / "bridge.password")
    certificates = broker.tls and broker.client_certificates
    if certificates:  # kept across restarts while valid; re-issued when missing or within 30 days of expiry
        broker.issue_client_cert(dir / "operator.pem", OPERATOR, reuse=True)
        if accept_bridges or (dir / "bridge.pem").exists():
            broker.issue_client_cert(dir / "bridge.pem", BRIDGE_USER, reuse=True)
    broker.start(detach=True)
    print(f"broker {broker.url} running (pid {broker.running_pid()}), folder {dir}")
    if broker.authenticated:
        print(f"operator: user {OPERATOR}, password in {dir / 'operator.password'}")
    if certificates:
        print(f"operator client certificate (--client-cert): {dir / 'operator.pem'}")
    if (dir / "bridge.password").exists():
        print(f"site bridges: user {BRIDGE_USER}, password in {dir / 'bridge.password'}"
              + (f", client certificate {dir / 'bridge.pem'}" if certificates else ""))
    if broker.bridge is not None:
        print(f"bridged to {broker.bridge.url} as {broker.bridge.client_id} (fleet topics both ways, QoS 1, queued)")
    if broker.tls:
        print(f"CA certificate for clients: {broker.ca_file}")


@app.command()
def stop(dir: Annotated[Path, typer.Option("--dir", help="broker folder")] = DEFAULT_DIR) -> None:
    """Stop the broker started from DIR."""
    broker = ManagedBroker.load(dir)
    print(f"broker {broker.url} stopped" if broker.stop() else f"no broker was running from {dir}")
