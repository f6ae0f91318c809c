"""The durable outbox: seq survives restarts and kill -9, order, ack, the bound, status coalescing."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime_agent.errors import AgentError
from runtime_agent.outbox import Message, Outbox, OutboxError

TELEMETRY, EVENTS, STATUS = "edge/v1/lab/dev-1/telemetry", "edge/v1/lab/dev-1/events", "edge/v1/lab/dev-1/status"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "device" / "outbox.sqlite"  # the folder does not exist yet: the outbox makes it


def seqs(box: Outbox) -> list[int]:
    return [m.seq for m in box.pending(1_000_000)]


def test_seq_rises_is_in_the_payload_and_survives_reopening(db: Path) -> None:
    box = Outbox(db)
    payload = {"schema": "telemetry/1", "n": 3}
    assert box.put(TELEMETRY, payload, kind="telemetry") == 1
    assert payload["seq"] == 1  # the caller sees the seq it got
    assert box.put(EVENTS, {"type": "installed"}, kind="event") == 2
    [first, second] = box.pending(10)
    assert json.loads(first.payload) == {"schema": "telemetry/1", "n": 3, "seq": 1, "stream": box.stream}
    assert first == Message(1, TELEMETRY, first.payload, 1, False, "telemetry")
    assert second.kind == "event" and json.loads(second.payload)["seq"] == 2
    box.ack(1)
    box.ack(2)
    box.close()
    box.close()  # idempotent

    with Outbox(db) as again:
        assert len(again) == 0 and again.last_seq == 2
        assert again.put(TELEMETRY, {}, kind="telemetry") == 3  # never reuses a seq, even when all were acked


def test_a_new_file_is_a_new_stream_and_a_file_keeps_its_stream(db: Path, tmp_path: Path) -> None:
    # A re-flashed device gets a fresh outbox whose seq restarts at 1: only the stream tells its messages
    # apart from the old file's (the monitor de-duplicates on device, stream and seq).
    with Outbox(db) as box:
        stream = box.stream
        assert len(stream) == 16 and int(stream, 16) >= 0
        assert box.put(TELEMETRY, {}, kind="telemetry") == 1
    with Outbox(db) as box:
        assert box.stream == stream  # reopening (an agent restart) keeps it
        payload: dict = {}
        box.put(EVENTS, payload, kind="event")
        assert payload == {"seq": 2, "stream": stream}
    db.unlink()
    with Outbox(db) as fresh:
        assert fresh.put(TELEMETRY, {}, kind="telemetry") == 1
        assert fresh.stream != stream
        assert json.loads(fresh.pending(1)[0].payload)["stream"] == fresh.stream


def test_a_file_from_before_streams_gets_one_once(db: Path) -> None:
    with Outbox(db) as box:
        box.put(TELEMETRY, {}, kind="telemetry")
    with sqlite3.connect(db) as conn:  # what an older agent left: no stream in meta
        conn.execute("DELETE FROM meta WHERE key = 'stream'")
    conn.close()
    with Outbox(db) as box:
        stream = box.stream
        assert box.put(TELEMETRY, {}, kind="telemetry") == 2  # the seq goes on
    with Outbox(db) as box:
        assert box.stream == stream


def test_pending_is_oldest_first_across_kinds_and_ack_removes(db: Path) -> None:
    with Outbox(db) as box:
        kinds = ["telemetry", "event", "telemetry", "status", "event", "telemetry"]
        topics = {"telemetry": TELEMETRY, "event": EVENTS, "status": STATUS}
        for i, kind in enumerate(kinds):
            box.put(topics[kind], {"i": i}, kind=kind, retain=kind == "status")
        assert len(box) == 6
        assert [m.seq for m in box.pending(4)] == [1, 2, 3, 4]
        assert [json.loads(m.payload)["i"] for m in box.pending(100)] == list(range(6))
        assert [m.retain for m in box.pending(100)] == [False, False, False, True, False, False]
        assert box.pending(0) == []
        assert box.ack(3) is True and box.ack(3) is False  # idempotent
        assert box.ack(999) is False
        assert seqs(box) == [1, 2, 4, 5, 6] and len(box) == 5  # acks out of order are fine
        for seq in seqs(box):
            box.ack(seq)
        assert len(box) == 0 and box.pending(10) == []


def test_full_queue_drops_oldest_telemetry_and_counts_it(db: Path) -> None:
    with Outbox(db, max_messages=5) as box:
        box.put(EVENTS, {"type": "installed"}, kind="event")            # 1
        for _ in range(4):
            box.put(TELEMETRY, {}, kind="telemetry")                    # 2..5
        assert len(box) == 5 and box.dropped_telemetry == 0
        box.put(TELEMETRY, {}, kind="telemetry")                        # 6 -> drops 2
        box.put(EVENTS, {"type": "drift_alarm"}, kind="event")          # 7 -> drops 3
        assert seqs(box) == [1, 4, 5, 6, 7] and box.dropped_telemetry == 2
    with Outbox(db, max_messages=5) as box:
        assert box.dropped_telemetry == 2  # persisted
        assert box.put(TELEMETRY, {}, kind="telemetry") == 8            # drops 4
        assert seqs(box) == [1, 5, 6, 7, 8] and box.dropped_telemetry == 3


def test_events_are_never_dropped_even_beyond_the_bound(db: Path) -> None:
    with Outbox(db, max_messages=3) as box:
        for i in range(5):
            box.put(EVENTS, {"i": i}, kind="event")
        assert seqs(box) == [1, 2, 3, 4, 5] and box.dropped_telemetry == 0  # over the bound, on purpose
        # A telemetry window cannot fit: it is the oldest (only) telemetry, so it is the one dropped.
        assert box.put(TELEMETRY, {}, kind="telemetry") == 6
        assert seqs(box) == [1, 2, 3, 4, 5] and box.dropped_telemetry == 1
        box.put(STATUS, {"state": "online"}, kind="status", retain=True)  # status is not dropped either
        assert seqs(box) == [1, 2, 3, 4, 5, 7]
        for seq in (1, 2, 3, 4):
            box.ack(seq)
        box.put(TELEMETRY, {}, kind="telemetry")
        assert seqs(box) == [5, 7, 8] and box.dropped_telemetry == 1


def test_only_the_newest_unsent_status_per_topic_is_kept(db: Path) -> None:
    other_status = "edge/v1/lab/dev-2/status"
    with Outbox(db) as box:
        box.put(STATUS, {"state": "online", "model_version": 1}, kind="status", retain=True)  # 1
        box.put(TELEMETRY, {}, kind="telemetry")                                            # 2
        box.put(other_status, {"state": "online"}, kind="status", retain=True)              # 3
        box.put(STATUS, {"state": "online", "model_version": 2}, kind="status", retain=True)  # 4 replaces 1
        pending = box.pending(10)
        assert [m.seq for m in pending] == [2, 3, 4]
        assert json.loads(pending[2].payload)["model_version"] == 2 and pending[2].retain
        box.ack(4)  # sent: a later status is a new message, nothing to coalesce with
        box.put(STATUS, {"state": "online", "model_version": 3}, kind="status", retain=True)  # 5
        assert seqs(box) == [2, 3, 5]
        box.ack(1)  # an ack for a status that was coalesced away is harmless
        assert seqs(box) == [2, 3, 5]


def test_bad_input_writes_nothing(db: Path) -> None:
    with Outbox(db) as box:
        box.put(TELEMETRY, {}, kind="telemetry")
        payload = {"value": object()}
        with pytest.raises(TypeError, match="not JSON serializable"):
            box.put(TELEMETRY, payload, kind="telemetry")
        assert "seq" not in payload and "stream" not in payload  # left as it was
        resent = {"value": object(), "seq": 7, "stream": "old"}
        with pytest.raises(TypeError, match="not JSON serializable"):
            box.put(TELEMETRY, resent, kind="telemetry")
        assert resent["seq"] == 7 and resent["stream"] == "old"
        with pytest.raises(ValueError, match="kind must be one of telemetry, event, status; got 'log'"):
            box.put(TELEMETRY, {}, kind="log")
        with pytest.raises(ValueError, match="qos must be 0, 1 or 2"):
            box.put(TELEMETRY, {}, kind="telemetry", qos=3)
        assert box.last_seq == 1 and seqs(box) == [1]
        assert box.put(TELEMETRY, {}, kind="telemetry") == 2  # no seq was burnt by the failures
    with pytest.raises(ValueError, match="max_messages"):
        Outbox(db, max_messages=0)


def test_closed_or_foreign_files_give_clear_errors(db: Path, tmp_path: Path) -> None:
    box = Outbox(db)
    box.close()
    with pytest.raises(OutboxError, match="is closed"):
        box.put(TELEMETRY, {}, kind="telemetry")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AgentError, match="not a usable outbox database: .*; move it aside to start with an empty queue"):
        Outbox(junk)  # the agent refuses to start on it: the line says how to get going


def test_wal_mode_with_full_synchronous(db: Path) -> None:
    with Outbox(db) as box:
        assert box._db().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync on every commit
        box.put(TELEMETRY, {}, kind="telemetry")
        other = sqlite3.connect(db)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("SELECT count(*) FROM messages").fetchone()[0] == 1  # committed, visible
        finally:
            other.close()


def test_concurrent_producers_and_an_acking_consumer(db: Path) -> None:
    box = Outbox(db)
    got: list[list[int]] = [[] for _ in range(4)]
    acked: list[int] = []
    done = threading.Event()

    def produce(slot: int) -> None:
        for i in range(100):
            got[slot].append(box.put(TELEMETRY if i % 3 else EVENTS, {"slot": slot}, kind="telemetry" if i % 3 else "event"))

    def consume() -> None:
        while True:
            finished = done.is_set()
            batch = box.pending(16)
            assert [m.seq for m in batch] == sorted(m.seq for m in batch)
            for message in batch:
                assert json.loads(message.payload)["seq"] == message.seq
                box.ack(message.seq)
                acked.append(message.seq)
            if finished and not batch:
                return

    consumer = threading.Thread(target=consume)
    producers = [threading.Thread(target=produce, args=(slot,)) for slot in range(4)]
    consumer.start()
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    done.set()
    consumer.join()
    assert all(mine == sorted(mine) for mine in got)  # each producer sees its seqs rise
    assert sorted(s for mine in got for s in mine) == list(range(1, 401))  # unique, no gaps
    assert acked == sorted(acked) and sorted(acked) == list(range(1, 401))  # delivered in seq order
    assert len(box) == 0 and box.last_seq == 400
    box.close()


CHILD = """
import sys
from pathlib import Path
from runtime_agent.outbox import Outbox
box = Outbox(Path(sys.argv[1]), max_messages=1_000_000)
i = 0
while True:
    kind = "event" if i % 4 == 0 else "telemetry"
    seq = box.put("edge/v1/lab/dev-1/" + ("events" if kind == "event" else "telemetry"), {"i": i, "pad": "x" * 300}, kind=kind)
    print(seq, flush=True)  # only after put() returned: this seq is committed
    i += 1
"""


def run_and_kill(db: Path, after: int) -> list[int]:
    """Start a writer, SIGKILL it once it has reported `after` commits; every seq it reported."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reported: list[int] = []
    try:
        while len(reported) < after:
            line = child.stdout.readline()
            assert line.endswith(b"\n"), child.stderr.read().decode()
            reported.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    rest = child.stdout.read()  # committed and printed after we stopped reading
    reported += [int(line) for line in rest.split(b"\n")[:-1]]  # complete lines only
    child.stdout.close()
    child.stderr.close()
    return reported


def test_kill_9_never_loses_a_committed_message(db: Path) -> None:
    expected_next = 1
    for after in (150, 40, 300):  # three crashes; each restart continues the same file
        reported = run_and_kill(db, after)
        assert len(reported) >= after
        assert reported == list(range(expected_next, expected_next + len(reported))), "rising, no gaps"
        with Outbox(db) as box:
            stored = box.pending(1_000_000)
            stored_seqs = [m.seq for m in stored]
            # Everything reported is there; at most one more got committed before the print that died with it.
            assert box.last_seq in (reported[-1], reported[-1] + 1)
            assert stored_seqs == list(range(1, box.last_seq + 1))  # nothing lost, nothing torn
            assert set(reported) <= set(stored_seqs)
            assert all(json.loads(m.payload)["seq"] == m.seq for m in stored)
            assert box.put(EVENTS, {"type": "restarted"}, kind="event") == box.last_seq == stored_seqs[-1] + 1
            expected_next = box.last_seq + 1
