"""The device end of a chunked, resumable bundle transfer (docs/push-protocol.md).

Chunks land at their offset in a pre-sized staging file, in any order; the set of received indexes is
persisted beside it after each write, so an agent killed mid-transfer resumes where it was and a
duplicate chunk is harmless. When every chunk is there, the whole file's sha256 must match the offer
(checked by the installer, off the network thread) before the signed bundle itself is verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runtime_agent import durable
from runtime_agent.bundle import MAX_BUNDLE_BYTES
from runtime_agent.errors import AgentError
from runtime_agent.protocol import ACK, ACK_EVERY, FINAL_STATES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, SCHEMAS

log = logging.getLogger(__name__)
_TRANSFER = re.compile(r"^[0-9a-f]{16}$")
KEEP_FINAL = 64  # final transfers remembered (in memory and as staging records) to answer a re-offer; older go


@dataclass
class Transfer:
    transfer: str
    size: int
    sha256: str
    chunk_bytes: int
    chunks: int
    offer: dict[str, Any]
    received: set[int] = field(default_factory=set)
    state: str = "receiving"
    reason: str = ""
    since_ack: int = 0

    def ranges(self) -> list[list[int]]:
        """Received indexes as inclusive [first, last] runs (compact on the wire)."""
        runs: list[list[int]] = []
        for index in sorted(self.received):
            if runs and index == runs[-1][1] + 1:
                runs[-1][1] = index
            else:
                runs.append([index, index])
        return runs

    def ack(self) -> dict[str, Any]:
        payload = {"schema": SCHEMAS[ACK], "transfer": self.transfer, "offer": self.offer.get("id"), "received": self.ranges(),
                   "chunks": self.chunks, "state": self.state, "version": self.offer.get("version")}
        return payload | ({"reason": self.reason} if self.reason else {})


def offered_version(offer: dict[str, Any]) -> int | None:
    """The model version an offer names (advisory: the signed manifest decides); None when it names none or
    is a benchmark job's (`job`), which installs nothing."""
    version = offer.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) and "job" not in offer else None


def parse_offer(command: dict[str, Any]) -> Transfer:
    """Validate a push_offer command; the message says which field is wrong."""
    def integer(key: str, low: int, high: int) -> int:
        value = command.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise AgentError(f"push_offer: '{key}' must be an integer in [{low}, {high}], got {value!r}")
        return value

    transfer = command.get("transfer")
    if not isinstance(transfer, str) or not _TRANSFER.match(transfer):
        raise AgentError(f"push_offer: 'transfer' must be 16 lowercase hex digits, got {transfer!r}")
    sha = command.get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise AgentError("push_offer: 'sha256' must be 64 lowercase hex digits")
    size = integer("bytes", 1, MAX_BUNDLE_BYTES)
    chunk_bytes = integer("chunk_bytes", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
    chunks = integer("chunks", 1, MAX_BUNDLE_BYTES)
    if chunks != -(-size // chunk_bytes):
        raise AgentError(f"push_offer: {size} bytes in chunks of {chunk_bytes} make {-(-size // chunk_bytes)} chunks, not {chunks}")
    return Transfer(transfer=transfer, size=size, sha256=sha, chunk_bytes=chunk_bytes, chunks=chunks, offer=dict(command))


class PushReceiver:
    """Stages transfers under `staging_dir`; calls `on_complete(transfer, path)` once all chunks are there."""

    def __init__(self, staging_dir: Path, send_ack: Callable[[str, dict[str, Any]], None],
                 on_complete: Callable[[Transfer, Path], None], ack_every: int = ACK_EVERY,
                 keep_final: int = KEEP_FINAL) -> None:
        self.dir = Path(staging_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.send_ack, self.on_complete, self.ack_every, self.keep_final = send_ack, on_complete, ack_every, keep_final
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}
        with self._lock:
            self._forget_old()  # records a previous run left

    def states(self) -> dict[str, int]:
        """How many transfers this agent has seen in each state (receiving, installed, rejected, ...)."""
        with self._lock:
            return dict(Counter(item.state for item in self._transfers.values()))

    def _paths(self, transfer: str) -> tuple[Path, Path]:
        return self.dir / f"{transfer}.part", self.dir / f"{transfer}.json"

    def _read_record(self, transfer: str) -> tuple[dict[str, Any], Transfer | None]:
        """A transfer's record as a run left it on disk, and its offer parsed; ({}, None) when there is none
        (or it is not a record of ours)."""
        _, state = self._paths(transfer)
        try:
            saved = json.loads(state.read_text())
            return saved, parse_offer(saved["offer"])
        except (OSError, ValueError, KeyError, TypeError, AgentError):
            return {}, None

    def _save(self, item: Transfer) -> None:
        """Atomic, not durable: after a power cut a lost record only makes the sender re-send chunks, and a
        chunk recorded but lost fails the whole-file hash (the retry starts afresh); one fsync per chunk
        would slow every push instead."""
        _, state = self._paths(item.transfer)
        durable.write_text(state, json.dumps({"offer": item.offer, "received": item.ranges(), "state": item.state,
                                              "reason": item.reason}), durable=False)

    def _load(self, offered: Transfer) -> Transfer:
        """Resume from disk when this transfer (same id, same file) was started before a restart."""
        part, _ = self._paths(offered.transfer)
        saved, previous = self._read_record(offered.transfer)
        same = previous is not None and (previous.sha256, previous.size, previous.chunk_bytes) == \
            (offered.sha256, offered.size, offered.chunk_bytes)
        # Resume a transfer in progress; remember one that was installed; start a rejected one afresh.
        if same and (saved.get("state") == "installed" or (saved.get("state") != "rejected" and part.exists())):
            offered.received = {i for first, last in saved["received"] for i in range(first, last + 1)}
            offered.state, offered.reason = saved.get("state", "receiving"), saved.get("reason", "")
            if offered.state == "verifying":  # a restart cut the verification short: `offer` starts it again
                offered.state = "receiving"
            return offered
        try:  # the whole file's space up front: a full disk refuses the push now, not mid-transfer
            with open(part, "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, offered.size)
        except OSError as exc:
            part.unlink(missing_ok=True)
            offered.state, offered.reason = "rejected", f"cannot stage {offered.size} bytes in {self.dir}: {exc.strerror}"
            log.warning("push %s rejected: %s", offered.transfer, offered.reason)
            return offered
        self._save(offered)
        return offered

    def offer(self, command: dict[str, Any]) -> Transfer:
        offered = parse_offer(command)
        with self._lock:
            item = self._transfers.get(offered.transfer)
            if item is None or item.sha256 != offered.sha256 or item.state == "rejected":
                item = self._transfers[offered.transfer] = self._load(offered)  # a rejected one starts afresh
            item.offer = offered.offer  # acks name the offer they answer
        self.send_ack(item.transfer, item.ack())
        if (version := offered_version(item.offer)) is not None and item.state == "receiving":
            self.drop_superseded(version - 1, f"superseded by the offer of v{version} (transfer {item.transfer})")
        if item.state == "receiving" and len(item.received) == item.chunks:
            self._finish(item)  # every chunk was on disk before a restart: verify now
        return item

    def chunk(self, transfer: str, index: int, data: bytes) -> None:
        """Store one chunk; unknown transfers and out-of-range or mis-sized chunks are ignored (acks tell)."""
        with self._lock:
            item = self._transfers.get(transfer)
            if item is None or item.state != "receiving" or not 0 <= index < item.chunks:
                return
            expected = min(item.chunk_bytes, item.size - index * item.chunk_bytes)
            if len(data) != expected or index in item.received:
                return
            part, _ = self._paths(transfer)
            fd = os.open(part, os.O_WRONLY)
            try:
                os.pwrite(fd, data, index * item.chunk_bytes)
            finally:
                os.close(fd)
            item.received.add(index)
            item.since_ack += 1
            self._save(item)
            complete = len(item.received) == item.chunks
            due = item.since_ack >= self.ack_every
            if due:
                item.since_ack = 0
        if complete:
            self._finish(item)
        elif due:
            self.send_ack(transfer, item.ack())

    def _finish(self, item: Transfer) -> None:
        self.set_state(item, "verifying")
        self.on_complete(item, self._paths(item.transfer)[0])

    def check_hash(self, item: Transfer, path: Path) -> None:
        """Whole-file sha256 against the offer (called by the installer, off the network thread)."""
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != item.sha256:
            raise AgentError("sha256 of the received file does not match the offer (a chunk was tampered with or corrupted)")

    def set_state(self, item: Transfer, state: str, reason: str = "") -> None:
        """Record a state change, ack it, and drop the staging data once the transfer is final."""
        with self._lock:
            item.state, item.reason = state, reason
            self._save(item)
        self._announce(item)

    def _announce(self, item: Transfer) -> None:
        """Ack `item`'s recorded state; a final one also frees its staging file and may retire old records."""
        self.send_ack(item.transfer, item.ack())
        if item.state in FINAL_STATES:
            part, _ = self._paths(item.transfer)
            part.unlink(missing_ok=True)
            with self._lock:
                self._forget_old()

    def drop_superseded(self, version: int, reason: str, installed_sha256: str | None = None) -> None:
        """Reject every unfinished transfer whose offer names a version up to `version`, freeing its staging
        file. A push its sender abandoned (Ctrl-C, an operator host gone) otherwise keeps its whole reserved
        size on the device for ever, and its bundle would be refused as not newer if it ever came. Records
        a previous run left count too; a transfer this run is verifying is left to its installer. One of
        the file installed (`installed_sha256`: a restart came between its switch and its report) ends
        `installed` instead, as a re-offer of it would."""
        dropped = []
        with self._lock:
            for record in self.dir.glob("*.json"):
                item = self._transfers.get(record.stem)
                if item is None:  # a previous run's: unfinished whether it was receiving or being verified
                    saved, item = self._read_record(record.stem)
                    if item is None:
                        continue  # gone meanwhile, or not a record of ours
                    item.state = "receiving" if saved.get("state") == "verifying" else saved.get("state", "receiving")
                version_offered = offered_version(item.offer)
                if item.state != "receiving" or version_offered is None or version_offered > version:
                    continue
                installed = item.sha256 == installed_sha256
                item.state, item.reason = ("installed", "") if installed else ("rejected", reason)  # chunks now are ignored
                self._transfers[item.transfer] = item
                self._save(item)
                dropped.append(item)
        for item in dropped:
            log.info("push %s (v%s) %s", item.transfer, offered_version(item.offer),
                     "is the installed file" if item.state == "installed" else f"dropped: {reason}")
            self._announce(item)

    def _forget_old(self) -> None:
        """Keep the newest `keep_final` final transfers, in memory and on disk: an agent that runs for years
        takes thousands of pushes. Newest: this run's in the order they were offered, after those of earlier
        runs by their record's time (file times are too coarse to order one run's quick pushes). A
        forgotten transfer offered again starts afresh, and its bundle is then refused as installed already
        or not newer. Call under the lock."""
        order = {transfer: position for position, transfer in enumerate(self._transfers)}
        final = []
        for record in self.dir.glob("*.json"):
            item = self._transfers.get(record.stem)
            try:
                state = item.state if item is not None else json.loads(record.read_text()).get("state")
                age = (1, order[record.stem]) if item is not None else (0, record.stat().st_mtime)
            except (OSError, ValueError, AttributeError):
                continue  # gone meanwhile, or not a record of ours
            if state in FINAL_STATES:
                final.append((age, record))
        for _, record in sorted(final)[:max(0, len(final) - self.keep_final)]:
            self._transfers.pop(record.stem, None)
            record.unlink(missing_ok=True)
