"""The fleet store on both of its databases, a SQLite file and a real PostgreSQL (tests/postgres.py): the
same behaviour, and what several writers sharing one database need: each window stored once, whoever
writes it, and a fleet alarm raised once."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.fleet.test_fleet_store import window
from toolchain.errors import ToolchainError
from toolchain.fleet.store import FLEET_ALARM, FLEET_DEVICE, FleetStore
from toolchain.fleet.store.local_server import PostgresServer


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh fleet database's --db: a SQLite file, or a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite")
    return request.getfixturevalue("postgres_url")


def test_streams_duplicates_events_and_pruning(target: str) -> None:
    with FleetStore(target) as store:
        assert [store.insert_telemetry(window(seq, "aaaa")) for seq in (1, 2, 3)] == [1, 1, 1]
        assert store.insert_telemetry(window(2, "aaaa")) is None
        # A batch's windows in one statement: a key twice in it is stored once, an old one not again.
        assert store.insert_telemetry_many([(window(4, "aaaa"), 5.0), (window(4, "aaaa"), 5.0), (window(3, "aaaa"), 5.0),
                                            (window(5, "aaaa", latency_ms=2), 6.0)]) == [1, None, None, 1]
        # Its columns go as typed arrays on PostgreSQL: an int in a REAL column and a NULL come back as stored.
        assert [(w["p50"], w["rss_mb"]) for w in store.telemetry("lab") if w["seq"] == 5] == [(2.0, None)]
        assert store.insert_telemetry(window(1, "bbbb", latency_ms=9.0, psi=0.4)) == 2  # re-flashed: newer
        assert store.update_status("lab", "dev-1", "online", seen_at=1.0, model_version=3) == ("unknown", None)
        assert store.update_status("lab", "dev-1", "offline") == ("online", 3)
        device = store.device("lab", "dev-1")
        assert (device["state"], device["stream"], device["latest"]["seq"], device["latest"]["p50"]) == (
            "offline", "bbbb", 1, 9.0)
        assert store.insert_event("lab", "dev-1", 4, "installed", {"version": 2}, stream="aaaa")
        assert not store.insert_event("lab", "dev-1", 4, "installed", {"version": 2}, stream="aaaa")
        store.record_rejected("edge/v1/lab/x/telemetry", "not JSON", b"\xff")
        assert store.rejected_count() == 1
        assert store.merged_latency("lab").windows == 6
        assert store.prune(before=float("inf")) == 5  # the latest window (the new stream's seq 1) stays
        assert [(w["stream"], w["seq"]) for w in store.telemetry("lab")] == [("bbbb", 1)]
        assert isinstance(store.telemetry("lab")[0]["received_at"], float)  # 8-byte times on both
    with FleetStore(target, create=False) as reader:
        assert [e["type"] for e in reader.recent_events(fleet="lab")] == ["installed"]


def test_two_writers_store_each_window_once(target: str) -> None:
    """Two connections (two monitor workers) store the same 300 windows of 20 devices at once, in
    batches, in opposite orders: every (device, stream, seq) is stored once, and together they report each
    as new exactly once. Opposite orders of the same windows can deadlock: PostgreSQL undoes one batch,
    which is tried again (as the monitor does)."""
    windows = [window(seq, "s1", device=f"dev-{d}") for d in range(20) for seq in range(1, 16)]
    new: list[int] = []

    def writer(order: list) -> None:
        with FleetStore(target) as store:
            for start in range(0, len(order), 25):
                while True:
                    try:
                        with store.batch():
                            stored = [r for r in order[start:start + 25] if store.insert_telemetry(r) is not None]
                    except store.retryable:
                        continue
                    new.extend(1 for _ in stored)
                    break

    threads = [threading.Thread(target=writer, args=(windows,)), threading.Thread(target=writer, args=(windows[::-1],))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with FleetStore(target, create=False) as store:
        stored = [(w["device"], w["stream"], w["seq"]) for w in store.telemetry("lab")]
        assert len(stored) == len(set(stored)) == len(windows) == len(new)
        assert {d["device"]: d["last_seq"] for d in store.devices("lab")} == {f"dev-{d}": 15 for d in range(20)}


def test_two_writers_batches_of_the_same_new_streams_never_deadlock(target: str) -> None:
    """Two monitor workers as a fleet starts: both batches meet the same new streams, and here the same
    windows too (a redelivery), in opposite orders, at the same moment. The store takes the rows in key
    order, so neither batch is undone as a deadlock (on PostgreSQL that costs its 1 s deadlock_timeout)."""
    conflicts: list[BaseException] = []

    def writer(store: FleetStore, batch: list, start: threading.Barrier) -> None:
        start.wait()
        while True:
            try:
                with store.batch():
                    store.insert_telemetry_many(batch)
                return
            except store.retryable as exc:
                conflicts.append(exc)

    with FleetStore(target) as first, FleetStore(target) as second:
        for round_ in range(3):
            batch = [(window(seq, f"r{round_}", device=f"dev-{d:02d}"), 1.0) for d in range(40) for seq in (1, 2, 3)]
            start = threading.Barrier(2)
            threads = [threading.Thread(target=writer, args=(first, batch, start)),
                       threading.Thread(target=writer, args=(second, batch[::-1], start))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        stored = [(w["device"], w["stream"], w["seq"]) for w in first.telemetry("lab")]
    assert conflicts == []
    assert len(stored) == len(set(stored)) == 3 * 40 * 3


def test_the_fleet_alarm_moves_once_whoever_evaluates(target: str) -> None:
    with FleetStore(target) as first, FleetStore(target) as second:
        first.insert_telemetry(window(1, "s", device="a", psi=0.5))
        second.insert_telemetry(window(1, "s", device="b"))
        assert first.evaluate_fleet_alarm("lab", 0.5)[1] == FLEET_ALARM
        share, change = second.evaluate_fleet_alarm("lab", 0.5)
        assert change is None and (share.in_alarm, share.reporting, share.devices_in_alarm) == (1, 2, ("a",))
        assert [e["type"] for e in second.recent_events(device=FLEET_DEVICE)] == [FLEET_ALARM]
        second.insert_telemetry(window(2, "s", device="a"))
        assert [first.evaluate_fleet_alarm("lab", 0.5)[1], second.evaluate_fleet_alarm("lab", 0.5)[1]] == [
            "fleet_drift_cleared", None]
        assert first.add_fleet_event("lab", "autopilot_step", {}) == 3
        assert first.fleet_alarms()["lab"]["active"] is False


def test_postgres_readers_refuse_a_database_without_the_fleet_tables(postgres_url: str) -> None:
    with pytest.raises(ToolchainError, match=r"is not a fleet database \(written by `toolchain fleet monitor`\)"):
        FleetStore(postgres_url, create=False)
    with FleetStore(postgres_url) as store:
        store._rows("UPDATE meta SET value = '99' WHERE key = 'schema_version' RETURNING value")
    with pytest.raises(ToolchainError, match="has fleet schema 99; this toolchain understands up to"):
        FleetStore(postgres_url)


def test_cli_on_postgres_and_its_one_line_errors(postgres_url: str, postgres_server: PostgresServer) -> None:
    with FleetStore(postgres_url) as store:
        store.insert_telemetry(window(1, "s"))
    result = run_cli("toolchain", "fleet", "status", "--db", postgres_url, "--json", "--since", "0", check=True)
    assert '"device": "dev-1"' in result.stdout and f'"db": "{postgres_url}"' in result.stdout
    missing = postgres_server.url("no_such_database")
    result = run_cli("toolchain", "fleet", "status", "--db", missing)
    assert result.returncode != 0 and "cannot open the fleet database" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # Without the driver (the extra not installed): one line that says what to install.
    blocked = ("import sys; sys.modules['psycopg'] = None; sys.argv = ['toolchain'] + sys.argv[1:]; "
               "from toolchain.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", blocked, "fleet", "status", "--db", postgres_url],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0 and "pip install 'edge-toolchain[postgres]'" in result.stderr
    assert "Traceback" not in result.stderr
