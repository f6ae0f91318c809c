"""One transfer: push a verified bundle to one device, resumably, and wait for its verdict.

The wire protocol is docs/push-protocol.md (topics and limits: `runtime_agent.protocol`): the sender
publishes a `push_offer` on `cmd`, the chunks on `push/{transfer}/{index}` (QoS 1) and listens to
`push/{transfer}/ack`, `events` and `status`.

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
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runtime_agent.protocol import (ACK_EVERY, CMD, EVENTS, FINAL_STATES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, ONLINE, SCHEMAS,
                                    STATUS, ack_topic, chunk_topic, device_topic)
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push.bundle import PushBundle, verified_bundle
from toolchain.deploy.push.client import Listener, PushClient, client_for
from toolchain.errors import ToolchainError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_KB = 64
DEFAULT_WINDOW = 32
DEFAULT_ACK_TIMEOUT_S = 5.0
MIN_CHUNK_KB, MAX_CHUNK_KB = MIN_CHUNK_BYTES >> 10, MAX_CHUNK_BYTES >> 10

Progress = Callable[[str, int, int, str], None]  # (device, chunks acknowledged, chunks, state)


@dataclass
class PushResult:
    device: str
    transfer: str
    state: str  # installed | rejected | timeout (done: a benchmark job was answered)
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


class PushSender(Listener):
    """Push one verified bundle to one device (see the module docstring for the protocol rules).

    `run()` may be called again (e.g. after a timeout): state is rebuilt from the device's answer.
    Keep `window` >= the device's ack cadence (`ACK_EVERY`): the device acks only every that many chunks, so a
    smaller window waits for the ack timeout each time. Several senders may share one `PushClient`
    and run in parallel threads (that is what `rollout()` does)."""

    def __init__(self, bundle: Path | PushBundle, device: str, fleet: str = "default", *,
                 client: PushClient | None = None, broker: str | None = None, username: str | None = None,
                 password: str | None = None, ca_file: Path | None = None, pubkey: Path | Ed25519PublicKey | None = None,
                 chunk_kb: int = DEFAULT_CHUNK_KB, window: int = DEFAULT_WINDOW, ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
                 wait_probation: bool = False, probation_timeout_s: float = 300.0, progress: Progress | None = None) -> None:
        if not MIN_CHUNK_KB <= chunk_kb <= MAX_CHUNK_KB:
            raise ToolchainError(f"--chunk-kb must be between {MIN_CHUNK_KB} and {MAX_CHUNK_KB}, got {chunk_kb}")
        if window < 1:
            raise ToolchainError(f"--window must be at least 1, got {window}")
        if ack_timeout_s <= 0:
            raise ToolchainError(f"the ack timeout must be positive, got {ack_timeout_s}")
        if window < ACK_EVERY:  # smaller windows wait for re-offers
            log.warning("window %d is below the device's ack cadence (%d chunks): expect stalls of %.1f s", window,
                        ACK_EVERY, ack_timeout_s)
        bundle = verified_bundle(bundle, pubkey)
        if client is None and not broker:
            raise ToolchainError("no MQTT broker given (--broker mqtt://HOST:PORT)")
        self.bundle, self.device, self.fleet = bundle, device, fleet
        self._client, self._login = client, BrokerLogin(broker, username, password, ca_file) if broker else None
        self.chunk_bytes = chunk_kb * 1024
        self.chunks = bundle.chunk_count(self.chunk_bytes)
        self.window, self.ack_timeout_s = window, ack_timeout_s
        self.wait_probation, self.probation_timeout_s = wait_probation, probation_timeout_s
        self.progress = progress
        self.transfer = bundle.transfer
        self.ack_topic = ack_topic(fleet, device, self.transfer)
        self.filters = (self.ack_topic, device_topic(fleet, device, EVENTS), device_topic(fleet, device, STATUS))
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
            elif topic.endswith("/" + EVENTS):
                self._on_event(message)
            elif topic.endswith("/" + STATUS):
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
        self._offline = status.get("state") != ONLINE
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
        offer = {"schema": SCHEMAS[CMD], "id": f"{self.transfer}-offer-{self._offers}", "type": "push_offer",
                 "transfer": self.transfer, "bytes": self.bundle.size, "sha256": self.bundle.sha256,
                 "chunk_bytes": self.chunk_bytes, "chunks": self.chunks, "name": self.bundle.name,
                 "version": self.bundle.version, "target": self.bundle.target}
        if self.bundle.job:
            offer["job"] = self.bundle.job
        with self._cv:
            self._last_offer = time.monotonic()
            self._mark("offer")
        self._client.publish(device_topic(self.fleet, self.device, CMD), json.dumps(offer))

    def _send(self, indexes: list[int]) -> None:
        data, size = self.bundle.data, self.chunk_bytes
        infos = []
        for i in indexes:
            topic = chunk_topic(self.fleet, self.device, self.transfer, i)
            infos.append(self._client.publish(topic, data[i * size:(i + 1) * size]))
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
        client, owned = client_for(self._client, self._login)
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
