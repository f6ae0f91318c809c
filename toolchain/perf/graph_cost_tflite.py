"""Static per-operator cost of a `.tflite` model, in the same `GraphCost` the ONNX analysis gives.

Why the same shape: the roofline and the calibrated predictor price each kernel by its group
(`op_type-kind/precision`, see `toolchain.perf.predictor.group_key`). TFLite's builtin ops are named
onto the ONNX operator they compute (CONV_2D -> Conv, FULLY_CONNECTED -> Gemm, ...), with the same
convolution variants (depthwise, stem, pointwise, kernel size, narrow/ragged), so a `.tflite` file
is predicted with the efficiencies a profile's calibration learned, and compared with ONNX
candidates on one scale.

The graph is read through the LiteRT interpreter (`_get_ops_details`: the op list before any
delegate takes it over; `get_tensor_details`: shapes after allocation at batch 1, and dtypes), so
no flatbuffer schema package is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.perf.cost_types import CHANNEL_BLOCK, MOVE_OPS, OPS_PER_ELEMENT, GraphCost, OpCost
from toolchain.errors import ToolchainError, first_line

# TFLite builtin -> the ONNX operator it computes (for the efficiency groups and the op classes).
ONNX_NAME = {
    "CONV_2D": "Conv", "DEPTHWISE_CONV_2D": "Conv", "FULLY_CONNECTED": "Gemm", "BATCH_MATMUL": "MatMul",
    "ADD": "Add", "SUB": "Sub", "MUL": "Mul", "DIV": "Div", "MAXIMUM": "Max", "MINIMUM": "Min",
    "MAX_POOL_2D": "MaxPool", "AVERAGE_POOL_2D": "AveragePool", "MEAN": "ReduceMean", "SUM": "ReduceSum",
    "RELU": "Relu", "RELU6": "Clip", "RELU_N1_TO_1": "Clip", "LEAKY_RELU": "LeakyRelu", "LOGISTIC": "Sigmoid",
    "TANH": "Tanh", "HARD_SWISH": "HardSwish", "SOFTMAX": "Softmax", "LOG_SOFTMAX": "LogSoftmax",
    "EXP": "Exp", "SQRT": "Sqrt", "RSQRT": "Reciprocal", "QUANTIZE": "QuantizeLinear",
    "DEQUANTIZE": "DequantizeLinear", "TRANSPOSE": "Transpose", "CONCATENATION": "Concat", "PAD": "Pad",
    "PADV2": "Pad", "SLICE": "Slice", "STRIDED_SLICE": "Slice", "GATHER": "Gather", "SPLIT": "Split",
    "RESHAPE": "Reshape", "SQUEEZE": "Squeeze", "EXPAND_DIMS": "Unsqueeze",
}
VIEW_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS"})
SKIPPED = frozenset({"DELEGATE"})  # a delegate's node stands for ops already listed


def _precision(dtype: Any) -> str:
    kind = np.dtype(dtype)
    if kind in (np.int8, np.uint8):
        return "int8"
    return "fp16" if kind == np.float16 else "fp32"


def _kind(op: str, weight: tuple[int, ...]) -> str:
    """The convolution variant, named as `toolchain.perf.graph_cost_onnx._kind` names ONNX ones (OHWI weights)."""
    if op == "DEPTHWISE_CONV_2D":
        return "depthwise"
    if op != "CONV_2D" or len(weight) != 4:
        return ""
    out_channels, kh, kw, in_channels = weight
    if in_channels <= 4:
        return "stem"
    parts = ["pointwise" if kh * kw == 1 else f"{kh}x{kw}"]
    if out_channels < CHANNEL_BLOCK:
        parts.append("narrow")
    elif out_channels % CHANNEL_BLOCK:
        parts.append("ragged")
    return "-".join(parts)


def _flops(op: str, shapes: list[tuple[int, ...]], out: tuple[int, ...]) -> tuple[int, tuple[int, int] | None]:
    """FLOPs (a multiply-add is 2) and, for matrix-product ops, (K, N)."""
    out_elems = math.prod(out)
    if op == "CONV_2D" and len(shapes) > 1 and len(shapes[1]) == 4:
        n, kh, kw, c_in = shapes[1]
        return 2 * out_elems * kh * kw * c_in, (kh * kw * c_in, n)
    if op == "DEPTHWISE_CONV_2D" and len(shapes) > 1 and len(shapes[1]) == 4:
        _, kh, kw, _ = shapes[1]
        return 2 * out_elems * kh * kw, (kh * kw, 1)
    if op in ("FULLY_CONNECTED", "BATCH_MATMUL") and len(shapes) > 1:
        k = shapes[0][-1] if shapes[0] else 1
        n = shapes[1][0] if op == "FULLY_CONNECTED" else shapes[1][-1]
        return 2 * out_elems * k, (k, n)
    if op in ("MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "SUM"):
        return math.prod(shapes[0]) if shapes else out_elems, None
    onnx_name = ONNX_NAME.get(op, "")
    if onnx_name in MOVE_OPS:
        return 0, None
    return OPS_PER_ELEMENT.get(onnx_name, 1) * out_elems, None


def analyze_tflite(path: Path | str) -> GraphCost:
    """Per-op FLOPs, bytes, precision and memory of a `.tflite` model at batch 1."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ToolchainError("analysing a .tflite model needs the LiteRT interpreter: `pip install ai-edge-litert`") from None
    try:
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    except Exception as exc:
        raise ToolchainError(f"LiteRT cannot load {path}: {first_line(exc)}") from None
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops_details = [o for o in interpreter._get_ops_details() if o["op_name"] not in SKIPPED]

    def shape(i: int) -> tuple[int, ...]:
        return tuple(int(d) for d in tensors[i]["shape"])

    def nbytes(i: int) -> int:
        return math.prod(shape(i)) * np.dtype(tensors[i]["dtype"]).itemsize

    produced = {int(i): n for n, o in enumerate(ops_details) for i in o["outputs"] if i >= 0}
    graph_inputs = {d["index"] for d in interpreter.get_input_details()}
    constants = {i for i in tensors if i not in produced and i not in graph_inputs}
    ops: list[OpCost] = []
    for n, detail in enumerate(ops_details):
        op = detail["op_name"]
        inputs = [int(i) for i in detail["inputs"] if i >= 0]
        outputs = [int(i) for i in detail["outputs"] if i >= 0]
        name, onnx_name = f"{op}_{n}", ONNX_NAME.get(op, op.title().replace("_", ""))
        data = [i for i in inputs if i not in constants] or inputs
        precision = _precision(tensors[data[0]]["dtype"]) if data else "fp32"
        # A DEQUANTIZE of a stored FP16 weight runs once, when tensors are allocated, not per inference.
        if op in VIEW_OPS or (op == "DEQUANTIZE" and all(i in constants for i in inputs)):
            ops.append(OpCost(name, onnx_name, precision, 0, 0, True, "view" if op in VIEW_OPS else "folded at load"))
            continue
        flops, channels = _flops(op, [shape(i) for i in inputs], shape(outputs[0]) if outputs else ())
        weight = shape(inputs[1]) if len(inputs) > 1 else ()
        ops.append(OpCost(name, onnx_name, precision, flops, sum(nbytes(i) for i in inputs + outputs), False, "",
                          _kind(op, weight), channels))

    # Activation liveness in op order: a tensor lives from its producer to its last consumer.
    last_use: dict[int, int] = {}
    for n, detail in enumerate(ops_details):
        for i in detail["inputs"]:
            if i >= 0 and int(i) not in constants:
                last_use[int(i)] = n
    outputs_of_graph = {d["index"] for d in interpreter.get_output_details()}
    live, peak = set(graph_inputs), sum(nbytes(i) for i in graph_inputs)
    for n, detail in enumerate(ops_details):
        live |= {int(i) for i in detail["outputs"] if i >= 0}
        peak = max(peak, sum(nbytes(i) for i in live))
        live = {i for i in live if last_use.get(i, -1) > n or i in outputs_of_graph}
    # Index and shape operands (transpose permutations, reshape targets) are not parameters.
    shape_operands = {int(i) for d in ops_details if d["op_name"] in VIEW_OPS or ONNX_NAME.get(d["op_name"]) in MOVE_OPS
                      for i in d["inputs"][1:] if i >= 0}
    params = sorted(constants - shape_operands)
    return GraphCost.from_ops(ops, param_count=sum(math.prod(shape(i)) for i in params),
                              param_bytes=sum(nbytes(i) for i in params), weights_bytes=sum(nbytes(i) for i in constants),
                              peak_activation_bytes=peak, assumptions=["read from the .tflite graph at batch 1"],
                              runtime="litert")
