"""Model push: transfer throughput, install + swap time, and what serving feels during the swap.

Builds the default example (quick budget, a throwaway key), pads a re-signed newer version of it to
`--mb` MB (an extra artifact with role "padding"), starts a local mosquitto and a real agent
(`edge-agent run`), and pushes with `toolchain.deploy.push.PushSender` in 64 KiB chunks, window 32, while a
REST client keeps calling the agent's KServe v2 `infer` endpoint over one keep-alive connection.

Reported per push (median over `--runs`):
- throughput: bundle bytes / (offer -> the device's ack that it holds every chunk, after hashing the file);
- install + swap: last chunk handed to MQTT -> the device's `installed` event (its own timestamp), and
  -> the first REST answer served by the new version;
- REST latency p50/p99 before the push (idle agent) vs during it (offer -> 0.5 s after the swap),
  and failed requests during the push (target: 0). The client opens a connection per request: over a
  keep-alive connection the agent's server answers in two TCP writes (headers, then body), which Nagle's
  algorithm and the client's delayed ACK stall by ~40 ms; `keepalive_p50_ms_before` records that.
Targets: throughput >= 10 MB/s, failed requests == 0.

    python benchmarks/push.py [--quick] [--mb 50] [--runs 3] [--bundle B --keys DIR]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from _common import print_table, target, write_results

BIN = Path(sys.executable).parent
TARGET_MB_S = 10.0


def build_base(work: Path) -> Path:
    out = work / "dist"
    done = subprocess.run([str(BIN / "toolchain"), "build", "--target", "jetson", "--budget", "quick", "--out", str(out)],
                          capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise SystemExit(f"build failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def given_or_built(bundle: Path | None, keys: Path | None, work: Path) -> tuple[Path, Path]:
    """(bundle, key folder): the ones given (`--bundle B --keys DIR`), else `build_base` in `work` with its key."""
    if bundle is not None and keys is not None:
        return bundle.resolve(), keys.resolve()
    started = time.monotonic()
    bundle = build_base(work)
    print(f"built {bundle.name} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return bundle, work / "keys"


def padded_version(base: Path, keys: Path, out: Path, version: int, megabytes: float) -> Path:
    """The base bundle re-signed as `version` with `megabytes` of random padding (a listed artifact)."""
    from runtime_agent.bundle import bundle_filename, read_bundle, write_bundle
    from runtime_agent.signing import load_private_key, load_public_key

    bundle = read_bundle(base, load_public_key(keys / "signing.pub"))
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "key_id")}
    manifest["version"] = version
    padding = int(megabytes * 1e6) - base.stat().st_size
    files = dict(bundle.files, **{"padding.bin": np.random.default_rng(version).bytes(max(0, padding))})
    manifest["artifacts"] = [dict(a) for a in manifest["artifacts"]] + [
        {"path": "padding.bin", "format": "bin", "precision": None, "runtime": None, "role": "padding"}]
    out.mkdir(parents=True, exist_ok=True)
    path = out / bundle_filename(manifest["name"], version, manifest["target"])
    return write_bundle(path, manifest, files, load_private_key(keys / "signing.key"))


def local_device(folder: Path, base: Path, keys: Path, broker_url: str, device_id: str, fleet: str,
                 serve_extra: str = "", probation_s: float = 86400) -> int:
    """Provision `folder` as a device of the local broker: the bundle, the key it trusts and agent.toml with
    REST on a free port (returned), 1 s telemetry windows and a probation that never ends by requests
    (`probation_s`: by time; the default keeps it out of the way)."""
    from toolchain.deploy.broker import free_port

    folder.mkdir()
    shutil.copyfile(base, folder / "current.bundle")
    shutil.copyfile(keys / "signing.pub", folder / "trusted.pub")
    port = free_port()
    (folder / "agent.toml").write_text(
        f'device_id = "{device_id}"\nfleet = "{fleet}"\nbroker = "{broker_url}"\n[serve]\nhost = "127.0.0.1"\n'
        f'port = {port}\n{serve_extra}[telemetry]\nwindow_s = 1\n[probation]\nrequests = 1000000\nseconds = {probation_s:g}\n')
    return port


def start_agent(device: Path, log: Path) -> subprocess.Popen:
    """`edge-agent run` on `device`, once it serves (its output appended to `log`)."""
    agent = subprocess.Popen([str(BIN / "edge-agent"), "run", "--device-dir", str(device)],
                             stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b"serving" not in log.read_bytes():
        if agent.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"agent did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return agent


def sample_input(bundle: Path, keys: Path) -> np.ndarray:
    """The first of the sample inputs the build stored in `bundle` (one request's worth)."""
    from runtime_agent.bundle import read_bundle
    from runtime_agent.signing import load_public_key

    return np.load(io.BytesIO(read_bundle(bundle, load_public_key(keys / "signing.pub")).files["samples.npz"]))["x"][0]


def _client_process(port: int, body: bytes, rps: float, stop: Any, out: Any) -> None:
    """Paced KServe v2 inferences (a new connection each) until `stop`; sends back every record."""
    records = []
    interval = 1.0 / rps
    next_at = time.perf_counter()
    while not stop.is_set():
        next_at += interval
        wall, started = time.time(), time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            status, version = _infer(connection, body)
        except (OSError, http.client.HTTPException, ValueError):
            status, version = 0, "?"
        finally:
            connection.close()
        records.append((wall, (time.perf_counter() - started) * 1000, status, version))
        time.sleep(max(0.0, next_at - time.perf_counter()))
    out.send(records)
    out.close()


def _infer(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, str]:
    connection.request("POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    return response.status, str(answer.get("model_version", "?"))


class RestClient:
    """A paced REST client in its own process (it must not share the sender's interpreter lock); every
    request is recorded with its wall-clock start, latency, HTTP status and the model version that answered."""

    def __init__(self, port: int, x: np.ndarray, rps: float) -> None:
        self.port = port
        self.body = json.dumps({"inputs": [{"name": "input", "shape": [1, *x.shape], "datatype": "FP32",
                                            "data": x.ravel().tolist()}]}).encode()  # bytes: one send() with the headers
        self.records: list[tuple[float, float, int, str]] = []
        self._stop = multiprocessing.Event()
        self._receive, send = multiprocessing.Pipe(duplex=False)
        self._process = multiprocessing.Process(target=_client_process, args=(port, self.body, rps, self._stop, send), daemon=True)
        self._process.start()

    def stop(self) -> list[tuple[float, float, int, str]]:
        if not self._stop.is_set():
            self._stop.set()
            self.records = self._receive.recv()
            self._process.join(15)
        return self.records

    def between(self, t0: float, t1: float) -> list[tuple[float, float, int, str]]:
        return [r for r in self.records if t0 <= r[0] < t1]


def keepalive_p50_ms(port: int, body: bytes, n: int = 50) -> float:
    """Median latency over one keep-alive connection (what Triton/KServe clients do), for comparison."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            _infer(connection, body)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        connection.close()
    return float(np.median(times))


def wait_for_version(port: int, body: bytes, version: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            if _infer(connection, body)[1] == str(version):
                return
        finally:
            connection.close()
        time.sleep(0.02)
    raise SystemExit(f"the agent does not serve version {version} {timeout_s:.0f} s after installing it")


def latency_stats(records: list[tuple[float, float, int, str]]) -> dict[str, Any]:
    ok = np.array([r[1] for r in records if r[2] == 200])
    return {"requests": len(records), "failed": sum(r[2] != 200 for r in records),
            "p50_ms": float(np.percentile(ok, 50)) if len(ok) else None,
            "p99_ms": float(np.percentile(ok, 99)) if len(ok) else None,
            "max_ms": float(ok.max()) if len(ok) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one push (finishes well within 2 minutes)")
    parser.add_argument("--mb", type=float, default=50.0, help="bundle size in MB")
    parser.add_argument("--runs", type=int, default=3, help="pushes (each a newer version)")
    parser.add_argument("--chunk-kb", type=int, default=64)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--rps", type=float, default=100.0, help="REST requests per second during the measurement")
    parser.add_argument("--bundle", type=Path, help="push variants of this bundle instead of building one "
                                                   "(needs --keys: the folder with the signing.key that signed it)")
    parser.add_argument("--keys", type=Path, help="key folder for --bundle")
    args = parser.parse_args()
    if (args.bundle is None) != (args.keys is None):
        parser.error("--bundle and --keys go together")
    runs = 1 if args.quick else args.runs
    idle_s = 2.0 if args.quick else 5.0

    work = Path(tempfile.mkdtemp(prefix="bench-push-"))
    os.environ["EDGE_TOOLCHAIN_KEYS"] = str(work / "keys")  # a throwaway key, never the user's
    from toolchain.deploy.broker import ManagedBroker, free_port
    from toolchain.deploy.push import PushSender, load_push_bundle

    broker = agent = client = None
    keepalive_ms = float("nan")
    rows: list[dict[str, Any]] = []
    try:
        started = time.monotonic()
        if args.bundle:
            base, keys = args.bundle.resolve(), args.keys.resolve()
        else:
            base, keys = build_base(work), work / "keys"
            print(f"built {base.name} in {time.monotonic() - started:.1f} s", file=sys.stderr)
        broker = ManagedBroker(work / "broker", port=free_port(), authenticated=False).start()
        device = work / "device"
        port = local_device(device, base, keys, broker.url, "bench-1", "bench")
        log = work / "agent.log"
        agent = start_agent(device, log)
        x = sample_input(base, keys)
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, *x.shape], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        keepalive_ms = keepalive_p50_ms(port, body)
        for run in range(runs):
            version = run + 2
            path = padded_version(base, keys, work / "bundles", version, args.mb)
            bundle = load_push_bundle(path, keys / "signing.pub")
            client = RestClient(port, x, args.rps)
            time.sleep(idle_s)
            result = PushSender(bundle, "bench-1", "bench", broker=broker.url, chunk_kb=args.chunk_kb,
                                window=args.window).run(timeout_s=120)
            if result.state != "installed":
                raise SystemExit(f"push {run + 1} failed: {result.state}: {result.reason}\n{log.read_text()[-3000:]}")
            wait_for_version(port, body, version)
            time.sleep(0.5)
            client.stop()
            timeline = result.timeline
            new_answers = [r[0] + r[1] / 1000 for r in client.records if r[3] == str(version)]
            if not new_answers:
                raise SystemExit(f"no paced request was answered by version {version}")
            first_new = min(new_answers)
            before = latency_stats(client.between(timeline["offer"] - idle_s + 0.2, timeline["offer"]))
            during = latency_stats(client.between(timeline["offer"], first_new + 0.5))
            swap = latency_stats(client.between(timeline["sent"], first_new + 0.5))
            client = None
            rows.append({
                "run": run + 1, "version": version, "mb": round(result.bytes / 1e6, 2), "chunks": result.chunks,
                "mb_per_s": round(result.mb_per_s, 2), "transfer_s": result.transfer_seconds,
                "send_s": round(timeline["sent"] - timeline["offer"], 4),
                "install_swap_s": round(timeline["installed"] - timeline["sent"], 4),
                "first_new_answer_s": round(first_new - timeline["sent"], 4),
                "resent": result.resent, "before_p50_ms": before["p50_ms"], "before_p99_ms": before["p99_ms"],
                "push_p50_ms": during["p50_ms"], "push_p99_ms": during["p99_ms"],
                "swap_p50_ms": swap["p50_ms"], "swap_p99_ms": swap["p99_ms"], "swap_max_ms": swap["max_ms"],
                "requests_before": before["requests"], "requests_during": during["requests"],
                "failed_before": before["failed"], "failed_during": during["failed"]})
            print(f"push {run + 1}/{runs}: {rows[-1]['mb_per_s']} MB/s, install+swap {rows[-1]['install_swap_s']} s",
                  file=sys.stderr)
    finally:
        if client:
            client.stop()
        if agent and agent.poll() is None:
            agent.terminate()
            agent.wait(30)
        if broker:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    print_table(rows, ["run", "mb", "mb_per_s", "transfer_s", "install_swap_s", "first_new_answer_s", "resent",
                       "before_p50_ms", "before_p99_ms", "push_p50_ms", "push_p99_ms", "swap_p50_ms", "swap_p99_ms",
                       "swap_max_ms", "requests_during", "failed_during"])
    failed = sum(r["failed_during"] + r["failed_before"] for r in rows)
    targets = {"push throughput MB/s (median)": target(median(r["mb_per_s"] for r in rows), ">=", TARGET_MB_S),
               "failed REST requests during pushes": target(float(failed), "<=", 0)}
    write_results("push", rows, targets, settings={"mb": args.mb, "chunk_kb": args.chunk_kb, "window": args.window,
                                                   "runs": runs, "quick": args.quick, "rest_rps": args.rps},
                  summary={"install_swap_s_median": median(r["install_swap_s"] for r in rows),
                           "first_new_answer_s_median": median(r["first_new_answer_s"] for r in rows),
                           "keepalive_p50_ms_before": round(keepalive_ms, 3)})
    print(f"REST p50 over one keep-alive connection (idle): {keepalive_ms:.2f} ms")


if __name__ == "__main__":
    main()
