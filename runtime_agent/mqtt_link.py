"""The agent's MQTT connection: drains the durable outbox in `seq` order and receives commands.

Delivery is at-least-once and in order: a message leaves the outbox only when the broker has
acknowledged it (PUBACK, QoS 1); after any disconnect everything unacknowledged is sent again from
the outbox, oldest first, so a receiver that drops `seq` values it has already seen gets every message
exactly once and in order. paho reconnects by itself with exponential backoff (1 s .. 30 s).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from paho.mqtt.packettypes import PacketTypes

from runtime_agent.config import AgentConfig
from runtime_agent.outbox import Outbox
from runtime_agent.protocol import CMD, PUSH, STATUS, STATUS_OFFLINE

log = logging.getLogger(__name__)

# TLS alerts a broker sends about the client's certificate, by the name OpenSSL gives them.
_CERTIFICATE_ALERTS = ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE",
                       "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_REVOKED", "ALERT_CERTIFICATE_UNKNOWN")


class SocketErrors(logging.Handler):
    """The last socket error of one paho client. paho tells why a connection died (a TLS alert, a reset) only
    to its log (`on_disconnect` reads "Unspecified error"): a logger of the client's own at ERROR, given
    through `enable_logger`, so that its per-packet DEBUG lines are never formatted (an `on_log` callback
    would format one for every packet), and kept out of the logging tree."""

    PREFIX = "failed to receive on socket: "

    def __init__(self, client: mqtt.Client) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None
        logger = logging.Logger("paho.socket-errors", logging.ERROR)
        logger.addHandler(self)
        client.enable_logger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            self.last = message[len(self.PREFIX):]

    def take(self) -> str | None:
        """The last error since the last call (for `on_disconnect`), or None."""
        error, self.last = self.last, None
        return error


def explain_socket_error(error: str, certificate_setting: str) -> str:
    """What to fix for a connection the broker closed before its CONNACK. A broker that requires client
    certificates (mosquitto's `require_certificate`) checks one only after a TLS 1.3 handshake has
    completed on the client's side, so a missing, foreign or expired certificate shows up here, as
    the broker's alert or as the socket closed under the first read."""
    if "ALERT_CERTIFICATE_REQUIRED" in error.upper():
        return (f"the broker requires a client certificate and got none; set {certificate_setting} (a certificate "
                "and key signed by the broker's CA)")
    if any(alert in error.upper() for alert in _CERTIFICATE_ALERTS):
        alert = error.split("] ", 1)[-1].split(" (_ssl.c", 1)[0]
        return (f"the broker refused the client certificate ({alert}); {certificate_setting} must be a certificate "
                "and key signed by the broker's CA, still valid")
    if "EOF occurred in violation of protocol" in error:
        return (f"the broker closed the connection right after the TLS handshake (no client certificate, or one it "
                f"does not accept? check {certificate_setting})")
    return error


class MqttLink:
    def __init__(self, config: AgentConfig, outbox: Outbox, birth: Callable[[], dict[str, Any]],
                 on_command: Callable[[bytes, bool], None], on_chunk: Callable[[str, int, bytes], None] | None = None,
                 max_inflight: int = 20) -> None:
        self.config, self.outbox, self.birth, self.on_command = config, outbox, birth, on_command
        self.on_chunk = on_chunk
        self.max_inflight = max_inflight
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set once the broker acknowledged the subscriptions to this device's commands and pushes (cleared on a
        disconnect): from then on nothing sent to the device is missed, so a test or a supervisor can wait for it."""
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho message id -> outbox seq
        # Acks that arrived before publish() returned their mid, with arrival time: only fresh ones count
        # (a late ack of a message re-sent by paho after a reconnect must not match a reused mid).
        self._early: dict[int, tuple[float, Any]] = {}
        self.rejected_by_broker = 0
        self.connections = 0  # successful connects: the second and later are reconnects
        self.client = self._make_client()
        self._pump = threading.Thread(target=self._pump_loop, name="mqtt-pump", daemon=True)

    def _make_client(self) -> mqtt.Client:
        config = self.config
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config.device_id, protocol=mqtt.MQTTv5)
        if config.username:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            client.tls_set(ca_certs=str(config.ca_file) if config.ca_file else None, cert_reqs=ssl.CERT_REQUIRED,
                           certfile=str(config.client_cert) if config.client_cert else None)
        client.will_set(config.topic(STATUS), json.dumps(STATUS_OFFLINE), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(self.max_inflight)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_connect_fail = lambda c, u: log.warning("cannot reach the broker at %s:%s: %s; retrying with backoff",
                                                          config.broker_host, config.broker_port, self._why_unreachable())
        client.on_disconnect = self._on_disconnect
        self._socket_errors = SocketErrors(client)
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _why_unreachable(self, timeout_s: float = 2.0) -> str:
        """paho does not hand the failed dial's error to `on_connect_fail`: dial once more with a plain
        socket to name the real cause (refused, unresolvable, no answer, or TLS/MQTT on a live port)."""
        address = (self.config.broker_host, self.config.broker_port)
        try:
            socket.create_connection(address, timeout=timeout_s).close()
        except ConnectionRefusedError:
            return "connection refused (is the broker running on that port?)"
        except socket.gaierror as exc:
            return f"cannot resolve the host name ({exc.strerror})"
        except TimeoutError:
            return f"no answer within {timeout_s:g} s (broker unreachable: host down or firewalled)"
        except OSError as exc:
            return f"broker unreachable ({exc.strerror or exc})"
        if self.config.tls:
            return ("the port answers but the TLS handshake failed (check [mqtt] ca_file, client_cert and the broker's "
                    "certificate)")
        return "the port answers but the MQTT connection failed (is it an MQTT broker?)"

    def prepare(self) -> None:
        """Set the connection up without dialling: a clean start and no session kept on the broker, since
        the device's memory is its outbox (the connection is made when the client's loop runs)."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0
        self.client.connect_async(self.config.broker_host, self.config.broker_port, keepalive=self.config.keepalive_s,
                                  clean_start=True, properties=properties)

    def start(self) -> "MqttLink":
        self.prepare()
        self.client.loop_start()
        self._pump.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Flush what the broker will take within the timeout, say offline, disconnect."""
        deadline = time.monotonic() + timeout_s
        while self.connected.is_set() and len(self.outbox) and time.monotonic() < deadline:
            self.wake()
            time.sleep(0.02)
        self._stopping.set()
        self.wake()
        if self.connected.is_set():
            self.client.publish(self.config.topic(STATUS), json.dumps(STATUS_OFFLINE), qos=1, retain=True).wait_for_publish(1.0)
        self.client.disconnect()
        self.client.loop_stop()
        self._pump.join(timeout=2)

    def wake(self) -> None:
        self._wake.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        self.connections += 1
        log.info("%s the broker at %s:%s", "reconnected to" if self.connections > 1 else "connected to",
                 self.config.broker_host, self.config.broker_port)
        own = SubscribeOptions(qos=1, noLocal=True)  # not our own acks back
        client.subscribe([(self.config.topic(CMD), own), (self.config.topic(f"{PUSH}/+/+"), own)])
        # after subscribing: the broker handles one connection's packets in order, so whoever sees this birth
        # can publish to the device (an offer, a command) knowing it will be delivered
        client.publish(self.config.topic(STATUS), json.dumps(self.birth()), qos=1, retain=True)
        with self._lock:
            self._inflight.clear()
            self._early.clear()
        self.connected.set()
        self.wake()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        error = self._socket_errors.take()
        if self.connected.is_set() and not self._stopping.is_set():
            log.warning("lost the broker at %s:%s (%s); reconnecting with backoff", self.config.broker_host,
                        self.config.broker_port, reason_code)
        elif error is not None and not self._stopping.is_set():  # closed before its CONNACK: nothing else says why
            log.warning("cannot connect to the broker at %s:%s: %s; retrying with backoff", self.config.broker_host,
                        self.config.broker_port, explain_socket_error(error, "[mqtt] client_cert in agent.toml"))
        self.connected.clear()
        self.subscribed.clear()
        with self._lock:
            self._inflight.clear()  # unacknowledged messages stay in the outbox and are sent again

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            seq = self._inflight.pop(mid, None)
            if seq is None:
                self._early[mid] = (time.monotonic(), reason_code)
                return
        self._acknowledged(seq, reason_code)

    def _acknowledged(self, seq: int, reason_code: Any) -> None:
        if reason_code.is_failure:  # e.g. "Not authorized": retrying would never succeed
            self.rejected_by_broker += 1
            log.warning("broker refused message seq %s: %s", seq, reason_code)
        self.outbox.ack(seq)
        self.wake()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if topic == self.config.topic(CMD):
            self.on_command(message.payload, bool(message.retain))
        elif self.on_chunk is not None and topic.startswith(chunks := self.config.topic(f"{PUSH}/")):
            transfer, _, index = topic[len(chunks):].partition("/")
            if index.isdigit():
                self.on_chunk(transfer, int(index), message.payload)

    def publish_now(self, topic: str, payload: dict[str, Any]) -> None:
        """Send without the outbox: for progress messages (push acks) that are stale once missed."""
        if self.connected.is_set():
            self.client.publish(topic, json.dumps(payload), qos=1)

    def announce(self) -> None:
        """Re-publish the retained status (the model version changed)."""
        if self.connected.is_set():
            self.client.publish(self.config.topic(STATUS), json.dumps(self.birth()), qos=1, retain=True)

    def _pump_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            if self.connected.is_set():
                self._publish_pending()

    def _publish_pending(self) -> None:
        with self._lock:
            busy = set(self._inflight.values())
            room = self.max_inflight - len(busy)
        if room <= 0:
            return
        for message in self.outbox.pending(len(busy) + room):
            if message.seq in busy:
                continue
            if not self.connected.is_set():
                return
            # Never hold our lock across publish(): paho calls on_publish under its own lock.
            info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return
            with self._lock:
                arrived, early = self._early.pop(info.mid, (0.0, None))
                if early is None or time.monotonic() - arrived > 2.0:
                    early = None
                    self._inflight[info.mid] = message.seq
            if early is not None:
                self._acknowledged(message.seq, early)
