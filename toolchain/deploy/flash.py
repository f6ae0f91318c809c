"""Provision a device folder: everything an agent needs to start serving and reporting on first boot.

The folder is assembled next to its destination and renamed into place, so a failed flash leaves no
half-provisioned device; re-flashing an existing id needs `force` (it replaces the credentials and
the installed model). The folder also carries the agent's source, an install script that builds a
virtual environment with only the agent's dependencies, and a systemd unit, for real boards.

With a TLS broker folder (`--broker-dir`, the default of `toolchain broker start`) the device folder also
gets the broker's CA (`ca.pem`: the agent verifies the broker with it) and the device's own client
certificate (`client.pem`: certificate and key in one file, 0600, CN = the device id, signed by the
broker folder's CA, valid `cert_days`), which the agent presents in the handshake (mutual TLS) and whose
expiry it reports in its status. The key is generated on the host and lives only in the device folder.
Renewing it is a re-flash (`--force`): a new certificate, a new password, the same model slots' format.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

from runtime_agent import durable
from runtime_agent.bundle import read_bundle
from runtime_agent.config import load_agent_config
from runtime_agent.errors import AgentError
from runtime_agent.signing import load_public_key
from runtime_agent.slots import Slots
from toolchain.deploy.broker import ManagedBroker
from toolchain.errors import ToolchainError
from toolchain.resources import agent_sources, lock_file

AGENT_PACKAGES = ("numpy", "onnxruntime", "paho-mqtt", "cryptography")
FIRST_SERVE_PORT = 8080

INSTALL_SH = """#!/bin/sh
# Install this device folder as a service: a venv with only the agent's dependencies and a systemd unit.
# Usage (as root on the board): sh install.sh [/opt/edge-agent]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest=${{1:-/opt/edge-agent}}
mkdir -p "$dest"
[ "$here" = "$dest" ] || cp -a "$here/." "$dest/"
python3 -m venv "$dest/venv"
"$dest/venv/bin/pip" install --quiet {requirements}
sed "s#@DEST@#$dest#g" "$dest/edge-agent.service" > /etc/systemd/system/edge-agent-{device_id}.service
if command -v systemctl >/dev/null 2>&1; then
  systemctl daemon-reload
  systemctl enable --now edge-agent-{device_id}.service
fi
echo "installed {device_id} in $dest"
"""

UNIT = """[Unit]
Description=edge-agent {device_id} (fleet {fleet})
After=network-online.target
Wants=network-online.target

[Service]
WorkingDirectory=@DEST@
Environment=PYTHONPATH=@DEST@
ExecStart=@DEST@/venv/bin/python -m runtime_agent.cli run --device-dir @DEST@
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def pinned_agent_requirements() -> list[str]:
    """The agent's dependencies at the versions the project tests with (requirements.lock)."""
    pins = {}
    for line in lock_file().read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            pins[name.strip().lower()] = version.strip()
    return [f"{name}=={pins[name]}" if name in pins else name for name in AGENT_PACKAGES]


def agent_toml(device_id: str, fleet: str, broker_url: str, mqtt_lines: list[str], serve_port: int, window_s: float,
               writer: str = "toolchain flash") -> str:
    """The text of a device's agent.toml (shared with the fleet simulator, whose devices are real device folders)."""
    return "\n".join([
        f"# Written by `{writer}`.", f'device_id = "{device_id}"', f'fleet = "{fleet}"', f'broker = "{broker_url}"',
        "", "[mqtt]", *mqtt_lines, "", "[serve]", 'host = "127.0.0.1"', f"port = {serve_port}",
        "", "[telemetry]", f"window_s = {window_s}", ""])


def _configured_port(device_dir: Path) -> int | None:
    try:
        return load_agent_config(device_dir).serve_port
    except (AgentError, OSError):
        return None


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_serve_port(device_dir: Path) -> int:
    """The REST port of a device folder: the one it already has (a re-flash keeps it; its agent may be
    running), else the lowest from 8080 up that no sibling device folder uses and nothing listens on, so
    device folders side by side on one host can all run."""
    own = _configured_port(device_dir)
    if own:
        return own
    siblings = device_dir.parent.iterdir() if device_dir.parent.is_dir() else ()
    taken = {_configured_port(sibling) for sibling in siblings if sibling.is_dir() and sibling != device_dir}
    port = FIRST_SERVE_PORT
    while port in taken or not _bindable(port):
        port += 1
        if port > 65535:
            raise ToolchainError("no free TCP port from 8080 up for the agent's REST endpoint; pass --port")
    return port


def tls_credentials(managed: ManagedBroker, folder: Path, device_id: str, cert_days: int | None = None) -> list[str]:
    """Give a device folder what a TLS broker folder asks of its clients: its CA (`ca.pem`) and, with client
    certificates on, the device's own (`client.pem`); returns the `[mqtt]` lines of agent.toml for them."""
    shutil.copyfile(managed.ca_file, folder / "ca.pem")
    lines = ['ca_file = "ca.pem"']
    if managed.client_certificates:
        managed.issue_client_cert(folder / "client.pem", device_id, cert_days)
        lines.append('client_cert = "client.pem"')
    return lines


def flash(device_dir: Path, device_id: str, bundle: Path, broker_url: str, fleet: str = "default",
          pubkey: Path | None = None, broker_dir: Path | None = None, serve_port: int | None = None,
          window_s: float = 10.0, force: bool = False, cert_days: int | None = None) -> Path:
    """Provision `device_dir`; `serve_port` None: `pick_serve_port`; `cert_days` None: `tls.CLIENT_DAYS`."""
    device_dir = Path(device_dir).resolve()
    if (device_dir / "agent.toml").exists() and not force:
        raise ToolchainError(f"{device_dir} is already provisioned; re-flashing replaces its model and credentials: add --force")
    if force and (running := _configured_port(device_dir)) and not _bindable(running):
        # its agent would go on serving from the replaced (deleted) folder, shut out by the new password
        raise ToolchainError(f"the agent of {device_dir} seems to be running (its REST port {running} is in use); stop "
                             "it before re-flashing")
    if pubkey is None:
        raise ToolchainError("flash needs the trusted public key (--pubkey)")
    verified = read_bundle(bundle, load_public_key(pubkey))
    managed = ManagedBroker.load(broker_dir) if broker_dir is not None else None
    if managed is not None and broker_url.startswith("mqtts://") != managed.tls:
        raise ToolchainError(f"--broker-dir {broker_dir} runs {managed.url.split(':')[0]}://, but --broker is {broker_url}: "
                             "give the device the scheme its broker speaks")
    if cert_days is not None and not 1 <= cert_days <= 3650:
        raise ToolchainError(f"--cert-days must be 1..3650, got {cert_days}")
    if serve_port is None:
        serve_port = pick_serve_port(device_dir)
    device_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{device_dir.name}.flash-", dir=device_dir.parent))
    try:
        password = secrets.token_urlsafe(24)
        durable.write_bytes(staging / "mqtt.password", f"{password}\n".encode(), 0o600)
        mqtt_lines = [f'username = "{device_id}"', 'password_file = "mqtt.password"']
        if managed is not None and managed.tls:
            mqtt_lines += tls_credentials(managed, staging, device_id, cert_days)
        durable.write_text(staging / "agent.toml", agent_toml(device_id, fleet, broker_url, mqtt_lines, serve_port, window_s))
        shutil.copyfile(pubkey, staging / "trusted.pub")
        manifest = verified.manifest
        slots = Slots(staging, staging / "current.bundle")
        slots.activate(slots.store(bundle, manifest["name"], manifest["version"]), f"{manifest['name']}-{manifest['version']}.bundle")
        shutil.copytree(agent_sources(), staging / "runtime_agent", ignore=shutil.ignore_patterns("__pycache__"))
        durable.write_bytes(staging / "install.sh", INSTALL_SH.format(requirements=" ".join(pinned_agent_requirements()),
                                                                      device_id=device_id).encode(), 0o755)
        durable.write_text(staging / "edge-agent.service", UNIT.format(device_id=device_id, fleet=fleet))
        load_agent_config(staging)  # what we wrote must be what the agent accepts
        if managed is not None:
            managed.add_user(device_id, password)
        _replace_dir(staging, device_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return device_dir


def _replace_dir(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; an existing `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
