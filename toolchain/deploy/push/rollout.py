"""Staged rollouts: canaries first, then waves, each stage going on only while every device of the
previous one installed (and passed probation); every decision is recorded with its reason."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push.bundle import PushBundle, verified_bundle
from toolchain.deploy.push.client import PushClient, client_for
from toolchain.deploy.push.transfer import (DEFAULT_ACK_TIMEOUT_S, DEFAULT_CHUNK_KB, DEFAULT_WINDOW, Progress, PushResult,
                                            PushSender)
from toolchain.errors import ToolchainError


@dataclass(frozen=True)
class RolloutSettings:
    """How a rollout goes: its stages, each transfer's flow control and patience, and (when the caller
    passes no connected client) the broker and login to use. `pubkey` verifies a bundle given as a path
    (default: the operator's own trusted key)."""

    canary: int = 1  # devices updated first, alone
    waves: int | Sequence[int] | None = None  # devices per wave after them (a list repeats its last size); None: all
    chunk_kb: int = DEFAULT_CHUNK_KB
    window: int = DEFAULT_WINDOW  # chunks in flight per device
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    timeout_s: float = 600.0  # per device, to transfer and install
    wait_probation: bool = True
    probation_timeout_s: float = 300.0
    broker: BrokerLogin | None = None
    pubkey: Path | Ed25519PublicKey | None = None


@dataclass
class RolloutResult:
    bundle: str
    name: str
    version: int
    transfer: str
    fleet: str
    state: str  # completed | stopped
    results: dict[str, PushResult]
    decisions: list[dict[str, Any]]
    skipped: list[str]

    @property
    def ok(self) -> bool:
        return self.state == "completed" and all(r.ok for r in self.results.values())

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "name": self.name, "version": self.version, "transfer": self.transfer,
                "fleet": self.fleet, "state": self.state, "ok": self.ok, "decisions": self.decisions,
                "skipped": self.skipped, "results": {d: r.to_dict() for d, r in self.results.items()}}


def plan_stages(devices: Sequence[str], canary: int, waves: int | Sequence[int] | None) -> list[tuple[str, list[str]]]:
    """Split devices into ("canary", ...) then ("wave 1", ...), ...; a list of wave sizes repeats its last size."""
    if canary < 0:
        raise ToolchainError(f"--canary must be 0 or more, got {canary}")
    devices = list(devices)
    stages = [("canary", devices[:canary])] if canary else []
    rest = devices[canary:]
    if waves is None or waves == 0 or waves == []:
        sizes: list[int] = [len(rest)] if rest else []
    elif isinstance(waves, int):
        sizes = [waves]
    else:
        sizes = [int(w) for w in waves]
    if any(size < 1 for size in sizes):
        raise ToolchainError(f"wave sizes must be at least 1, got {waves}")
    number, position = 0, 0
    while position < len(rest):
        size = sizes[min(number, len(sizes) - 1)]
        number += 1
        stages.append((f"wave {number}", rest[position:position + size]))
        position += size
    return stages


def rollout(bundle: Path | PushBundle, fleet: str, devices: Iterable[str], settings: RolloutSettings = RolloutSettings(), *,
            client: PushClient | None = None, progress: Progress | None = None,
            on_decision: Callable[[dict[str, Any]], None] | None = None) -> RolloutResult:
    """Canaries first, then waves; each stage's devices are pushed concurrently over one connection (`client`,
    or one made for `settings.broker`) and the rollout goes on only if every one of them installed (and passed
    probation when waiting for it). Devices of later stages never get an offer once a stage failed. Every
    decision carries its reason, and is passed to `on_decision` as it is taken."""
    devices = list(dict.fromkeys(devices))
    if not devices:
        raise ToolchainError(f"no devices to push to in fleet {fleet!r}")
    bundle = verified_bundle(bundle, settings.pubkey)
    stages = plan_stages(devices, settings.canary, settings.waves)
    decisions: list[dict[str, Any]] = []
    results: dict[str, PushResult] = {}

    def decide(stage: str, action: str, members: list[str], reason: str) -> None:
        decision = {"stage": stage, "action": action, "devices": list(members), "reason": reason, "ts": time.time()}
        decisions.append(decision)
        if on_decision:
            on_decision(decision)

    shared, owned = client_for(client, settings.broker)
    skipped: list[str] = []
    state = "completed"
    try:
        for number, (stage, members) in enumerate(stages):
            why = (f"canary: {len(members)} of {len(devices)} devices first" if stage == "canary"
                   else f"{stage}: {len(members)} device(s)" + (", the previous stage passed" if number else ""))
            decide(stage, "push", members, why)
            senders = [PushSender(bundle, device, fleet, client=shared, chunk_kb=settings.chunk_kb, window=settings.window,
                                  ack_timeout_s=settings.ack_timeout_s, wait_probation=settings.wait_probation,
                                  probation_timeout_s=settings.probation_timeout_s, progress=progress) for device in members]
            stage_results = _run_concurrently(senders, settings.timeout_s)
            results.update(stage_results)
            failed = [r for r in stage_results.values() if not r.ok]
            later = [d for _, rest in stages[number + 1:] for d in rest]
            if failed:
                state = "stopped"
                detail = "; ".join(f"{r.device} {r.summary}" for r in failed)
                decide(stage, "stop", [r.device for r in failed], f"{len(failed)} of {len(members)} failed: {detail}")
                if later:
                    skipped = later
                    decide(stage, "skip", later, f"not offered: the rollout stopped at the {stage}")
                break
            verdict = "passed probation" if settings.wait_probation else "installed"
            decide(stage, "continue" if later else "complete", members,
                   f"all {len(members)} {verdict}" + (f"; {len(later)} device(s) to go" if later else ""))
    finally:
        if owned:
            shared.close()
    return RolloutResult(bundle=str(bundle.path), name=bundle.name, version=bundle.version, transfer=bundle.transfer,
                         fleet=fleet, state=state, results=results, decisions=decisions, skipped=skipped)


def _run_concurrently(senders: list[PushSender], timeout_s: float) -> dict[str, PushResult]:
    results: dict[str, PushResult] = {}
    errors: list[BaseException] = []

    def one(sender: PushSender) -> None:
        try:
            results[sender.device] = sender.run(timeout_s)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(s,), name=f"push-{s.device}", daemon=True) for s in senders]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        for sender in senders:
            sender.cancel()
        raise
    if errors:
        raise errors[0]
    return {s.device: results[s.device] for s in senders}
