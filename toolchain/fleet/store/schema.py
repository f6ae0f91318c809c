"""The fleet database's schema: what every device reported, and the migrations from older versions of
it. The same tables, keys and migrations on SQLite (one file, WAL) and PostgreSQL: the DDL is written
in SQLite's types and `backend.PostgresBackend.ddl` maps them (8-byte INTEGER and REAL, an identity key).

Tables
------
``devices``    one row per (fleet, device): ``state`` (online | offline | unknown: never seen a status),
               the model and agent the birth announced, ``last_seen`` (the monitor's clock when the
               device's last fresh message arrived), ``stream``/``epoch`` (its newest outbox stream) and
               ``last_seq`` (highest seq received on that stream); ``cert_not_after``/``ca_not_after``
               (Unix seconds: when the device's client certificate and its CA expire, from its birth).
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
"""

from __future__ import annotations

SCHEMA_VERSION = 3  # 2: outbox streams (the de-duplication key gained the stream); 3: certificate expiry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'unknown',
    model_version INTEGER, model_name TEXT, agent_version TEXT, profile TEXT,
    last_seen REAL, last_seq INTEGER, state_changed_at REAL, stream TEXT, epoch INTEGER NOT NULL DEFAULT 0,
    cert_not_after REAL, ca_not_after REAL,
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
# Schema 2 -> 3: the devices' certificate expiry, unknown (NULL) until each device's next birth.
_MIGRATE_FROM_2 = """
ALTER TABLE devices ADD COLUMN cert_not_after REAL;
ALTER TABLE devices ADD COLUMN ca_not_after REAL;
UPDATE meta SET value = '3' WHERE key = 'schema_version';
"""
_MIGRATIONS = {1: _MIGRATE_FROM_1, 2: _MIGRATE_FROM_2}


def latest_window(outer: str, window: str = "t") -> str:
    """SQL: ``window`` (a telemetry row) is the latest window (newest stream, then highest seq) of
    ``outer``'s device. (epoch, seq) is unique per device (an epoch is one stream); a row value, not
    SQLite's rowid, so that PostgreSQL runs it too."""
    return (f"({window}.epoch, {window}.seq) = (SELECT m.epoch, m.seq FROM telemetry m WHERE m.fleet = {outer}.fleet "
            f"AND m.device = {outer}.device ORDER BY m.epoch DESC, m.seq DESC LIMIT 1)")
