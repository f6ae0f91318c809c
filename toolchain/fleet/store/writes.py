"""Everything the monitor writes: device states, telemetry windows, events, fleet alarms, rejected
messages, pruning. Each write is one transaction, or a savepoint inside `Database.batch`.

Several writers may share one database (monitor workers on PostgreSQL): every write is safe against a
concurrent one without locks held in Python. De-duplication is the unique key (``ON CONFLICT DO
NOTHING``: the second writer of a window waits for the first and then stores nothing), a new row is an
upsert, never a read-then-insert, and a fleet alarm changes state only under its row's lock.
"""

from __future__ import annotations

import json
import operator
import time
from typing import Any, Mapping, Sequence

from toolchain.fleet.store.codec import encode
from toolchain.fleet.store.database import Database
from toolchain.fleet.store.records import FLEET_DEVICE, REJECTED_KEPT, TelemetryRecord
from toolchain.fleet.store.schema import latest_window
from toolchain.fleet.store.share import FLEET_ALARM, FleetShare, read_share


def _greatest(a: str, b: str) -> str:
    """SQL for the larger of two values (SQLite's two-argument MAX is PostgreSQL's GREATEST)."""
    return f"CASE WHEN {a} > {b} THEN {a} ELSE {b} END"


TOUCHES_PER_STATEMENT = 500
_TELEMETRY_KEY = operator.itemgetter(0, 1, 2, 4)  # (fleet, device, stream, seq) of a telemetry row
_TOUCH = (  # {rows}: one "(?, ?, ?, ?, ?, ?)" per device
    "INSERT INTO devices (fleet, device, last_seen, last_seq, stream, epoch) VALUES {rows} "
    "ON CONFLICT (fleet, device) DO UPDATE SET "
    f"last_seen = {_greatest('COALESCE(devices.last_seen, 0)', 'excluded.last_seen')}, "
    "last_seq = CASE WHEN excluded.epoch > devices.epoch THEN excluded.last_seq "
    "WHEN excluded.epoch = devices.epoch AND excluded.epoch > 0 "
    f"THEN {_greatest('COALESCE(devices.last_seq, 0)', 'excluded.last_seq')} ELSE devices.last_seq END, "
    "stream = CASE WHEN excluded.epoch > devices.epoch THEN excluded.stream ELSE devices.stream END, "
    f"epoch = {_greatest('devices.epoch', 'excluded.epoch')} RETURNING device")


Touch = tuple[float, "str | None", int, "int | None"]  # (seen_at, stream, epoch, seq) of a device's messages


def _newer(a: Touch, b: Touch) -> Touch:
    """Two signs of life of one device as one: the later time, and the newer (epoch, seq) position (what
    applying both to the device row one after the other gives; epoch 0: no position)."""
    position = b if b[2] > 0 and (a[2] == 0 or (b[2], b[3] or 0) > (a[2], a[3] or 0)) else a
    return (max(a[0], b[0]), position[1], position[2], position[3])


class StoreWrites(Database):
    """Writes. The device rows are updated once per device at the end of each transaction, in device
    order: two writers' batches then never wait on each other's device rows in opposite orders (no
    deadlock), and a batch of 500 windows from 50 devices updates 50 rows, not 500. A stream's epoch never
    changes once stored, so it is cached after the commit that stored or read it."""

    def __init__(self, target: Any, *, create: bool = True) -> None:
        self._epochs: dict[tuple[str, str, str], int] = {}
        super().__init__(target, create=create)

    def _touch(self, fleet: str, device: str, seen_at: float, stream: str | None = None,
               epoch: int = 0, seq: int | None = None) -> None:
        """Note a sign of life; with a message's (stream, epoch, seq), advance the device's newest stream and
        its last seq (a message of an older stream, epoch below the device's, leaves them alone). Written
        at the end of the transaction (`_before_commit`)."""
        pending, key = self._pending[-1], ("touch", fleet, device)
        touch = (seen_at, stream, epoch, seq)
        pending[key] = _newer(pending[key], touch) if key in pending else touch

    def _merge_pending(self, into: dict[Any, Any], done: dict[Any, Any]) -> None:
        for key, value in done.items():
            into[key] = _newer(into[key], value) if key[0] == "touch" and key in into else value

    def _before_commit(self, db: Any, pending: dict[Any, Any]) -> None:
        """The devices' rows, in key order, one statement per TOUCHES_PER_STATEMENT devices."""
        keys = sorted(key for key in pending if key[0] == "touch")
        for start in range(0, len(keys), TOUCHES_PER_STATEMENT):
            db.insert_many(_TOUCH, [(key[1], key[2], pending[key][0], pending[key][3], pending[key][1], pending[key][2])
                                    for key in keys[start:start + TOUCHES_PER_STATEMENT]])

    def _after_commit(self, pending: dict[Any, Any]) -> None:
        self._epochs.update((key[1:], value) for key, value in pending.items() if key[0] == "epoch")

    def _epoch(self, db: Any, fleet: str, device: str, stream: str, seen_at: float) -> int:
        """The stream's epoch for this device; a stream seen for the first time gets the next one (two
        writers seeing it at once: the key lets one insert, the other reads what it inserted)."""
        cached = self._epochs.get((fleet, device, stream))
        if cached is not None:
            return cached
        query = ("SELECT epoch FROM streams WHERE fleet = ? AND device = ? AND stream = ?", (fleet, device, stream))
        row = db.execute(*query).fetchone()
        if row is None:
            db.execute("INSERT INTO streams (fleet, device, stream, epoch, first_seen) "
                       "SELECT ?, ?, ?, COALESCE(MAX(epoch), 0) + 1, ? FROM streams WHERE fleet = ? AND device = ? "
                       "ON CONFLICT (fleet, device, stream) DO NOTHING",
                       (fleet, device, stream, seen_at, fleet, device))
            row = db.execute(*query).fetchone()
        self._pending[-1][("epoch", fleet, device, stream)] = int(row[0])
        return int(row[0])

    def update_status(self, fleet: str, device: str, state: str, *, seen_at: float | None = None,
                      **fields: Any) -> tuple[str | None, int | None]:
        """Set a device's state (and the birth's fields given: model_version, model_name, agent_version,
        profile, cert_not_after, ca_not_after); returns the previous (state, model_version), (None, None)
        for a new device. ``seen_at`` None leaves last_seen alone (a retained status is old news, not a
        sign of life)."""
        allowed = {"model_version", "model_name", "agent_version", "profile", "cert_not_after", "ca_not_after"}
        if unknown := set(fields) - allowed:
            raise ValueError(f"unknown device fields {sorted(unknown)}")
        now = time.time()
        with self._tx() as db:
            new = db.execute("INSERT INTO devices (fleet, device, state, state_changed_at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (fleet, device) DO NOTHING", (fleet, device, state, now)).rowcount == 1
            previous: tuple[str | None, int | None] = (None, None)
            if not new:  # lock the row while reading it: the previous state is the one this change replaces
                row = db.execute("UPDATE devices SET state = state WHERE fleet = ? AND device = ? "
                                 "RETURNING state, model_version", (fleet, device)).fetchone()
                previous = (row[0], row[1])
                if previous[0] != state:
                    db.execute("UPDATE devices SET state = ?, state_changed_at = ? WHERE fleet = ? AND device = ?",
                               (state, now, fleet, device))
            if fields:
                assignments = ", ".join(f"{key} = ?" for key in fields)
                db.execute(f"UPDATE devices SET {assignments} WHERE fleet = ? AND device = ?",
                           (*fields.values(), fleet, device))
            if seen_at is not None:
                self._touch(fleet, device, seen_at)
        return previous

    def insert_telemetry(self, record: TelemetryRecord, received_at: float | None = None) -> int | None:
        """Store one window and return its stream's epoch (>= 1: windows order by (epoch, seq)); None (and
        nothing changed) if this (fleet, device, stream, seq) is already stored."""
        return self.insert_telemetry_many([(record, time.time() if received_at is None else received_at)])[0]

    def insert_telemetry_many(self, windows: Sequence[tuple[TelemetryRecord, float]]) -> list[int | None]:
        """`insert_telemetry` of many (window, received_at) in one INSERT: one round trip to the database
        for a batch. A key twice in ``windows``: the first is stored, the second is a duplicate."""
        if not windows:
            return []
        with self._tx() as db:
            # Rows are locked in key order, the streams a batch meets first, then its windows: two writers
            # whose batches hold the same new streams (every device's, as a fleet starts) or the same windows
            # (a redelivery) then wait on each other in one order, never in a circle. A circle is a deadlock,
            # which PostgreSQL breaks only after its deadlock_timeout (1 s), and the batch is tried again.
            first_seen: dict[tuple[str, str, str], float] = {}
            for r, at in windows:
                first_seen.setdefault((r.fleet, r.device, r.stream), at)
            stream_epochs = {key: self._epoch(db, *key, at) for key, at in sorted(first_seen.items())}
            epochs = [stream_epochs[r.fleet, r.device, r.stream] for r, _ in windows]
            rows = [(r.fleet, r.device, r.stream, epoch, r.seq, at, r.window_start, r.window_end, r.model_version, r.n,
                     r.requests, r.errors, r.rss_mb, r.p50, r.p90, r.p99, r.psi_max, int(r.alarm),
                     encode(r.sketch), encode(r.drift))
                    for (r, at), epoch in zip(windows, epochs)]
            rows.sort(key=_TELEMETRY_KEY)  # stable: of a key twice, the first still goes first
            new = {tuple(row) for row in db.insert_many(
                "INSERT INTO telemetry (fleet, device, stream, epoch, seq, received_at, window_start, window_end, "
                "model_version, n, requests, errors, rss_mb, p50, p90, p99, psi_max, alarm, sketch, drift) "
                "VALUES {rows} ON CONFLICT (fleet, device, stream, seq) DO NOTHING RETURNING fleet, device, stream, seq",
                rows)}
            result: list[int | None] = []
            for (r, at), epoch in zip(windows, epochs):
                key = (r.fleet, r.device, r.stream, r.seq)
                stored = key in new
                new.discard(key)
                result.append(epoch if stored else None)
                if stored:
                    self._touch(r.fleet, r.device, at, r.stream, epoch, r.seq)
        return result

    def insert_event(self, fleet: str, device: str, seq: int, kind: str, payload: Mapping[str, Any],
                     ts: float | None = None, received_at: float | None = None, stream: str = "") -> bool:
        """Store one device event; False if this (fleet, device, stream, seq) is already stored."""
        received_at = time.time() if received_at is None else received_at
        with self._tx() as db:
            inserted = db.execute(
                "INSERT INTO events (fleet, device, stream, seq, received_at, ts, type, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device, stream, seq) DO NOTHING",
                (fleet, device, stream, seq, received_at, ts, kind,
                 json.dumps(dict(payload), separators=(",", ":")))).rowcount == 1
            if inserted and device != FLEET_DEVICE:
                epoch = self._epoch(db, fleet, device, stream, received_at)
                self._touch(fleet, device, received_at, stream, epoch, seq)
        return inserted

    def add_fleet_event(self, fleet: str, kind: str, payload: Mapping[str, Any]) -> int:
        """A fleet-level event (device ``*``: the monitor's alarms, the autopilot's steps); returns its seq,
        the fleet's next. Two writers taking the same seq: the key keeps the first, the second takes the next."""
        now = time.time()
        body = json.dumps({"type": kind, "fleet": fleet, **payload}, separators=(",", ":"))
        with self._tx() as db:
            while True:
                row = db.execute(
                    "INSERT INTO events (fleet, device, seq, received_at, ts, type, payload) "
                    "SELECT ?, ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ? FROM events WHERE fleet = ? AND device = ? "
                    "ON CONFLICT (fleet, device, stream, seq) DO NOTHING RETURNING seq",
                    (fleet, FLEET_DEVICE, now, now, kind, body, fleet, FLEET_DEVICE)).fetchone()
                if row is not None:
                    return int(row[0])

    def evaluate_fleet_alarm(self, fleet: str, threshold: float) -> tuple[FleetShare, str | None]:
        """Recompute a fleet's drift share (`share.read_share`) and move its alarm: raise it when the share
        reaches ``threshold``, clear it when it drops below, adding the ``fleet_drift_alarm`` /
        ``fleet_drift_cleared`` event; returns the share and the move (None: none). Under the fleet's alarm
        row lock, with the share read after taking it: of several writers, the last to evaluate sees every
        commit, and a move happens once, by whichever writer sees it first. The threshold is recorded."""
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO fleet_alarms (fleet, active, share, in_alarm, reporting, threshold, changed_at) "
                       "VALUES (?, 0, 0, 0, 0, ?, ?) ON CONFLICT (fleet) DO NOTHING", (fleet, threshold, now))
            active = bool(db.execute("UPDATE fleet_alarms SET active = active WHERE fleet = ? RETURNING active",
                                     (fleet,)).fetchone()[0])
            share = read_share(db, fleet)
            change = share.change(threshold, active)
            active = active if change is None else change == FLEET_ALARM
            db.execute("UPDATE fleet_alarms SET active = ?, share = ?, in_alarm = ?, reporting = ?, threshold = ?, "
                       "changed_at = CASE WHEN active = ? THEN changed_at ELSE ? END WHERE fleet = ?",
                       (int(active), share.share, share.in_alarm, share.reporting, threshold, int(active), now, fleet))
            if change is not None:
                self.add_fleet_event(fleet, change, share.event(threshold))
        return share, change

    def record_rejected(self, topic: str, reason: str, payload: bytes) -> None:
        """Keep a malformed message's topic, reason and first 200 bytes (the last REJECTED_KEPT of them)."""
        head = payload[:200].decode("utf-8", errors="replace")
        with self._tx() as db:
            row_id = db.execute("INSERT INTO rejected (received_at, topic, reason, head) VALUES (?, ?, ?, ?) RETURNING id",
                                (time.time(), topic, reason, head)).fetchone()[0]
            db.execute("DELETE FROM rejected WHERE id <= ?", (row_id - REJECTED_KEPT,))

    def prune(self, before: float) -> int:
        """Delete telemetry received before ``before`` (monitor clock), always keeping each device's latest
        window; returns the number of windows deleted."""
        with self._tx() as db:
            return db.execute(f"DELETE FROM telemetry WHERE received_at < ? AND NOT {latest_window('telemetry', 'telemetry')}",
                              (before,)).rowcount
