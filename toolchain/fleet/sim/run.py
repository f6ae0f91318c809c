"""Run simulation workers: spawn them, start them together, show progress, collect their results.

Workers are *spawned* (not forked): each builds its own onnxruntime session and MQTT sockets, and a
forked copy of the parent's threads and locks would be a hazard. They connect first; only when every
device of every worker is connected does the parent set the common start time, so drift onsets and
windows mean the same moment in every process. Ctrl-C (or the end of the duration) stops them cleanly:
each reports its last window, delivers what its devices queued, says offline and sends its result.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from toolchain.errors import ToolchainError
from toolchain.fleet.sim import worker as simworker
from toolchain.fleet.sim.worker import WorkerSpec

START_MARGIN_S = 0.2  # between "go" and the start time, so every worker sees the start in its future
JOIN_TIMEOUT_S = 60.0


class _Workers:
    """The worker processes and the channels to them."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        self.reports = context.Queue()
        self.go, self.stop = context.Event(), context.Event()
        self.start = context.Value("d", 0.0)
        self.processes = [context.Process(target=simworker.main, args=(spec, self.reports, self.go, self.stop, self.start),
                                          name=f"fleet-sim-{spec.worker}", daemon=True) for spec in specs]
        for process in self.processes:
            process.start()
        self.status: dict[int, dict[str, Any]] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.ready: set[int] = set()

    def receive(self, timeout: float) -> None:
        """Handle one message (or none within `timeout`); raise for a worker that failed or died."""
        try:
            kind, worker, data = self.reports.get(timeout=timeout)
        except queue.Empty:
            dead = [p for i, p in enumerate(self.processes) if p.exitcode is not None and i not in self.results]
            if dead:
                raise RuntimeError(f"simulation worker {dead[0].name} exited with code {dead[0].exitcode} without a result")
            return
        if kind == "failed":
            raise ToolchainError(data)
        if kind == "crashed":
            raise RuntimeError(f"simulation worker {worker} failed:\n{data}")
        if kind == "ready":
            self.ready.add(worker)
        elif kind == "status":
            self.status[worker] = data
        elif kind == "done":
            self.results[worker] = data

    def begin(self) -> float:
        t0 = time.time() + START_MARGIN_S
        self.start.value = t0
        self.go.set()
        return t0

    def close(self) -> None:
        self.stop.set()
        for process in self.processes:
            process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(5)


def _describe(workers: _Workers, devices: int) -> str:
    status = list(workers.status.values())
    online = sum(s["online"] for s in status)
    windows = sum(s["windows"] for s in status)
    requests = sum(s["requests"] for s in status)
    correct = sum(s["correct"] for s in status)
    accuracy = f", accuracy {correct / requests:.3f}" if requests else ""
    queued = sum(s["queued"] for s in status)
    return f"{online}/{devices} online, {windows} windows ({queued} queued), {requests} requests{accuracy}"


def run_workers(specs: list[WorkerSpec], duration_s: float, console: Console | None = None,
                on_time: Callable[[float], None] | None = None) -> tuple[float, float, list[dict]]:
    """Run the workers to the end (or Ctrl-C); returns (start, end, results in worker order).

    `on_time(elapsed_s)` is called at the start and then about every 0.2 s while the simulation runs."""
    console = console or Console(stderr=True, quiet=True)
    devices = sum(len(spec.devices) for spec in specs)
    workers = _Workers(specs)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    t0 = time.time()
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"connecting {devices} simulated devices in {len(specs)} process(es)", total=None)
            while len(workers.ready) < len(specs):
                workers.receive(0.2)
            t0 = workers.begin()
            if on_time is not None:
                on_time(0.0)
            progress.update(task, total=duration_s or None, completed=0)
            try:
                while len(workers.results) < len(specs):
                    workers.receive(0.2)
                    elapsed = max(0.0, time.time() - t0)
                    if on_time is not None and (not duration_s or elapsed < duration_s):
                        on_time(elapsed)
                    progress.update(task, completed=min(elapsed, duration_s) if duration_s else elapsed,
                                    description=f"simulating: {_describe(workers, devices)}")
            except KeyboardInterrupt:
                workers.stop.set()
                progress.update(task, description="stopping: delivering what the devices queued")
                while len(workers.results) < len(specs):
                    workers.receive(0.2)
        t1 = time.time()
    finally:
        workers.close()
    return t0, min(t1, t0 + duration_s) if duration_s else t1, [workers.results[i] for i in range(len(specs))]
