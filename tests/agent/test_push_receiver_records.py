"""The push receiver remembers a bounded number of finished transfers (runtime_agent.push_receiver):
an agent that runs for years takes thousands of pushes, and each left a record in memory and on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from runtime_agent.push_receiver import PushReceiver


def push(receiver: PushReceiver, data: bytes) -> str:
    """Offer and send `data` in one chunk (the receiver's installer then ends the transfer)."""
    transfer = hashlib.sha256(data).hexdigest()[:16]
    receiver.offer({"id": f"o-{transfer}", "type": "push_offer", "transfer": transfer, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "chunk_bytes": 1024, "chunks": 1})
    receiver.chunk(transfer, 0, data)
    return transfer


def test_only_the_newest_finished_transfers_are_remembered(tmp_path: Path) -> None:
    acks: list[dict] = []
    receiver = PushReceiver(tmp_path, lambda transfer, ack: acks.append(ack),
                            lambda item, path: receiver.set_state(item, "installed"), keep_final=3)
    transfers = [push(receiver, bytes([n]) * 100) for n in range(5)]
    receiving = hashlib.sha256(b"open" * 50).hexdigest()[:16]
    receiver.offer({"id": "o-open", "type": "push_offer", "transfer": receiving, "bytes": 2048,
                    "sha256": hashlib.sha256(b"open").hexdigest(), "chunk_bytes": 1024, "chunks": 2})
    assert receiver.states() == {"installed": 3, "receiving": 1}  # one in progress is never forgotten
    assert {p.stem for p in tmp_path.glob("*.json")} == {*transfers[2:], receiving}
    assert [a["state"] for a in acks if a["transfer"] == transfers[0]][-1] == "installed"

    for age, transfer in enumerate(transfers[2:]):  # records of a past run are ordered by their time (the
        os.utime(tmp_path / f"{transfer}.json", (1_000_000 + age, 1_000_000 + age))  # filesystem's is coarse)
    again = PushReceiver(tmp_path, lambda transfer, ack: None, lambda item, path: None, keep_final=2)  # a restart
    assert {p.stem for p in tmp_path.glob("*.json")} == {*transfers[3:], receiving}
    assert json.loads((tmp_path / f"{transfers[4]}.json").read_text())["state"] == "installed"
    assert again.states() == {}  # records are read back when a transfer is offered again
