"""Benchmark the spine on the embedded default example (digits), side by side in one run.

1. Times the real command `toolchain build --target jetson --budget quick` (target: <= 3 minutes).
2. Rebuilds the candidates in-process and measures, interleaved round by round on one core, the torch
   eager FP32 teacher, ONNX FP32, ONNX INT8 (static QDQ) and ONNX FP16: latency p50/p90, size, accuracy.
Targets: build time, shipped accuracy drop vs FP32 (<= 1.0 pp), INT8 file / FP32 file (<= 0.35).

    python benchmarks/build_default.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _common import print_table, target, write_results
from toolchain.core.config import load_config
from toolchain.core.data import load_dataset
from toolchain.runtime.measure import make_feeds, make_session
from toolchain.passes.shipping.evaluate import EvaluatePass
from toolchain.passes.torch.export_onnx import ExportOnnxPass
from toolchain.passes.onnx.quantize_fp16 import QuantizeFp16Pass
from toolchain.passes.onnx.quantize_int8 import QuantizeInt8Pass
from toolchain.passes.torch.train import TrainPass
from toolchain.training.fit import evaluate_torch
from toolchain.core.seeding import seed_everything
from toolchain.targets.profiles import resolve_target
from toolchain.core.contract import BuildContext
from toolchain.build.workflow import run_passes


def timed_cli_build(out: Path, keys: Path) -> tuple[float, dict]:
    toolchain = Path(sys.executable).parent / "toolchain"
    env = dict(os.environ, EDGE_TOOLCHAIN_KEYS=str(keys))
    started = time.perf_counter()
    subprocess.run([str(toolchain), "build", "--target", "jetson", "--budget", "quick", "--out", str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, json.loads((out / "report.json").read_text())


def interleaved(runners: dict[str, Callable[[], object]], seconds: float, warmup: int = 50) -> dict[str, np.ndarray]:
    """Round-robin batches of runs so the machine's noise lands on every variant alike."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, run in runners.items():
            for _ in range(20):
                started = time.perf_counter_ns()
                run()
                samples[name].append((time.perf_counter_ns() - started) / 1e6)
    return {name: np.asarray(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter latency measurement (finishes in < 2 minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as scratch:
        scratch = Path(scratch)
        build_seconds, report = timed_cli_build(scratch / "dist", scratch / "keys")
        print(f"toolchain build --target jetson --budget quick: {build_seconds:.1f} s, shipped {report['shipped']['name']}")

        config = load_config(None)
        seed_everything(0)
        ctx = BuildContext(config=config, profile=resolve_target("jetson"), dataset=load_dataset(config, 0),
                           out_dir=scratch / "unused", work_dir=scratch, seed=0, budget="quick")
        ctx.console.quiet = True
        artifact = run_passes([TrainPass(), ExportOnnxPass(), QuantizeInt8Pass(), QuantizeFp16Pass(), EvaluatePass()], ctx)

        teacher = artifact.module.eval()
        one = torch.from_numpy(ctx.dataset.x_test[:1])
        runners: dict[str, Callable[[], object]] = {}
        with torch.no_grad():
            runners["torch eager fp32"] = lambda: teacher(one)
            for candidate in artifact.candidates:
                session = make_session(candidate.path, threads=1)
                feeds = make_feeds(session, ctx.dataset.input_shape)
                runners[candidate.name] = (lambda s=session, f=feeds: s.run(None, f))
            latencies = interleaved(runners, seconds=10.0 if args.quick else 40.0)

        state = io.BytesIO()
        torch.save(teacher.state_dict(), state)
        _, torch_accuracy = evaluate_torch(teacher, torch.from_numpy(ctx.dataset.x_test), torch.from_numpy(ctx.dataset.y_test))
        sizes = {"torch eager fp32": len(state.getvalue()), **{c.name: c.bytes for c in artifact.candidates}}
        accuracy = {"torch eager fp32": torch_accuracy, **{c.name: c.metrics["accuracy"] for c in artifact.candidates}}
        fp32_p50 = float(np.percentile(latencies["onnx-fp32"], 50))
        rows = [{"variant": name, "p50_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90)),
                 "runs": int(len(v)), "vs_onnx_fp32": float(np.percentile(v, 50)) / fp32_p50,
                 "bytes": sizes[name], "accuracy": accuracy[name]} for name, v in latencies.items()]

    print_table(rows, ["variant", "p50_ms", "p90_ms", "vs_onnx_fp32", "runs", "bytes", "accuracy"])
    by_name = {row["variant"]: row for row in rows}
    drop_pp = 100 * (report["reference"]["accuracy"] - report["shipped"]["accuracy"])
    write_results("build_default", rows, {
        "build_seconds_quick_jetson": target(build_seconds, "<=", 180),
        "shipped_accuracy_drop_pp": target(drop_pp, "<=", 1.0),
        "int8_bytes_over_fp32_bytes": target(by_name["onnx-int8-qdq"]["bytes"] / by_name["onnx-fp32"]["bytes"], "<=", 0.35),
    }, shipped=report["shipped"]["name"], gate=[{k: c[k] for k in ("name", "accepted", "verdict")} for c in report["candidates"]])


if __name__ == "__main__":
    main()
