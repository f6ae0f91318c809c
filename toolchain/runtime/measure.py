"""Host latency and memory of ONNX models, measured with onnxruntime the way the gate needs them.

Latency: candidates are measured *interleaved* (round-robin, a short batch of runs per model per
round, the starting model rotating every round), not one after the other. This machine is shared
and noisy; when candidate A runs during a quiet minute and B during a busy one, their ratio says
more about the neighbours than about the models. Interleaving spreads the noise over all of them
alike, and the gate only trusts ratios between candidates.

Memory: the peak RSS of a model is measured in a fresh child process, because the parent's
high-water mark already holds torch, training data and every other model. The child runs this
very file as a script (`python -P measure.py --rss ...`, so the `toolchain` package is not
imported) and imports only numpy and onnxruntime, as the device agent does. Its baseline is the
RSS after those imports, so `model_rss_mb` is what the model and its session add.

This module deliberately imports only the standard library, numpy, onnxruntime and the device agent's
LiteRT facade (which imports `ai_edge_litert` only when a `.tflite` model is opened) at the top.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import onnxruntime as ort

from runtime_agent.litert import LiteRtSession

_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
    "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
}


@dataclass
class LatencyStats:
    """Latency percentiles of one model (milliseconds), from `runs` timed runs."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    samples_ms: list[float] = field(default_factory=list, repr=False)  # in measurement order

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> LatencyStats:
        if not samples_ms:
            raise ValueError("no latency samples")
        arr = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99])
        return cls(runs=len(arr), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                   mean_ms=float(arr.mean()), min_ms=float(arr.min()), samples_ms=list(samples_ms))

    def to_dict(self) -> dict[str, Any]:
        """Summary numbers only; the raw samples stay in memory (`samples_ms`)."""
        data = asdict(self)
        data.pop("samples_ms")
        return data


def make_session(model_path: Path | str, threads: int = 1) -> ort.InferenceSession | LiteRtSession:
    """A CPU session configured as measured: fixed threads, full graph optimization, no spinning.

    Spinning is off because interleaved sessions would otherwise steal cores from each other
    with idle-spinning pool threads after every run (only matters with threads > 1). A `.tflite`
    file gets the device agent's LiteRT session (XNNPACK, the same thread count), which answers
    the same calls.
    """
    if Path(model_path).suffix == ".tflite":
        return LiteRtSession(model_path, threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def make_feeds(session: ort.InferenceSession, input_shape: tuple[int, ...], dtype: Any = np.float32,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs: the first input gets batch 1 + `input_shape`, others their declared shape.

    Data is drawn in `dtype`, then cast to what the model declares (float16 models get float16),
    so every candidate of one model sees the same values.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i, inp in enumerate(session.get_inputs()):
        shape = (1, *input_shape) if i == 0 else tuple(d if isinstance(d, int) else 1 for d in inp.shape)
        want = _ORT_TYPES.get(inp.type)
        if want is None:
            raise ValueError(f"input '{inp.name}' has unsupported type {inp.type}")
        if np.issubdtype(want, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype).astype(want)
        elif want in (np.int8, np.uint8):
            info = np.iinfo(want)
            feeds[inp.name] = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=want)
        elif want is np.bool_:
            feeds[inp.name] = rng.random(shape) < 0.5
        else:  # wider ints are usually indices or token ids: keep them small and valid
            feeds[inp.name] = rng.integers(0, 2, size=shape, dtype=want)
    return feeds


def measure_latencies(
    models: dict[str, Path],
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]],
    dtype: Any = np.float32,
    warmup: int = 10,
    min_runs: int = 30,
    max_seconds: float = 5.0,
    threads: int = 1,
    seed: int = 0,
    runs_per_round: int = 5,
    max_runs: int | None = None,
    on_round: Callable[[float], None] | None = None,
) -> dict[str, LatencyStats]:
    """Interleaved latency of several models on this host (batch 1), keyed like `models`.

    Runs round after round until `max_seconds` of measuring have passed and every model has at
    least `min_runs` samples (or, earlier, once every model has `max_runs`). Each run is timed
    alone with `perf_counter_ns`. `input_shape` is one shape for all, or a shape per model name
    (models of different inputs, e.g. the predictor's calibration variants, interleave too).
    `on_round` gets the elapsed share of `max_seconds` after every round (for a progress bar).
    """
    if not models:
        raise ValueError("no models to measure")
    if min_runs < 1 or runs_per_round < 1:
        raise ValueError("min_runs and runs_per_round must be >= 1")
    sessions: dict[str, tuple[ort.InferenceSession, dict[str, np.ndarray]]] = {}
    for name, path in models.items():
        session = _open(path, threads)
        shape = input_shape[name] if isinstance(input_shape, dict) else input_shape
        sessions[name] = (session, make_feeds(session, shape, dtype, seed))
    for session, feeds in sessions.values():
        for _ in range(warmup):
            session.run(None, feeds)

    samples: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    deadline = time.perf_counter_ns() + int(max_seconds * 1e9)
    round_index = 0
    while True:
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            session, feeds = sessions[name]
            for _ in range(runs_per_round):
                t0 = time.perf_counter_ns()
                session.run(None, feeds)
                samples[name].append((time.perf_counter_ns() - t0) / 1e6)
        round_index += 1
        if on_round is not None:
            on_round(min(1.0, 1.0 - (deadline - time.perf_counter_ns()) / max(max_seconds * 1e9, 1.0)))
        counts = [len(s) for s in samples.values()]
        if min(counts) >= min_runs and (time.perf_counter_ns() >= deadline
                                        or (max_runs is not None and min(counts) >= max_runs)):
            break
    return {name: LatencyStats.from_samples(s) for name, s in samples.items()}


def measure_peak_rss(model_path: Path, input_shape: tuple[int, ...], threads: int = 1, runs: int = 50,
                     timeout_s: float = 300.0) -> dict[str, Any]:
    """Peak RSS of loading and running one model, in a fresh process that imports only
    numpy and onnxruntime (see the module docstring)."""
    shape = ",".join(str(int(d)) for d in input_shape)
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--rss", str(model_path),
           "--shape", shape, "--threads", str(threads), "--runs", str(runs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        _fail(f"measuring peak RSS of {model_path} took longer than {timeout_s:.0f} s")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        _fail(f"measuring peak RSS of {model_path} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- helpers


def _fail(message: str) -> NoReturn:
    from toolchain.errors import ToolchainError  # lazily: the --rss child never imports toolchain

    raise ToolchainError(message)


def _open(path: Path | str, threads: int) -> ort.InferenceSession | LiteRtSession:
    if not Path(path).is_file():
        _fail(f"model {path} does not exist")
    try:
        return make_session(path, threads)
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        _fail(f"onnxruntime cannot load {path}: {first_line}")


def _proc_status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's peak RSS.

    On Linux, VmHWM from /proc: `getrusage().ru_maxrss` survives execve, so a child spawned by a
    parent that holds torch would report the *parent's* peak (measured: a 10 MB child of a
    326 MB parent says 326 MB). VmHWM belongs to the new address space. Elsewhere, ru_maxrss.
    """
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return raw / 2**20 if sys.platform == "darwin" else raw / 1024  # bytes on macOS, KiB on Linux


def _rss_child(model: str, shape: tuple[int, ...], threads: int, runs: int) -> dict[str, Any]:
    # Baseline: resident now, after importing numpy and onnxruntime and before the model (the
    # current RSS, not the high-water mark, which holds transient import peaks).
    baseline = _proc_status_mb("VmRSS") or _peak_rss_mb()
    session = make_session(model, threads)
    feeds = make_feeds(session, shape)
    for _ in range(max(1, runs)):
        session.run(None, feeds)
    peak = _peak_rss_mb()
    known = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "runtime_agent", "ai_edge_litert", "__main__"}
    foreign = sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")} - known - {"cython_runtime"})
    return {"process_peak_rss_mb": round(peak, 3), "baseline_rss_mb": round(baseline, 3),
            "model_rss_mb": round(max(0.0, peak - baseline), 3), "runs": max(1, runs), "threads": threads,
            "imported_packages": foreign}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure an ONNX model with onnxruntime on this host.")
    parser.add_argument("model", nargs="?", help="model for latency (omit with --rss)")
    parser.add_argument("--rss", metavar="MODEL", help="report the peak RSS of MODEL in this process (JSON)")
    parser.add_argument("--shape", required=True, help="input shape without the batch, e.g. 1,8,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50, help="runs (latency: the minimum)")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency: measuring time")
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(",") if d.strip())
    if args.rss:
        result = _rss_child(args.rss, shape, args.threads, args.runs)
    elif args.model:
        result = measure_latencies({"model": Path(args.model)}, shape, threads=args.threads,
                                   min_runs=args.runs, max_seconds=args.seconds)["model"].to_dict()
    else:
        parser.error("give MODEL or --rss MODEL")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
