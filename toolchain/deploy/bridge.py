"""A site broker's mosquitto bridge to a central broker: the fleet's topic schema, both ways, QoS 1, queued.

Why a bridge: a site (a plant, a store) keeps its own broker next to its devices, so serving, telemetry
and the devices' own reconnects never depend on the wide-area link, while the monitor, the dashboard and
`toolchain push` run once, on the central broker. The bridge forwards what devices send up
(`UP_TOPICS`: ``status``, ``telemetry``, ``events``, push acks) and what the operator sends down
(`DOWN_TOPICS`: ``cmd`` and push chunks), each at QoS 1; the topic names are the same on both brokers,
so nothing else in the fleet knows there is a bridge.

Nothing is lost while the link is down: the bridge connects with ``cleansession false`` on both ends
(``local_cleansession false`` too), so the central broker queues the commands and chunks for the site's
session, the site broker queues the reports for the bridge's, and the site's persistence keeps that
queue across its own restarts. The bridge's client id (`BridgeSettings.client_id`) is the session's
name: it is drawn once per site folder and kept, and must be unique per site at the central broker.
Retained statuses stay retained on the central broker (``bridge_outgoing_retain``), so `toolchain push`
discovers the site's devices there. ``try_private`` marks the bridge to a mosquitto (or another broker
that honours the bridge flag), which then never echoes back what the bridge itself published: the push
topics go both ways (chunks down, acks up under the same ``push/`` prefix), so without it an ack would loop.

The central broker's generated ACL has a ``BRIDGE_USER`` account that may write exactly the up topics
and read the down ones (`toolchain broker start --accept-bridges` creates it, and with TLS the client
certificate `bridge.pem` a site passes as `--bridge-client-cert`); the bridge's connection
state is published, retained, on ``edge/bridges/{client_id}/state`` (``1`` up, ``0`` by its last will).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from runtime_agent.protocol import CMD, EVENTS, PUSH, STATUS, TELEMETRY, ack_topic, device_topic
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.errors import ToolchainError

BRIDGE_USER = "edge-bridge"
UP_TOPICS = (device_topic("+", "+", STATUS), device_topic("+", "+", TELEMETRY), device_topic("+", "+", EVENTS),
             ack_topic("+", "+", "+"))
DOWN_TOPICS = (device_topic("+", "+", CMD), device_topic("+", "+", PUSH) + "/#")
NOTIFICATION_ROOT = "edge/bridges"


def _new_client_id() -> str:
    return f"edge-site-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class BridgeSettings:
    """Where a site broker's bridge connects and how it logs in; stored in the site's ``broker.json``.

    The password lives in its own file (never in ``broker.json`` or on a command line); mosquitto needs
    it in its config, so a bridged broker's ``mosquitto.conf`` is written readable by its owner only."""

    url: str
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    client_id: str = field(default_factory=_new_client_id)
    client_cert: str | None = None  # certificate + key (one PEM) for a central broker that requires one

    def check(self) -> tuple[str, int, bool]:
        """(host, port, tls) of the central broker; a one-line ToolchainError for what the user can fix."""
        host, port, tls = BrokerLogin(self.url, ca_file=self.ca_file, client_cert=self.client_cert).address("--bridge-to")
        if tls and self.ca_file is None:
            raise ToolchainError("--bridge-to mqtts://... needs --bridge-ca-file (the CA that signed the central broker's certificate)")
        if (self.username is None) != (self.password_file is None):
            raise ToolchainError("--bridge-user and --bridge-password-file go together (the account on the central broker)")
        return host, port, tls

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            password = Path(self.password_file).read_text().strip()
        except OSError as exc:
            raise ToolchainError(f"cannot read --bridge-password-file {self.password_file}: {exc.strerror}") from None
        if not password or "\n" in password:
            raise ToolchainError(f"--bridge-password-file {self.password_file} must hold the password on one line")
        return password

    def config_lines(self) -> list[str]:
        """The ``connection`` section of mosquitto.conf (it must come after the broker's own settings)."""
        host, port, tls = self.check()
        lines = [f"connection {self.client_id}", f"address {host}:{port}", f"remote_clientid {self.client_id}",
                 "bridge_protocol_version mqttv311", "try_private true", "cleansession false", "local_cleansession false",
                 "start_type automatic", "restart_timeout 1 10", "keepalive_interval 20", "bridge_outgoing_retain true",
                 "notifications true", f"notification_topic {NOTIFICATION_ROOT}/{self.client_id}/state"]
        if self.username is not None:
            lines += [f"remote_username {self.username}", f"remote_password {self.password()}"]
        if tls:
            lines += [f"bridge_cafile {Path(self.ca_file).resolve()}", "bridge_tls_version tlsv1.2"]
        if self.client_cert is not None:  # mosquitto reads the certificate and the key from the same PEM
            cert = Path(self.client_cert).resolve()
            lines += [f"bridge_certfile {cert}", f"bridge_keyfile {cert}"]
        lines += [f"topic {topic} out 1" for topic in UP_TOPICS]
        lines += [f"topic {topic} in 1" for topic in DOWN_TOPICS]
        return lines


def bridge_acl() -> str:
    """The central broker's ACL section for site bridges: write the up topics, read the down ones."""
    lines = [f"user {BRIDGE_USER}", *(f"topic write {topic}" for topic in UP_TOPICS),
             *(f"topic read {topic}" for topic in DOWN_TOPICS), f"topic write {NOTIFICATION_ROOT}/#"]
    return "\n".join(lines) + "\n"
