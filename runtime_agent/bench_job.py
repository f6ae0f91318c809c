"""Benchmark jobs: time model files on this device, in its own runtime and settings, without installing them.

A job arrives over the push channel like a bundle (a `push_offer` with `"job": "bench"`, docs/push-protocol.md
"Benchmark jobs") and is the same kind of signed archive: `manifest.json` (`"kind": "bench-job"`), its
ed25519 signature by a key of the device's keyring, and the model files with their sha256. Nothing in it
is loaded before the signature and every hash check out, and a bundle's signature cannot be replayed as a
job (nor a job's as a bundle): each manifest must name its own kind.

Jobs cross a broker that other clients may read, so a signed job must not be worth replaying: it names the
one device it is for (`device`) and when it stops being valid (`expires`, unix seconds; the toolchain gives
an hour), and the device keeps the ids of the jobs it ran until they expire (`JobLedger`, a file in the
device folder that survives restarts): a job for another device, an expired one or one already run is
refused with the reason, before anything is timed.

Serving goes on while a job runs, so the job is paced: it computes in bursts of about `BURST_S` (20 ms),
then sleeps long enough that it computes at most `duty` of the wall time (default 0.5); after each pause
one untimed run re-warms the caches, so neither the pause nor a cold first run is in any timing. One job
runs at a time. Each model is opened exactly as a served model is (`runtime_agent.model.open_session`: the
serving bundle's providers, the agent's `[serve] spin_us` and its `[serve] threads` unless the job names a
thread count), fed seeded random inputs of the job's shapes, warmed up, then timed run by run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime_agent import durable
from runtime_agent.bundle import check_artifacts, read_signed
from runtime_agent.config import SPIN_US
from runtime_agent.errors import AgentError
from runtime_agent.keyring import Keyring
from runtime_agent.model import open_session
from runtime_agent.process import rss_mb

JOB_KIND = "bench-job"
MAX_MODELS = 64
MAX_RUNS = 100_000
MAX_INPUT_VALUES = 1 << 26  # per input: what a job may make the device allocate
FORMATS = ("onnx", "tflite")
LEDGER_SIZE = 1024  # job ids remembered at most (the oldest to expire go first)
CLOCK_SKEW_S = 300.0  # a job's expiry is honoured this long after it, for a device clock running behind
BURST_S = 0.02  # compute this long back to back, then pause: short enough for serving, long enough to stay warm
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
           "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class BenchJob:
    """A verified job: what to time and how."""

    id: str
    expires: float  # unix seconds
    models: list[dict[str, Any]]  # the manifest's artifacts: path, format, name, inputs ({input: shape})
    files: dict[str, bytes]
    runs: int
    warmup: int
    threads: int | None  # None: the agent's own [serve] threads
    duty: float
    seed: int


def _number(manifest: dict[str, Any], key: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = manifest.get(key, default)
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or not low <= value <= high:
        raise AgentError(f"benchmark job: '{key}' must be a {kind.__name__} in [{low}, {high}], got {value!r}")
    return value


def read_job(path: Path, keyring: Keyring, device_id: str, now: float | None = None) -> BenchJob:
    """Verify a job archive (signature by a trusted key, every file's hash), that it is meant for this device
    and still valid, and check its fields."""
    manifest, members = read_signed(path, keyring)
    if not isinstance(manifest, dict) or manifest.get("kind") != JOB_KIND:
        raise AgentError(f"benchmark job: the signed manifest is not a benchmark job (its kind is not {JOB_KIND!r})")
    job_id, device, expires = manifest.get("id"), manifest.get("device"), manifest.get("expires")
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= 64:
        raise AgentError("benchmark job: 'id' must be a string of 1 to 64 characters")
    if device != device_id:
        raise AgentError(f"benchmark job: made for device {str(device)[:64]!r}, this is {device_id!r}; "
                         "make a job for this device (toolchain bench --device)")
    if not isinstance(expires, (int, float)) or isinstance(expires, bool) or not math.isfinite(expires):
        raise AgentError("benchmark job: 'expires' (unix seconds) is missing; make the job with this toolchain's `bench`")
    if (now if now is not None else time.time()) > expires + CLOCK_SKEW_S:
        raise AgentError(f"benchmark job {job_id} expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(expires))}; "
                         "make a new one (or check this device's clock)")
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, list) or not 1 <= len(artifacts) <= MAX_MODELS:
        raise AgentError(f"benchmark job: 'artifacts' must list 1 to {MAX_MODELS} models")
    for artifact in artifacts:
        if not isinstance(artifact, dict) or artifact.get("format") not in FORMATS or not isinstance(artifact.get("inputs"), dict) \
                or not all(isinstance(artifact.get(key), kind) for key, kind in (("path", str), ("sha256", str), ("bytes", int))):
            raise AgentError(f"benchmark job: model {str(artifact)[:200]} needs path, sha256, bytes, a format in {FORMATS} "
                             "and 'inputs' {name: shape}")
        for name, shape in artifact["inputs"].items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape) \
                    or math.prod(shape) > MAX_INPUT_VALUES:
                raise AgentError(f"benchmark job: input {name!r} of {artifact.get('path')!r} needs a shape of positive "
                                 f"sizes holding at most {MAX_INPUT_VALUES} values, got {str(shape)[:100]}")
    check_artifacts(manifest, members, path)
    return BenchJob(id=job_id, expires=float(expires), models=artifacts, files=members,
                    runs=_number(manifest, "runs", int, 1, MAX_RUNS, 200), warmup=_number(manifest, "warmup", int, 0, MAX_RUNS, 10),
                    threads=_number(manifest, "threads", int, 0, 256, None), duty=float(_number(manifest, "duty", float, 0.01, 1.0, 0.5)),
                    seed=_number(manifest, "seed", int, 0, 1 << 31, 0))


class JobLedger:
    """The benchmark jobs this device has run, by id, each kept until its expiry has passed (then a replay
    is refused as expired anyway); at most `LEDGER_SIZE`. Stored in one JSON file ({id: expires}) replaced
    durably, so a restart does not reopen the door to a replay. The file is the state (no lock here): the
    agent admits one job at a time (`Agent.bench` holds its bench lock)."""

    def __init__(self, path: Path, size: int = LEDGER_SIZE) -> None:
        self.path, self.size = path, size

    def _read(self) -> dict[str, float]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: the expiry check still bounds a replay
        if not isinstance(entries, dict):
            return {}
        return {k: float(v) for k, v in entries.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def admit(self, job: BenchJob, now: float | None = None) -> None:
        """Record the job as run, or refuse it (AgentError) when it already ran here."""
        now = now if now is not None else time.time()
        entries = self._read()
        if job.id in entries:
            raise AgentError(f"benchmark job {job.id} already ran on this device: a replayed job is refused; "
                             "make a new one")
        entries = {k: v for k, v in entries.items() if v + CLOCK_SKEW_S >= now}
        entries[job.id] = job.expires
        kept = sorted(entries.items(), key=lambda item: item[1])[-self.size:]
        durable.write_text(self.path, json.dumps(dict(kept)))


def sample_feeds(session: Any, shapes: dict[str, list[int]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded random inputs: the job's shape for each input it names, else the model's (free dims as 1)."""
    feeds = {}
    for spec in session.get_inputs():
        shape = shapes.get(spec.name) or [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = _DTYPES.get(spec.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def time_model(job: BenchJob, artifact: dict[str, Any], providers: Sequence[str], threads: int,
               spin_us: int = SPIN_US) -> dict[str, Any]:
    """One model's p50/p90/p99 (ms), load time and memory; a model that cannot load or run gets `error`."""
    threads = job.threads if job.threads is not None else threads
    row: dict[str, Any] = {"name": artifact.get("name", artifact["path"]), "path": artifact["path"],
                           "format": artifact["format"], "threads": threads, "runs": 0}
    before = rss_mb()
    started = time.perf_counter()
    try:
        session = open_session(artifact["format"], job.files[artifact["path"]], artifact["path"], providers, threads, spin_us)
        row["load_ms"] = round((time.perf_counter() - started) * 1000, 3)
        feeds = sample_feeds(session, artifact["inputs"], np.random.default_rng(job.seed))
        latencies, busy = [], 0.0
        for index in range(job.warmup + job.runs):
            began = time.perf_counter()
            session.run(None, feeds)
            took = time.perf_counter() - began
            if index >= job.warmup:
                latencies.append(took * 1000)
            busy += took
            if busy >= BURST_S and job.duty < 1:  # pacing: serving keeps the rest of the CPU
                time.sleep(busy * (1 - job.duty) / job.duty)
                began = time.perf_counter()
                session.run(None, feeds)  # untimed: re-warm what the pause let go cold
                busy = time.perf_counter() - began
    except Exception as exc:  # a bad model is this model's error, not the job's
        row["error"] = f"{type(exc).__name__}: {exc}"[:512]
        return row
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    row.update(runs=len(latencies), p50_ms=round(float(p50), 4), p90_ms=round(float(p90), 4), p99_ms=round(float(p99), 4),
               mean_ms=round(float(np.mean(latencies)), 4), rss_mb=round(rss_mb(), 2),
               model_rss_mb=round(rss_mb() - before, 2))
    return row


def run_job(job: BenchJob, providers: Sequence[str], threads: int, spin_us: int = SPIN_US) -> dict[str, Any]:
    """Every model of the job, one after the other; what the `bench_result` event carries."""
    started = time.perf_counter()
    models = [time_model(job, artifact, providers, threads, spin_us) for artifact in job.models]
    return {"job": job.id, "models": models, "runs": job.runs, "warmup": job.warmup, "duty": job.duty,
            "seconds": round(time.perf_counter() - started, 3)}
