"""The push receiver keeps bounded state (runtime_agent.push_receiver): an agent that runs for years takes
thousands of pushes, and each left a record in memory and on disk; and an abandoned push kept its whole
reserved staging file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from runtime_agent.agent import Agent
from runtime_agent.config import load_agent_config
from runtime_agent.push_receiver import PushReceiver
from tests.conftest import Build, provision_device


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


def offer(receiver: PushReceiver, name: bytes, version: int, **extra) -> str:
    """Offer a two-chunk transfer of model `version` and send its first chunk only (a sender gone midway)."""
    transfer = hashlib.sha256(name).hexdigest()[:16]
    receiver.offer({"id": f"o-{transfer}", "type": "push_offer", "transfer": transfer, "bytes": 2048,
                    "sha256": hashlib.sha256(name).hexdigest(), "chunk_bytes": 1024, "chunks": 2, "version": version, **extra})
    receiver.chunk(transfer, 0, b"x" * 1024)
    return transfer


def test_unfinished_pushes_that_can_no_longer_install_free_their_space(tmp_path: Path) -> None:
    """Each offer reserves its whole size on disk; an abandoned one gives it back once a newer version is
    offered or installed, also after a restart."""
    acks: list[dict] = []
    receiver = PushReceiver(tmp_path, lambda transfer, ack: acks.append(ack), lambda item, path: None)
    old = offer(receiver, b"v2", 2)
    assert (tmp_path / f"{old}.part").stat().st_size == 2048
    new = offer(receiver, b"v3", 3)
    assert not (tmp_path / f"{old}.part").exists() and (tmp_path / f"{new}.part").exists()
    assert acks[-1]["transfer"] == old and acks[-1]["state"] == "rejected"
    assert acks[-1]["reason"] == f"superseded by the offer of v3 (transfer {new})"
    job = offer(receiver, b"job", 0, job="bench")  # a benchmark job installs nothing: it supersedes nothing
    receiver.drop_superseded(2, "v2 is installed")
    assert receiver.states() == {"rejected": 1, "receiving": 2} and (tmp_path / f"{new}.part").exists()

    acks.clear()
    again = PushReceiver(tmp_path, lambda transfer, ack: acks.append(ack), lambda item, path: None)  # a restart
    again.drop_superseded(3, "v3 is installed; a push must be newer")
    assert not (tmp_path / f"{new}.part").exists() and (tmp_path / f"{job}.part").exists()
    assert json.loads((tmp_path / f"{new}.json").read_text())["state"] == "rejected"
    assert [(a["transfer"], a["state"], a["reason"]) for a in acks] == [(new, "rejected", "v3 is installed; a push must be newer")]


def test_an_agent_frees_the_space_of_pushes_older_than_what_it_serves(default_build: Build, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", default_build, "mqtt://127.0.0.1:1")  # serves v1
    agent = Agent(load_agent_config(device))
    agent.load()
    stale = offer(agent.receiver, b"v1 again", 1)  # as a sender that was cut off before v1 installed leaves it
    staged = agent.receiver.dir / f"{stale}.part"
    assert staged.exists()
    agent.outbox.close()
    restarted = Agent(load_agent_config(device))
    restarted.load()
    assert not staged.exists() and restarted.receiver.states() == {"rejected": 1}
    restarted.outbox.close()


def test_an_unfinished_push_of_the_installed_file_ends_installed(tmp_path: Path) -> None:
    """A restart between an install's switch and its report: the transfer is the running file, not a stale one."""
    acks: list[dict] = []
    receiver = PushReceiver(tmp_path, lambda transfer, ack: acks.append(ack), lambda item, path: None)
    transfer = offer(receiver, b"v2", 2)
    receiver.drop_superseded(2, "v2 is installed; a push must be newer", installed_sha256=hashlib.sha256(b"v2").hexdigest())
    assert (acks[-1]["state"], "reason" in acks[-1]) == ("installed", False) and not (tmp_path / f"{transfer}.part").exists()
