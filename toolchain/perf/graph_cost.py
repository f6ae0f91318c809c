"""One `GraphCost` from any model file the toolchain ships: ONNX or `.tflite`, each read by its own
reader (`graph_cost_onnx`, `graph_cost_tflite`) into the same per-op costs (`cost_types`)."""

from __future__ import annotations

from pathlib import Path

import onnx

from toolchain.perf.cost_types import GraphCost
from toolchain.perf.graph_cost_onnx import analyze_onnx
from toolchain.perf.graph_cost_tflite import analyze_tflite


def analyze(model: str | Path | onnx.ModelProto) -> GraphCost:
    """Static per-op FLOPs, bytes, precision and memory of an ONNX or `.tflite` model (batch 1)."""
    if isinstance(model, (str, Path)) and Path(model).suffix == ".tflite":
        return analyze_tflite(model)
    return analyze_onnx(model)
