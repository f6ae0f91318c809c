"""The device agent's costs, side by side in one run: inference overhead, drift accounting, memory, disk.

1. Builds a signed bundle of a realistic edge model with the real CLI (`toolchain keys generate`, then
   `toolchain build --target <tmp>/raspberry-pi-5-onnx.toml --config <tmp>/toolchain.toml --key ...`;
   the profile is raspberry-pi-5's with `formats = ["onnx"]`: this benchmark measures the agent over ONNX
   Runtime, and with the tflite extra installed the stock profile would ship a `.tflite`): MobileNetV2 at
   width 0.5 (`zoo:mobilenet_v2`) on the seeded synthetic gratings of benchmarks/_gratings.py (`python:data.py:load`),
   FP32 (`quantize = []`), 1500 images, 6 epochs (~1 min; the model then really classifies, so the predicted-class
   statistics are realistic). In full mode (or with --digits) the small embedded digits CNN is built too
   (same profile) for a second, non-target overhead figure. Config files live in a temporary folder. The
   builds run with OMP_NUM_THREADS=1 (see BUILD_ENV); `--quick` reuses the previous run's bundles when the
   toolchain's and agent's sources, the config and the pins are unchanged (`--rebuild` to force).
2. Starts a real mosquitto (`ManagedBroker(authenticated=False)` on a free port), provisions a device
   folder (window_s = 1) and runs `Agent.run` in a background thread (REST server, MQTT link, outbox,
   a telemetry window closed and published every second), then measures `Agent.infer(x)` (batch 1,
   telemetry and drift on) against a bare `onnxruntime.InferenceSession.run` on the same model file with
   the agent's own session options and providers (read back from the agent's session), INTERLEAVED in
   short bursts round-robin (order rotated each round) so the machine's noise lands on both alike.
   A third variant, the agent's own session object called directly, isolates the Python wrapper's cost
   from any session-to-session difference; a per-component breakdown says where the overhead goes.
   gRPC: a second agent on the same bundle with `[serve] grpc_port` (same threads) answers KServe v2
   `ModelInfer` calls (raw_input_contents, batch 1, every output) from a client in a child process
   (the agent's own generated stubs), interleaved there in bursts with a bare `session.run` of the same
   model file and options: the end-to-end round trip a client sees against the bare runtime.
3. Drift accounting cost: `measure_drift_cost` of benchmarks/drift_cost.py (64 features, batch 1).
4. Memory: peak RSS (VmHWM) of a clean child process running the full agent (`Agent.run`: REST + MQTT +
   outbox) serving N KServe v2 REST requests from this process, minus that of a clean child that only
   imports numpy + onnxruntime, loads the same model file into an InferenceSession with the same options
   and runs it N times. Both children run `sys.executable -I` (no script dir, no user site, no PYTHON*
   variables); the agent child fails loudly if torch, tensorflow or toolchain was imported.
5. Disk: a fresh `python3.11 -m venv` with only the four device dependencies (`pip install -c
   requirements.lock numpy onnxruntime paho-mqtt cryptography`, so the exact locked versions) plus the
   `runtime_agent` package copied in; smoke-tested by `edge-agent predict` on the bundle from that venv;
   measured as disk usage (st_blocks, hard links once, symlinks not followed), largest distributions listed.

Targets: agent p50 overhead vs session.run <= 5 %, gRPC round trip p50 vs session.run <= 10 %, drift update <= 10 us per feature per sample, agent RSS
beyond the runtime's <= 50 MiB, agent-only venv <= 300 MiB.

    python benchmarks/agent.py [--quick] [--image-size 64] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import http.client
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnxruntime as ort

from _common import print_table, require_trained, target, write_results
from _gratings import data_py
from drift_cost import measure_drift_cost
from runtime_agent.agent import Active, Agent
from runtime_agent.config import load_agent_config
from runtime_agent.metrics import ServingMetrics
from runtime_agent.reference import summary_features
from runtime_agent.sketch import LatencySketch
from toolchain.deploy.broker import ManagedBroker, free_port
from toolchain.targets.profiles import builtin_profile_paths

REPO = Path(__file__).resolve().parent.parent

BIN = Path(sys.executable).parent
MIB = 1 << 20
FLEET = "bench"
FORBIDDEN_IN_AGENT = ("torch", "tensorflow", "toolchain")
HOST_ONLY = ("onnx", "onnxscript", "optuna", "sklearn", "scipy", "pydantic", "typer", "rich", "psutil", "PIL", "torch_pruning")
AGENT_DEPENDENCIES = ("numpy", "onnxruntime", "paho-mqtt", "cryptography")
BOARD = "raspberry-pi-5"
SAMPLES = 1500  # synthetic images (900 to train): fewer leave the model at chance on the overlapping gratings
ONNX_ONLY = 'formats = ["onnx"]'  # the agent is measured over ONNX Runtime, whichever extras the host has

CONFIG_TOML = '''\
# Written by benchmarks/agent.py into a temporary folder.
[project]
name = "mobilenetv2bench"
version = 1

[model]
entry = "zoo:mobilenet_v2"
input_shape = [3, {size}, {size}]
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
kwargs = {{ width_mult = 0.5 }}

[data]
source = "python:data.py:load"
validation = 0.2
test = 0.2

[train]
epochs = {epochs}
batch_size = 16

[compress]
quantize = []
'''

AGENT_CHILD = '''\
import json, sys, threading
from pathlib import Path

from runtime_agent.agent import Agent
from runtime_agent.config import load_agent_config
from runtime_agent.metrics import ServingMetrics

agent = Agent(load_agent_config(Path(sys.argv[1])))
stop = threading.Event()
failure = []

def serve():
    try:
        agent.run(stop, on_ready=lambda port: print(json.dumps({"port": port}), flush=True))
    except BaseException as exc:
        failure.append(f"{type(exc).__name__}: {exc}")
        print(json.dumps({"error": failure[-1]}), flush=True)

thread = threading.Thread(target=serve, name="agent")
thread.start()
sys.stdin.readline()  # the parent writes a line when it is done sending requests
stop.set()
thread.join()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

top = sorted({name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names) - {"__main__"})
print(json.dumps({"vmhwm_kb": status("VmHWM"), "vmrss_kb": status("VmRSS"), "failure": failure,
                  "modules": len(sys.modules), "third_party": [m for m in top if not m.startswith("_")]}), flush=True)
'''

BARE_CHILD = '''\
import json, sys

import numpy as np
import onnxruntime as ort

path, runs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shape = [int(d) for d in sys.argv[4].split(",")]
options = ort.SessionOptions()
options.intra_op_num_threads = threads
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
inputs = np.random.default_rng(0).standard_normal((16, 1, *shape)).astype(np.float32)
for i in range(runs):
    session.run(None, {name: inputs[i % 16]})

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

top = sorted({name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names) - {"__main__"})
print(json.dumps({"vmhwm_kb": status("VmHWM"), "vmrss_kb": status("VmRSS"), "modules": len(sys.modules),
                  "third_party": [m for m in top if not m.startswith("_")]}), flush=True)
'''


GRPC_CHILD = '''\
import json, sys

import grpc
import numpy as np
import onnxruntime as ort

from agent import interleaved
from runtime_agent.kserve_grpc import grpc_predict_v2_pb2 as pb
from runtime_agent.kserve_grpc import grpc_predict_v2_pb2_grpc as pb_grpc

path, address, model, threads, seconds, samples = sys.argv[1:7]
options = ort.SessionOptions()
options.intra_op_num_threads = int(threads)
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
feed = session.get_inputs()[0].name
inputs = list(np.load(samples))
stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))

def model_infer(x, raw=True):
    """What a client does: build the request, call, read the first output back as an array."""
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    if raw:
        request.raw_input_contents.append(x.tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request)
    out = response.outputs[0]
    values = np.frombuffer(response.raw_output_contents[0], np.float32) if raw else np.array(out.contents.fp32_contents, np.float32)
    return values.reshape(list(out.shape))

for raw in (True, False):  # the agent answers what the runtime computes
    assert np.array_equal(model_infer(inputs[0], raw), session.run(None, {feed: inputs[0]})[0])
runners = {"bare session.run": lambda x: session.run(None, {feed: x}), "gRPC ModelInfer (raw)": model_infer,
           "gRPC ModelInfer (contents)": lambda x: model_infer(x, raw=False),
           "gRPC ServerLive (no work: the protocol's floor)": lambda x: stub.ServerLive(pb.ServerLiveRequest())}
latencies, rounds = interleaved(runners, inputs, float(seconds))
print(json.dumps({"rounds": rounds, "calls": {k: len(v) for k, v in latencies.items()},
                  "p50_us": {k: float(np.percentile(v, 50)) for k, v in latencies.items()},
                  "p90_us": {k: float(np.percentile(v, 90)) for k, v in latencies.items()}}))
'''

class Rows:
    """The benchmark's table: one measurement per row, with its value, unit and notes."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, section: str, measurement: str, value: float | int | str | None, unit: str, notes: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 6)
        self.rows.append({"section": section, "measurement": measurement, "value": value, "unit": unit, "notes": notes})


def log(message: str) -> None:
    print(f"[agent-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- building the bundles with the real CLI -------------------------------------------------------

# torch's default OpenMP threads (one per core) slow training down ~60x when other processes load this
# 2-core machine (measured: the digits train stage 201 s vs 3.3 s with one thread, side by side); the
# build is not what this benchmark measures, so it runs with one OpenMP thread to stay inside its budget.
BUILD_ENV = {"OMP_NUM_THREADS": "1"}


def _toolchain(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "toolchain"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **BUILD_ENV})


def _finish(process: subprocess.Popen, what: str) -> str:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{what} failed ({process.returncode}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return stdout


BUILD_CACHE = Path(tempfile.gettempdir()) / "edge-agent-bench-builds"


def onnx_profile() -> str:
    """raspberry-pi-5's profile with ONNX as its only format, so the bundle ships an ONNX model."""
    text = builtin_profile_paths()[BOARD].read_text()
    formats = next(line for line in text.splitlines() if line.startswith("formats = "))
    return text.replace(formats, ONNX_ONLY)


def _build_key(size: int, epochs: int) -> str:
    """What the bundles depend on: the project's files, the toolchain's and agent's sources, profiles, pins."""
    digest = hashlib.sha256(f"{size}/{epochs}/{sys.version}/{sorted(BUILD_ENV.items())}".encode())
    digest.update(data_py(size, SAMPLES).encode() + CONFIG_TOML.format(size=size, epochs=epochs).encode()
                  + onnx_profile().encode())
    for folder in ("toolchain", "runtime_agent", "targets", "examples/digits"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    digest.update((REPO / "requirements.lock").read_bytes())
    return digest.hexdigest()[:20]


def build_bundles(root: Path, size: int, epochs: int, with_digits: bool, reuse: bool) -> tuple[Path, dict[str, dict[str, Any]]]:
    """keys generate, then `toolchain build` of the MobileNetV2 project (and the embedded digits example), in `root`.

    With `reuse`, a previous run's output for the same key (sources, config, pins) is copied instead of
    rebuilding (the build is not what this benchmark measures); every fresh build refreshes that cache."""
    key = _build_key(size, epochs)
    cached = BUILD_CACHE / key
    wanted = {"mobilenetv2", *(["digits"] if with_digits else [])}
    if reuse and (cached / "builds.json").exists() and wanted <= set(json.loads((cached / "builds.json").read_text())):
        shutil.copytree(cached, root)
        builds = {name: build for name, build in json.loads((root / "builds.json").read_text()).items() if name in wanted}
        for build in builds.values():
            build["bundle"] = root / build["bundle"]
            build["report"] = json.loads((build["bundle"].parent / "report.json").read_text())
            build["cached"] = f"reused from {cached} (same sources/config/pins; built {build['built']})"
        log(f"reused the bundles built at {next(iter(builds.values()))['built']} ({cached})")
        return root / "keys" / "signing.pub", builds
    root.mkdir(parents=True)
    keys = root / "keys"
    _finish(_toolchain(["keys", "generate", "--out", str(keys)]), "toolchain keys generate")
    project = root / "project"
    project.mkdir()
    (project / "data.py").write_text(data_py(size, SAMPLES))
    (project / "toolchain.toml").write_text(CONFIG_TOML.format(size=size, epochs=epochs))
    profile = root / f"{BOARD}-onnx.toml"
    profile.write_text(onnx_profile())
    commands = {"mobilenetv2": ["build", "--target", str(profile), "--config", str(project / "toolchain.toml"),
                                "--out", str(root / "dist"), "--key", str(keys / "signing.key")]}
    if with_digits:  # no --config: the embedded default example
        commands["digits"] = ["build", "--target", str(profile), "--out", str(root / "dist-digits"),
                              "--key", str(keys / "signing.key")]
    started = time.perf_counter()
    builds: dict[str, dict[str, Any]] = {}
    for name, args in commands.items():  # one at a time: honest build times on a 2-core machine
        began = time.perf_counter()
        stdout = _finish(_toolchain(args), f"toolchain {' '.join(args)}")
        bundle = Path(stdout.strip().splitlines()[-1])
        builds[name] = {"bundle": bundle, "report": json.loads((bundle.parent / "report.json").read_text()),
                        "seconds": time.perf_counter() - began, "command": "toolchain " + " ".join(args),
                        "built": time.strftime("%Y-%m-%d %H:%M:%S"), "cached": ""}
    log(f"built {', '.join(builds)} in {time.perf_counter() - started:.1f} s")
    (root / "builds.json").write_text(json.dumps({name: {**{k: v for k, v in b.items() if k not in ("bundle", "report")},
                                                         "bundle": str(b["bundle"].relative_to(root))}
                                                  for name, b in builds.items()}))
    with contextlib.suppress(OSError):  # keep only this build in the cache
        shutil.rmtree(BUILD_CACHE, ignore_errors=True)
        BUILD_CACHE.mkdir(parents=True)
        shutil.copytree(root, BUILD_CACHE / f".{key}.tmp")
        os.replace(BUILD_CACHE / f".{key}.tmp", cached)
    return keys / "signing.pub", builds


def extract_model(bundle: Path, into: Path) -> tuple[Path, dict[str, Any]]:
    """The bundle's model file, read with tarfile (not runtime_agent), checked against the manifest's sha256."""
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle) as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())
        artifact = next(a for a in manifest["artifacts"] if a["role"] == "model")
        if artifact["format"] != "onnx":
            raise SystemExit(f"{bundle} ships {artifact['path']} ({artifact['format']}); this benchmark measures the "
                             f"agent over ONNX Runtime and builds for an ONNX-only profile")
        data = archive.extractfile(artifact["path"]).read()
    if hashlib.sha256(data).hexdigest() != artifact["sha256"]:
        raise SystemExit(f"{bundle}: {artifact['path']} does not match its manifest sha256")
    path = into / Path(artifact["path"]).name
    path.write_bytes(data)
    return path, manifest


def load_data(root: Path) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    spec = importlib.util.spec_from_file_location("_agent_bench_data", root / "project" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load


# -- a running agent connected to a real broker ---------------------------------------------------

def provision(device_dir: Path, bundle: Path, pubkey: Path, broker: ManagedBroker, device_id: str, threads: int = 0,
              grpc: bool = False) -> Path:
    """A device folder as `toolchain flash` lays it out (tests/conftest.py provision_device), window_s = 1;
    `grpc`: with a `[serve] grpc_port` too."""
    device_dir.mkdir(parents=True)
    shutil.copyfile(bundle, device_dir / "current.bundle")
    shutil.copyfile(pubkey, device_dir / "trusted.pub")
    grpc_port = f"grpc_port = {free_port()}\n" if grpc else ""
    (device_dir / "agent.toml").write_text(
        f'device_id = "{device_id}"\nfleet = "{FLEET}"\nbroker = "{broker.url}"\n'
        f'[serve]\nhost = "127.0.0.1"\nport = {free_port()}\n{grpc_port}threads = {threads}\n[telemetry]\nwindow_s = 1\n')
    return device_dir


class Listener:
    """An MQTT subscriber on the benchmark's broker: counts each device's telemetry and sees its birth."""

    def __init__(self, broker: ManagedBroker) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._lock = threading.Lock()
        self.telemetry: dict[str, list[dict[str, Any]]] = {}
        self.online: set[str] = set()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="agent-bench-listener", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edge/v1/{FLEET}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("the benchmark's MQTT listener could not subscribe to the local mosquitto")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        device, kind = message.topic.split("/")[3:5]
        payload = json.loads(message.payload) if message.payload else {}
        with self._lock:
            if kind == "telemetry":
                self.telemetry.setdefault(device, []).append(payload)
            elif kind == "status" and payload.get("state") == "online":
                self.online.add(device)

    def count(self, device: str) -> int:
        with self._lock:
            return len(self.telemetry.get(device, []))

    def served(self, device: str) -> int:
        with self._lock:
            return sum(p.get("requests", 0) for p in self.telemetry.get(device, []))

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def running_agent(device_dir: Path, listener: Listener) -> Iterator[Agent]:
    """`Agent.run` in a background thread (REST + MQTT + outbox + 1 s windows) until the block ends."""
    agent = Agent(load_agent_config(device_dir))
    stop, ready, failure = threading.Event(), threading.Event(), []

    def serve() -> None:
        try:
            agent.run(stop, on_ready=lambda port: ready.set())
        except BaseException as exc:  # surfaced below, not lost in the thread
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=serve, name="agent-run", daemon=True)
    thread.start()
    if not ready.wait(60) or failure:
        raise SystemExit(f"Agent.run did not become ready: {failure[0] if failure else 'timeout'}")
    listener.wait(lambda: agent.config.device_id in listener.online, 20, f"{agent.config.device_id}'s MQTT birth")
    try:
        yield agent
    finally:
        stop.set()
        thread.join(30)
    if failure:
        raise SystemExit(f"Agent.run failed: {failure[0]!r}")


# -- 1. inference overhead --------------------------------------------------------------------------

BURST = 20


def interleaved(runners: dict[str, Callable[[np.ndarray], object]], inputs: list[np.ndarray], seconds: float,
                burst: int = BURST, warmup: int = 100) -> tuple[dict[str, np.ndarray], int]:
    """Round-robin bursts of `burst` calls per variant over the same inputs, the order rotated every round."""
    names = list(runners)
    for name in names:
        for i in range(warmup):
            runners[name](inputs[i % len(inputs)])
    samples: dict[str, list[int]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    deadline, rounds, cursor = time.perf_counter() + seconds, 0, 0
    while time.perf_counter() < deadline:
        batch = [inputs[(cursor + i) % len(inputs)] for i in range(burst)]
        cursor += burst
        for k in range(len(names)):
            name = names[(rounds + k) % len(names)]
            run, out = runners[name], samples[name]
            for x in batch:
                started = clock()
                run(x)
                out.append(clock() - started)
        rounds += 1
    return {name: np.asarray(v, dtype=np.float64) / 1e3 for name, v in samples.items()}, rounds  # microseconds


def per_call_us(function: Callable[[], object], calls: int, repeats: int = 3,
                before: Callable[[], object] | None = None) -> float:
    """Best-of-repeats median per-call time (us) of `function`; `before` (untimed) runs ahead of every call,
    e.g. a session.run, so the function meets the caches as it does on the agent's request path."""
    best = float("inf")
    clock = time.perf_counter_ns
    for _ in range(repeats):
        times = np.empty(calls)
        for i in range(calls):
            if before is not None:
                before()
            started = clock()
            function()
            times[i] = clock() - started
        best = min(best, float(np.median(times)))
    return best / 1e3


GRPC_HANDLER = "gRPC ModelInfer handler, in process (raw)"


def grpc_handler(agent: Agent, inputs: list[np.ndarray]) -> Callable[[np.ndarray], object]:
    """The agent's KServe gRPC ModelInfer handler as a runner: called in this process on a request built
    beforehand for each input (raw contents, as Triton's client sends), without grpcio's transport."""
    from runtime_agent.grpc_server import KServeServicer
    from runtime_agent.kserve_grpc import grpc_predict_v2_pb2 as pb

    servicer = KServeServicer(agent, ServingMetrics())
    requests = {}
    for x in inputs:
        request = pb.ModelInferRequest(model_name=agent.model.bundle.manifest["name"])
        request.inputs.add(name="input", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        requests[id(x)] = request
    return lambda x: servicer.ModelInfer(requests[id(x)], None)


def measure_overhead(name: str, agent: Agent, model_path: Path, inputs: list[np.ndarray], seconds: float,
                     listener: Listener, rows: Rows) -> dict[str, Any]:
    model = agent.model
    options = model.session.get_session_options()  # exactly the agent's options: intra_op threads, graph level...
    providers = model.session.get_providers()
    tasks = len(os.listdir("/proc/self/task"))
    bare = ort.InferenceSession(str(model_path), options, providers=providers)
    pool_workers = len(os.listdir("/proc/self/task")) - tasks  # the intra-op pool's threads besides the caller
    input_name = bare.get_inputs()[0].name
    own = model.session
    runners = {
        "agent.infer": agent.infer,
        "bare session.run": lambda x: bare.run(None, {input_name: x}),
        "agent's session.run": lambda x: own.run(None, {input_name: x}),
        GRPC_HANDLER: grpc_handler(agent, inputs),
    }
    device = agent.config.device_id
    telemetry_before, served_before = listener.count(device), listener.served(device)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    latencies, rounds = interleaved(runners, inputs, seconds)
    wall = time.perf_counter() - started
    load = max(load_before, os.getloadavg()[0])
    time.sleep(1.3)  # let the window in progress close and publish
    windows = listener.count(device) - telemetry_before
    served = listener.served(device) - served_before
    if windows < max(1, int(wall) - 2) or served == 0:
        raise SystemExit(f"{name}: only {windows} telemetry windows ({served} requests) reached the broker in "
                         f"{wall:.0f} s of measurement: telemetry was not running as intended")
    p50 = {k: float(np.percentile(v, 50)) for k, v in latencies.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in latencies.items()}
    overhead = p50["agent.infer"] / p50["bare session.run"] - 1
    wrapper = p50["agent.infer"] / p50["agent's session.run"] - 1
    # Spread of the estimate: the same ratio on halves of the run, and the median of per-round ratios
    # (each round's agent burst against the bare burst next to it: robust to load that changes between rounds).
    half = len(latencies["agent.infer"]) // 2
    halves = [float(np.percentile(latencies["agent.infer"][s], 50) / np.percentile(latencies["bare session.run"][s], 50) - 1)
              for s in (slice(0, half), slice(half, None))]
    per_round = (np.median(latencies["agent.infer"][:rounds * BURST].reshape(rounds, BURST), axis=1)
                 / np.median(latencies["bare session.run"][:rounds * BURST].reshape(rounds, BURST), axis=1))
    paired = float(np.median(per_round) - 1)
    threads = options.intra_op_num_threads
    common = (f"batch 1, {rounds} interleaved rounds x {BURST} calls per variant over {wall:.0f} s; agent running "
              f"(REST + MQTT + outbox), {windows} telemetry windows of 1 s published meanwhile; load average {load:.2f} "
              f"on {os.cpu_count()} cores")
    for variant in runners:
        rows.add(f"overhead: {name}", f"{variant} p50", p50[variant], "us",
                 f"p90 {p90[variant]:.1f} us, {len(latencies[variant])} calls")
    rows.add(f"overhead: {name}", "agent p50 / bare p50 - 1", overhead, "fraction",
             f"{common}; bare = separate InferenceSession on the bundle's model file with the agent's session options "
             f"(intra_op_num_threads={threads}: {pool_workers + 1} threads incl. the caller, {options.graph_optimization_level.name}) "
             f"and providers {providers}; "
             f"first/second half: {halves[0]:+.3f} / {halves[1]:+.3f}; median of per-round ratios {paired:+.3f}")
    rows.add(f"overhead: {name}", "agent p50 / own session.run p50 - 1", wrapper, "fraction",
             "same session object as the agent's, called directly: the Python wrapper's share alone")
    rows.add(f"overhead: {name}", "gRPC handler in process p50 / bare p50 - 1", p50[GRPC_HANDLER] / p50["bare session.run"] - 1,
             "fraction", "the agent's own share of a gRPC call: its KServe ModelInfer handler (decode the raw request, "
             "agent.infer, encode the response, metrics) called in this process on prebuilt requests, no transport; "
             "the round trip ('overhead: grpc') adds grpcio's client, server and HTTP/2 on loopback")
    rows.add(f"overhead: {name}", "agent p50 - bare p50", p50["agent.infer"] - p50["bare session.run"], "us",
             "absolute per-request cost of the agent: independent of the model's compute, but it grows with the "
             "input's size (validation and the drift summary read every value)")
    breakdown = overhead_breakdown(agent, inputs)
    for component, us in breakdown.items():
        rows.add(f"overhead: {name}", f"breakdown: {component}", us, "us",
                 "median per call, timed alone right after an untimed session.run")
    attributed = sum(us for component, us in breakdown.items() if not component.startswith("  "))
    rows.add(f"overhead: {name}", "breakdown: unattributed", p50["agent.infer"] - p50["agent's session.run"] - attributed, "us",
             f"(agent p50 - own session.run p50) - sum of the parts above ({attributed:.1f} us): call overhead, "
             f"GIL hand-offs to the agent's threads, noise")
    return {"p50_us": p50, "p90_us": p90, "overhead": overhead, "wrapper_overhead": wrapper, "halves": halves,
            "paired_round_median": paired, "rounds": rounds, "windows": windows, "load_average": load,
            "intra_op_num_threads": threads, "intra_op_pool_threads": pool_workers + 1, "breakdown_us": breakdown}


def overhead_breakdown(agent: Agent, inputs: list[np.ndarray], calls: int = 400) -> dict[str, float]:
    """Where the agent's per-request time goes: each piece of `Agent.infer` timed on its own, right after an
    untimed session.run (as on the request path), on private copies (the live agent's window and monitor are
    not touched): validate, softmax/argmax/labels, drift, the two sketches, the lock."""
    model = agent.model
    x = inputs[0]
    batch = model.validate(x)
    feeds = {model.input_name: batch}
    run = lambda: model.session.run(None, feeds)  # noqa: E731
    clock = time.perf_counter_ns
    extra = []  # predict_batch - session.run, pair by pair (a difference of medians would be mostly noise)
    for _ in range(calls):
        started = clock()
        run()
        middle = clock()
        model.predict_batch(batch)
        extra.append((clock() - middle) - (middle - started))
    prediction = model.predict_batch(batch)
    classes = prediction.classes
    active = Active(model)  # private copies: the live agent's window and statistics are not touched
    scores = prediction.logits if classes is not None else None  # as Agent.infer queues them
    sketch, served = LatencySketch(), deque()
    every = Agent.ACCOUNT_EVERY
    run_of = ([0.5] * every, [batch] * every, [classes] * every, [scores] * every)

    def account() -> None:  # what Agent.account does for one run of requests
        sketch.add_many(run_of[0])
        active.account(*run_of)

    runs = max(20, calls // 8)
    parts = {
        "validate (dtype, shape, isfinite)": per_call_us(lambda: model.validate(x), calls, before=run),
        "predict_batch - session.run (argmax, Prediction)": float(np.median(extra)) / 1e3,
        "record: queue the request (deque append)": per_call_us(lambda: served.append((active, 0.5, batch, classes, scores)), calls, before=run),
    }
    parts[f"  amortised: accounting per request (sketches, drift on {active.monitor.n_features} summary features, "
          f"probation; run every {every} requests)"] = per_call_us(account, runs, before=run) / every
    parts["  of which DriftMonitor.update, per request"] = per_call_us(
        lambda: active.monitor.update(np.concatenate(run_of[1]), np.concatenate(run_of[2])), runs, before=run) / every
    parts["  of which reference.summary_features, per request"] = per_call_us(
        lambda: summary_features(np.concatenate(run_of[1])), runs, before=run) / every
    return parts


def measure_grpc(agent: Agent, model_path: Path, inputs: list[np.ndarray], seconds: float, scratch: Path,
                 listener: Listener, rows: Rows) -> dict[str, Any]:
    """The KServe v2 gRPC round trip against a bare session.run, both timed by a client child process
    (GRPC_CHILD) on the same inputs, interleaved; the agent serves from this process."""
    script, samples = scratch / "grpc_client.py", scratch / "grpc_inputs.npy"
    script.write_text(GRPC_CHILD)
    np.save(samples, np.stack(inputs))
    threads = agent.model.session.get_session_options().intra_op_num_threads
    device, served_before = agent.config.device_id, listener.served(agent.config.device_id)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])}
    started = time.perf_counter()
    child = subprocess.run([sys.executable, str(script), str(model_path), f"127.0.0.1:{agent.config.grpc_port}",
                            agent.model.bundle.manifest["name"], str(threads), str(seconds), str(samples)],
                           capture_output=True, text=True, env=env, cwd=str(scratch), timeout=seconds * 4 + 120)
    if child.returncode != 0:
        raise SystemExit(f"the gRPC client child failed ({child.returncode}):\n{child.stdout[-2000:]}\n{child.stderr[-3000:]}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    wall = time.perf_counter() - started
    time.sleep(1.3)  # let the window in progress close and publish
    served = listener.served(device) - served_before
    grpc_calls = sum(n for variant, n in measured["calls"].items() if variant.startswith("gRPC ModelInfer"))
    if served < grpc_calls:
        raise SystemExit(f"the agent's telemetry counted {served} requests for {grpc_calls} gRPC calls")
    p50, p90 = measured["p50_us"], measured["p90_us"]
    overhead = p50["gRPC ModelInfer (raw)"] / p50["bare session.run"] - 1
    for variant in p50:
        rows.add("overhead: grpc", f"{variant} p50", p50[variant], "us", f"p90 {p90[variant]:.1f} us, {measured['calls'][variant]} calls")
    rows.add("overhead: grpc", "gRPC (raw) p50 / bare p50 - 1", overhead, "fraction",
             f"batch 1, {measured['rounds']} interleaved rounds x {BURST} calls per variant in a client child process over "
             f"{wall:.0f} s (incl. start): request built, ModelInfer over loopback to the agent (Agent.run with [serve] "
             f"grpc_port, threads {threads}), first output read back; bare = InferenceSession on the same file and options "
             f"in the child; the agent's telemetry counted {served} requests")
    floor = p50["gRPC ServerLive (no work: the protocol's floor)"]
    rows.add("overhead: grpc", "gRPC (raw) p50 - bare p50", p50["gRPC ModelInfer (raw)"] - p50["bare session.run"], "us",
             f"the absolute cost of the protocol (client and server protobuf, HTTP/2 on loopback, thread hand-offs in "
             f"grpcio's Python client and server) and of the agent's own per-request work; of it, {floor:.0f} us is an "
             f"empty ServerLive round trip")
    return {"p50_us": p50, "p90_us": p90, "overhead": overhead, "rounds": measured["rounds"], "calls": measured["calls"],
            "served_by_agent": served, "intra_op_num_threads": threads}


# -- 3. memory --------------------------------------------------------------------------------------

def _child(script: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(script.parent))


def _last_json(process: subprocess.Popen, what: str, stdin: str = "") -> dict[str, Any]:
    stdout, stderr = process.communicate(stdin, timeout=120)
    if process.returncode != 0 or not stdout.strip():
        raise SystemExit(f"{what} failed ({process.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def kserve_bodies(manifest: dict[str, Any], inputs: list[np.ndarray], count: int = 16) -> list[bytes]:
    name = manifest["input"]["name"]
    return [json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}).encode() for x in inputs[:count]]


CLIENTS = 4


def send_requests(port: int, manifest: dict[str, Any], inputs: list[np.ndarray], requests: int) -> np.ndarray:
    """`requests` KServe v2 infer calls from CLIENTS threads, each on its own HTTP/1.1 keep-alive connection
    (as a local client library would); returns every request's latency in ms."""
    url = f"/v2/models/{manifest['name']}/infer"
    bodies = kserve_bodies(manifest, inputs)
    latencies: list[float] = []
    errors: list[str] = []

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in range(index, requests, CLIENTS):
                began = time.perf_counter()
                connection.request("POST", url, bodies[i % len(bodies)], {"Content-Type": "application/json"})
                response = connection.getresponse()
                body = response.read()
                latencies.append((time.perf_counter() - began) * 1000)
                if response.status != 200:
                    errors.append(f"HTTP {response.status}: {body[:300]!r}")
                    return
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"REST requests to the agent child failed: {errors[0]}")
    return np.asarray(latencies)


def measure_memory(scratch: Path, device_dir: Path, model_path: Path, manifest: dict[str, Any], inputs: list[np.ndarray],
                   requests: int, threads: int, listener: Listener, rows: Rows) -> dict[str, Any]:
    children = scratch / "children"
    children.mkdir()
    (children / "agent_child.py").write_text(AGENT_CHILD)
    (children / "bare_child.py").write_text(BARE_CHILD)
    device = load_agent_config(device_dir).device_id

    agent_child = _child(children / "agent_child.py", str(device_dir))
    ready = json.loads(agent_child.stdout.readline() or '{"error": "no output"}')
    if "port" not in ready:
        agent_child.kill()
        raise SystemExit(f"agent child did not start: {ready} {agent_child.stderr.read()[-3000:]}")
    listener.wait(lambda: device in listener.online, 20, "the agent child's MQTT birth")
    started = time.perf_counter()
    rest_ms = send_requests(ready["port"], manifest, inputs, requests)
    rest_seconds = time.perf_counter() - started
    listener.wait(lambda: listener.served(device) >= requests, 20,
                  f"telemetry of the agent child's {requests} requests to reach the broker")
    agent_result = _last_json(agent_child, "agent child", stdin="stop\n")
    if agent_result["failure"]:
        raise SystemExit(f"agent child: Agent.run failed: {agent_result['failure']}")
    forbidden = [m for m in agent_result["third_party"] if m in FORBIDDEN_IN_AGENT]
    if forbidden:
        raise SystemExit(f"the agent child imported {forbidden}: runtime_agent must not pull in host packages")
    host_only = [m for m in agent_result["third_party"] if m in HOST_ONLY]

    shape = ",".join(str(d) for d in manifest["input"]["shape"])
    bare_result = _last_json(_child(children / "bare_child.py", str(model_path), str(requests), str(threads), shape),
                             "bare onnxruntime child")
    agent_mb, bare_mb = agent_result["vmhwm_kb"] / 1024, bare_result["vmhwm_kb"] / 1024
    rest_p50 = float(np.percentile(rest_ms, 50))
    hint = ("; ~40 ms per request is the signature of Nagle + delayed ACK (response headers and body written "
            "separately on a keep-alive connection, TCP_NODELAY off)" if 35 <= rest_p50 <= 50 else "")
    rows.add("rest", "KServe v2 REST request p50 (agent child)", rest_p50, "ms",
             f"p90 {np.percentile(rest_ms, 90):.2f} ms; {requests} requests of {len(kserve_bodies(manifest, inputs, 1)[0])} "
             f"bytes from {CLIENTS} HTTP/1.1 keep-alive clients; {requests / rest_seconds:.0f} requests/s{hint}")
    rows.add("memory", "agent child peak RSS (VmHWM)", agent_mb, "MiB",
             f"Agent.run (REST + MQTT + outbox, window_s = 1) served {requests} KServe v2 REST requests in {rest_seconds:.1f} s "
             f"({listener.count(device)} telemetry windows published); third-party modules: "
             f"{', '.join(agent_result['third_party'])}" + (f"; host-only modules present: {host_only}" if host_only else ""))
    rows.add("memory", "bare onnxruntime child peak RSS (VmHWM)", bare_mb, "MiB",
             f"numpy + onnxruntime only, same model file, intra_op_num_threads={threads}, {requests} session.run calls; "
             f"third-party modules: {', '.join(bare_result['third_party'])}")
    rows.add("memory", "agent peak RSS beyond the runtime's", agent_mb - bare_mb, "MiB",
             f"both children `{Path(sys.executable).name} -I`; no torch / tensorflow / toolchain in the agent's sys.modules")
    return {"agent_vmhwm_mb": agent_mb, "bare_vmhwm_mb": bare_mb, "requests": requests, "rest_seconds": rest_seconds,
            "rest_p50_ms": rest_p50, "rest_p90_ms": float(np.percentile(rest_ms, 90)), "rest_clients": CLIENTS,
            "agent_modules": agent_result["third_party"], "bare_modules": bare_result["third_party"]}


# -- 4. disk ----------------------------------------------------------------------------------------

def _usage(paths: list[Path], seen: set[tuple[int, int]]) -> tuple[int, int]:
    """(disk bytes = st_blocks * 512, apparent bytes) of files and folders; hard links once, symlinks not followed."""
    disk = apparent = 0
    for root in paths:
        stack = [root]
        while stack:
            path = stack.pop()
            st = path.lstat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            disk += st.st_blocks * 512
            apparent += st.st_size
            if path.is_dir() and not path.is_symlink():
                stack.extend(path.iterdir())
    return disk, apparent


def _distributions(site: Path) -> dict[str, list[Path]]:
    """site-packages entries grouped by the distribution whose RECORD lists them (runtime_agent and the rest by name)."""
    owner: dict[str, str] = {}
    for info in site.glob("*.dist-info"):
        name = info.name.split("-")[0]
        record = info / "RECORD"
        if record.exists():
            for row in csv.reader(io.StringIO(record.read_text())):
                if row and not row[0].startswith(".."):
                    owner[row[0].split("/")[0]] = name
        owner[info.name] = name
    groups: dict[str, list[Path]] = {}
    for entry in site.iterdir():
        groups.setdefault(owner.get(entry.name, entry.name.removesuffix(".py")), []).append(entry)
    return groups


def measure_venv(scratch: Path, bundle: Path, pubkey: Path, sample: np.ndarray, rows: Rows) -> dict[str, Any]:
    python = shutil.which("python3.11") or getattr(sys, "_base_executable", sys.executable)
    venv = scratch / "agent-venv"
    started = time.perf_counter()
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                          "-q", "-c", str(REPO / "requirements.lock"), *AGENT_DEPENDENCIES], capture_output=True, text=True)
    if pip.returncode != 0:
        raise SystemExit(f"pip install {' '.join(AGENT_DEPENDENCIES)} into a fresh venv failed:\n{pip.stderr[-3000:]}")
    site = next((venv / "lib").glob("python*/site-packages"))
    shutil.copytree(REPO / "runtime_agent", site / "runtime_agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    np.save(scratch / "sample.npy", sample)
    smoke = subprocess.run([str(venv / "bin" / "python"), "-I", "-c",
                            "import sys; from runtime_agent.cli import main; import runtime_agent.agent, runtime_agent.server, "
                            "runtime_agent.mqtt_link; code = main(sys.argv[1:]); "
                            "bad = [m for m in ('torch', 'toolchain', 'tensorflow', 'onnx') if m in sys.modules]; "
                            "assert not bad, bad; raise SystemExit(code)",
                            "predict", "--bundle", str(bundle), "--input", str(scratch / "sample.npy"), "--pubkey", str(pubkey),
                            "--json"], capture_output=True, text=True, cwd=str(scratch))
    if smoke.returncode != 0:
        raise SystemExit(f"the agent-only venv cannot run `edge-agent predict`:\n{smoke.stdout[-1000:]}\n{smoke.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze",
                             "--disable-pip-version-check"], capture_output=True, text=True).stdout.split()
    seen: set[tuple[int, int]] = set()
    total_disk, total_apparent = _usage([venv], set())
    groups = {name: _usage(paths, seen) for name, paths in _distributions(site).items()}
    tooling = sum(groups.get(name, (0, 0))[0] for name in ("pip", "setuptools", "pkg_resources", "_distutils_hack",
                                                          "distutils-precedence.pth"))
    biggest = sorted(groups.items(), key=lambda item: -item[1][0])
    rows.add("disk", "agent-only venv size on disk", total_disk / MIB, "MiB",
             f"fresh `{Path(python).name} -m venv` + pip install -c requirements.lock {' '.join(AGENT_DEPENDENCIES)} + runtime_agent "
             f"copied into site-packages, built in this run ({seconds:.0f} s incl. an `edge-agent predict` smoke test from it); "
             f"st_blocks, hard links once, symlinks not followed (the interpreter and stdlib are outside the venv); "
             f"apparent size {total_apparent / MIB:.1f} MiB")
    rows.add("disk", "agent-only venv without pip/setuptools", (total_disk - tooling) / MIB, "MiB",
             "what a device image needs (pip and setuptools are not used at run time)")
    for name, (disk, _) in biggest[:8]:
        rows.add("disk", f"  {name}", disk / MIB, "MiB", "files listed in its RECORD" if name != "runtime_agent" else "copied package")
    return {"python": python, "seconds": seconds, "disk_mb": total_disk / MIB, "apparent_mb": total_apparent / MIB,
            "without_pip_setuptools_mb": (total_disk - tooling) / MIB, "installed": freeze,
            "largest_mb": {name: round(disk / MIB, 2) for name, (disk, _) in biggest[:12]},
            "smoke_test": json.loads(smoke.stdout.strip().splitlines()[-1])}


# -- main -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter measurements (finishes in < 2 minutes)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the synthetic 3xSxS images (default 64)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the benchmark's model (default 6: ~1 min)")
    parser.add_argument("--digits", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the small digits model's overhead (not a target; default: full mode only)")
    parser.add_argument("--threads", type=int, default=1,
                        help="the agent's [serve] threads (onnxruntime intra-op threads) for the overhead measurement; "
                             "default 1: with a multi-thread pool, its spin-waiting workers on this shared 2-core machine "
                             "swing both variants by more than the agent's cost, in either direction, run to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    parser.add_argument("--rebuild", action="store_true",
                        help="--quick: build the bundles even when an identical earlier build is cached")
    args = parser.parse_args(argv)
    overhead_s = 15.0 if args.quick else 60.0
    digits_s = 6.0 if args.quick else 20.0
    requests = 600 if args.quick else 2000
    drift_samples = 5000 if args.quick else 20000
    started = time.perf_counter()
    rows = Rows()
    scratch = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    broker = listener = None
    try:
        with_digits = args.digits if args.digits is not None else not args.quick
        built = scratch / "build"
        pubkey, builds = build_bundles(built, args.image_size, args.epochs, with_digits=with_digits,
                                       reuse=args.quick and not args.rebuild)
        for name, build in builds.items():
            shipped = build["report"]["shipped"]
            rows.add("build", f"{name}: toolchain build", build["seconds"], "s",
                     (f"{build['cached']}; " if build["cached"] else "") +
                     f"{build['bundle'].name}: shipped {shipped.get('name')}, accuracy {shipped.get('accuracy', 0):.3f}, "
                     f"{shipped.get('bytes')} bytes, {shipped.get('parameters')} parameters, {shipped.get('flops')} FLOPs, "
                     f"predicted {shipped.get('latency_ms_predicted')} ms on {BOARD} (profile with {ONNX_ONLY}); "
                     f"`{' '.join(f'{k}={v}' for k, v in BUILD_ENV.items())} "
                     f"{re.sub(r'/[^ ]*/build/', '<tmp>/', build['command'])}`")
        models = {name: extract_model(build["bundle"], scratch / "models" / name) for name, build in builds.items()}
        for name, (_, manifest) in models.items():  # a model at chance would serve unrealistic class statistics
            require_trained(name, builds[name]["report"]["shipped"]["accuracy"], len(manifest["labels"]))

        broker = ManagedBroker(scratch / "broker", port=free_port(), authenticated=False).start()
        listener = Listener(broker)
        data = load_data(built)
        x, _ = data(seed=1, n=256)  # unseen samples of the training distribution: realistic drift statistics
        inputs = {"mobilenetv2": [np.ascontiguousarray(x[i:i + 1]) for i in range(len(x))]}
        if "digits" in builds:
            from sklearn.datasets import load_digits  # host side only: the inputs the digits model was built on
            digits = (load_digits().data.astype(np.float32)).reshape(-1, 1, 8, 8)
            inputs["digits"] = [np.ascontiguousarray(digits[i:i + 1]) for i in range(256)]

        results: dict[str, Any] = {}
        for name, build in builds.items():
            device_dir = provision(scratch / "devices" / name, build["bundle"], pubkey, broker, f"bench-{name}", args.threads)
            with running_agent(device_dir, listener) as agent:
                seconds = overhead_s if name == "mobilenetv2" else digits_s
                log(f"{name}: interleaved agent.infer vs session.run for {seconds:.0f} s")
                results[name] = measure_overhead(name, agent, models[name][0], inputs[name], seconds, listener, rows)
            log(f"{name}: overhead {results[name]['overhead']:+.3f} (agent p50 {results[name]['p50_us']['agent.infer']:.1f} us, "
                f"bare {results[name]['p50_us']['bare session.run']:.1f} us)")

        grpc_dir = provision(scratch / "devices" / "grpc", builds["mobilenetv2"]["bundle"], pubkey, broker, "bench-grpc",
                             args.threads, grpc=True)
        with running_agent(grpc_dir, listener) as agent:
            log(f"mobilenetv2: gRPC ModelInfer vs session.run in a client process for {overhead_s:.0f} s")
            grpc_result = measure_grpc(agent, models["mobilenetv2"][0], inputs["mobilenetv2"], overhead_s, scratch, listener, rows)
        log(f"mobilenetv2: gRPC overhead {grpc_result['overhead']:+.3f} (p50 {grpc_result['p50_us']['gRPC ModelInfer (raw)']:.1f} us, "
            f"bare {grpc_result['p50_us']['bare session.run']:.1f} us)")

        log("drift update cost")
        drift_us = measure_drift_cost(n_features=64, samples=drift_samples, batch_size=1)
        rows.add("drift", "DriftMonitor.update per feature per sample", drift_us, "us",
                 f"measure_drift_cost(n_features=64, samples={drift_samples}, batch_size=1): best of 3 passes, as "
                 f"benchmarks/drift_cost.py; per request of 64 features: {drift_us * 64:.1f} us")
        image = next((us, name) for name, us in results["mobilenetv2"]["breakdown_us"].items() if "DriftMonitor.update" in name)
        n_image = len(models["mobilenetv2"][1]["reference"]["features"])
        rows.add("drift", "DriftMonitor.update per feature per sample, the image model", image[0] / n_image, "us",
                 f"not the target: {image[0]:.1f} us per request / {n_image} summary features (channel mean and std of "
                 f"3x{args.image_size}x{args.image_size}: the cost grows with the pixels, not the feature count)")

        log(f"memory: agent child vs bare onnxruntime child, {requests} requests each")
        rss_dir = provision(scratch / "devices" / "rss", builds["mobilenetv2"]["bundle"], pubkey, broker, "bench-rss", args.threads)
        memory = measure_memory(scratch, rss_dir, models["mobilenetv2"][0], models["mobilenetv2"][1], inputs["mobilenetv2"],
                                requests, results["mobilenetv2"]["intra_op_num_threads"], listener, rows)

        log("disk: fresh agent-only venv")
        venv = measure_venv(scratch, builds["mobilenetv2"]["bundle"], pubkey, x[0], rows)
    finally:
        if listener is not None:
            listener.close()
        if broker is not None:
            broker.stop()
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    total = time.perf_counter() - started
    rows.add("run", "benchmark wall time", total, "s", "--quick" if args.quick else "full")
    width = 110
    print_table([{**row, "notes": row["notes"] if len(row["notes"]) <= width else row["notes"][:width - 3] + "..."}
                 for row in rows.rows], ["section", "measurement", "value", "unit", "notes"])
    print(f"(notes cut at {width} characters; benchmarks/results/agent.json has them in full)")
    mnv2 = results["mobilenetv2"]
    write_results("agent", rows.rows, {
        "agent_p50_overhead_vs_session_run": target(mnv2["overhead"], "<=", 0.05),
        "agent_grpc_p50_overhead_vs_session_run": target(grpc_result["overhead"], "<=", 0.10),
        "drift_update_us_per_feature_per_sample": target(drift_us, "<=", 10.0),
        "agent_rss_beyond_runtime_mb": target(memory["agent_vmhwm_mb"] - memory["bare_vmhwm_mb"], "<=", 50.0),
        "agent_venv_mb": target(venv["disk_mb"], "<=", 300.0),
    }, mode="quick" if args.quick else "full", wall_seconds=round(total, 1),
        model={"name": "mobilenet_v2 (zoo), width_mult 0.5", "input_shape": [3, args.image_size, args.image_size],
               "epochs": args.epochs, "target": f"{BOARD}, {ONNX_ONLY}", "bare_p50_us": round(mnv2["p50_us"]["bare session.run"], 2),
               **{f"shipped_{key}": builds["mobilenetv2"]["report"]["shipped"].get(key)
                  for key in ("name", "accuracy", "bytes", "parameters", "flops", "latency_ms_predicted")}},
        method={
            "agent_p50_overhead_vs_session_run":
                "p50(Agent.infer) / p50(bare InferenceSession.run) - 1, batch 1, in one process, interleaved round-robin in "
                "bursts of 20 calls (order rotated per round) over the same 256 inputs; Agent.run running in a background "
                "thread against a local mosquitto (ManagedBroker(authenticated=False)), window_s = 1, telemetry received by a "
                "subscriber checked; the bare session is a separate InferenceSession on the bundle's model file (sha256 "
                "checked) with the agent session's own SessionOptions (get_session_options(): the agent's [serve] threads, "
                "--threads, default 1) and providers",
            "agent_grpc_p50_overhead_vs_session_run":
                "p50(KServe v2 gRPC ModelInfer round trip, raw_input_contents, batch 1, every output) / p50(bare "
                "InferenceSession.run) - 1, both timed in one client child process, interleaved round-robin in bursts of 20 "
                "calls (order rotated per round) over the same 256 inputs; the agent (Agent.run with [serve] grpc_port, the "
                "same threads) serves from the benchmark process; the bare session has the same file and intra-op threads",
            "drift_update_us_per_feature_per_sample": "benchmarks/drift_cost.measure_drift_cost, 64 features, batch 1",
            "agent_rss_beyond_runtime_mb":
                "VmHWM of a `python -I` child running Agent.run (REST + MQTT + outbox) that served N KServe v2 REST requests, "
                "minus VmHWM of a `python -I` child with numpy + onnxruntime only running the same model file N times "
                "(same intra_op_num_threads); MiB",
            "agent_venv_mb": "disk usage (st_blocks) of a venv built fresh in this run: python3.11 -m venv, pip install -c "
                             "requirements.lock numpy onnxruntime paho-mqtt cryptography, runtime_agent copied in; MiB "
                             "(pip and setuptools included)",
        },
        overhead={name: {k: v for k, v in r.items()} for name, r in results.items()}, grpc=grpc_result, memory=memory, venv=venv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
