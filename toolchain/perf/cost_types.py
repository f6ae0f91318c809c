"""What a model costs, independent of its format and of any device: per-op FLOPs, bytes and precision
(`OpCost`) and the graph's totals and memory (`GraphCost`). The ONNX and `.tflite` readers
(`graph_cost_onnx`, `graph_cost_tflite`) produce these; `graph_cost.analyze` picks the reader;
`roofline` and `predictor` turn them into latency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 2**20
CHANNEL_BLOCK = 16  # output channels per SIMD block of blocked (NCHWc) convolution kernels
# Ops that copy data but do no arithmetic: 0 FLOPs, their bytes still count.
MOVE_OPS = frozenset({"Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND",
                      "Pad", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "ScatterND",
                      "ScatterElements", "ConstantOfShape", "Range", "NonZero", "Where"})
# Elementwise ops that cost a few operations per element (transcendentals, reductions inside).
OPS_PER_ELEMENT = {
    "Sigmoid": 4, "Tanh": 4, "Exp": 4, "Log": 4, "Erf": 4, "Gelu": 8, "Softplus": 4, "Elu": 4,
    "Selu": 4, "Mish": 8, "Sqrt": 4, "Reciprocal": 4, "Pow": 4, "HardSigmoid": 2, "HardSwish": 3,
    "Softmax": 5, "LogSoftmax": 5, "BatchNormalization": 2, "LayerNormalization": 8,
    "InstanceNormalization": 8, "GroupNormalization": 8, "DynamicQuantizeLinear": 3,
}


@dataclass
class OpCost:
    """The cost of one ONNX node. `free` ops launch no kernel (reshape-like, folded or fused)."""

    name: str
    op_type: str
    precision: str  # "int8" | "fp16" | "fp32"
    flops: int
    bytes: int
    free: bool
    note: str = ""  # why it is free, or what was not known about it
    kind: str = ""  # a variant with its own kernel and efficiency: "depthwise" for per-channel Conv
    # (K, N) of Conv/Gemm/MatMul seen as a matrix product: K = reduction length per output (input
    # channels per group * kernel area), N = output channels. Narrow products fill fewer SIMD
    # lanes and pay more packing per FLOP, so the calibrated predictor charges extra per 1/K, 1/N
    channels: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GraphCost:
    """Static cost of a whole graph, independent of any device."""

    ops: list[OpCost]
    flops: int
    bytes: int
    param_count: int  # initializer elements, without int64 shape/index constants
    param_bytes: int
    weights_bytes: int  # every initializer and Constant at its stored size
    kernel_ops: int
    peak_activation_bytes: int
    peak_memory_bytes: int  # weights_bytes + peak_activation_bytes
    flops_by_precision: dict[str, int] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    runtime: str = "onnxruntime"  # what runs the file ("litert" for .tflite): picks the calibration to use

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_ops(cls, ops: list[OpCost], *, param_count: int, param_bytes: int, weights_bytes: int,
                 peak_activation_bytes: int, assumptions: list[str], runtime: str = "onnxruntime") -> GraphCost:
        """The totals of a graph from its per-op costs (whatever format the ops were read from)."""
        kernels = [op for op in ops if not op.free]
        by_precision: dict[str, int] = {}
        for op in kernels:
            by_precision[op.precision] = by_precision.get(op.precision, 0) + op.flops
        return cls(ops=ops, flops=sum(op.flops for op in kernels), bytes=sum(op.bytes for op in kernels),
                   param_count=param_count, param_bytes=param_bytes, weights_bytes=weights_bytes,
                   kernel_ops=len(kernels), peak_activation_bytes=peak_activation_bytes,
                   peak_memory_bytes=peak_activation_bytes + weights_bytes, flops_by_precision=by_precision,
                   assumptions=assumptions, runtime=runtime)
