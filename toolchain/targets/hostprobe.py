"""Measured numbers for the `host` profile, so predictions for "this machine" rest on facts.

A board's profile can copy its data sheet; the machine the toolchain runs on has no data sheet we
know in advance (laptops, CI runners, cloud VMs with throttled or shared cores), and its marketing
peak says little about what numpy and onnxruntime actually reach. So the host profile's [cpu],
[memory] and [compute] sections are measured here, with the same libraries the toolchain benchmarks
with, and cached: measuring takes seconds, and every `--target host` run would otherwise pay it.

The cache is keyed by a fingerprint of everything that changes the answer (CPU model, cores, RAM,
library versions, this probe's version); when any of it changes, the numbers are measured again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime_agent import durable

log = logging.getLogger(__name__)

# Raise when the way something is measured changes, so old caches are not trusted.
PROBE_VERSION = 1
CACHE_FILE_NAME = "host-profile.json"

# Flags that change how fast ML kernels run; everything else in /proc/cpuinfo is noise here.
_X86_FLAGS = (
    "sse4_2", "avx", "f16c", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
)
# aarch64 "Features" names -> the names the shipped profiles use.
_ARM_FEATURES = {
    "asimd": "neon", "fphp": "fp16", "asimdhp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm",
    "bf16": "bf16", "sve": "sve", "sve2": "sve2", "sme": "sme",
}


# ----------------------------------------------------------------------------- public API


def cache_dir() -> Path:
    """The toolchain's cache folder; `EDGE_TOOLCHAIN_CACHE` lets tests and CI isolate it."""
    base = os.environ.get("EDGE_TOOLCHAIN_CACHE")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "edge-toolchain"


def cache_path() -> Path:
    """Where the measurements live."""
    return cache_dir() / CACHE_FILE_NAME


def fingerprint() -> dict[str, Any]:
    """What must be unchanged for cached numbers to still describe this machine and software."""
    import onnxruntime

    return {
        "probe_version": PROBE_VERSION,
        "cpu_model": _cpu_model(),
        "arch": _cpu_arch(),
        "cores": _cores(),
        "ram_mb": _ram_mb(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def measured_host_values(*, refresh: bool = False) -> dict[str, Any]:
    """The host's profile sections, from the cache when its fingerprint still matches.

    Shaped like a profile TOML ({"cpu": ..., "memory": ..., "compute": {..., "cpu": {...}}}) so the
    loader can merge it over `targets/host.toml`. `refresh=True` ignores the cache.
    """
    path = cache_path()
    current = fingerprint()
    if not refresh:
        cached = _read_cache(path)
        if cached is not None and cached.get("fingerprint") == current and _looks_valid(cached.get("values")):
            return cached["values"]
    log.info("measuring this host for the 'host' profile (takes a few seconds, cached in %s)", path)
    values = measure()
    record = {
        "fingerprint": current,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "values": values,
    }
    try:
        write_json_atomic(path, record)
    except OSError as exc:  # a read-only home must not make `--target host` unusable
        log.warning("could not cache host measurements in %s: %s", path, exc)
    return values


def measure() -> dict[str, Any]:
    """Measure now, without the cache (about 10 s on a 2-core machine)."""
    cores = _cores()
    bandwidth = _measure_bandwidth_gbs(cores)
    # numpy's BLAS and onnxruntime's MLAS differ by tens of percent either way; peak is the better.
    fp32 = max(_measure_numpy_fp32_gflops(), _measure_ort_matmul_gops("fp32", cores))
    int8 = _measure_ort_matmul_gops("int8", cores)
    fp16 = _measure_ort_matmul_gops("fp16", cores)
    overhead = _measure_op_overhead_us()
    cpu_compute = {"fp32_gflops": round(fp32, 1), "fp16_gflops": round(fp16, 1), "int8_gops": round(int8, 1)}
    return {
        "cpu": {"arch": _cpu_arch(), "cores": cores, "freq_ghz": _cpu_freq_ghz(), "isa": _cpu_isa()},
        "memory": {"ram_mb": _ram_mb(), "bandwidth_gbs": round(bandwidth, 2)},
        # On the host the runtime runs models on the CPU, so the runtime unit is the CPU itself.
        "compute": {**cpu_compute, "op_overhead_us": round(overhead, 2), "cpu": dict(cpu_compute)},
    }


# ----------------------------------------------------------------------------- static facts


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo_field(name: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(name)}\s*:\s*(.*)$", re.MULTILINE)
    return [m.group(1).strip() for m in pattern.finditer(_cpuinfo())]


def _cpu_model() -> str:
    """A stable name for the CPU; aarch64 kernels often print no model name, only part numbers."""
    for key in ("model name", "Hardware", "Model"):
        values = _cpuinfo_field(key)
        if values and values[0]:
            return values[0]
    parts = sorted(set(_cpuinfo_field("CPU implementer")) | set(_cpuinfo_field("CPU part")))
    return " ".join(parts) or platform.processor() or platform.machine() or "unknown"


def _cpu_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine or "unknown")


def _cores() -> int:
    """Cores this process may use: a container or taskset limit matters more than the socket."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _ram_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (AttributeError, ValueError, OSError):
        import psutil

        return int(psutil.virtual_memory().total // 2**20)


def _cpu_isa() -> list[str]:
    flags = set(" ".join(_cpuinfo_field("flags")).split())
    if flags:
        return [f for f in _X86_FLAGS if f in flags]
    features = set(" ".join(_cpuinfo_field("Features")).split())
    names: list[str] = []
    for feature, name in _ARM_FEATURES.items():
        if feature in features and name not in names:
            names.append(name)
    return names


def _cpu_freq_ghz() -> float:
    """Max clock; the validator needs > 0, so an unknown clock becomes a nominal 1.0 GHz."""
    try:  # cpufreq knows the real maximum (kHz); /proc/cpuinfo only shows the current clock
        khz = max(int(p.read_text()) for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq"))
        if khz > 0:
            return round(khz / 1e6, 3)
    except (OSError, ValueError):
        pass
    match = re.search(r"@\s*([0-9.]+)\s*GHz", _cpu_model())
    if match:
        return round(float(match.group(1)), 3)
    mhz = [float(v) for v in _cpuinfo_field("cpu MHz") if re.fullmatch(r"[0-9.]+", v)]
    if mhz and max(mhz) > 0:
        return round(max(mhz) / 1000, 3)
    # No clock exposed (some VMs, macOS): a nominal value; nothing downstream divides by it.
    return 1.0


# ----------------------------------------------------------------------------- measurements


def _best_rate(run: Callable[[], None], work: float, budget_s: float, min_runs: int = 3, max_runs: int = 20) -> float:
    """Best work/second over repeated runs: the fastest run is the least disturbed by neighbours."""
    best = 0.0
    start = time.perf_counter()
    for i in range(max_runs):
        t0 = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t0
        best = max(best, work / max(elapsed, 1e-9))
        if i + 1 >= min_runs and time.perf_counter() - start > budget_s:
            break
    return best


def _measure_bandwidth_gbs(cores: int) -> float:
    """STREAM-copy style: read + write bytes per second, with one thread per core.

    One thread rarely saturates the memory controller, so the array is copied in `cores` slices
    at once (numpy releases the GIL for plain copies).
    """
    nbytes = min(256 * 2**20, max(16 * 2**20, _ram_mb() * 2**20 // 16))
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.zeros_like(src)  # touched now, so page faults are not timed
    bounds = np.linspace(0, src.size, cores + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=cores) as pool:
        def copy() -> None:
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))

        copy()  # warm-up
        rate = _best_rate(copy, 2.0 * src.nbytes, budget_s=1.5, min_runs=3, max_runs=10)
    return rate / 1e9


def _measure_numpy_fp32_gflops() -> float:
    """Peak float32 GEMM through numpy's BLAS (all threads), the ceiling torch/ORT fp32 get near."""
    rng = np.random.default_rng(0)
    n = 512
    a = rng.standard_normal((n, n), dtype=np.float32)
    a @ a  # warm-up: BLAS thread pool start
    t0 = time.perf_counter()
    a @ a
    rough = 2 * n**3 / max(time.perf_counter() - t0, 1e-6)
    # Size the matrix so one product takes ~0.15 s: small ones under-report peak, big ones waste time.
    n = int(np.clip((0.15 * rough / 2) ** (1 / 3) // 128 * 128, 512, 4096))
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    return _best_rate(lambda: np.matmul(a, b, out=out), 2.0 * n**3, budget_s=1.2) / 1e9


def _ort_session(model: Any, threads: int, optimize: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _measure_ort_matmul_gops(precision: str, cores: int) -> float:
    """Peak GEMM throughput of onnxruntime's CPU kernels in `precision` ("int8", "fp16", "fp32").

    int8 is MatMulInteger uint8 x int8 (the u8s8 kernel static/dynamic-quantized models use);
    fp16 is a float16 MatMul, which many CPUs run through casts to fp32 and so measure slow:
    that slowness is the point, it is what an fp16 model would see here.
    """
    from onnx import TensorProto, helper, numpy_helper

    k = n = 1024
    rng = np.random.default_rng(0)
    if precision == "int8":
        weights = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32

        def make_input(m: int) -> np.ndarray:
            return rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    else:
        dtype = np.float16 if precision == "fp16" else np.float32
        weights = rng.standard_normal((k, n)).astype(dtype)
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type = y_type = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT

        def make_input(m: int) -> np.ndarray:
            return rng.standard_normal((m, k)).astype(dtype)

    graph = helper.make_graph(
        [node], f"probe_{precision}",
        [helper.make_tensor_value_info("A", a_type, ["M", k])],
        [helper.make_tensor_value_info("Y", y_type, ["M", n])],
        initializer=[numpy_helper.from_array(weights, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    try:
        session = _ort_session(model, threads=cores)
    except Exception as exc:  # no kernel at all for this precision: it runs no faster than fp32
        log.warning("onnxruntime cannot run a %s MatMul on this CPU (%s); using the fp32 rate", precision, exc)
        return _measure_numpy_fp32_gflops()
    m = 256
    feed = {"A": make_input(m)}
    session.run(None, feed)  # warm-up: prepacking, thread pool start
    t0 = time.perf_counter()
    session.run(None, feed)
    rough = 2 * m * k * n / max(time.perf_counter() - t0, 1e-6)
    # One run should take ~0.15 s; the row count M is free, so scale it instead of K and N.
    m = int(np.clip(0.15 * rough / (2 * k * n) // 64 * 64, 64, 16384))
    feed = {"A": make_input(m)}
    session.run(None, feed)
    return _best_rate(lambda: session.run(None, feed), 2.0 * m * k * n, budget_s=1.2) / 1e9


def _measure_op_overhead_us() -> float:
    """Fixed cost of one operator in onnxruntime: what dominates tiny models like 8x8 digits.

    Timing a long chain of tiny ops against a short one cancels the per-run cost (Python call,
    input binding) and leaves only the per-op dispatch. Optimizations are off so the op count is
    exactly what was built; one thread, because tiny ops are never split across threads.
    """
    from onnx import TensorProto, helper, numpy_helper

    def chain(n_ops: int) -> Any:
        nodes, name = [], "X"
        for i in range(n_ops):
            out = f"t{i}"
            if i % 2 == 0:
                nodes.append(helper.make_node("Add", [name, "C"], [out]))
            else:
                nodes.append(helper.make_node("Relu", [name], [out]))
            name = out
        nodes.append(helper.make_node("Identity", [name], ["Y"]))
        graph = helper.make_graph(
            nodes, f"chain{n_ops}",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8])],
            initializer=[numpy_helper.from_array(np.full((1, 8), 0.01, dtype=np.float32), "C")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return _ort_session(model, threads=1, optimize=False)

    short_n, long_n = 2, 52
    sessions = {short_n: chain(short_n), long_n: chain(long_n)}
    feed = {"X": np.zeros((1, 8), dtype=np.float32)}

    def per_run_s(session: Any, runs: int = 200, batches: int = 5) -> float:
        best = float("inf")
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(runs):
                session.run(None, feed)
            best = min(best, (time.perf_counter() - t0) / runs)
        return best

    for session in sessions.values():
        per_run_s(session, runs=50, batches=1)  # warm-up
    short_t, long_t = per_run_s(sessions[short_n]), per_run_s(sessions[long_n])
    per_op = (long_t - short_t) / (long_n - short_n)
    if per_op <= 0:  # noise swamped the difference: charge the whole run to its ops instead
        per_op = long_t / long_n
    return per_op * 1e6


# ----------------------------------------------------------------------------- cache


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _looks_valid(values: Any) -> bool:
    """A truncated or hand-edited cache is re-measured rather than failing the profile loader."""
    try:
        compute = values["compute"]
        numbers = [values["memory"]["bandwidth_gbs"], compute["op_overhead_us"]]
        numbers += [compute[k] for k in ("fp32_gflops", "fp16_gflops", "int8_gops")]
        numbers += [compute["cpu"][k] for k in ("fp32_gflops", "fp16_gflops", "int8_gops")]
        return (all(isinstance(x, (int, float)) and x > 0 for x in numbers)
                and isinstance(values["cpu"]["cores"], int) and isinstance(values["memory"]["ram_mb"], int))
    except (KeyError, TypeError):
        return False


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """`record` as indented JSON, written whole (`runtime_agent.durable`: a concurrent reader never sees
    half a file), making its folder. Private to the user (0600), as these files have always been."""
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(path, (json.dumps(record, indent=2) + "\n").encode(), 0o600)
