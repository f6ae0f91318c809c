"""Time models on a board itself: a signed benchmark job sent to its agent over the push channel.

The job is a signed archive like a bundle (`runtime_agent.bench_job` is the device's half): the model
files, the input shapes, runs, warm-up, threads and the pacing duty. It travels as a push transfer with
`"job": "bench"` in the offer (resumable, flow-controlled, the same acks); the device verifies it with
its keyring, times each model in its own runtime beside serving, answers with a `bench_result` event
(p50/p90/p99, RSS, errors per model) and closes the transfer with the state `done`.

Results are stored as one JSON file per job under `device_bench_dir()/PROFILE/`, named by device and
time: a build (`--measure-on`) and `toolchain calibrate --from-device` read them back by the board's
profile id, and a file needs no fleet monitor or database running (the fleet store holds telemetry
of served traffic, which a benchmark job is not).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtime_agent.bench_job import JOB_KIND
from runtime_agent.bundle import write_signed
from runtime_agent.protocol import EVENTS, device_topic
from runtime_agent.signing import PRIVATE_KEY_NAME, default_key_dir, key_id, load_private_key
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push.bundle import PushBundle
from toolchain.deploy.push.client import Listener, PushClient, borrowed_client
from toolchain.deploy.push.discovery import fleet_of_devices
from toolchain.deploy.push.transfer import PushSender
from toolchain.errors import ToolchainError
from toolchain.targets.hostprobe import cache_dir, write_json_atomic

RESULT_EVENT = "bench_result"
JOB_VALID_S = 3600.0  # how long a job stays valid: the device refuses it after that, and a second time at all
RESULT_WAIT_S = 30.0  # after `done`: the event leaves the device's outbox within a second or so


@dataclass(frozen=True)
class JobSettings:
    """How the device times each model. `threads` None: the agent's own `[serve] threads`; `duty`: the
    share of wall time the job may compute (it sleeps the rest, so serving is not starved)."""

    runs: int = 200
    warmup: int = 10
    threads: int | None = None
    duty: float = 0.5
    seed: int = 0


def device_bench_dir() -> Path:
    """Where device results are stored: `$EDGE_TOOLCHAIN_DEVICE_BENCH`, else `<cache>/device-bench`."""
    override = os.environ.get("EDGE_TOOLCHAIN_DEVICE_BENCH")
    return Path(override).expanduser() if override else cache_dir() / "device-bench"


def signing_key(path: Path | None) -> Ed25519PrivateKey:
    """The operator's signing key (default: the one builds sign with); devices trust its public half."""
    path = path or default_key_dir() / PRIVATE_KEY_NAME
    if not Path(path).is_file():
        raise ToolchainError(f"signing key {path} does not exist; pass --key (devices must trust its public half)")
    return load_private_key(Path(path))


def write_job(models: dict[str, Path], settings: JobSettings, key: Ed25519PrivateKey, out: Path, device: str,
              inputs: dict[str, dict[str, list[int]]] | None = None, valid_s: float = JOB_VALID_S) -> Path:
    """The signed job archive for one device, valid for `valid_s`. `models`: name -> .onnx/.tflite file;
    `inputs`: per model name, {input: full shape}; an input not named is fed at the model's own shape, free
    dims as 1. A fresh id makes every job a new transfer (the device would answer a repeated one with its
    earlier state) and lets the device refuse a replay (runtime_agent.bench_job.JobLedger)."""
    files, artifacts = {}, []
    for index, (name, path) in enumerate(models.items()):
        path = Path(path)
        model_format = {".onnx": "onnx", ".tflite": "tflite"}.get(path.suffix)
        if model_format is None:
            raise ToolchainError(f"{path}: a benchmark job times .onnx or .tflite files")
        member = f"m{index}{path.suffix}"
        data = path.read_bytes()
        files[member] = data
        artifacts.append({"path": member, "name": name, "format": model_format, "role": "bench",
                          "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                          "inputs": (inputs or {}).get(name, {})})
    created = datetime.now(timezone.utc)
    manifest = {"kind": JOB_KIND, "id": uuid.uuid4().hex, "created": created.isoformat(), "device": device,
                "expires": round(created.timestamp() + valid_s, 3), "key_id": key_id(key.public_key()),
                "artifacts": artifacts, **{k: v for k, v in asdict(settings).items() if v is not None}}
    return write_signed(out, manifest, files, key)


class _ResultListener(Listener):
    """Catches the device's `bench_result` event for one transfer."""

    def __init__(self, fleet: str, device: str, transfer: str) -> None:
        self.filters = (device_topic(fleet, device, EVENTS),)
        self.transfer = transfer
        self.result: dict[str, Any] | None = None
        self.arrived = threading.Event()

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if isinstance(event, dict) and event.get("type") == RESULT_EVENT and event.get("transfer") == self.transfer:
            self.result = event
            self.arrived.set()


def bench_on_device(models: dict[str, Path], device: str, broker: PushClient | BrokerLogin | str, *,
                    fleet: str | None = None, key: Path | None = None, settings: JobSettings = JobSettings(),
                    inputs: dict[str, dict[str, list[int]]] | None = None, timeout_s: float = 600.0,
                    results_dir: Path | None = None) -> dict[str, Any]:
    """Write and sign a job, send it, wait for the device's answer and store it (the returned dict's
    `stored` is the file). A refused job is a ToolchainError with the device's reason."""
    private = signing_key(key)
    with tempfile.TemporaryDirectory(prefix="toolchain-device-bench-") as scratch, borrowed_client(broker) as client:
        job = write_job(models, settings, private, Path(scratch) / "job.bench", device, inputs,
                        valid_s=max(timeout_s, JOB_VALID_S))
        result = send_job(job, device, client, fleet, timeout_s)
    result["settings"] = asdict(settings)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    stored = (results_dir or device_bench_dir()) / str(result["profile"]) / f"{device}-{stamp}-{result['transfer']}.json"
    write_json_atomic(stored, result)
    return {**result, "stored": str(stored)}


def device_timer(device: str, broker: BrokerLogin, fleet: str | None, key: Path | None, profile_id: str,
                 settings: JobSettings = JobSettings()) -> Callable[[dict[str, Path]], dict[str, Any]]:
    """What a build times its candidates with (`--measure-on`): one job per call, refused unless the device
    reports the profile the build is for (a board of another kind would gate on the wrong numbers)."""
    def timer(models: dict[str, Path]) -> dict[str, Any]:
        result = bench_on_device(models, device, broker, fleet=fleet, key=key, settings=settings)
        if result["profile"] != profile_id:
            raise ToolchainError(f"device {device} is a {result['profile']!r} board; this build is for {profile_id!r}")
        return result
    return timer


def send_job(path: Path, device: str, client: PushClient, fleet: str | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
    """Push a job archive as it is (signed or not: the device judges) and return the device's answer."""
    data = Path(path).read_bytes()
    job = PushBundle(path=Path(path), data=data, sha256=hashlib.sha256(data).hexdigest(), name="bench-job", version=0,
                     target="", job="bench")
    fleet = fleet_of_devices(client, [device], fleet)
    listener = _ResultListener(fleet, device, job.transfer)
    client.add_listener(listener)
    try:
        started = time.monotonic()
        pushed = PushSender(job, device, fleet, client=client).run(timeout_s)
        if pushed.state == "rejected":
            raise ToolchainError(f"device {device} refused the benchmark job: {pushed.reason}")
        if pushed.state != "done":
            raise ToolchainError(f"benchmark job on device {device}: {pushed.state}: {pushed.reason}")
        if not listener.arrived.wait(RESULT_WAIT_S):
            raise ToolchainError(f"device {device} finished the benchmark job but its result did not arrive "
                                 f"within {RESULT_WAIT_S:.0f} s")
    finally:
        client.remove_listener(listener)
    event = listener.result or {}
    return {"device": device, "fleet": fleet, "profile": event.get("profile"), "transfer": job.transfer,
            "seconds": round(time.monotonic() - started, 3), "device_seconds": event.get("seconds"), "ts": event.get("ts"),
            "models": {row["name"]: row for row in event.get("models", [])}}


def device_errors(result: dict[str, Any]) -> dict[str, str]:
    """Models the device could not time, with its reason."""
    return {name: row["error"] for name, row in result["models"].items() if row.get("error")}
