"""Benchmark jobs through a real agent: do the device's numbers agree with timing the files here, and how
much does a job disturb serving?

1. Builds (or reuses, as benchmarks/agent.py does) the signed MobileNetV2 x0.5 bundle of benchmarks/agent.py,
   starts a real mosquitto and a real `edge-agent run` process serving it (`[serve] threads` = --threads).
2. The models to time: that MobileNetV2's ONNX file and generated variants (toolchain.perf.variants: a dense
   CNN, a depthwise "mobile" net and an MLP, FP32 and INT8).
3. Agreement: rounds of (time every file directly here: `runtime_agent.model.open_session` with the same
   threads, the same seeded inputs, warm-up, then `runs` timed `session.run`s) and (`toolchain bench --device`'s
   library call: one signed job with every file, no REST traffic), alternating, so the machine's noise lands
   on both. Per model: the median over rounds of each side's p50, and their difference. Target: every model
   within 10%.
4. Disturbance: a REST client sends KServe v2 inferences one after another, first alone (baseline), then
   while a job runs (the same job, with its default pacing `duty` = 0.5). REST p50/p99 of both are
   reported, and the job's own p50s under that load.

`python benchmarks/device_bench.py [--quick] [--threads 1] [--rounds 3] [--runs 200]`; writes
benchmarks/results/device_bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from _common import print_table, target, write_results
from agent import BIN, BUILD_CACHE, FLEET, build_bundles, extract_model, provision
from runtime_agent.bench_job import sample_feeds
from runtime_agent.model import open_session
from toolchain.deploy.broker import ManagedBroker, free_port
from toolchain.deploy.device_bench import JobSettings, bench_on_device
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push import PushClient
from toolchain.perf.variants import VariantSpec, write_variant

DEVICE = "bench-dev"
VARIANTS = [VariantSpec("cnn", 32, 2, 3, 32, "fp32"), VariantSpec("cnn", 32, 2, 3, 32, "int8"),
            VariantSpec("mobile", 64, 3, 3, 32, "fp32"), VariantSpec("mlp", 512, 2, 1, 256, "fp32")]


def served_bundle(root: Path, rebuild: bool) -> tuple[Path, Path]:
    """benchmarks/agent.py's MobileNetV2 bundle and its public key: its cached build whatever sources it was
    built from (what is served does not change what a job measures), else a fresh build."""
    cached = sorted(BUILD_CACHE.glob("*/builds.json"))
    if cached and not rebuild:
        shutil.copytree(cached[-1].parent, root)
        return root / "keys" / "signing.pub", root / json.loads((root / "builds.json").read_text())["mobilenetv2"]["bundle"]
    pubkey, builds = build_bundles(root, 64, 6, with_digits=False, reuse=False)
    return pubkey, builds["mobilenetv2"]["bundle"]


def time_here(path: Path, settings: JobSettings) -> float:
    """p50 (ms) of `path` timed in this process as the agent times it, without pacing."""
    session = open_session(path.suffix[1:], path.read_bytes(), path.name, (), settings.threads or 0)
    feeds = sample_feeds(session, {}, np.random.default_rng(settings.seed))
    latencies = []
    for index in range(settings.warmup + settings.runs):
        began = time.perf_counter()
        session.run(None, feeds)
        if index >= settings.warmup:
            latencies.append((time.perf_counter() - began) * 1000)
    return float(np.percentile(latencies, 50))


class RestLoad:
    """One REST client, requests back to back; latencies (ms) of those that started inside each phase."""

    def __init__(self, url: str, body: bytes) -> None:
        self.url, self.body = url, body
        self.samples: list[tuple[float, float]] = []  # (start, ms)
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            request = urllib.request.Request(self.url, data=self.body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
            except OSError:
                self.failed += 1
                continue
            self.samples.append((began, (time.perf_counter() - began) * 1000))

    def between(self, start: float, end: float) -> list[float]:
        return [ms for began, ms in self.samples if start <= began < end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def stats(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return {"n": len(values), "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and runs (~2 minutes after the build)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the agent and of the direct timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rest-seconds", type=float, default=8.0, help="REST baseline duration")
    parser.add_argument("--rebuild", action="store_true", help="build the bundle even if a cached one matches")
    args = parser.parse_args()
    rounds, runs = (2, 150) if args.quick else (args.rounds, args.runs)
    settings = JobSettings(runs=runs, warmup=10, threads=args.threads, duty=0.5)
    root = Path(tempfile.mkdtemp(prefix="device-bench-"))
    broker = agent = None
    try:
        pubkey, bundle = served_bundle(root / "built", args.rebuild)
        key = pubkey.with_name("signing.key")
        model, manifest = extract_model(bundle, root / "models")
        files = {"mobilenetv2-x0.5": model, **{spec.name: write_variant(spec, root / "models") for spec in VARIANTS}}
        broker = ManagedBroker(root / "broker", port=free_port(), authenticated=False).start()
        device = provision(root / "device", bundle, pubkey, broker, DEVICE, threads=args.threads)
        log = root / "agent.log"
        agent = subprocess.Popen([str(BIN / "edge-agent"), "run", "--device-dir", str(device)], stdout=open(log, "wb"),
                                 stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while b"serving" not in log.read_bytes():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the agent did not start:\n{log.read_text()}")
            time.sleep(0.1)
        port = int(next(line for line in (device / "agent.toml").read_text().splitlines() if line.startswith("port")).split("=")[1])
        here: dict[str, list[float]] = {name: [] for name in files}
        there: dict[str, list[float]] = {name: [] for name in files}
        with PushClient(BrokerLogin(broker.url)) as client:
            for round_index in range(rounds):
                for name, path in files.items():
                    here[name].append(time_here(path, settings))
                result = bench_on_device(files, DEVICE, client, fleet=FLEET, key=key, settings=settings,
                                         results_dir=root / "results")
                for name, row in result["models"].items():
                    if row.get("error"):
                        raise SystemExit(f"the device could not time {name}: {row['error']}")
                    there[name].append(row["p50_ms"])
                print(f"round {round_index + 1}/{rounds} done ({result['seconds']:.1f} s for the job)", flush=True)
            shape = [1, *manifest["input"]["shape"]]
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            body = json.dumps({"inputs": [{"name": manifest["input"]["name"], "shape": shape, "datatype": "FP32",
                                           "data": x.ravel().tolist()}]}).encode()
            load = RestLoad(f"http://127.0.0.1:{port}/v2/models/{manifest['name']}/infer", body)
            time.sleep(1.0)
            quiet_start = time.perf_counter()
            time.sleep(args.rest_seconds)
            job_start = quiet_end = time.perf_counter()
            loaded = bench_on_device(files, DEVICE, client, fleet=FLEET, key=key, settings=settings,
                                     results_dir=root / "results")
            job_end = time.perf_counter()
            load.stop()
        rows = []
        for name in files:
            local, device_p50 = statistics.median(here[name]), statistics.median(there[name])
            rows.append({"model": name, "here_p50_ms": round(local, 3), "device_p50_ms": round(device_p50, 3),
                         "diff_pct": round(100 * (device_p50 / local - 1), 2),
                         "device_p99_ms": loaded["models"][name]["p99_ms"],
                         "under_rest_p50_ms": loaded["models"][name]["p50_ms"],
                         "rounds_here": [round(v, 3) for v in here[name]], "rounds_device": there[name]})
        print_table(rows, ["model", "here_p50_ms", "device_p50_ms", "diff_pct", "under_rest_p50_ms"])
        quiet, during = stats(load.between(quiet_start, quiet_end)), stats(load.between(job_start, job_end))
        print(f"\nREST (one client, back to back): alone p50 {quiet['p50_ms']} ms p99 {quiet['p99_ms']} ms "
              f"(n={quiet['n']}); during a job (duty {settings.duty}) p50 {during['p50_ms']} ms p99 {during['p99_ms']} ms "
              f"(n={during['n']}); failed requests {load.failed}")
        worst = max(abs(row["diff_pct"]) for row in rows)
        write_results("device_bench", rows, {
            "device p50 within 10% of timing the same files here, worst model (%)": target(worst, "<=", 10.0),
            "REST requests failed during a job": target(float(load.failed), "<=", 0.0),
        }, rest={"alone": quiet, "during_job": during, "job_seconds": round(job_end - job_start, 2)},
            settings={"threads": args.threads, "rounds": rounds, "runs": runs, "warmup": settings.warmup,
                      "duty": settings.duty}, note="REST p99 during a job is reported, not a target: see README")
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(15)
        if broker is not None:
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
