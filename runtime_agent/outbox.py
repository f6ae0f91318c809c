"""Durable outbound queue: every telemetry window, event and status goes to disk before the network.

Why: the agent must never lose what it reports, across broker outages and across ``kill -9`` or a power
cut of the device, and serving must never wait on the network. So producers (serving, telemetry
threads) only ``put`` into this SQLite file; the MQTT thread reads ``pending`` oldest first, publishes,
and ``ack``s what the broker acknowledged. Nothing here knows about MQTT.

Durability. SQLite in WAL mode with ``synchronous=FULL``: a ``put`` returns only after its transaction
is fsync'ed, so a message whose seq was returned survives kill -9 and power loss. (``NORMAL`` would
survive kill -9 too, but may lose the last transactions on power loss; ``FULL`` costs one fsync per
put, which is nothing at a telemetry rate of one message per window.)

Sequence numbers. Every put gets the next per-device ``seq`` (1, 2, 3, ...), written into the payload
(``payload["seq"]``; the caller's dict is updated too). The counter lives in the ``meta`` table and is
incremented in the same transaction as the insert, so it is monotonic across restarts and crashes:
a seq is either committed together with its message or not used at all. The monitor de-duplicates on
it (delivery is at-least-once). Delivery order is seq order. A seq can be missing downstream only
when its message was dropped by the bound below (counted) or coalesced away (status).

Stream id. A seq is unique only within one outbox file, and a file can be replaced under the same device
id (``toolchain flash --force`` writes a fresh device folder): its seq restarts at 1, and a receiver that
keyed on (device, seq) alone would drop the new file's first messages as duplicates of the old one's. So
each file draws a random 64-bit ``stream`` id when it is created (an older file gets one the first time
this code opens it), kept in ``meta`` for its whole life, and written into every payload next to seq
(``payload["stream"]``, 16 hex digits). Receivers de-duplicate on (device, stream, seq).

Kinds and the bound (``max_messages``):
- ``"telemetry"``: when the queue holds more than ``max_messages``, the *oldest telemetry* messages are
  dropped and counted in ``dropped_telemetry`` (persisted). Telemetry is a time series of summaries;
  the newest windows are worth the most, and the count tells the fleet that a gap is real.
- ``"event"``: never dropped. If the queue is full of events only, a new event is still accepted and the
  queue exceeds its bound: an installed/rolled-back/drift-alarm event lost is a fleet that is wrong
  about a device, while a bigger file costs a few hundred bytes per event. (Events are rare; a queue
  full of them means something else is badly wrong, and the events say what.)
- ``"status"``: may be retained; only the newest *unsent* status per topic is kept (older ones are
  deleted when a newer one is put), which bounds them by the number of status topics. Never dropped by
  the bound.

Thread safety: one connection (``check_same_thread=False``) guarded by a lock; every public method
holds it. Several processes may also open the same file (SQLite's own locking; writes use
``BEGIN IMMEDIATE`` and read the counter inside the transaction).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_agent.errors import AgentError

KINDS = ("telemetry", "event", "status")
SCHEMA_VERSION = 1
_SYNC = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


class OutboxError(AgentError):
    """The queue file cannot be used (not an outbox, newer schema, closed)."""


@dataclass(frozen=True)
class Message:
    """One queued message, as the MQTT side publishes it."""

    seq: int
    topic: str
    payload: bytes  # UTF-8 JSON, includes "seq" and "stream"
    qos: int
    retain: bool
    kind: str


class Outbox:
    """A bounded, durable, ordered queue of outbound messages in one SQLite file."""

    def __init__(self, path: Path, max_messages: int = 10_000, *, synchronous: str = "FULL") -> None:
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"max_messages must be an integer >= 1, got {max_messages!r}")
        synchronous = synchronous.upper()
        if synchronous not in _SYNC:
            raise ValueError(f"synchronous must be one of {sorted(_SYNC)}, got {synchronous!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; timeout: wait for another process's lock.
        conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise OutboxError(f"{self.path}: cannot switch the queue to WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._init_schema(conn)
        except sqlite3.DatabaseError as error:
            conn.close()
            raise OutboxError(f"{self.path} is not a usable outbox database: {error}; move it aside to start with an "
                              "empty queue (what it held unsent is lost)") from error
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
                         "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS messages_kind ON messages (kind, seq)")
            # The stream id is stored as an integer (meta.value has INTEGER affinity: a text id made only of
            # digits would silently turn into a number) and shown as 16 hex digits.
            conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                             [("schema_version", SCHEMA_VERSION), ("last_seq", 0), ("dropped_telemetry", 0),
                              ("stream", secrets.randbits(63))])
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(f"{self.path} has outbox schema {version}; this agent understands up to "
                                  f"{SCHEMA_VERSION} (upgrade the agent)")
            self.stream = f"{self._meta(conn, 'stream'):016x}"
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- helpers -------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self.path} is closed")
        return self._conn

    def _meta(self, conn: sqlite3.Connection, key: str) -> int:
        return conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    # -- producers -----------------------------------------------------------------------------
    def put(self, topic: str, payload: dict[str, Any], kind: str, qos: int = 1, retain: bool = False) -> int:
        """Queue one message durably and return its seq (also written into ``payload["seq"]``, and the
        file's ``stream`` id into ``payload["stream"]``).

        On return the message is committed to disk. On any error nothing is written and ``payload`` is
        left as it was.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty string")
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict (it becomes a JSON object), got {type(payload).__name__}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        before = {key: payload[key] for key in ("seq", "stream") if key in payload}
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta(conn, "last_seq") + 1
                payload["seq"], payload["stream"] = seq, self.stream
                data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
                conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
                if kind == "status":  # only the newest unsent status per topic matters
                    conn.execute("DELETE FROM messages WHERE kind = 'status' AND topic = ?", (topic,))
                conn.execute("INSERT INTO messages (seq, topic, payload, qos, retain, kind) VALUES (?, ?, ?, ?, ?, ?)",
                             (seq, topic, data, int(qos), int(bool(retain)), kind))
                excess = conn.execute("SELECT count(*) FROM messages").fetchone()[0] - self.max_messages
                if excess > 0:
                    dropped = conn.execute(
                        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE kind = 'telemetry' "
                        "ORDER BY seq LIMIT ?)", (excess,)).rowcount
                    if dropped:
                        conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_telemetry'", (dropped,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                payload.pop("seq", None)
                payload.pop("stream", None)
                payload.update(before)
                raise
        return seq

    # -- the delivering side ---------------------------------------------------------------------
    def pending(self, limit: int = 100) -> list[Message]:
        """Up to ``limit`` queued messages, oldest (lowest seq) first; they stay queued until acked."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db().execute(
                "SELECT seq, topic, payload, qos, retain, kind FROM messages ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [Message(seq, topic, bytes(payload), qos, bool(retain), kind)
                for seq, topic, payload, qos, retain, kind in rows]

    def ack(self, seq: int) -> bool:
        """Remove a delivered message. Idempotent: False if it was not queued (already acked or coalesced)."""
        with self._lock:
            return self._db().execute("DELETE FROM messages WHERE seq = ?", (int(seq),)).rowcount > 0

    # -- state ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return self._db().execute("SELECT count(*) FROM messages").fetchone()[0]

    @property
    def last_seq(self) -> int:
        """The highest seq ever committed (0 when nothing was put yet); the next put gets last_seq + 1."""
        with self._lock:
            return self._meta(self._db(), "last_seq")

    @property
    def dropped_telemetry(self) -> int:
        """Telemetry messages dropped by the bound, over the life of this file."""
        with self._lock:
            return self._meta(self._db(), "dropped_telemetry")

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the file (idempotent). Everything put is already on disk."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"{len(self)} queued"
        return f"Outbox({str(self.path)!r}, max_messages={self.max_messages}, {state})"
