"""INT8 speed on a real-size model: MobileNetV2 (width 1.0) at 3x224x224, batch 1, one onnxruntime thread.

Side by side, timed interleaved round by round in one run:
- `fp32`: the ONNX export (`toolchain.export.onnx.export_module`);
- `ort one-liner int8`: `quantize_static(fp32, out, reader)` with every option at its default (QDQ,
  per-tensor, S8S8, min/max): what a user gets without this toolchain;
- `toolchain int8 before`: the quantize-int8 pass as it was before calibration and float layers were
  chosen by measurement: per-channel QDQ, U8S8, min/max, every layer INT8 (`quantize_int8` defaults);
- `toolchain int8 after`: what the quantize-int8 pass makes now and the gate would take on speed:
  `onnx-int8-fast` when the pass added it (the layers profiled slower in INT8 on this host kept in
  float), else `onnx-int8-qdq` (the calibration chosen on validation).
Speed does not depend on the weights' values and training MobileNetV2 at 224x224 takes far longer
than this benchmark may, so the network keeps its initial random weights, with batch-norm statistics
taken from the images (so activations have realistic ranges for calibration); the images are the
synthetic gratings of the other MobileNetV2 benchmarks (benchmarks/_gratings.py) at 224x224. An
untrained network has no accuracy to keep (tried: a head trained on its frozen features reached 0.17,
chance 0.10, and its near-tied logits flip under any quantization), so accuracy is checked on trained
models elsewhere (tests/passes/test_quantize_int8_*.py, benchmarks/compression.py); here each file's
mean absolute logit error vs FP32 as a share of their range (`logit_error`) and top-1 agreement on
the test split are reported (the untrained network predicts one class: `fp32_classes_predicted`).

Target (issue 14): toolchain INT8 / FP32 p50 latency <= 0.45. The load of the shared machine during
the timing is printed and stored (`other_cpu_pct`: what other processes used, 100 = one core).

    python benchmarks/int8_speed.py [--quick]

`--quick`: 200 images, 32 representative samples, 30 s of timing (about 2 minutes on two cores);
the full run: 600 images, 256 samples, 120 s of timing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import quantize_static

from _common import print_table, target, write_results
from _gratings import data_py
from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.config import load_config
from toolchain.core.contract import BuildContext
from toolchain.core.data import load_dataset
from toolchain.core.seeding import seed_everything
from toolchain.core.zoo import MODELS
from toolchain.export.onnx import export_module
from toolchain.passes.onnx.quantize_int8 import QuantizeInt8Pass
from toolchain.quantize.int8 import ArrayCalibrationReader, prepared_reference, quantize_int8, representative_samples
from toolchain.runtime.measure import measure_latencies
from toolchain.runtime.sessions import model_outputs
from toolchain.targets.profiles import resolve_target

SIZE = 224
PROJECT_TOML = """
[project]
name = "mobilenetv2_int8_speed"
[model]
entry = "zoo:mobilenet_v2"
input_shape = [3, {size}, {size}]
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
[data]
source = "python:data.py:load"
[eval]
metric = "agreement"
[compress]
quantize = ["int8"]
calibration_samples = {samples}
"""


def log(message: str) -> None:
    print(f"[int8-speed-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def busy_cpu_seconds() -> float:
    """CPU seconds every process of the machine has used (user + nice + system + irq + softirq)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


def mobilenet(x_train: np.ndarray) -> torch.nn.Module:
    """MobileNetV2 1.0 with initial weights and batch-norm statistics averaged over training images."""
    seed_everything(0)
    model = MODELS["mobilenet_v2"]([3, SIZE, SIZE], 10, width_mult=1.0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over every batch seen
    model.train()
    with torch.no_grad():
        for start in range(0, 64, 16):
            model(torch.from_numpy(x_train[start:start + 16]))
    return model.eval()


def fidelity(path: Path, reference: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with the FP32 logits `reference`, and the mean absolute logit error as a share of their range."""
    logits = model_outputs(path, x)[0]
    return {"top1_agreement": float((logits.argmax(axis=1) == reference.argmax(axis=1)).mean()),
            "logit_error": float(np.abs(logits - reference).mean() / (reference.max() - reference.min()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and samples, 30 s of timing (about 2 minutes)")
    args = parser.parse_args()
    images, samples, seconds = (200, 32, 30.0) if args.quick else (600, 256, 120.0)
    torch.set_num_threads(os.cpu_count() or 1)
    logging.getLogger("root").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as scratch:
        root = Path(scratch)
        (root / "data.py").write_text(data_py(SIZE, images))
        (root / "toolchain.toml").write_text(PROJECT_TOML.format(size=SIZE, samples=samples))
        config = load_config(root / "toolchain.toml")
        data = load_dataset(config, 0)
        ctx = BuildContext(config=config, profile=resolve_target("raspberry-pi-5"), dataset=data,
                           out_dir=root / "out", work_dir=root / "work", seed=0, budget="quick")
        ctx.work_dir.mkdir()
        ctx.console.quiet = True
        log(f"{len(data.x_train)} training, {len(data.x_val)} validation and {len(data.x_test)} test gratings at "
            f"{SIZE}x{SIZE}; exporting MobileNetV2 1.0")
        fp32 = ctx.work_path("model-fp32.onnx")
        export_module(mobilenet(data.x_train), (3, SIZE, SIZE), fp32)
        artifact = Artifact(candidates=[Candidate(name="onnx-fp32", precision="fp32", path=fp32)])

        started = time.perf_counter()
        QuantizeInt8Pass().run(artifact, ctx)
        pass_seconds = time.perf_counter() - started
        calibration, fast = artifact.metrics["int8_calibration"], artifact.metrics["int8_fast"]
        log(f"quantize-int8 pass: {pass_seconds:.1f} s; {calibration['decision']}; {fast['decision']}")
        representative = representative_samples(data.x_train, samples, ctx.seed)
        before = ctx.work_path("before.onnx")
        quantize_int8(prepared_reference(artifact, ctx), before, representative, ctx.profile.providers)
        one_liner = ctx.work_path("one-liner.onnx")
        quantize_static(str(fp32), str(one_liner), ArrayCalibrationReader("input", representative))
        names = [c.name for c in artifact.candidates]
        after = artifact.candidate("onnx-int8-fast" if "onnx-int8-fast" in names else "onnx-int8-qdq")
        models = {"fp32": fp32, "ort one-liner int8": one_liner, "toolchain int8 before": before,
                  f"toolchain int8 after ({after.name})": after.path}
        if after.name == "onnx-int8-fast":
            models["toolchain int8 after, no float layers (onnx-int8-qdq)"] = artifact.candidate("onnx-int8-qdq").path

        log(f"timing {len(models)} models interleaved for {seconds:.0f} s, one thread")
        busy, cpu, wall = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        stats = measure_latencies(models, (3, SIZE, SIZE), threads=1, max_seconds=seconds, min_runs=20)
        wall = time.perf_counter() - wall
        other_cpu_pct = round(100 * ((busy_cpu_seconds() - busy) - (time.process_time() - cpu)) / wall, 1)
        reference = model_outputs(fp32, data.x_test)[0]
        rows = [{"variant": name, "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "runs": s.runs,
                 "vs_fp32": s.p50_ms / stats["fp32"].p50_ms, "bytes": path.stat().st_size,
                 **fidelity(path, reference, data.x_test)} for (name, path), s in zip(models.items(), stats.values())]
    print(f"\nMobileNetV2 1.0 at {SIZE}x{SIZE}, batch 1, onnxruntime CPU, one thread; other processes used "
          f"{other_cpu_pct}% of a core meanwhile; load average {os.getloadavg()[0]:.2f}")
    print_table(rows, ["variant", "p50_ms", "p90_ms", "vs_fp32", "runs", "bytes", "top1_agreement", "logit_error"])
    ratio = next(r["vs_fp32"] for r in rows if r["variant"].startswith("toolchain int8 after ("))
    write_results("int8_speed", rows, {"int8_over_fp32": target(ratio, "<=", 0.45)},
                  quick=args.quick, other_cpu_pct=other_cpu_pct, quantize_pass_seconds=round(pass_seconds, 1),
                  fp32_classes_predicted=len(np.unique(reference.argmax(axis=1))),
                  int8_calibration=calibration, int8_fast=fast)


if __name__ == "__main__":
    main()
