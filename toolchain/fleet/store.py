"""The fleet monitor's database: one SQLite file (WAL) with what every device reported.

Tables
------
``devices``    one row per (fleet, device): ``state`` (online | offline | unknown: never seen a status),
               the model and agent the birth announced, ``last_seen`` (the monitor's clock when the
               device's last fresh message arrived), ``stream``/``epoch`` (its newest outbox stream) and
               ``last_seq`` (highest seq received on that stream).
``streams``    one row per (fleet, device, stream): the ``epoch`` (1, 2, ... per device, in order of first
               sight) that orders a device's streams. A stream is one outbox file of the agent: its seq
               restarts at 1 when a device is re-flashed (``toolchain flash --force``), so seq alone
               cannot say which of two windows is newer, or which is a duplicate.
``telemetry``  one row per telemetry window, ``PRIMARY KEY (fleet, device, stream, seq)``: inserting a
               seq that is already there is a no-op. That is the de-duplication: the agent delivers at
               least once (it re-sends everything unacknowledged after a reconnect), so duplicates are
               normal. Messages of agents older than the stream id have the stream ``''``.
               The latency sketch and the drift report are kept as JSON; ``p50/p90/p99``, ``psi_max`` and
               ``alarm`` are columns for quick tables.
``events``     one row per event, same key. Fleet-level events raised by the monitor itself use the
               device ``*`` (never a valid device id) and the monitor's own counter as seq.
``fleet_alarms`` the fleet drift alarm's current state per fleet (so a restarted monitor neither
               forgets an active alarm nor raises it twice).
``rejected``   the last malformed messages (topic, reason, the first bytes), for diagnosis.
``meta``       schema version and the monitor's stable MQTT client id.

Times: ``window_start``/``window_end`` are the device's clock (when the window was measured);
``received_at``/``last_seen`` are the monitor's. Time ranges in the queries select on ``window_end``.

Which window is a device's *latest*: the highest seq of its newest stream (highest epoch); seqs rise
per stream and survive agent restarts, device clocks can be wrong. A window is *in alarm* by the agent's own rule
(`runtime_agent.drift.alarm`): Page-Hinkley fired, or ``psi_max`` / ``prediction_psi`` >= 0.25 on a window of
at least ``MIN_PSI_SAMPLES`` samples (a PSI of a few dozen samples is noise; see runtime_agent/drift.py).

One connection, guarded by a lock, so the monitor's network thread and readers in other threads can
share one store; other processes (`toolchain fleet status`) read concurrently thanks to WAL.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from runtime_agent.drift import MIN_PSI_SAMPLES, alarm
from runtime_agent.sketch import LatencySketch
from toolchain.errors import ToolchainError

SCHEMA_VERSION = 2  # 2: outbox streams (the de-duplication key gained the stream)
FLEET_DEVICE = "*"
"""Device column of fleet-level events (a device id is [A-Za-z0-9_-], so it can never collide)."""
ONLINE, OFFLINE, UNKNOWN = "online", "offline", "unknown"
REJECTED_KEPT = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'unknown',
    model_version INTEGER, model_name TEXT, agent_version TEXT, profile TEXT,
    last_seen REAL, last_seq INTEGER, state_changed_at REAL, stream TEXT, epoch INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (fleet, device));
CREATE TABLE IF NOT EXISTS streams (
    fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL, epoch INTEGER NOT NULL, first_seen REAL NOT NULL,
    PRIMARY KEY (fleet, device, stream));
CREATE TABLE IF NOT EXISTS telemetry (
    fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL DEFAULT '', epoch INTEGER NOT NULL DEFAULT 1,
    seq INTEGER NOT NULL, received_at REAL NOT NULL,
    window_start REAL NOT NULL, window_end REAL NOT NULL, model_version INTEGER,
    n INTEGER NOT NULL, requests INTEGER, errors INTEGER NOT NULL, rss_mb REAL,
    p50 REAL, p90 REAL, p99 REAL, psi_max REAL, alarm INTEGER NOT NULL,
    sketch TEXT NOT NULL, drift TEXT NOT NULL,
    PRIMARY KEY (fleet, device, stream, seq));
CREATE INDEX IF NOT EXISTS telemetry_window_end ON telemetry (fleet, window_end);
CREATE INDEX IF NOT EXISTS telemetry_order ON telemetry (fleet, device, epoch, seq);
CREATE TABLE IF NOT EXISTS events (
    fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL DEFAULT '', seq INTEGER NOT NULL,
    received_at REAL NOT NULL, ts REAL, type TEXT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (fleet, device, stream, seq));
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
CREATE TABLE IF NOT EXISTS fleet_alarms (
    fleet TEXT PRIMARY KEY, active INTEGER NOT NULL, share REAL NOT NULL, in_alarm INTEGER NOT NULL,
    reporting INTEGER NOT NULL, threshold REAL NOT NULL, changed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, head TEXT NOT NULL);
"""

# Schema 1 -> 2: the telemetry and events keys gain the stream, so both tables are rebuilt; every stored
# message becomes stream '' (what a pre-stream agent sends), epoch 1.
_MIGRATE_FROM_1 = """
DROP INDEX IF EXISTS telemetry_window_end;
DROP INDEX IF EXISTS events_received;
ALTER TABLE telemetry RENAME TO telemetry_v1;
ALTER TABLE events RENAME TO events_v1;
ALTER TABLE devices ADD COLUMN stream TEXT;
ALTER TABLE devices ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
""" + _SCHEMA + """
INSERT INTO telemetry (fleet, device, seq, received_at, window_start, window_end, model_version, n, requests, errors,
    rss_mb, p50, p90, p99, psi_max, alarm, sketch, drift)
    SELECT fleet, device, seq, received_at, window_start, window_end, model_version, n, requests, errors,
    rss_mb, p50, p90, p99, psi_max, alarm, sketch, drift FROM telemetry_v1;
INSERT INTO events (fleet, device, seq, received_at, ts, type, payload)
    SELECT fleet, device, seq, received_at, ts, type, payload FROM events_v1;
INSERT INTO streams (fleet, device, stream, epoch, first_seen)
    SELECT fleet, device, '', 1, MIN(received_at) FROM (SELECT fleet, device, received_at FROM telemetry_v1
    UNION ALL SELECT fleet, device, received_at FROM events_v1 WHERE device != '*') GROUP BY fleet, device;
UPDATE devices SET stream = '', epoch = 1 WHERE last_seq IS NOT NULL;
DROP TABLE telemetry_v1;
DROP TABLE events_v1;
UPDATE meta SET value = '2' WHERE key = 'schema_version';
"""
_MIGRATIONS = {1: _MIGRATE_FROM_1}


def _fleet_version_order(item: tuple[tuple[str, int | None], Any]) -> tuple[str, bool, int]:
    """Sort key of ``{(fleet, model_version): ...}`` items: by fleet, then version (unknown last)."""
    (fleet, version), _ = item
    return fleet, version is None, version or 0


def _latest_rowid(outer: str) -> str:
    """SQL for the rowid of the latest window (newest stream, then highest seq) of ``outer``'s device."""
    return (f"(SELECT m.rowid FROM telemetry m WHERE m.fleet = {outer}.fleet AND m.device = {outer}.device "
            "ORDER BY m.epoch DESC, m.seq DESC LIMIT 1)")


def window_alarm(drift: Mapping[str, Any], n: int, min_samples: int = MIN_PSI_SAMPLES) -> bool:
    """Whether one window's drift report is in alarm: the agent's rule (`runtime_agent.drift.alarm`).

    ``n`` (the window's samples) is used when the drift report does not carry its own ``n``.
    """
    if not drift:
        return False
    return alarm({**drift, "n": drift.get("n", n)}, min_samples=min_samples)


@dataclass(frozen=True)
class TelemetryRecord:
    """One validated telemetry window, as stored."""

    fleet: str
    device: str
    seq: int
    window_start: float
    window_end: float
    model_version: int | None
    n: int
    requests: int | None
    errors: int
    rss_mb: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    sketch: dict[str, Any]
    drift: dict[str, Any]
    alarm: bool
    stream: str = ""  # the agent's outbox stream ('' from agents older than the stream id)

    @property
    def psi_max(self) -> float | None:
        value = self.drift.get("psi_max")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class MergedLatency:
    """A merged latency sketch with what went into it."""

    sketch: LatencySketch
    windows: int  # telemetry windows merged
    skipped: int  # windows whose sketch has another bucket layout (cannot merge exactly): left out

    def summary(self) -> dict[str, Any]:
        return {"windows": self.windows, "count": self.sketch.count, **self.sketch.summary(),
                **({"skipped": self.skipped} if self.skipped else {})}


def merge_sketches(sketch_dicts: Iterable[Mapping[str, Any]]) -> MergedLatency:
    """Exact merge (`LatencySketch.merge`) of stored sketches in the default layout; others are skipped."""
    merged, windows, skipped = LatencySketch(), 0, 0
    for data in sketch_dicts:
        sketch = LatencySketch.from_dict(data)
        if sketch.relative_accuracy != merged.relative_accuracy or sketch.min_value != merged.min_value:
            skipped += 1
            continue
        merged.merge(sketch)
        windows += 1
    return MergedLatency(merged, windows, skipped)


class FleetStore:
    """The fleet database. ``create=False`` refuses a missing file (readers must not create one)."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ToolchainError(f"no fleet database at {self.path}; start `toolchain fleet monitor --db {self.path}` first")
        if self.path.is_dir():
            raise ToolchainError(f"{self.path} is a folder, not a fleet database file")
        self._lock = threading.RLock()
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise ToolchainError(f"cannot open the fleet database {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ToolchainError(f"{self.path}: cannot switch the fleet database to WAL mode (got {mode!r})")
            # NORMAL in WAL: a committed window survives a crash of the monitor; a power cut may lose the
            # last few, which the persistent MQTT session does not re-send (they were acknowledged).
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn: sqlite3.Connection | None = conn
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:
                raise ToolchainError(f"{self.path} is not a fleet database (written by `toolchain fleet monitor`)")
            if create:
                self._init_schema()
            else:
                self._check_readable()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ToolchainError(f"{self.path} is not a usable fleet database: {exc}") from None
        except BaseException:
            conn.close()
            raise

    # -- plumbing --------------------------------------------------------------------------------
    def _schema_version(self) -> int | None:
        """The file's schema version; None for a new (empty) file."""
        conn = self._db()
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else int(row[0])

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise ToolchainError(f"{self.path} has fleet schema {version}; this toolchain understands up to "
                                 f"{SCHEMA_VERSION} (upgrade the toolchain)")

    def _check_readable(self) -> None:
        """Readers neither create nor upgrade: a file the monitor has not upgraded yet is an error."""
        version = self._schema_version()
        if version is None:
            raise ToolchainError(f"{self.path} is not a fleet database (written by `toolchain fleet monitor`)")
        self._refuse_newer(version)
        if version < SCHEMA_VERSION:
            raise ToolchainError(f"{self.path} has fleet schema {version} from an older toolchain; run "
                                 f"`toolchain fleet monitor --db {self.path}` once to upgrade it")

    def _init_schema(self) -> None:
        with self._lock:
            conn = self._db()
            version = self._schema_version()
            if version is not None:
                self._refuse_newer(version)
            while version is not None and version < SCHEMA_VERSION:
                # One transaction per step (executescript runs the BEGIN/COMMIT inside the script).
                try:
                    conn.executescript(f"BEGIN IMMEDIATE;\n{_MIGRATIONS[version]}\nCOMMIT;")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                version = self._schema_version()
            conn.executescript(_SCHEMA)
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('client_id', ?)",
                           (f"fleet-monitor-{secrets.token_hex(6)}",))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write: its own transaction, or inside `batch` a savepoint (a failed write undoes only itself)."""
        with self._lock:
            conn = self._db()
            nested = conn.in_transaction
            conn.execute("SAVEPOINT write" if nested else "BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO write" if nested else "ROLLBACK")
                if nested:
                    conn.execute("RELEASE write")
                raise
            conn.execute("RELEASE write" if nested else "COMMIT")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes, one commit. Why: the monitor stores what arrived together in one transaction; a
        commit per message costs about twice the insert itself and writes the shared pages (device rows,
        index pages) into the WAL again for every message. Other threads' reads wait until the commit."""
        with self._tx():
            yield

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ToolchainError(f"fleet database {self.path} is closed")
        return self._conn

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db().execute(sql, tuple(params))
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "FleetStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client_id(self) -> str:
        """A stable MQTT client id for the monitor of this database (made once, kept in ``meta``)."""
        return self._rows("SELECT value FROM meta WHERE key = 'client_id'")[0]["value"]

    # -- writes ----------------------------------------------------------------------------------
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
                f"DELETE FROM telemetry WHERE received_at < ? AND rowid != {_latest_rowid('telemetry')}",
                (before,)).rowcount

    # -- queries ---------------------------------------------------------------------------------
    def fleets(self) -> list[str]:
        return [r["fleet"] for r in self._rows("SELECT DISTINCT fleet FROM devices ORDER BY fleet")]

    def device(self, fleet: str, device: str) -> dict[str, Any] | None:
        rows = [r for r in self.devices(fleet) if r["device"] == device]
        return rows[0] if rows else None

    def devices(self, fleet: str | None = None) -> list[dict[str, Any]]:
        """The device table, each row with its latest telemetry window (``latest``: None before the first)."""
        where, params = ("WHERE d.fleet = ?", (fleet,)) if fleet else ("", ())
        rows = self._rows(
            "SELECT d.fleet, d.device, d.state, d.model_version, d.model_name, d.agent_version, d.profile, d.last_seen, "
            "d.last_seq, d.stream, d.state_changed_at, t.seq AS w_seq, t.stream AS w_stream, t.epoch AS w_epoch, t.window_start AS w_start, t.window_end AS w_end, "
            "t.model_version AS w_model_version, t.n AS w_n, t.requests AS w_requests, t.errors AS w_errors, "
            "t.rss_mb AS w_rss_mb, t.p50 AS w_p50, t.p90 AS w_p90, t.p99 AS w_p99, t.psi_max AS w_psi_max, t.alarm AS w_alarm "
            "FROM devices d LEFT JOIN telemetry t ON t.fleet = d.fleet AND t.device = d.device AND t.rowid = "
            f"{_latest_rowid('d')} "
            f"{where} ORDER BY d.fleet, d.device", params)
        result = []
        for row in rows:
            latest = {key[2:]: row.pop(key) for key in list(row) if key.startswith("w_")}
            if latest["seq"] is None:
                latest = None
            else:
                latest["window"] = [latest.pop("start"), latest.pop("end")]
                latest["alarm"] = bool(latest["alarm"])
            result.append({**row, "latest": latest})
        return result

    def telemetry(self, fleet: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        """Stored windows (sketch and drift decoded), per device oldest first (by stream epoch, then seq)."""
        clauses, params = [], []
        for column, value in (("fleet", fleet), ("device", device)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(f"SELECT * FROM telemetry {where} ORDER BY fleet, device, epoch, seq", params)
        for row in rows:
            row["sketch"], row["drift"], row["alarm"] = json.loads(row["sketch"]), json.loads(row["drift"]), bool(row["alarm"])
        return rows

    def _sketch_rows(self, fleet: str | None, model_version: int | None, device: str | None,
                     since: float | None, until: float | None, columns: str = "sketch") -> list[dict[str, Any]]:
        clauses, params = [], []
        for clause, value in (("fleet = ?", fleet), ("model_version = ?", model_version), ("device = ?", device),
                              ("window_end >= ?", since), ("window_end <= ?", until)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return self._rows(f"SELECT {columns} FROM telemetry {where}", params)

    def merged_latency(self, fleet: str | None = None, model_version: int | None = None, device: str | None = None,
                       since: float | None = None, until: float | None = None) -> MergedLatency:
        """Exact merge of every stored window's sketch matching the filters (window_end in [since, until])."""
        rows = self._sketch_rows(fleet, model_version, device, since, until)
        return merge_sketches(json.loads(row["sketch"]) for row in rows)

    def merged_sketch(self, fleet: str | None = None, model_version: int | None = None, device: str | None = None,
                      since: float | None = None, until: float | None = None) -> LatencySketch:
        """`merged_latency(...)`'s sketch: p50/p90/p99 of the union of the windows, exactly as one device would."""
        return self.merged_latency(fleet, model_version, device, since, until).sketch

    def latency_by_model(self, fleet: str | None = None, since: float | None = None,
                         until: float | None = None) -> list[dict[str, Any]]:
        """Per (fleet, model_version): windows, count and p50/p90/p99 of the merged sketch."""
        groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
        for row in self._sketch_rows(fleet, None, None, since, until, "fleet, model_version, sketch"):
            groups.setdefault((row["fleet"], row["model_version"]), []).append(json.loads(row["sketch"]))
        return [{"fleet": f, "model_version": v, **merge_sketches(s).summary()}
                for (f, v), s in sorted(groups.items(), key=_fleet_version_order)]

    def latency_by_fleet(self, since: float | None = None, until: float | None = None) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in self._sketch_rows(None, None, None, since, until, "fleet, sketch"):
            groups.setdefault(row["fleet"], []).append(json.loads(row["sketch"]))
        return {fleet: merge_sketches(sketches).summary() for fleet, sketches in sorted(groups.items())}

    def latency_series(self, since: float, until: float, buckets: int = 60,
                       fleet: str | None = None) -> dict[str, Any]:
        """Latency over time per (fleet, model_version), for a chart: the windows with window_end from
        ``since`` on, their span up to ``until`` (from the first of them, so a young fleet is not squeezed
        into one corner; past ``until`` if a device clock runs ahead, rather than losing its windows) cut
        into ``buckets`` equal slices; per slice with data, the exact merge of its windows' sketches (``t``:
        the slice's end), not an average of device percentiles.

        Returns ``{"start", "end", "series": [{fleet, model_version, points: [{t, windows, count, p50, p90,
        p99}]}]}``."""
        if not until > since or buckets < 1:
            raise ValueError(f"need until > since and buckets >= 1, got [{since}, {until}] and {buckets}")
        rows = self._sketch_rows(fleet, None, None, since, None, "fleet, model_version, window_end, sketch")
        until = max([until, *(row["window_end"] for row in rows)])
        start = min(min((row["window_end"] for row in rows), default=since), until - 1.0)  # at least 1 s wide
        width = (until - start) / buckets
        groups: dict[tuple[str, int | None], dict[int, list[dict[str, Any]]]] = {}
        for row in rows:
            index = min(buckets - 1, int((row["window_end"] - start) / width))
            slices = groups.setdefault((row["fleet"], row["model_version"]), {})
            slices.setdefault(index, []).append(json.loads(row["sketch"]))
        series = []
        for (name, version), slices in sorted(groups.items(), key=_fleet_version_order):
            points = [{"t": start + (index + 1) * width, **merge_sketches(sketches).summary()}
                      for index, sketches in sorted(slices.items())]
            series.append({"fleet": name, "model_version": version, "points": points})
        return {"start": start, "end": until, "series": series}

    def latest_windows(self, fleet: str | None = None, include_offline: bool = False) -> list[dict[str, Any]]:
        """Each device's latest window (newest stream, highest seq) with the device's state; offline devices left out
        unless asked (their last window is stale)."""
        where = ["1"]
        params: list[Any] = []
        if fleet:
            where.append("t.fleet = ?")
            params.append(fleet)
        if not include_offline:
            where.append("d.state != 'offline'")
        rows = self._rows(
            "SELECT t.fleet, t.device, t.stream, t.epoch, t.seq, t.n, t.alarm, t.psi_max, t.drift, d.state FROM telemetry t "
            "JOIN devices d ON d.fleet = t.fleet AND d.device = t.device "
            f"WHERE t.rowid = {_latest_rowid('t')} "
            f"AND {' AND '.join(where)} ORDER BY t.fleet, t.device", params)
        for row in rows:
            row["drift"], row["alarm"] = json.loads(row["drift"]), bool(row["alarm"])
        return rows

    def fleet_drift(self, fleet: str, include_offline: bool = False, min_samples: int = MIN_PSI_SAMPLES) -> dict[str, Any]:
        """The fleet's drift now, from each reporting device's latest window.

        ``reporting``: devices with a window (and not offline, unless ``include_offline``); ``in_alarm``,
        ``share`` (= in_alarm / reporting, 0.0 with none) and ``devices_in_alarm`` use the stored per-window
        alarm. ``psi``: per feature, ``mean``/``max`` PSI across the devices whose latest window has at least
        ``min_samples`` samples (smaller windows' PSI is noise), and how many ``devices`` that is.
        ``alarm_active``/``threshold``: the monitor's fleet alarm state, if a monitor ran.
        """
        windows = self.latest_windows(fleet, include_offline)
        in_alarm = [w["device"] for w in windows if w["alarm"]]
        per_feature: dict[str, list[float]] = {}
        for window in windows:
            drift = window["drift"]
            if int(drift.get("n", window["n"]) or 0) < min_samples:
                continue
            for feature, value in (drift.get("psi") or {}).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    per_feature.setdefault(feature, []).append(float(value))
        heat = {feature: {"mean": sum(values) / len(values), "max": max(values), "devices": len(values)}
                for feature, values in per_feature.items()}
        state = self._rows("SELECT active, threshold FROM fleet_alarms WHERE fleet = ?", (fleet,))
        return {"fleet": fleet, "reporting": len(windows), "in_alarm": len(in_alarm),
                "share": len(in_alarm) / len(windows) if windows else 0.0, "devices_in_alarm": in_alarm,
                "psi": dict(sorted(heat.items(), key=lambda kv: -kv[1]["mean"])),
                "alarm_active": bool(state[0]["active"]) if state else False,
                "threshold": state[0]["threshold"] if state else None}

    def fleet_alarms(self) -> dict[str, dict[str, Any]]:
        return {row.pop("fleet"): {**row, "active": bool(row["active"])}
                for row in self._rows("SELECT * FROM fleet_alarms ORDER BY fleet")}

    def recent_events(self, limit: int = 20, fleet: str | None = None, device: str | None = None,
                      kind: str | None = None, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Newest first (by arrival); ``payload`` decoded. ``kinds``: any of these types (e.g. the rollout
        events a dashboard lists)."""
        clauses, params = [], []
        for clause, value in (("fleet = ?", fleet), ("device = ?", device), ("type = ?", kind)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if kinds is not None:
            kinds = list(kinds)
            clauses.append(f"type IN ({', '.join('?' * len(kinds))})" if kinds else "0")
            params.extend(kinds)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(f"SELECT * FROM events {where} ORDER BY received_at DESC, seq DESC LIMIT ?", [*params, int(limit)])
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        return rows

    def rejected(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._rows("SELECT received_at, topic, reason, head FROM rejected ORDER BY id DESC LIMIT ?", (int(limit),))

    def rejected_count(self) -> int:
        """Malformed messages recorded (all time: the AUTOINCREMENT counter survives the trimming)."""
        rows = self._rows("SELECT seq FROM sqlite_sequence WHERE name = 'rejected'")
        return int(rows[0]["seq"]) if rows else 0
