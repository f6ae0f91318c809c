"""Model pushes, operator side: offer a signed bundle, stream it in chunks, resume, roll out in waves.

The wire protocol is docs/push-protocol.md (topics of DESIGN.md, prefix `edge/v1/{fleet}/{device}/`):
the sender publishes a `push_offer` on `cmd`, the chunks on `push/{transfer}/{index}` (QoS 1) and
listens to `push/{transfer}/ack`, `events` and `status`.

Flow control and resumption rest on one rule: the device's acks say which chunk indexes it holds on
disk (`received` ranges), so the sender never needs to remember anything across restarts.

- At most `window` chunks are unacknowledged at any time; an index counts as acknowledged once it
  appears in an ack's `received` ranges.
- After every offer the sender sends nothing until the device answers it (an ack of what it already
  holds): a sender, agent or broker restart therefore costs at most the chunks that were in flight.
- The sender re-offers (same deterministic `transfer` id) when no ack came for `ack_timeout_s`,
  when its own connection comes back, and when the device announces a new `status` birth (it
  reconnected). Only indexes neither acknowledged nor in flight are ever published again.
- `chunks_sent` counts every chunk this process handed to the MQTT client, `resent` those of them
  for an index it had already published before. `transport_retries` counts chunks the MQTT client
  itself re-transmits after a reconnect (QoS 1 messages the broker had not acknowledged yet), which
  are not our decision but are on the wire too.

A push is final on an ack (or event) with state `installed` or `rejected`; with `wait_probation`
it then waits for the device's `probation_passed` or `rollback` event for that version.
`rollout()` pushes to canaries first and continues wave by wave only while every device of the
previous stage passed; `discover_devices()` lists a fleet's online devices from their retained status.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from runtime_agent.errors import AgentError
from toolchain.errors import ToolchainError

log = logging.getLogger(__name__)

TOPIC_ROOT = "edge/v1"
FINAL_STATES = ("installed", "rejected")
DEFAULT_CHUNK_KB = 64
DEFAULT_WINDOW = 32
DEFAULT_ACK_TIMEOUT_S = 5.0
MAX_CHUNK_KB = 16 * 1024  # the device accepts chunk_bytes in [1 KiB, 16 MiB]
# MQTT-level cap on QoS 1 publishes awaiting the broker's PUBACK (paho queues the rest). Mosquitto's default
# Receive Maximum is 20, and paho cannot change this once connected, so stay within it.
MQTT_INFLIGHT = 20

Progress = Callable[[str, int, int, str], None]  # (device, chunks acknowledged, chunks, state)


def prefix(fleet: str, device: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/{device}/"


def _parse_broker(url: str) -> tuple[str, int, bool]:
    from runtime_agent.config import parse_broker

    try:
        return parse_broker(url, "--broker")
    except AgentError:
        raise ToolchainError(f"--broker must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}") from None


# --- the bundle to push -------------------------------------------------------------------------

@dataclass(frozen=True)
class PushBundle:
    """A bundle verified with the operator's trusted key, with the exact bytes that will be sent."""

    path: Path
    data: bytes
    sha256: str
    name: str
    version: int
    target: str

    @property
    def transfer(self) -> str:
        """Deterministic transfer id (protocol §Transfer id): the same bundle always resumes the same transfer."""
        return self.sha256[:16]

    @property
    def size(self) -> int:
        return len(self.data)

    def chunk_count(self, chunk_bytes: int) -> int:
        return -(-len(self.data) // chunk_bytes)


def load_push_bundle(path: Path, pubkey: Path | Ed25519PublicKey) -> PushBundle:
    """Read and verify a bundle with the trusted public key; refuse (ToolchainError) anything that does not verify."""
    from runtime_agent.bundle import read_bundle
    from runtime_agent.signing import load_public_key

    path = Path(path)
    try:
        key = pubkey if isinstance(pubkey, Ed25519PublicKey) else load_public_key(Path(pubkey))
    except AgentError as exc:
        raise ToolchainError(f"cannot push {path}: {exc}") from None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ToolchainError(f"bundle {path} does not exist") from None
    except IsADirectoryError:
        raise ToolchainError(f"bundle {path} is a directory, expected a .bundle file") from None
    try:
        manifest = read_bundle(path, key).manifest
    except AgentError as exc:
        raise ToolchainError(f"refusing to push {path}: it does not verify with the trusted key ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise ToolchainError(f"bundle {path} changed while it was being read; try again")
    return PushBundle(path=path, data=data, sha256=digest, name=manifest["name"], version=int(manifest["version"]),
                      target=manifest["target"])


# --- one MQTT connection shared by every transfer of this process ----------------------------------

class _Listener:
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

    def __init__(self, broker: str, username: str | None = None, password: str | None = None,
                 ca_file: Path | None = None, client_id: str | None = None, session_expiry_s: int = 600) -> None:
        self.url = broker
        self.host, self.port, self.tls = _parse_broker(broker)
        self.client_id = client_id or f"toolchain-push-{uuid.uuid4().hex[:12]}"
        self.session_expiry_s = session_expiry_s
        self.connected = threading.Event()
        self.connections = 0
        self._refused: str | None = None
        self._answered = threading.Event()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._listeners: list[_Listener] = []
        self._filters: dict[str, int] = {}  # topic filter -> number of listeners using it
        self._subacks: dict[int, list[Any]] = {}
        self._online = False  # under _lock: whether on_connect already took its snapshot of the filters
        client = self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if username:
            client.username_pw_set(username, password)
        if self.tls:
            client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        client.reconnect_delay_set(min_delay=1, max_delay=4)
        client.max_inflight_messages_set(MQTT_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._started = False

    # -- lifecycle
    def start(self, timeout_s: float = 10.0) -> "PushClient":
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry_s
        try:
            self.client.connect(self.host, self.port, keepalive=15, clean_start=False, properties=properties)
        except OSError as exc:
            raise ToolchainError(f"cannot reach the MQTT broker at {self.url}: {exc.strerror or exc}") from None
        self.client.loop_start()
        self._started = True
        if not self._answered.wait(timeout_s):
            self.close()
            raise ToolchainError(f"the MQTT broker at {self.url} did not answer within {timeout_s:.0f} s")
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
        if self.connected.is_set():
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0  # nothing of this session is needed any more
            self.client.disconnect(properties=properties)
        else:
            self.client.disconnect()
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
    def add_listener(self, listener: _Listener, timeout_s: float = 10.0) -> None:
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

    def remove_listener(self, listener: _Listener) -> None:
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

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)


def _client_for(client: PushClient | None, broker: str | None, username: str | None = None, password: str | None = None,
                ca_file: Path | None = None) -> tuple[PushClient, bool]:
    """The shared client, or a new started one (owned by the caller: second value True)."""
    if client is not None:
        return client, False
    if not broker:
        raise ToolchainError("no MQTT broker given (--broker mqtt://HOST:PORT)")
    return PushClient(broker, username, password, ca_file).start(), True


@contextlib.contextmanager
def _borrowed_client(broker: str | PushClient, **credentials: Any) -> Iterator[PushClient]:
    """The given client, or one made for the URL and closed afterwards."""
    if isinstance(broker, PushClient):
        yield broker
        return
    client, _ = _client_for(None, broker, **credentials)
    try:
        yield client
    finally:
        client.close()


# --- retained status: discovery --------------------------------------------------------------------

class _StatusCollector(_Listener):
    def __init__(self, topic_filter: str) -> None:
        self.filters = (topic_filter,)
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}  # (fleet, device) -> status
        self.last = time.monotonic()

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        parts = topic.split("/")  # edge/v1/{fleet}/{device}/status
        if len(parts) != 5 or not payload:
            return
        try:
            status = json.loads(payload)
        except ValueError:
            return
        if isinstance(status, dict):
            self.statuses[(parts[2], parts[3])] = status
            self.last = time.monotonic()


def _collect_statuses(client: PushClient, topic_filter: str, timeout_s: float,
                      quiet_s: float = 0.3) -> dict[tuple[str, str], dict[str, Any]]:
    """Retained status messages under a filter: they arrive right after the subscription is granted,
    so this returns once none came for `quiet_s` (or at `timeout_s`)."""
    collector = _StatusCollector(topic_filter)
    deadline = time.monotonic() + timeout_s
    client.add_listener(collector)
    try:
        collector.last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - collector.last < quiet_s:
            time.sleep(0.02)
    finally:
        client.remove_listener(collector)
    return dict(collector.statuses)


def device_statuses(broker: str | PushClient, fleet: str, timeout_s: float = 2.0,
                    **credentials: Any) -> dict[str, dict[str, Any]]:
    """Every device of `fleet` with a retained status, and that status (`state`, `model_version`, ...)."""
    with _borrowed_client(broker, **credentials) as client:
        found = _collect_statuses(client, f"{prefix(fleet, '+')}status", timeout_s)
    return {device: status for (_, device), status in sorted(found.items())}


def discover_devices(broker: str | PushClient, fleet: str, timeout_s: float = 2.0, **credentials: Any) -> list[str]:
    """Devices whose retained `edge/v1/{fleet}/+/status` says online, sorted. `credentials`: username,
    password, ca_file (when `broker` is a URL)."""
    return [device for device, status in device_statuses(broker, fleet, timeout_s, **credentials).items()
            if status.get("state") == "online"]


def find_fleet(broker: str | PushClient, device: str, timeout_s: float = 2.0, **credentials: Any) -> str:
    """The fleet a device reports in, from its retained status; a clear error when none or several."""
    with _borrowed_client(broker, **credentials) as client:
        found = _collect_statuses(client, f"{TOPIC_ROOT}/+/{device}/status", timeout_s)
    fleets = sorted(fleet for fleet, _ in found)
    if not fleets:
        raise ToolchainError(f"device {device!r} has no status on the broker (never connected?); pass --fleet NAME")
    if len(fleets) > 1:
        raise ToolchainError(f"device {device!r} reports in several fleets ({', '.join(fleets)}); pass --fleet NAME")
    return fleets[0]


# --- one transfer -----------------------------------------------------------------------------------

@dataclass
class PushResult:
    device: str
    transfer: str
    state: str  # installed | rejected | timeout
    reason: str
    chunks: int
    chunks_sent: int
    resent: int
    seconds: float
    bytes: int
    fleet: str = ""
    version: int = 0
    probation: str | None = None  # passed | rollback | timeout, None when not awaited (or not installed)
    probation_reason: str = ""
    offers: int = 0
    transport_retries: int = 0
    held_before: int = 0  # chunks the device already held when it first answered (a resumed transfer)
    # As the sender sees them (monotonic clock, receipt times): the device hashes the whole file before
    # its last ack leaves, so that hash counts as transfer and install_seconds is verify + self-test + swap.
    transfer_seconds: float | None = None  # first offer -> an ack shows every chunk on the device
    install_seconds: float | None = None  # that ack -> installed
    probation_seconds: float | None = None  # installed -> verdict
    # Wall clock (time.time()) of each milestone: offer, sent (last chunk handed to MQTT), received,
    # installed and verdict (the device's own `ts` when the news came as an event).
    timeline: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "installed" and self.probation in (None, "passed")

    @property
    def mb_per_s(self) -> float | None:
        if not self.transfer_seconds:
            return None
        moved = self.bytes * (1 - self.held_before / max(1, self.chunks))
        return moved / self.transfer_seconds / 1e6

    @property
    def summary(self) -> str:
        if self.state != "installed":
            return f"{self.state}: {self.reason}"
        if self.probation == "passed":
            return "installed, passed probation"
        if self.probation:
            return f"installed, then {self.probation}: {self.probation_reason}"
        return "installed"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "mb_per_s": self.mb_per_s}


class PushSender(_Listener):
    """Push one verified bundle to one device (see the module docstring for the protocol rules).

    `run()` may be called again (e.g. after a timeout): state is rebuilt from the device's answer.
    Keep `window` >= the device's `ack_every` (16): the device acks only every that many chunks, so a
    smaller window waits for the ack timeout each time. Several senders may share one `PushClient`
    and run in parallel threads (that is what `rollout()` does)."""

    def __init__(self, bundle: Path | PushBundle, device: str, fleet: str = "default", *,
                 client: PushClient | None = None, broker: str | None = None, username: str | None = None,
                 password: str | None = None, ca_file: Path | None = None, pubkey: Path | Ed25519PublicKey | None = None,
                 chunk_kb: int = DEFAULT_CHUNK_KB, window: int = DEFAULT_WINDOW, ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
                 wait_probation: bool = False, probation_timeout_s: float = 300.0, progress: Progress | None = None) -> None:
        if not 1 <= chunk_kb <= MAX_CHUNK_KB:
            raise ToolchainError(f"--chunk-kb must be between 1 and {MAX_CHUNK_KB}, got {chunk_kb}")
        if window < 1:
            raise ToolchainError(f"--window must be at least 1, got {window}")
        if ack_timeout_s <= 0:
            raise ToolchainError(f"the ack timeout must be positive, got {ack_timeout_s}")
        if window < 16:  # the device acks every 16 chunks (protocol default): smaller windows wait for re-offers
            log.warning("window %d is below the device's ack cadence (16 chunks): expect stalls of %.1f s", window, ack_timeout_s)
        if not isinstance(bundle, PushBundle):
            if pubkey is None:
                from runtime_agent.signing import PUBLIC_KEY_NAME, default_key_dir
                pubkey = default_key_dir() / PUBLIC_KEY_NAME
            bundle = load_push_bundle(Path(bundle), pubkey)
        if client is None and not broker:
            raise ToolchainError("no MQTT broker given (--broker mqtt://HOST:PORT)")
        self.bundle, self.device, self.fleet = bundle, device, fleet
        self._client, self._broker, self._credentials = client, broker, (username, password, ca_file)
        self.chunk_bytes = chunk_kb * 1024
        self.chunks = bundle.chunk_count(self.chunk_bytes)
        self.window, self.ack_timeout_s = window, ack_timeout_s
        self.wait_probation, self.probation_timeout_s = wait_probation, probation_timeout_s
        self.progress = progress
        self.prefix = prefix(fleet, device)
        self.transfer = bundle.transfer
        self.ack_topic = f"{self.prefix}push/{self.transfer}/ack"
        self.filters = (self.ack_topic, f"{self.prefix}events", f"{self.prefix}status")
        self._cancel = threading.Event()
        self._cv = threading.Condition()
        self._reset_state()

    def _reset_state(self) -> None:
        self._acked = bytearray(self.chunks)
        self._n_acked = 0
        self._sent = bytearray(self.chunks)
        self._inflight: dict[int, tuple[float, int]] = {}  # index -> (sent at, send sequence number)
        self._send_seq = 0
        self._acked_seq = -1  # highest send sequence number acknowledged so far (evidence of holes before it)
        self._scan = 0
        self._awaiting = True  # an offer is unanswered: send nothing until the device says what it holds
        self._resync = False  # the next answer replaces (not extends) what we believe the device holds
        self._reoffer_now = False
        self._answered_once = False
        self._device_state: str | None = None
        self._final: tuple[str, str] | None = None
        self._verdict: tuple[str, str] | None = None
        self._offline = False
        self._last_error = ""
        self._last_ack = 0.0
        self._last_offer = 0.0
        self._offers = 0
        self._chunks_sent = 0
        self._resent = 0
        self._transport_retries = 0
        self._unconfirmed: list[mqtt.MQTTMessageInfo] = []
        self._held_before = 0
        self._marks: dict[str, float] = {}  # milestone -> time.monotonic()
        self._wall: dict[str, float] = {}

    def cancel(self) -> None:
        """Stop at the next step (run() returns a `timeout` result saying it was cancelled)."""
        self._cancel.set()
        with self._cv:
            self._cv.notify_all()

    # -- messages (network thread) -------------------------------------------------------------
    def _mark(self, name: str, wall: float | None = None) -> None:
        if name not in self._marks:
            self._marks[name] = time.monotonic()
            self._wall[name] = wall if wall is not None else time.time()

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            message = json.loads(payload) if payload else None
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        with self._cv:
            if topic == self.ack_topic:
                self._on_ack(message)
            elif topic.endswith("/events"):
                self._on_event(message)
            elif topic.endswith("/status"):
                self._on_status(message, retained)
            self._cv.notify_all()

    def _on_ack(self, ack: dict[str, Any]) -> None:
        if ack.get("transfer", self.transfer) != self.transfer:
            return
        ranges = ack.get("received")
        if not isinstance(ranges, list):
            return
        valid = [(int(r[0]), int(r[1])) for r in ranges
                 if isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) and 0 <= r[0] <= r[1] < self.chunks]
        if self._resync:
            self._resync = False
            held = bytearray(self.chunks)
            for first, last in valid:
                held[first:last + 1] = b"\x01" * (last - first + 1)
            lost = [i for i in range(self.chunks) if self._acked[i] and not held[i]]
            if lost:  # the device lost chunks it had acknowledged (its staging was reset): send them again
                log.warning("%s: device no longer holds %d acknowledged chunks", self.device, len(lost))
                for i in lost:
                    self._acked[i] = 0
                self._n_acked -= len(lost)
                self._scan = 0
        for first, last in valid:
            i = self._acked.find(0, first, last + 1)
            while i != -1:
                self._acked[i] = 1
                self._n_acked += 1
                sent = self._inflight.pop(i, None)
                if sent is not None:
                    self._acked_seq = max(self._acked_seq, sent[1])
                i = self._acked.find(0, i + 1, last + 1)
        if not self._answered_once:
            self._answered_once = True
            self._held_before = self._n_acked
        self._awaiting = False
        self._last_ack = time.monotonic()
        state = ack.get("state")
        if isinstance(state, str):
            self._device_state = state
        if self._n_acked == self.chunks or state == "verifying":
            self._mark("received")
        if state in FINAL_STATES and self._final is None:
            self._settle(state, str(ack.get("reason") or ""))

    def _settle(self, state: str, reason: str, wall: float | None = None) -> None:
        self._final = (state, reason)
        self._device_state = state
        if state == "installed":
            self._mark("received", wall)  # no-op when an ack already showed every chunk
        self._mark(state, wall)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        wall = event.get("ts") if isinstance(event.get("ts"), (int, float)) else None
        if kind in FINAL_STATES and event.get("transfer") == self.transfer:
            if self._final is None:
                self._settle(kind, str(event.get("reason") or ""), wall)
        elif kind == "probation_passed" and event.get("version") == self.bundle.version:
            self._verdict = self._verdict or ("passed", "")
            self._mark("verdict", wall)
        elif kind == "rollback" and event.get("from_version") == self.bundle.version:
            self._verdict = self._verdict or ("rollback", str(event.get("reason") or ""))
            self._mark("verdict", wall)
        elif kind == "error" and "push_offer" in str(event.get("reason", "")):
            self._last_error = str(event["reason"])

    def _on_status(self, status: dict[str, Any], retained: bool) -> None:
        self._offline = status.get("state") != "online"
        if not retained and not self._offline and self._final is None and self._device_state != "verifying":
            self._reoffer_now = True  # a fresh birth: the device (re)connected and may have missed chunks

    def on_connect(self) -> None:
        with self._cv:
            self._reoffer_now = True
            self._cv.notify_all()

    def on_disconnect(self) -> None:
        with self._cv:
            self._transport_retries += sum(not info.is_published() for info in self._unconfirmed)
            self._drop_inflight()
            self._awaiting = True
            self._cv.notify_all()

    # -- sending (caller's thread) ---------------------------------------------------------------
    def _drop_inflight(self) -> None:
        if self._inflight:
            self._scan = min(self._scan, min(self._inflight))
            self._inflight.clear()

    def _next_missing(self) -> int | None:
        while self._scan < self.chunks:
            i = self._acked.find(0, self._scan)
            if i == -1:
                self._scan = self.chunks
                return None
            self._scan = i + 1
            if i not in self._inflight:
                return i
        return None

    def _plan(self, now: float, connected: bool) -> tuple[bool, list[int]]:
        """Under the lock: whether to (re)offer now and which chunk indexes to publish."""
        if not connected or self._final is not None:
            return False, []
        since_offer = now - self._last_offer
        if self._reoffer_now and since_offer >= 0.2:
            reoffer = True
        elif self._awaiting:
            reoffer = since_offer >= self.ack_timeout_s
            self._resync = self._resync or reoffer
        else:
            reoffer = now - self._last_ack >= self.ack_timeout_s
            self._resync = self._resync or reoffer
        if reoffer:
            self._reoffer_now = False
            self._awaiting = True
            self._drop_inflight()
            return True, []
        if self._awaiting or self._device_state not in (None, "receiving"):
            return False, []
        holes = [i for i, (sent, seq) in self._inflight.items() if seq < self._acked_seq and now - sent >= self.ack_timeout_s]
        for i in holes:  # later chunks were acknowledged long ago: this one was lost
            del self._inflight[i]
            self._scan = min(self._scan, i)
        picked = []
        while len(self._inflight) < self.window:
            i = self._next_missing()
            if i is None:
                break
            self._inflight[i] = (now, self._send_seq)
            self._send_seq += 1
            picked.append(i)
        return False, picked

    def _offer(self) -> None:
        self._offers += 1
        offer = {"schema": "cmd/1", "id": f"{self.transfer}-offer-{self._offers}", "type": "push_offer",
                 "transfer": self.transfer, "bytes": self.bundle.size, "sha256": self.bundle.sha256,
                 "chunk_bytes": self.chunk_bytes, "chunks": self.chunks, "name": self.bundle.name,
                 "version": self.bundle.version, "target": self.bundle.target}
        with self._cv:
            self._last_offer = time.monotonic()
            self._mark("offer")
        self._client.publish(f"{self.prefix}cmd", json.dumps(offer))

    def _send(self, indexes: list[int]) -> None:
        data, size = self.bundle.data, self.chunk_bytes
        infos = []
        for i in indexes:
            infos.append(self._client.publish(f"{self.prefix}push/{self.transfer}/{i}", data[i * size:(i + 1) * size]))
        with self._cv:
            for i in indexes:
                self._chunks_sent += 1
                if self._sent[i]:
                    self._resent += 1
                self._sent[i] = 1
            self._unconfirmed.extend(infos)
            if self._scan >= self.chunks:
                self._mark("sent")  # every chunk the device lacked is now with the MQTT client
            if len(self._unconfirmed) > 4 * self.window:
                self._unconfirmed = [info for info in self._unconfirmed if not info.is_published()]

    def run(self, timeout_s: float = 600.0) -> PushResult:
        """Push until installed or rejected (and, with wait_probation, the verdict), or `timeout_s`."""
        self._reset_state()
        started = time.monotonic()
        client, owned = _client_for(self._client, self._broker, *self._credentials)
        self._client = client
        try:
            client.add_listener(self)
            try:
                return self._loop(client, started, timeout_s)
            finally:
                client.remove_listener(self)
        finally:
            if owned:
                client.close()
                self._client = None

    def _loop(self, client: PushClient, started: float, timeout_s: float) -> PushResult:
        deadline = started + timeout_s
        self._offer()
        reported = None
        while True:
            now = time.monotonic()
            with self._cv:
                if self._final is not None and self._done_waiting(now):
                    break
                if self._cancel.is_set() or (now >= deadline and self._final is None):
                    break
                reoffer, indexes = self._plan(now, client.connected.is_set())
                snapshot = (self._n_acked, self._state_label())
            if reoffer:
                self._offer()
            if indexes:
                self._send(indexes)
            if self.progress and snapshot != reported:
                reported = snapshot
                self.progress(self.device, snapshot[0], self.chunks, snapshot[1])
            if not indexes and not reoffer:
                with self._cv:
                    self._cv.wait(0.1)
        if self.progress:
            with self._cv:
                snapshot = (self._n_acked, self._state_label())
            if snapshot != reported:
                self.progress(self.device, snapshot[0], self.chunks, snapshot[1])
        return self._result(started)

    def _state_label(self) -> str:
        if self._verdict is not None:
            return "probation passed" if self._verdict[0] == "passed" else "rolled back"
        if self._final is not None and self._final[0] == "installed" and self.wait_probation:
            return "installed, on probation"
        return self._device_state or "offered"

    def _done_waiting(self, now: float) -> bool:
        if not self.wait_probation or self._final[0] != "installed" or self._verdict is not None:
            return True
        return now - self._marks["installed"] >= self.probation_timeout_s

    def _result(self, started: float) -> PushResult:
        with self._cv:
            marks = self._marks
            since = lambda a, b: round(marks[b] - marks[a], 4) if a in marks and b in marks else None  # noqa: E731
            if self._final is not None:
                state, reason = self._final
            else:
                state, reason = "timeout", self._timeout_reason()
            probation = probation_reason = None
            if state == "installed" and self.wait_probation:
                probation, probation_reason = self._verdict or (
                    "timeout", f"no probation verdict within {self.probation_timeout_s:.0f} s of the install")
            return PushResult(
                device=self.device, fleet=self.fleet, transfer=self.transfer, state=state, reason=reason,
                chunks=self.chunks, chunks_sent=self._chunks_sent, resent=self._resent,
                seconds=round(time.monotonic() - started, 4), bytes=self.bundle.size, version=self.bundle.version,
                probation=probation, probation_reason=probation_reason or "", offers=self._offers,
                transport_retries=self._transport_retries, held_before=self._held_before,
                transfer_seconds=since("offer", "received"), install_seconds=since("received", "installed"),
                probation_seconds=since("installed", "verdict"), timeline=dict(self._wall))

    def _timeout_reason(self) -> str:
        if self._cancel.is_set():
            what = "cancelled"
        elif not self._answered_once:
            what = "no answer to the offer" + (" (its last status says offline)" if self._offline else "")
        elif self._device_state == "verifying":
            what = "all chunks delivered, the device did not finish verifying and installing"
        else:
            what = f"{self._n_acked}/{self.chunks} chunks acknowledged"
        return what + (f"; device reported: {self._last_error}" if self._last_error else "")


# --- rollouts ---------------------------------------------------------------------------------------

@dataclass
class RolloutResult:
    bundle: str
    name: str
    version: int
    transfer: str
    fleet: str
    state: str  # completed | stopped
    results: dict[str, PushResult]
    decisions: list[dict[str, Any]]
    skipped: list[str]

    @property
    def ok(self) -> bool:
        return self.state == "completed" and all(r.ok for r in self.results.values())

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "name": self.name, "version": self.version, "transfer": self.transfer,
                "fleet": self.fleet, "state": self.state, "ok": self.ok, "decisions": self.decisions,
                "skipped": self.skipped, "results": {d: r.to_dict() for d, r in self.results.items()}}


def plan_stages(devices: Sequence[str], canary: int, waves: int | Sequence[int] | None) -> list[tuple[str, list[str]]]:
    """Split devices into ("canary", ...) then ("wave 1", ...), ...; a list of wave sizes repeats its last size."""
    if canary < 0:
        raise ToolchainError(f"--canary must be 0 or more, got {canary}")
    devices = list(devices)
    stages = [("canary", devices[:canary])] if canary else []
    rest = devices[canary:]
    if waves is None or waves == 0 or waves == []:
        sizes: list[int] = [len(rest)] if rest else []
    elif isinstance(waves, int):
        sizes = [waves]
    else:
        sizes = [int(w) for w in waves]
    if any(size < 1 for size in sizes):
        raise ToolchainError(f"wave sizes must be at least 1, got {waves}")
    number, position = 0, 0
    while position < len(rest):
        size = sizes[min(number, len(sizes) - 1)]
        number += 1
        stages.append((f"wave {number}", rest[position:position + size]))
        position += size
    return stages


def rollout(bundle: Path | PushBundle, fleet: str, devices: Iterable[str], canary: int = 1,
            waves: int | Sequence[int] | None = None, *, client: PushClient | None = None, broker: str | None = None,
            username: str | None = None, password: str | None = None, ca_file: Path | None = None,
            pubkey: Path | Ed25519PublicKey | None = None, chunk_kb: int = DEFAULT_CHUNK_KB, window: int = DEFAULT_WINDOW,
            ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S, timeout_s: float = 600.0, wait_probation: bool = True,
            probation_timeout_s: float = 300.0, progress: Progress | None = None,
            on_decision: Callable[[dict[str, Any]], None] | None = None) -> RolloutResult:
    """Canaries first, then waves; each stage's devices are pushed concurrently over one connection and
    the rollout goes on only if every one of them installed (and passed probation when waiting for it).
    Devices of later stages never get an offer once a stage failed. Every decision carries its reason."""
    devices = list(dict.fromkeys(devices))
    if not devices:
        raise ToolchainError(f"no devices to push to in fleet {fleet!r}")
    if not isinstance(bundle, PushBundle):
        if pubkey is None:
            from runtime_agent.signing import PUBLIC_KEY_NAME, default_key_dir
            pubkey = default_key_dir() / PUBLIC_KEY_NAME
        bundle = load_push_bundle(Path(bundle), pubkey)
    stages = plan_stages(devices, canary, waves)
    decisions: list[dict[str, Any]] = []
    results: dict[str, PushResult] = {}

    def decide(stage: str, action: str, members: list[str], reason: str) -> None:
        decision = {"stage": stage, "action": action, "devices": list(members), "reason": reason, "ts": time.time()}
        decisions.append(decision)
        if on_decision:
            on_decision(decision)

    shared, owned = _client_for(client, broker, username, password, ca_file)
    skipped: list[str] = []
    state = "completed"
    try:
        for number, (stage, members) in enumerate(stages):
            why = (f"canary: {len(members)} of {len(devices)} devices first" if stage == "canary"
                   else f"{stage}: {len(members)} device(s)" + (", the previous stage passed" if number else ""))
            decide(stage, "push", members, why)
            senders = [PushSender(bundle, device, fleet, client=shared, chunk_kb=chunk_kb, window=window,
                                  ack_timeout_s=ack_timeout_s, wait_probation=wait_probation,
                                  probation_timeout_s=probation_timeout_s, progress=progress) for device in members]
            stage_results = _run_concurrently(senders, timeout_s)
            results.update(stage_results)
            failed = [r for r in stage_results.values() if not r.ok]
            later = [d for _, rest in stages[number + 1:] for d in rest]
            if failed:
                state = "stopped"
                detail = "; ".join(f"{r.device} {r.summary}" for r in failed)
                decide(stage, "stop", [r.device for r in failed], f"{len(failed)} of {len(members)} failed: {detail}")
                if later:
                    skipped = later
                    decide(stage, "skip", later, f"not offered: the rollout stopped at the {stage}")
                break
            verdict = "passed probation" if wait_probation else "installed"
            decide(stage, "continue" if later else "complete", members,
                   f"all {len(members)} {verdict}" + (f"; {len(later)} device(s) to go" if later else ""))
    finally:
        if owned:
            shared.close()
    return RolloutResult(bundle=str(bundle.path), name=bundle.name, version=bundle.version, transfer=bundle.transfer,
                         fleet=fleet, state=state, results=results, decisions=decisions, skipped=skipped)


def _run_concurrently(senders: list[PushSender], timeout_s: float) -> dict[str, PushResult]:
    results: dict[str, PushResult] = {}
    errors: list[BaseException] = []

    def one(sender: PushSender) -> None:
        try:
            results[sender.device] = sender.run(timeout_s)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(s,), name=f"push-{s.device}", daemon=True) for s in senders]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        for sender in senders:
            sender.cancel()
        raise
    if errors:
        raise errors[0]
    return {s.device: results[s.device] for s in senders}
