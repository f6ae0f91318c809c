"""What serving costs in CPU when requests are few, and what the agent's spin cap (`[serve] spin_us`) gives up
for it.

onnxruntime's intra-op threads spin for more work after every run (its own policy: ~40 ms). On a board that
answers a few requests per second, that is most of a core burning for nothing: heat, battery, and a core the
rest of the device does not get. The agent caps the spin (runtime_agent.config.SPIN_US, 1 ms by default).

For each model (generated variants, toolchain.perf.variants: a small dense CNN like the default example, a
depthwise "mobile" net at 64 px and one at 128 px) and each setting (onnxruntime's own policy, the agent's
cap, never spinning, one thread), sessions opened exactly as the agent opens them
(`runtime_agent.model.open_session`, threads 0 = one per core unless "1 thread"):
- back to back: p50 of consecutive runs (a busy server), and the process's CPU per second;
- paced: one run every 1/RATE s (a quiet device; default 20/s), p50 and the process's CPU in % of one core.
Settings are measured in rounds, in rotated order, and each number is the median over rounds, so the
machine's noise lands on every setting alike.

Targets: paced CPU with the agent's cap at most 1/4 of onnxruntime's own policy on every model; back-to-back
p50 with the cap within 10% of onnxruntime's own policy (the cap must not cost a busy server).

`python benchmarks/serving_cpu.py [--quick] [--rate 20] [--rounds 3]`; writes benchmarks/results/serving_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import print_table, target, write_results
from runtime_agent.config import SPIN_US
from runtime_agent.model import open_session
from toolchain.perf.variants import VariantSpec, write_variant

MODELS = {"cnn (like the default example)": VariantSpec("cnn", 32, 2, 3, 8, "fp32"),
          "mobile @64": VariantSpec("mobile", 32, 5, 3, 64, "fp32"),
          "mobile @128": VariantSpec("mobile", 32, 5, 3, 128, "fp32")}
SETTINGS = {"onnxruntime's own policy": (0, -1), f"agent default (spin {SPIN_US} us)": (0, SPIN_US),
            "never spin": (0, 0), "1 thread": (1, SPIN_US)}  # name: (threads, spin_us)
OWN, CAPPED = "onnxruntime's own policy", f"agent default (spin {SPIN_US} us)"


def cpu_seconds() -> float:
    user, system = os.times()[:2]
    return user + system


def measure(session: Any, feed: dict[str, np.ndarray], seconds: float, interval: float) -> tuple[float, float]:
    """p50 (us) of `session.run` and CPU (% of one core) over `seconds`, one run every `interval` s (0: back to back)."""
    latencies, started, cpu = [], time.monotonic(), cpu_seconds()
    next_at = started
    while (now := time.monotonic()) < started + seconds:
        if now < next_at:
            time.sleep(next_at - now)
        began = time.perf_counter()
        session.run(None, feed)
        latencies.append((time.perf_counter() - began) * 1e6)
        next_at += interval
    return float(np.percentile(latencies, 50)), (cpu_seconds() - cpu) / (time.monotonic() - started) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s back to back and 2 s paced")
    parser.add_argument("--rate", type=float, default=20.0, help="paced requests per second")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds, busy_s, paced_s = (1, 1.0, 2.0) if args.quick else (args.rounds, 2.0, 4.0)
    folder = Path(tempfile.mkdtemp(prefix="serving-cpu-"))
    samples: dict[tuple[str, str], dict[str, list[float]]] = {}
    for model_name, spec in MODELS.items():
        path = write_variant(spec, folder)
        feed = {"input": np.random.default_rng(0).standard_normal((1, *spec.input_shape)).astype(np.float32)}
        sessions = {}
        for name, (threads, spin_us) in SETTINGS.items():
            sessions[name] = open_session("onnx", path.read_bytes(), path.name, (), threads, spin_us)
            feed = {sessions[name].get_inputs()[0].name: next(iter(feed.values()))}
            for _ in range(50):
                sessions[name].run(None, feed)
        names = list(SETTINGS)
        for round_index in range(rounds):
            for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                time.sleep(0.2)  # the last setting's threads stop spinning before this one is measured
                busy_p50, busy_cpu = measure(sessions[name], feed, busy_s, 0.0)
                time.sleep(0.2)
                paced_p50, paced_cpu = measure(sessions[name], feed, paced_s, 1 / args.rate)
                for key, value in (("busy_p50", busy_p50), ("busy_cpu", busy_cpu), ("paced_p50", paced_p50), ("paced_cpu", paced_cpu)):
                    samples.setdefault((model_name, name), {}).setdefault(key, []).append(value)
            print(f"{model_name}: round {round_index + 1}/{rounds} done", flush=True)
    rows = [{"model": model, "setting": setting, **{key: round(statistics.median(values), 1) for key, values in measured.items()}}
            for (model, setting), measured in samples.items()]
    print()
    print_table(rows, ["model", "setting", "busy_p50", "busy_cpu", "paced_p50", "paced_cpu"])
    print(f"\np50 in us; CPU in % of one core ({os.cpu_count()} cores here); paced: {args.rate:g} runs/s; "
          f"median of {rounds} round(s)")
    by = {(row["model"], row["setting"]): row for row in rows}
    targets: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        own, capped = by[(model, OWN)], by[(model, CAPPED)]
        targets[f"{model}: paced CPU, cap / own policy"] = target(capped["paced_cpu"] / max(own["paced_cpu"], 1e-9), "<=", 0.25)
        targets[f"{model}: back-to-back p50, cap / own policy"] = target(capped["busy_p50"] / own["busy_p50"], "<=", 1.10)
    write_results("serving_cpu", rows, targets, rate=args.rate, rounds=rounds, quick=args.quick,
                  models={name: spec.to_dict() for name, spec in MODELS.items()})


if __name__ == "__main__":
    main()
