"""The fleet operator's MQTT connection, set up in one place for push (`push.client.PushClient`) and the
fleet monitor (`toolchain.fleet.monitor`): broker URL, credentials, TLS, and an MQTT v5 persistent session.

Both are operator clients that must not lose what devices send while they reconnect (or, for the
monitor, while it is down): they connect with ``clean_start=False`` and a session expiry, under a client
id that stays the same for the life of the session, so the broker keeps their subscriptions and queues
QoS 1 messages for them. A client that is done ends its session (expiry 0 on DISCONNECT) so the broker
stops queueing for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from runtime_agent.config import parse_broker
from runtime_agent.mqtt_link import SocketErrors, explain_socket_error
from runtime_agent.errors import AgentError
from toolchain.errors import ToolchainError


@dataclass(frozen=True)
class BrokerLogin:
    """Where the broker is and how the operator logs in (`username` is the fleet operator account)."""

    url: str
    username: str | None = None
    password: str | None = None
    ca_file: Path | str | None = None  # the CA that signed the broker's certificate (mqtts://)
    client_cert: Path | str | None = None  # certificate + key in one PEM, for brokers that require one (mutual TLS)

    def address(self, what: str = "--broker") -> tuple[str, int, bool]:
        """(host, port, tls) of ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``, the CA file checked; a one-line
        ToolchainError naming `what` (the option the user gave the broker with) otherwise."""
        try:
            address = parse_broker(self.url, what)
        except AgentError:
            raise ToolchainError(f"{what} must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {self.url!r}") from None
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ToolchainError(f"CA file {self.ca_file} does not exist (the broker's CA certificate, PEM)")
        if self.client_cert is not None and not Path(self.client_cert).is_file():
            raise ToolchainError(f"client certificate {self.client_cert} does not exist (certificate and key, PEM; "
                                 "`toolchain broker start` writes DIR/operator.pem)")
        if self.client_cert is not None and not address[2]:
            raise ToolchainError(f"a client certificate needs an mqtts:// broker, got {self.url!r}")
        return address


class OperatorSession:
    """A paho-mqtt 2 client (MQTT v5) logged in as `login`, connecting into a persistent session.

    `client` is the paho client: the owner sets its callbacks and drives its loop. `what` names the
    broker in errors (the option the user gave it with)."""

    def __init__(self, login: BrokerLogin, client_id: str, *, session_expiry_s: int, keepalive_s: int,
                 reconnect_max_s: int, manual_ack: bool = False, what: str = "--broker") -> None:
        self.host, self.port, self.tls = login.address(what)
        self.url, self.client_id = login.url, client_id
        self.session_expiry_s, self.keepalive_s = int(session_expiry_s), int(keepalive_s)
        client = self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                           manual_ack=manual_ack)
        if login.username:
            client.username_pw_set(login.username, login.password)
        if self.tls:
            client.tls_set(ca_certs=str(login.ca_file) if login.ca_file else None,
                           certfile=str(login.client_cert) if login.client_cert else None)
        client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
        self.socket_errors = SocketErrors(client)  # why the last connection died, as paho logged it

    def take_socket_error(self) -> str | None:
        """For `on_disconnect` before any CONNACK: what to fix (a broker refusing the client certificate closes
        the socket after a TLS 1.3 handshake, which paho reports only as "Unspecified error"), or None. Cleared."""
        error = self.socket_errors.take()
        if error is None:
            return None
        return explain_socket_error(error, "--client-cert") + ("" if self.tls else " (a TLS listener? use mqtts://)")

    def _properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry_s
        return properties

    def connect(self) -> None:
        """Dial now (ToolchainError if the broker cannot be reached); the owner then starts the loop."""
        try:
            self.client.connect(self.host, self.port, keepalive=self.keepalive_s, clean_start=False,
                                properties=self._properties())
        except OSError as exc:
            raise ToolchainError(f"cannot reach the MQTT broker at {self.url}: {exc.strerror or exc}") from None

    def connect_async(self) -> None:
        """Dial once the owner's loop runs, retrying with backoff while the broker is unreachable."""
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive_s, clean_start=False,
                                  properties=self._properties())

    def disconnect(self, end_session: bool) -> None:
        """Disconnect; with `end_session` the broker drops the session (nothing is queued for it any more)."""
        if not end_session:
            self.client.disconnect()
            return
        properties = Properties(PacketTypes.DISCONNECT)
        properties.SessionExpiryInterval = 0
        self.client.disconnect(properties=properties)
