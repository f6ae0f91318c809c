"""One MQTT connection of the operator shared by every transfer (and discovery) of this process.

The session setup (credentials, TLS, a persistent MQTT v5 session) is `toolchain.deploy.mqtt`'s; this
module routes messages to the listeners that subscribed to them and renews their subscriptions after a
reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from toolchain.deploy.mqtt import BrokerLogin, OperatorSession
from toolchain.errors import ToolchainError

log = logging.getLogger(__name__)

# MQTT-level cap on QoS 1 publishes awaiting the broker's PUBACK (paho queues the rest). Mosquitto's default
# Receive Maximum is 20, and paho cannot change this once connected, so stay within it.
MQTT_INFLIGHT = 20


class Listener:
    """Receives the messages of some topic filters, and hears about (re)connections."""

    filters: tuple[str, ...] = ()

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None: ...

    def on_connect(self) -> None: ...

    def on_disconnect(self) -> None: ...


class PushClient:
    """One paho-mqtt 2 client (MQTT v5) for any number of concurrent transfers.

    A persistent session (unique client id, expiry `session_expiry_s`) keeps the subscriptions and
    queues device events across a broker restart; paho reconnects with backoff, and after every
    reconnect the subscriptions are renewed and every listener is told (transfers re-offer then).
    `close()` ends the session on the broker.
    """

    def __init__(self, login: BrokerLogin, client_id: str | None = None, session_expiry_s: int = 600) -> None:
        self.url = login.url
        self.session = OperatorSession(login, client_id or f"toolchain-push-{uuid.uuid4().hex[:12]}",
                                       session_expiry_s=session_expiry_s, keepalive_s=15, reconnect_max_s=4)
        self.connected = threading.Event()
        self.connections = 0
        self._refused: str | None = None
        self._failed: str | None = None  # the connection died before any CONNACK, and why (`take_socket_error`)
        self._answered = threading.Event()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._listeners: list[Listener] = []
        self._filters: dict[str, int] = {}  # topic filter -> number of listeners using it
        self._subacks: dict[int, list[Any]] = {}
        self._online = False  # under _lock: whether on_connect already took its snapshot of the filters
        client = self.client = self.session.client
        client.max_inflight_messages_set(MQTT_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._started = False

    # -- lifecycle
    def start(self, timeout_s: float = 10.0) -> "PushClient":
        self.session.connect()
        self.client.loop_start()
        self._started = True
        if not self._answered.wait(timeout_s):
            self.close()
            raise ToolchainError(f"the MQTT broker at {self.url} did not answer within {timeout_s:.0f} s")
        if self._failed is not None and not self.connected.is_set():
            reason = self._failed
            self.close()
            raise ToolchainError(f"cannot connect to the MQTT broker at {self.url}: {reason}")
        if self._refused is not None:
            reason = self._refused
            self.close()
            raise ToolchainError(f"the MQTT broker at {self.url} refused the connection: {reason} "
                                 "(check --username and --password-file)")
        return self

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        self.session.disconnect(end_session=self.connected.is_set())  # nothing of this session is needed any more
        self.client.loop_stop()

    def __enter__(self) -> "PushClient":
        return self if self._started else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- paho callbacks (network thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._safely(self._connected, client, reason_code)

    def _connected(self, client: mqtt.Client, reason_code: Any) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._answered.set()
            if self.connections == 0:
                client.disconnect()  # bad credentials do not get better by retrying
            return
        with self._lock:
            filters = list(self._filters)  # a listener added after this snapshot subscribes by itself
            listeners = list(self._listeners)
            self._online = True
            self.connections += 1
            reconnect = self.connections > 1
        if filters:
            client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        self.connected.set()
        self._answered.set()
        if reconnect:
            log.info("reconnected to %s", self.url)
            for listener in listeners:
                self._safely(listener.on_connect)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        failed = self.session.take_socket_error()
        if failed is not None and not self._answered.is_set():
            self._failed = failed
            self._answered.set()
        with self._lock:
            self._online = False
            listeners = list(self._listeners)
        for listener in listeners:
            self._safely(listener.on_disconnect)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            if any(mqtt.topic_matches_sub(f, message.topic) for f in listener.filters):
                self._safely(listener.on_message, message.topic, bytes(message.payload), bool(message.retain))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list, properties: Any) -> None:
        with self._cv:
            self._subacks[mid] = list(reason_codes)
            self._cv.notify_all()

    @staticmethod
    def _safely(function: Callable, *args: Any) -> None:
        try:
            function(*args)
        except Exception:  # a bug in one transfer must not stop the network thread of all
            log.exception("push listener failed")

    # -- subscriptions and publishing
    def add_listener(self, listener: Listener, timeout_s: float = 10.0) -> None:
        """Subscribe to the listener's filters (waiting for the broker's SUBACK) and route their messages to it."""
        with self._lock:
            new = [f for f in listener.filters if self._filters.get(f, 0) == 0]
            for f in listener.filters:
                self._filters[f] = self._filters.get(f, 0) + 1
            self._listeners.append(listener)
            online = self._online
        if not new or not online:
            return  # the next (re)connect subscribes to everything
        result, mid = self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in new])
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return
        with self._cv:
            if not self._cv.wait_for(lambda: mid in self._subacks, timeout=timeout_s):
                return  # lost with the connection; the reconnect subscribes again
            codes = self._subacks.pop(mid)
        refused = [f for f, code in zip(new, codes) if getattr(code, "is_failure", False)]
        if refused:
            self.remove_listener(listener)
            raise ToolchainError(f"the broker at {self.url} refused to let this user read {', '.join(refused)} "
                                 "(is it the fleet operator account?)")

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener not in self._listeners:
                return
            self._listeners.remove(listener)
            gone = []
            for f in listener.filters:
                self._filters[f] -= 1
                if self._filters[f] == 0:
                    del self._filters[f]
                    gone.append(f)
        if gone and self.connected.is_set():
            self.client.unsubscribe(gone)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)


def client_for(client: PushClient | None, login: BrokerLogin | None) -> tuple[PushClient, bool]:
    """The shared client, or a new started one (owned by the caller: second value True)."""
    if client is not None:
        return client, False
    if login is None or not login.url:
        raise ToolchainError("no MQTT broker given (--broker mqtt://HOST:PORT)")
    return PushClient(login).start(), True


@contextlib.contextmanager
def borrowed_client(broker: PushClient | BrokerLogin | str) -> Iterator[PushClient]:
    """The given client, or one made for the login (a bare URL: anonymous) and closed afterwards."""
    if isinstance(broker, PushClient):
        yield broker
        return
    client, _ = client_for(None, broker if isinstance(broker, BrokerLogin) else BrokerLogin(broker))
    try:
        yield client
    finally:
        client.close()
