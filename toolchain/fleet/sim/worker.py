"""A simulation worker: a few hundred simulated devices (`SimDevice`) in one process and one thread.

The thread alternates between the network (a `SharedLoop` over every device's MQTT socket), serving
(every `TICK_S`, the requests each device is due, as one batched onnxruntime run for all of them, then
accounted request by request in each device's agent), and closing telemetry windows (each device on
its own schedule, staggered across the window so a fleet does not report in lock step, as real devices
booted at different times do not).

Requests are a deterministic function of the seed: device `i`'s `k`-th request is sample
`pool[idx_i[k]]` (indices from the device's own seeded generator) plus the drift of the phase that
request `k` falls in (its time is `k / rate` seconds after the start). Which window a request lands in
depends on the clock; what each device serves does not.

Messages to the parent (a multiprocessing queue), each ``(kind, worker, data)``: ``ready`` (every device
connected), ``status`` (once a second), ``done`` (the result), ``failed`` (a problem the user can fix:
unreachable or refusing broker; the text says which) or ``crashed`` (a bug: the traceback).
"""

from __future__ import annotations

import heapq
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime_agent.bundle import read_bundle
from runtime_agent.model import LoadedModel
from runtime_agent.signing import load_public_key
from toolchain.fleet.sim.netloop import SharedLoop
from toolchain.fleet.sim.device import SimDevice

TICK_S = 0.1  # serving granularity: requests due are served in one batch per tick
POLL_MAX_S = 0.05
STATUS_SLICES = 5
CLOSE_CHUNK = 50  # final windows closed between two rounds of network I/O
COST_BATCH = 256  # samples timed once per model file for the per-request latency devices report


@dataclass(frozen=True)
class Stream:
    """What every device serves: a labelled pool of inputs and the drift schedule applied to it.

    ``onsets`` (seconds after the start, ascending, the first 0.0) open the phases; ``deltas[p]`` is
    added to every input of a request that falls in phase ``p`` (zeros before the first drift)."""

    x: np.ndarray
    y: np.ndarray
    onsets: np.ndarray
    deltas: np.ndarray

    def phase(self, times: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.onsets, times, side="right") - 1

    def inputs(self, indices: np.ndarray, times: np.ndarray) -> np.ndarray:
        """(devices, count) pool indices and the requests' times -> (devices * count, *input_shape) float32."""
        drifted = self.x[indices] + self.deltas[self.phase(times)][None]
        return drifted.reshape(-1, *self.x.shape[1:]).astype(np.float32, copy=False)


@dataclass(frozen=True)
class WorkerSpec:
    worker: int
    devices: tuple[tuple[int, str], ...]  # (index in the fleet, device folder)
    fleet_size: int
    bundle: str
    pubkey: str
    stream: Stream
    rate: float  # requests per second per device
    duration_s: float  # 0: until stopped
    window_s: float  # telemetry window and accuracy bucket
    seed: int
    accuracy_every: int  # windows per `accuracy` event; 0: none
    connect_timeout_s: float = 30.0
    drain_timeout_s: float = 15.0


class Failure(Exception):
    """A problem the user can fix (the broker is unreachable or refuses the devices)."""


def _median_ms(model: Any, sample: np.ndarray, other: Any = None, rounds: int = 5) -> Any:
    """Median ms of `model.predict_batch(sample)`; with `other`, both timed alternately: (model's, other's)."""
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for slot, timed in enumerate((model, other) if other is not None else (model,)):
            started = time.perf_counter()
            timed.predict_batch(sample)
            times[slot].append((time.perf_counter() - started) * 1000)
    medians = [float(np.median(t)) for t in times if t]
    return medians[0] if other is None else tuple(medians)


class Worker:
    def __init__(self, spec: WorkerSpec, reports: Any) -> None:
        self.spec, self.reports = spec, reports
        self._parent = os.getppid()
        bundle = read_bundle(Path(spec.bundle), load_public_key(Path(spec.pubkey)))
        model = LoadedModel.from_bundle(bundle, threads=1)
        self.loop = SharedLoop()
        self.woken: set = set()
        self.devices = [SimDevice(index, Path(folder), model, self.loop, self.woken, spec.seed, len(spec.stream.y))
                        for index, folder in spec.devices]
        self.served = 0  # requests served per device so far (every device is served in step)
        self.bucket_n = np.zeros(0, dtype=np.int64)  # per window_s of simulated time, all devices of this worker
        self.bucket_correct = np.zeros(0, dtype=np.int64)
        self.phase_n = np.zeros(len(spec.stream.onsets), dtype=np.int64)  # per drift phase, likewise
        self.phase_correct = np.zeros(len(spec.stream.onsets), dtype=np.int64)
        self._next_misc = 0.0
        self._queued: dict[int, int] = {}
        self._queued_turn = 0
        self._costs: dict[str, float] = {}  # per model file: ms per request (see _cost_ms)
        self._reference: Any = None  # the first model timed: later ones are timed against it

    # -- plumbing -------------------------------------------------------------------------------
    def _pump(self) -> None:
        while self.woken:
            self.woken.pop().pump()

    def _spin(self, timeout: float) -> None:
        """Network, outbox pumps, and once a second keep-alives and redials."""
        self._pump()
        self.loop.poll(min(max(timeout, 0.0), POLL_MAX_S))
        self._pump()
        now = time.time()
        if now >= self._next_misc:
            self._next_misc = now + 1.0
            self.loop.misc()
            for device in self.devices:
                device.keep_connected(now)

    def orphaned(self) -> bool:
        """The parent died without stopping us (killed): stop too, or a `--duration 0` run never ends."""
        return os.getppid() != self._parent

    def _online(self) -> int:
        return sum(device.online for device in self.devices)

    # -- phases -----------------------------------------------------------------------------------
    def connect(self, go: Any, stop: Any) -> bool:
        """Dial every device and wait until all are connected; then hold the connections until `go`."""
        now = time.time()
        for device in self.devices:
            if (reason := device.dial(now)) is not None:
                host, port = device.link.config.broker_host, device.link.config.broker_port
                raise Failure(f"cannot reach the broker at {host}:{port} ({reason})")
        deadline = now + self.spec.connect_timeout_s
        while self._online() < len(self.devices):
            if refused := next((d for d in self.devices if d.refused), None):
                raise Failure(f"the broker refused simulated device {refused.id}: {refused.refused} (a `toolchain broker` "
                              "with passwords: give --broker-dir so the simulator can add its devices' credentials)")
            if time.time() > deadline or stop.is_set():
                raise Failure(f"only {self._online()} of {len(self.devices)} simulated devices connected within "
                              f"{self.spec.connect_timeout_s:.0f} s")
            self._spin(POLL_MAX_S)
        self.reports.put(("ready", self.spec.worker, {"online": len(self.devices)}))
        while not go.is_set() and not stop.is_set() and not self.orphaned():
            self._spin(POLL_MAX_S)
        return go.is_set() and not stop.is_set()

    def run(self, t0: float, stop: Any) -> None:
        """Serve and report until the duration is over or `stop` is set."""
        spec = self.spec
        for device in self.devices:
            device.begin(t0, t0 + spec.window_s * (1 + device.index / spec.fleet_size))
        closing = [(device.next_close, device.index, device) for device in self.devices]
        heapq.heapify(closing)
        end = t0 + spec.duration_s if spec.duration_s > 0 else float("inf")
        next_serve = next_status = t0
        while not stop.is_set():
            now = time.time()
            if now >= end:
                break
            if now >= next_serve:
                self.serve(now - t0)
                next_serve = now + TICK_S
            while closing and closing[0][0] <= now:
                _, index, device = heapq.heappop(closing)
                device.close_window(now, spec.accuracy_every)
                device.next_close += device.agent.window_s  # a `config` command may have changed it
                if device.next_close <= now:  # fell behind: skip, don't burst
                    device.next_close = now + device.agent.window_s
                heapq.heappush(closing, (device.next_close, index, device))
            if now >= next_status:
                if self.orphaned():
                    break
                self.status()
                next_status = now + 1.0
            self._spin(min(next_serve, closing[0][0] if closing else end, end) - time.time())
        self.serve(min(time.time(), end) - t0)

    def serve(self, elapsed_s: float) -> None:
        """Serve every device the requests due by `elapsed_s`: one batched inference per model in use."""
        stream, rate = self.spec.stream, self.spec.rate
        due = int(elapsed_s * rate)
        count = due - self.served
        if count <= 0:
            return
        times = np.arange(self.served, due) / rate
        groups: dict[str, list[SimDevice]] = {}
        for device in self.devices:  # devices on the same model file share one batched inference, whether
            # they started with it or installed it from a push: per-request latency stays comparable, so a
            # device's probation does not judge the batching instead of the model
            groups.setdefault(device.agent.model.bundle.model_artifact["sha256"], []).append(device)
        buckets = (times // self.spec.window_s).astype(np.int64)
        phases = stream.phase(times)
        size = int(buckets[-1]) + 1
        if size > self.bucket_n.size:
            self.bucket_n = np.pad(self.bucket_n, (0, size - self.bucket_n.size))
            self.bucket_correct = np.pad(self.bucket_correct, (0, size - self.bucket_correct.size))
        for devices in groups.values():
            indices = np.stack([device.next_samples(count) for device in devices])
            batch = stream.inputs(indices, times)
            model = devices[0].agent.model
            prediction = model.predict_batch(batch)
            classes, scores = prediction.classes, prediction.logits
            per_request_ms = self._cost_ms(model, batch)
            right = classes.reshape(len(devices), count) == stream.y[indices]
            for row, device in enumerate(devices):
                rows = slice(row * count, (row + 1) * count)
                device.served(per_request_ms, batch[rows], classes[rows], int(right[row].sum()), scores[rows])
            self.bucket_n[:size] += np.bincount(buckets, minlength=size) * len(devices)
            self.bucket_correct[:size] += np.bincount(buckets, weights=right.sum(axis=0), minlength=size).astype(np.int64)
            self.phase_n += np.bincount(phases, minlength=self.phase_n.size) * len(devices)
            self.phase_correct += np.bincount(phases, weights=right.sum(axis=0), minlength=self.phase_n.size).astype(np.int64)
        self.served = due

    def _cost_ms(self, model: Any, batch: np.ndarray) -> float:
        """The latency a device reports per request: its model's cost per sample on a fixed batch. Timing
        each tick's batch instead would make a request's latency depend on how many devices share the
        batch (a device that has just installed a pushed model is alone in its batch for a moment, and its
        probation would judge that). The first model is timed alone (median of 5); a later one side by side
        with the first, interleaved, and scaled from the first's cost, so the load of the machine at that
        moment does not pass for a slower model."""
        key = model.bundle.model_artifact["sha256"]
        if key not in self._costs:
            sample = np.resize(batch, (COST_BATCH, *batch.shape[1:]))
            if not self._costs:
                self._costs[key] = _median_ms(model, sample) / COST_BATCH
                self._reference = model
            else:
                mine, reference = _median_ms(model, sample, self._reference)
                first = self._reference.bundle.model_artifact["sha256"]
                self._costs[key] = self._costs[first] * mine / reference
        return self._costs[key]

    def status(self) -> None:
        """Progress for the parent. Queue lengths are counted for a fifth of the devices per call (each is a
        query, and a burst of hundreds would hold up the network for milliseconds)."""
        start = self._queued_turn % STATUS_SLICES
        for device in self.devices[start::STATUS_SLICES]:
            self._queued[device.index] = len(device.agent.outbox)
        self._queued_turn += 1
        self.reports.put(("status", self.spec.worker, {
            "online": self._online(), "windows": sum(d.windows for d in self.devices),
            "requests": sum(d.requests for d in self.devices), "correct": sum(d.correct for d in self.devices),
            "queued": sum(self._queued.values())}))

    def shutdown(self) -> None:
        """Report the last partial window, deliver everything queued, say offline, disconnect."""
        self._spin(0)  # first send what the last windows queued, then close the final ones a chunk at a time
        for start in range(0, len(self.devices), CLOSE_CHUNK):
            now = time.time()
            for device in self.devices[start:start + CLOSE_CHUNK]:
                device.close_window(now, self.spec.accuracy_every)
            self._spin(0)
        deadline = time.time() + self.spec.drain_timeout_s
        next_check = 0.0
        while time.time() < deadline:
            self._spin(POLL_MAX_S)
            if time.time() >= next_check:
                next_check = time.time() + 0.2
                if not any(len(d.agent.outbox) for d in self.devices if d.online):
                    break
        goodbyes = [device.link.say_offline() for device in self.devices if device.online]
        deadline = time.time() + 5.0
        while time.time() < deadline and not all(info.is_published() for info in goodbyes):
            self._spin(POLL_MAX_S)
        for device in self.devices:
            device.link.client.disconnect()
        deadline = time.time() + 3.0
        while time.time() < deadline and any(d.link.client.socket() is not None for d in self.devices):
            self.loop.poll(POLL_MAX_S)

    def result(self) -> dict[str, Any]:
        devices = [device.report() for device in self.devices]
        for device in self.devices:
            device.close()
        self.loop.close()
        return {"devices": devices, "buckets": {"n": self.bucket_n.tolist(), "correct": self.bucket_correct.tolist()},
                "phases": {"n": self.phase_n.tolist(), "correct": self.phase_correct.tolist()}}


def main(spec: WorkerSpec, reports: Any, go: Any, stop: Any, start: Any) -> None:
    """Process entry point: connect, wait for the common start, simulate, shut down, send the result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which sets `stop`
    try:
        worker = Worker(spec, reports)
        if worker.connect(go, stop):
            worker.run(start.value, stop)
        worker.shutdown()
        reports.put(("done", spec.worker, worker.result()))
    except Failure as failure:
        reports.put(("failed", spec.worker, str(failure)))
    except BaseException:
        reports.put(("crashed", spec.worker, traceback.format_exc()))
