"""The fleet store on its own (real SQLite files): outbox streams in the de-duplication key and in the
order of a device's windows, and the upgrade of a database written before streams existed."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from runtime_agent.sketch import LatencySketch
from toolchain.errors import ToolchainError
from toolchain.fleet.store import SCHEMA_VERSION, FleetStore, TelemetryRecord


def window(seq: int, stream: str = "", device: str = "dev-1", latency_ms: float = 1.0, psi: float = 0.0) -> TelemetryRecord:
    sketch = LatencySketch()
    sketch.add(latency_ms)
    drift = {"psi": {"x0": psi}, "psi_max": psi, "prediction_psi": 0.0, "ph_alarm": False, "n": 500}
    return TelemetryRecord(fleet="lab", device=device, seq=seq, window_start=100.0 + seq, window_end=101.0 + seq,
                           model_version=1, n=500, requests=1, errors=0, rss_mb=None, p50=latency_ms, p90=latency_ms,
                           p99=latency_ms, sketch=sketch.to_dict(), drift=drift, alarm=psi >= 0.25, stream=stream)


def test_a_new_stream_restarts_seq_and_is_the_newest(tmp_path: Path) -> None:
    with FleetStore(tmp_path / "fleet.sqlite") as store:
        assert [store.insert_telemetry(window(seq, "aaaa")) for seq in (1, 2, 3)] == [1, 1, 1]
        assert store.insert_telemetry(window(2, "aaaa")) is None  # a real duplicate: dropped
        # Re-flashed: a new outbox, seq from 1 again. Before streams, these were dropped as duplicates.
        assert store.insert_telemetry(window(1, "bbbb", latency_ms=9.0, psi=0.4)) == 2
        assert store.insert_telemetry(window(1, "bbbb")) is None
        assert store.insert_telemetry(window(3, "aaaa")) is None  # the old stream's duplicates still are
        assert [(w["stream"], w["seq"]) for w in store.telemetry("lab")] == [("aaaa", 1), ("aaaa", 2), ("aaaa", 3),
                                                                             ("bbbb", 1)]
        device = store.device("lab", "dev-1")
        assert (device["stream"], device["last_seq"]) == ("bbbb", 1)
        assert (device["latest"]["stream"], device["latest"]["seq"], device["latest"]["p50"]) == ("bbbb", 1, 9.0)
        assert [(w["stream"], w["seq"], w["alarm"]) for w in store.latest_windows("lab")] == [("bbbb", 1, True)]
        assert store.insert_event("lab", "dev-1", 1, "installed", {"version": 2}, stream="bbbb")
        assert not store.insert_event("lab", "dev-1", 1, "installed", {"version": 2}, stream="bbbb")
        assert store.insert_event("lab", "dev-1", 1, "installed", {"version": 1}, stream="aaaa")  # other stream
        assert store.device("lab", "dev-1")["last_seq"] == 1  # an old stream's event does not move it
        # Pruning keeps each device's latest window: the new stream's, although its seq is the lowest.
        assert store.prune(before=float("inf")) == 3
        assert [(w["stream"], w["seq"]) for w in store.telemetry("lab")] == [("bbbb", 1)]


def test_messages_without_a_stream_are_deduplicated_as_before(tmp_path: Path) -> None:
    with FleetStore(tmp_path / "fleet.sqlite") as store:
        assert store.insert_telemetry(window(5)) == 1
        assert store.insert_telemetry(window(5)) is None
        assert store.insert_telemetry(window(6)) == 1
        assert store.device("lab", "dev-1")["latest"]["seq"] == 6 and store.device("lab", "dev-1")["stream"] == ""


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE devices (fleet TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'unknown',
    model_version INTEGER, model_name TEXT, agent_version TEXT, profile TEXT, last_seen REAL, last_seq INTEGER,
    state_changed_at REAL, PRIMARY KEY (fleet, device));
CREATE TABLE telemetry (fleet TEXT NOT NULL, device TEXT NOT NULL, seq INTEGER NOT NULL, received_at REAL NOT NULL,
    window_start REAL NOT NULL, window_end REAL NOT NULL, model_version INTEGER, n INTEGER NOT NULL, requests INTEGER,
    errors INTEGER NOT NULL, rss_mb REAL, p50 REAL, p90 REAL, p99 REAL, psi_max REAL, alarm INTEGER NOT NULL,
    sketch TEXT NOT NULL, drift TEXT NOT NULL, PRIMARY KEY (fleet, device, seq));
CREATE INDEX telemetry_window_end ON telemetry (fleet, window_end);
CREATE TABLE events (fleet TEXT NOT NULL, device TEXT NOT NULL, seq INTEGER NOT NULL, received_at REAL NOT NULL,
    ts REAL, type TEXT NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (fleet, device, seq));
CREATE INDEX events_received ON events (received_at);
CREATE TABLE fleet_alarms (fleet TEXT PRIMARY KEY, active INTEGER NOT NULL, share REAL NOT NULL,
    in_alarm INTEGER NOT NULL, reporting INTEGER NOT NULL, threshold REAL NOT NULL, changed_at REAL NOT NULL);
CREATE TABLE rejected (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, head TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1'), ('client_id', 'fleet-monitor-old');
INSERT INTO devices (fleet, device, state, model_version, last_seen, last_seq) VALUES ('lab', 'dev-1', 'online', 1, 50, 8);
INSERT INTO events VALUES ('lab', 'dev-1', 8, 50, 50, 'installed', '{"type": "installed"}');
"""


def test_a_schema_1_database_is_upgraded_by_the_writer_and_refused_by_readers(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    sketch = json.dumps(LatencySketch().to_dict())
    with sqlite3.connect(db) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute("INSERT INTO telemetry VALUES ('lab', 'dev-1', 7, 40, 1, 2, 1, 0, 0, 0, NULL, NULL, NULL, NULL, "
                     "0.0, 0, ?, '{}')", (sketch,))
    conn.close()
    with pytest.raises(ToolchainError, match=r"has fleet schema 1 from an older toolchain; run `toolchain fleet monitor"):
        FleetStore(db, create=False)
    with FleetStore(db) as store:  # the monitor's store upgrades it
        assert store.client_id == "fleet-monitor-old"
        assert [(w["stream"], w["seq"]) for w in store.telemetry("lab")] == [("", 7)]
        assert store.insert_telemetry(window(7)) is None  # still a duplicate after the upgrade
        assert store.insert_event("lab", "dev-1", 8, "installed", {}) is False
        assert store.insert_telemetry(window(1, "cafe")) == 2  # a re-flashed agent's stream comes after
        device = store.device("lab", "dev-1")
        assert (device["stream"], device["last_seq"], device["latest"]["seq"]) == ("cafe", 1, 1)
    with FleetStore(db, create=False) as reader:
        assert reader.recent_events(fleet="lab")[0]["stream"] == ""
        assert reader._rows("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"] == str(SCHEMA_VERSION)


def test_a_batch_commits_together_and_a_failed_write_undoes_only_itself(tmp_path: Path) -> None:
    """The monitor stores what arrived together in one transaction; each write in it is a savepoint."""
    path = tmp_path / "fleet.sqlite"
    broken = TelemetryRecord(**{**window(1, "cccc", device="dev-bad").__dict__, "sketch": {"min": object()}})
    with FleetStore(path) as store:
        with store.batch():
            assert store.insert_telemetry(window(1, "aaaa")) == 1
            with pytest.raises(TypeError):  # fails after its stream row was written: that row is undone
                store.insert_telemetry(broken)
            assert store.insert_event("lab", "dev-2", 1, "installed", {"version": 2}, stream="bbbb")
            with FleetStore(path, create=False) as reader:  # another connection sees nothing before the commit
                assert reader.telemetry("lab") == [] and reader.devices("lab") == []
        with FleetStore(path, create=False) as reader:
            assert [(w["device"], w["seq"]) for w in reader.telemetry("lab")] == [("dev-1", 1)]
            assert [d["device"] for d in reader.devices("lab")] == ["dev-1", "dev-2"]
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT device FROM streams ORDER BY device").fetchall() == [("dev-1",), ("dev-2",)]


def test_processes_opening_a_new_database_together_all_get_it(tmp_path: Path) -> None:
    """A monitor creating the file while `fleet status` or a second writer opens it: switching to WAL takes
    the file's exclusive lock, which SQLite refuses at once ("database is locked") instead of waiting."""
    failures: list[BaseException] = []
    for attempt in range(30):
        path, start = tmp_path / f"fleet-{attempt}.sqlite", threading.Barrier(3)

        def open_it() -> None:
            start.wait()
            try:
                FleetStore(path).close()
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                failures.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
