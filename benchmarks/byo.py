"""Bring your own model (issue 14): a MobileNetV2 from elsewhere, imported by file, and the regression example.

1. A MobileNetV2 (width 1.0) is trained briefly on the synthetic gratings at 32x32 with plain torch
   (it stands for a model made with another tool), exported to ONNX at 224x224, and then built *by
   file* (`[model] file`, no labels: the gate's metric is agreement with the imported model) for the
   `host` profile. Reported: the INT8/FP32 host latency ratio (p50, the build's own interleaved
   measurement) of the shipped model and of the best INT8 candidate, and the agreement lost.
2. `examples/diabetes` (an MLP trained with MSE, gated by RMSE) is built for `rpi5`: the shipped
   model's RMSE over the FP32 model's on the test split.

    python benchmarks/byo.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import print_table, require_trained, target, write_results
from _gratings import data_py

from toolchain.build.workflow import build
from toolchain.core.config import command_line_config, load_config
from toolchain.core.seeding import seed_everything
from toolchain.core.zoo import MODELS
from toolchain.export.onnx import export_module
from toolchain.targets.profiles import resolve_target

REPO = Path(__file__).resolve().parents[1]
TRAIN_SIZE, TIMING_SIZE = 32, 224


def log(message: str) -> None:
    print(f"[byo-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gratings(size: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    namespace: dict = {}
    exec(data_py(size, samples), namespace)  # the benchmarks' shared synthetic task, at this size
    return namespace["load"](seed=seed)


def pretrained_mobilenet(epochs: int, samples: int) -> torch.nn.Module:
    """MobileNetV2 trained with plain torch (Adam, cross-entropy): someone else's model."""
    seed_everything(0)
    x, y = gratings(TRAIN_SIZE, samples, seed=0)
    split = int(0.8 * len(x))
    model = MODELS["mobilenet_v2"]([3, TRAIN_SIZE, TRAIN_SIZE], 10, width_mult=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:split]), torch.from_numpy(y[:split])
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(split).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
        log(f"epoch {epoch + 1}/{epochs}")
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x[split:])).argmax(1).numpy() == y[split:]).mean())
    require_trained("MobileNetV2", accuracy, 10)
    log(f"trained: held-out accuracy {accuracy:.3f} at {TRAIN_SIZE}x{TRAIN_SIZE}")
    return model


def mobilenet_by_file(work: Path, quick: bool) -> tuple[list[dict], dict]:
    model = pretrained_mobilenet(epochs=4 if quick else 12, samples=800 if quick else 2000)
    onnx_path = work / "mobilenet_v2.onnx"
    export_module(model, (3, TIMING_SIZE, TIMING_SIZE), onnx_path)
    # 224x224 images the 32x32-trained model recognises: its own task's images tiled 7 x 7 (same pixel
    # frequencies, so its predictions vary as they do at 32 and agreement measures something).
    small, _ = gratings(TRAIN_SIZE, 300 if quick else 1000, seed=1)
    x = np.tile(small, (1, 1, TIMING_SIZE // TRAIN_SIZE, TIMING_SIZE // TRAIN_SIZE))
    np.savez(work / "images.npz", x=x)  # no y: judged by agreement with the imported model
    with torch.no_grad():
        predicted = model(torch.from_numpy(x[:64])).argmax(1).numpy()
    distinct = len(np.unique(predicted))
    log(f"the FP32 model predicts {distinct} distinct classes on the 224x224 images")
    if distinct < 5:
        raise SystemExit(f"the imported model predicts only {distinct} classes on the benchmark images: agreement would mean nothing")
    config = command_line_config(onnx_path, f"npz:{work / 'images.npz'}", None, None)
    config = config.model_copy(update={"compress": config.compress.model_copy(update={"calibration_samples": 32})})
    log("building by file for host")
    artifact, _ = build(config, resolve_target("host"), work / "dist", budget="quick" if quick else "standard")
    fp32 = artifact.reference.metrics["latency_ms_p50_host"]
    rows = [{"model": "mobilenet_v2 by file", "candidate": c.name, "precision": c.precision,
             "latency_ms_p50_host": c.metrics["latency_ms_p50_host"], "ratio_vs_fp32": c.metrics["latency_ms_p50_host"] / fp32,
             "agreement": c.metrics["metric_value"], "agreement_loss_pp": 100 * c.metrics["metric_drop"],
             "shipped": c is artifact.shipped, "fp32_distinct_predictions": distinct} for c in artifact.candidates]
    int8 = [row for row in rows if row["precision"] == "int8"]
    best = min(int8, key=lambda row: row["ratio_vs_fp32"])
    shipped = next(row for row in rows if row["shipped"])
    targets = {"mobilenet_v2_by_file_shipped_int8_over_fp32": target(shipped["ratio_vs_fp32"] if shipped["precision"] == "int8"
                                                                     else 1.0, "<=", 0.45),
               "mobilenet_v2_by_file_best_int8_over_fp32": target(best["ratio_vs_fp32"], "<=", 0.45),
               "mobilenet_v2_by_file_agreement_loss_pp": target(shipped["agreement_loss_pp"], "<=", 1.0)}
    return rows, targets


def regression_example(work: Path) -> tuple[list[dict], dict]:
    log("building examples/diabetes for rpi5")
    config = load_config(REPO / "examples" / "diabetes" / "toolchain.toml")
    artifact, _ = build(config, resolve_target("rpi5"), work / "diabetes", budget="quick")
    fp32 = artifact.reference.metrics["metric_value"]
    rows = [{"model": "diabetes regression", "candidate": c.name, "precision": c.precision,
             "latency_ms_p50_host": c.metrics["latency_ms_p50_host"], "rmse": c.metrics["metric_value"],
             "rmse_over_fp32": c.metrics["metric_value"] / fp32, "shipped": c is artifact.shipped} for c in artifact.candidates]
    shipped = next(row for row in rows if row["shipped"])
    return rows, {"diabetes_shipped_rmse_over_fp32": target(shipped["rmse_over_fp32"], "<=", 1.02)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and images (<= 3 minutes)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="byo-bench-") as folder:
        work = Path(folder)
        mobilenet_rows, mobilenet_targets = mobilenet_by_file(work, args.quick)
        regression_rows, regression_targets = regression_example(work)
    rows = mobilenet_rows + regression_rows
    print_table(rows, ["model", "candidate", "precision", "latency_ms_p50_host", "ratio_vs_fp32", "agreement_loss_pp",
                       "rmse", "rmse_over_fp32", "shipped"])
    write_results("byo", rows, {**mobilenet_targets, **regression_targets}, quick=args.quick,
                  seconds=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    main()
