"""Properties that a byte fuzzer cannot state: what must come out, not only "no crash" (a flipped bundle
byte: tests/agent/test_bundle.py; any delivery of a rotation chain: tests/agent/test_keyring.py).

Hypothesis, derandomized (the same examples every run): the push receiver rebuilds exactly the offered
file from chunks in any order, duplicated, interleaved with junk and across an agent restart."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime_agent.push_receiver import PushReceiver

CHUNK = 1024


def offer(data: bytes, transfer: str) -> dict:
    return {"schema": "cmd/1", "id": f"{transfer}-offer-1", "type": "push_offer", "transfer": transfer,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunk_bytes": CHUNK,
            "chunks": -(-len(data) // CHUNK), "version": 2}


@settings(max_examples=60, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 6 * CHUNK), order=st.randoms(use_true_random=False),
       extra=st.lists(st.tuples(st.integers(-2, 8), st.integers(0, 2 * CHUNK)), max_size=6),
       restart_at=st.integers(0, 12))
def test_chunks_in_any_order_with_junk_and_a_restart_rebuild_the_file(tmp_path: Path, size: int, order, extra,
                                                                      restart_at: int) -> None:
    data = bytes((i * 31 + size) % 251 for i in range(size))
    transfer = hashlib.sha256(data).hexdigest()[:16]
    chunks = [(i, data[i * CHUNK:(i + 1) * CHUNK]) for i in range(-(-size // CHUNK))]
    deliveries = chunks * 2 + [(index, bytes(length)) for index, length in extra]  # duplicates and junk
    order.shuffle(deliveries)
    completed: list[Path] = []
    staging = Path(tempfile.mkdtemp(dir=tmp_path))  # tmp_path is shared by the examples: one folder each

    def receiver() -> PushReceiver:
        new = PushReceiver(staging, lambda transfer, ack: None, lambda item, path: completed.append(path))
        new.offer(offer(data, transfer))
        return new

    current = receiver()
    for n, (index, chunk) in enumerate(deliveries):
        if n == restart_at:
            current = receiver()  # the agent restarted: the staged chunks and their record are on disk
        if index < 0 or index >= len(chunks) or len(chunk) != len(chunks[index][1]) or chunk == chunks[index][1]:
            current.chunk(transfer, index, chunk)  # junk of a wrong index or size is ignored; right chunks land
    assert completed and completed[-1].read_bytes() == data

