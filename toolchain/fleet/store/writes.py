"""Everything the monitor writes: device states, telemetry windows, events, fleet alarms, rejected
messages, pruning. Each write is one transaction, or a savepoint inside `Database.batch`."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Mapping

from toolchain.fleet.store.database import Database
from toolchain.fleet.store.records import FLEET_DEVICE, REJECTED_KEPT, TelemetryRecord
from toolchain.fleet.store.schema import latest_window_rowid


class StoreWrites(Database):
    @staticmethod
    def _touch(db: sqlite3.Connection, fleet: str, device: str, seen_at: float, stream: str | None = None,
               epoch: int = 0, seq: int | None = None) -> None:
        """Note a sign of life; with a message's (stream, epoch, seq), advance the device's newest stream and
        its last seq (a message of an older stream, epoch below the device's, leaves them alone)."""
        db.execute("INSERT INTO devices (fleet, device, last_seen, last_seq, stream, epoch) VALUES (?, ?, ?, ?, ?, ?) "
                   "ON CONFLICT (fleet, device) DO UPDATE SET last_seen = MAX(COALESCE(devices.last_seen, 0), excluded.last_seen), "
                   "last_seq = CASE WHEN excluded.epoch > devices.epoch THEN excluded.last_seq "
                   "WHEN excluded.epoch = devices.epoch AND excluded.epoch > 0 "
                   "THEN MAX(COALESCE(devices.last_seq, 0), excluded.last_seq) ELSE devices.last_seq END, "
                   "stream = CASE WHEN excluded.epoch > devices.epoch THEN excluded.stream ELSE devices.stream END, "
                   "epoch = MAX(devices.epoch, excluded.epoch)",
                   (fleet, device, seen_at, seq, stream, epoch))

    @staticmethod
    def _epoch(db: sqlite3.Connection, fleet: str, device: str, stream: str, seen_at: float) -> int:
        """The stream's epoch for this device; a stream seen for the first time gets the next one."""
        row = db.execute("SELECT epoch FROM streams WHERE fleet = ? AND device = ? AND stream = ?",
                         (fleet, device, stream)).fetchone()
        if row is not None:
            return int(row[0])
        epoch = db.execute("SELECT COALESCE(MAX(epoch), 0) + 1 FROM streams WHERE fleet = ? AND device = ?",
                           (fleet, device)).fetchone()[0]
        db.execute("INSERT INTO streams (fleet, device, stream, epoch, first_seen) VALUES (?, ?, ?, ?, ?)",
                   (fleet, device, stream, epoch, seen_at))
        return int(epoch)

    def update_status(self, fleet: str, device: str, state: str, *, seen_at: float | None = None,
                      **fields: Any) -> tuple[str | None, int | None]:
        """Set a device's state (and the birth's fields given: model_version, model_name, agent_version,
        profile); returns the previous (state, model_version), (None, None) for a new device. ``seen_at``
        None leaves last_seen alone (a retained status is old news, not a sign of life)."""
        allowed = {"model_version", "model_name", "agent_version", "profile"}
        if unknown := set(fields) - allowed:
            raise ValueError(f"unknown device fields {sorted(unknown)}")
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state, model_version FROM devices WHERE fleet = ? AND device = ?",
                             (fleet, device)).fetchone()
            previous = row[0] if row else None
            if row is None:
                db.execute("INSERT INTO devices (fleet, device, state, state_changed_at) VALUES (?, ?, ?, ?)",
                           (fleet, device, state, now))
            elif previous != state:
                db.execute("UPDATE devices SET state = ?, state_changed_at = ? WHERE fleet = ? AND device = ?",
                           (state, now, fleet, device))
            if fields:
                assignments = ", ".join(f"{key} = ?" for key in fields)
                db.execute(f"UPDATE devices SET {assignments} WHERE fleet = ? AND device = ?",
                           (*fields.values(), fleet, device))
            if seen_at is not None:
                self._touch(db, fleet, device, seen_at)
        return (previous, row[1] if row else None)

    def insert_telemetry(self, record: TelemetryRecord, received_at: float | None = None) -> int | None:
        """Store one window and return its stream's epoch (>= 1: windows order by (epoch, seq)); None (and
        nothing changed) if this (fleet, device, stream, seq) is already stored."""
        received_at = time.time() if received_at is None else received_at
        with self._tx() as db:
            epoch = self._epoch(db, record.fleet, record.device, record.stream, received_at)
            inserted = db.execute(
                "INSERT OR IGNORE INTO telemetry (fleet, device, stream, epoch, seq, received_at, window_start, window_end, "
                "model_version, n, requests, errors, rss_mb, p50, p90, p99, psi_max, alarm, sketch, drift) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.fleet, record.device, record.stream, epoch, record.seq, received_at, record.window_start,
                 record.window_end, record.model_version, record.n, record.requests, record.errors, record.rss_mb,
                 record.p50, record.p90, record.p99, record.psi_max, int(record.alarm),
                 json.dumps(record.sketch, separators=(",", ":")), json.dumps(record.drift, separators=(",", ":")))).rowcount == 1
            if inserted:
                self._touch(db, record.fleet, record.device, received_at, record.stream, epoch, record.seq)
        return epoch if inserted else None

    def insert_event(self, fleet: str, device: str, seq: int, kind: str, payload: Mapping[str, Any],
                     ts: float | None = None, received_at: float | None = None, stream: str = "") -> bool:
        """Store one device event; False if this (fleet, device, stream, seq) is already stored."""
        received_at = time.time() if received_at is None else received_at
        with self._tx() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO events (fleet, device, stream, seq, received_at, ts, type, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (fleet, device, stream, seq, received_at, ts, kind,
                 json.dumps(dict(payload), separators=(",", ":")))).rowcount == 1
            if inserted and device != FLEET_DEVICE:
                epoch = self._epoch(db, fleet, device, stream, received_at)
                self._touch(db, fleet, device, received_at, stream, epoch, seq)
        return inserted

    def add_fleet_event(self, fleet: str, kind: str, payload: Mapping[str, Any]) -> int:
        """A monitor-raised fleet-level event (device ``*``); returns its seq."""
        now = time.time()
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE fleet = ? AND device = ?",
                             (fleet, FLEET_DEVICE)).fetchone()[0]
            db.execute("INSERT INTO events (fleet, device, seq, received_at, ts, type, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (fleet, FLEET_DEVICE, seq, now, now, kind,
                        json.dumps({"type": kind, "fleet": fleet, **payload}, separators=(",", ":"))))
        return seq

    def set_fleet_alarm(self, fleet: str, active: bool, share: float, in_alarm: int, reporting: int, threshold: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO fleet_alarms (fleet, active, share, in_alarm, reporting, threshold, changed_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet) DO UPDATE SET active = excluded.active, "
                       "share = excluded.share, in_alarm = excluded.in_alarm, reporting = excluded.reporting, "
                       "threshold = excluded.threshold, changed_at = excluded.changed_at",
                       (fleet, int(active), share, in_alarm, reporting, threshold, time.time()))

    def record_rejected(self, topic: str, reason: str, payload: bytes) -> None:
        """Keep a malformed message's topic, reason and first 200 bytes (the last REJECTED_KEPT of them)."""
        head = payload[:200].decode("utf-8", errors="replace")
        with self._tx() as db:
            cursor = db.execute("INSERT INTO rejected (received_at, topic, reason, head) VALUES (?, ?, ?, ?)",
                                (time.time(), topic, reason, head))
            db.execute("DELETE FROM rejected WHERE id <= ?", (cursor.lastrowid - REJECTED_KEPT,))

    def prune(self, before: float) -> int:
        """Delete telemetry received before ``before`` (monitor clock), always keeping each device's latest
        window; returns the number of windows deleted."""
        with self._tx() as db:
            return db.execute(
                f"DELETE FROM telemetry WHERE received_at < ? AND rowid != {latest_window_rowid('telemetry')}",
                (before,)).rowcount
