"""The ONNX reader of the cost model: per-operator FLOPs, bytes, precision and memory of an ONNX graph,
as onnxruntime will execute it (`roofline.predict` turns them into time on a profile).

What counts as a kernel follows what onnxruntime actually executes after its graph optimizations
(the level the toolchain measures and deploys with), not the raw ONNX nodes. Assumptions, each a
simplification of onnxruntime's optimizer (kept small on purpose; see `_classify`):

- Reshape-like ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Shape, Dropout, ...) are free:
  they alias their input buffer and launch no kernel.
- Nodes whose inputs are all constants are folded at session load: free, and their outputs are
  constants (weights), not activations.
- QDQ int8 models: a Conv/MatMul/Gemm whose data and weight inputs come from DequantizeLinear is
  the pattern onnxruntime fuses into one int8 kernel (QLinearConv, QLinearMatMul, ...). The
  DequantizeLinear nodes feeding it (on weights or behind a QuantizeLinear), and the QuantizeLinear
  that re-quantizes its output, are *fused*: free for overhead, no bytes of their own; the fused
  kernel is charged for reading and writing the int8 tensors instead. The Q->DQ pairs around
  reshape-like ops are dropped the same way. A QuantizeLinear on a graph input and the
  DequantizeLinear producing a graph output stay real kernels.
- An activation (Relu, Clip, ...) or a BatchNormalization right after a Conv/Gemm, as its only
  consumer, is fused into it (FusedConv / Conv+BN folding).

Memory: peak = weights (initializers at their stored size) + the peak of live activation tensors
over a simple liveness walk in graph order. ONNX requires nodes to be topologically sorted, so
the graph's own order is used. Pre-packed weight copies and the runtime's arena are not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import onnx
from onnx import TensorProto, helper, shape_inference

from toolchain.errors import ToolchainError
from toolchain.perf.cost_types import CHANNEL_BLOCK, MOVE_OPS, OPS_PER_ELEMENT, GraphCost, OpCost

# Launch no kernel: views of their input (or metadata only).
FREE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size",
                      "Constant", "Dropout"})
# Ops that compute on quantized data whatever their neighbours are.
QUANT_COMPUTE_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})
# Float ops onnxruntime fuses with surrounding DequantizeLinear/QuantizeLinear into an int8 kernel.
QDQ_HOST_OPS = frozenset({"Conv", "MatMul", "Gemm"})
# Ops that onnxruntime runs in int8 when every data input comes from DequantizeLinear and every
# consumer is a QuantizeLinear (QLinearAdd, QLinearGlobalAveragePool, int8 MaxPool, ...).
QDQ_WRAPPED_OPS = frozenset({"Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool", "Sigmoid",
                             "LeakyRelu", "Concat", "Softmax"})
# Activations / BN that onnxruntime fuses into a preceding Conv or Gemm.
FUSABLE_AFTER_CONV = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh",
                                "BatchNormalization"})
_POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_REDUCE_INPUT_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean",
                               "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
                               "ReduceSumSquare", "ArgMax", "ArgMin"})
_SUB_BYTE_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, getattr(TensorProto, "FLOAT4E2M1", -1): 4}
_HALF_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass
class _Tensor:
    elem_type: int
    shape: tuple[int, ...] | None  # None when any dim is unknown

    @property
    def numel(self) -> int | None:
        return math.prod(self.shape) if self.shape is not None else None

    @property
    def nbytes(self) -> int | None:
        n = self.numel
        if n is None or self.elem_type == TensorProto.UNDEFINED:
            return None
        bits = _SUB_BYTE_BITS.get(self.elem_type)
        if bits is None:
            try:
                bits = helper.tensor_dtype_to_np_dtype(self.elem_type).itemsize * 8
            except (KeyError, TypeError, ValueError):
                return None
        return (n * bits + 7) // 8


def _load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    try:
        return onnx.load(str(model))
    except Exception as exc:  # protobuf, OS and onnx errors all mean "not a model we can read"
        raise ToolchainError(f"cannot read ONNX model {model}: {exc}") from None


def _concretize_and_infer(model: onnx.ModelProto, assumptions: list[str]) -> onnx.ModelProto:
    """Set symbolic input dims (the batch) to 1 and run shape inference with data propagation.

    Stale value_info and symbolic output dims are dropped first so that inference recomputes
    concrete shapes instead of keeping (or clashing with) the symbolic ones.
    """
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    for value in graph.input:
        if value.name in init_names:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                assumptions.append(f"input '{value.name}': symbolic dim '{dim.dim_param or '?'}' taken as 1")
                dim.Clear()
                dim.dim_value = 1
    for value in graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    del graph.value_info[:]
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort; costs of unknown shapes become 0
        assumptions.append(f"shape inference failed ({exc}); ops with unknown shapes cost 0")
        return model


def _tensor_table(model: onnx.ModelProto) -> dict[str, _Tensor]:
    table: dict[str, _Tensor] = {}
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        ttype = value.type.tensor_type
        shape: tuple[int, ...] | None = None
        if ttype.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
            shape = None if any(d is None for d in dims) else tuple(dims)  # type: ignore[arg-type]
        table[value.name] = _Tensor(ttype.elem_type, shape)
    for init in graph.initializer:
        table[init.name] = _Tensor(init.data_type, tuple(init.dims))
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    table[node.output[0]] = _Tensor(attr.t.data_type, tuple(attr.t.dims))
    return table


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _flops(node: onnx.NodeProto, t: dict[str, _Tensor]) -> int | None:
    """Arithmetic operations of one node (multiply and add count as two). None: shapes unknown."""
    op = node.op_type

    def shape(i: int, outputs: bool = False) -> tuple[int, ...] | None:
        names = node.output if outputs else node.input
        if i >= len(names) or not names[i] or names[i] not in t:
            return None
        return t[names[i]].shape

    def has(i: int) -> bool:
        return i < len(node.input) and bool(node.input[i])

    out = shape(0, outputs=True)
    out_n = math.prod(out) if out is not None else None
    if op in FREE_OPS or op in MOVE_OPS:
        return 0
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        weight = shape(3 if op == "QLinearConv" else 1)
        if weight is None or out_n is None:
            return None
        bias = has(8) if op == "QLinearConv" else (op == "Conv" and has(2))
        # 2 * N*Cout*Hout*Wout * (Cin/group) * prod(kernel); weight is (Cout, Cin/group, *kernel)
        return 2 * out_n * weight[1] * math.prod(weight[2:]) + (out_n if bias else 0)
    if op == "ConvTranspose":
        weight, inp = shape(1), shape(0)
        if weight is None or inp is None or out_n is None:
            return None
        return 2 * math.prod(inp) * weight[1] * math.prod(weight[2:]) + (out_n if has(2) else 0)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
        a = shape(0)
        if a is None or out_n is None:
            return None
        k = a[0] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
        # 2*M*N*K per batch element; the output holds batch*M*N elements
        return 2 * out_n * k + (out_n if op == "Gemm" and has(2) else 0)
    if op in _POOL_OPS:
        kernel = _attr(node, "kernel_shape", [])
        return None if out_n is None else out_n * math.prod(kernel)
    if op in _REDUCE_INPUT_OPS:
        inp = shape(0)
        return None if inp is None else math.prod(inp)
    if op in ("QuantizeLinear", "DequantizeLinear"):
        return out_n
    total = 0
    for i in range(len(node.output)):
        s = shape(i, outputs=True)
        if s is None:
            return None
        total += math.prod(s)
    return total * OPS_PER_ELEMENT.get(op, 1)


class _Graph:
    """Producer/consumer maps of the main graph, plus the walks the fusion rules need."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.outputs = {o.name for o in g.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for idx, node in enumerate(self.nodes):
            for name in node.output:
                self.producer[name] = idx
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(idx)
        self.constants = {i.name for i in g.initializer}
        self.constants |= {n.output[0] for n in self.nodes if n.op_type == "Constant" and n.output}

    def op(self, name: str) -> str | None:
        idx = self.producer.get(name)
        return None if idx is None else self.nodes[idx].op_type

    def source(self, name: str) -> int | None:
        """The node really producing `name`, looking through reshape-like views."""
        idx = self.producer.get(name)
        while idx is not None and self.nodes[idx].op_type in FREE_OPS and self.nodes[idx].input:
            idx = self.producer.get(self.nodes[idx].input[0])
        return idx

    def sinks(self, name: str) -> Iterator[int | None]:
        """Nodes finally consuming `name` through reshape-like views (None: a graph output)."""
        if name in self.outputs or not self.consumers.get(name):
            yield None
        for idx in self.consumers.get(name, []):
            node = self.nodes[idx]
            if node.op_type in FREE_OPS:
                for out in node.output:
                    yield from self.sinks(out)
            else:
                yield idx


def _is_qdq_host(g: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type in QDQ_HOST_OPS:
        return len(node.input) >= 2 and all(g.op(name) == "DequantizeLinear" for name in node.input[:2])
    if node.op_type not in QDQ_WRAPPED_OPS or not node.output:
        return False
    data = [name for name in node.input if name and g.producer.get(name) is not None and g.op(name) != "Constant"]
    sinks = list(g.sinks(node.output[0]))
    return (bool(data) and all(g.op(name) == "DequantizeLinear" for name in data)
            and all(s is not None and g.nodes[s].op_type == "QuantizeLinear" for s in sinks))


def _channels(node: onnx.NodeProto, t: dict[str, _Tensor]) -> tuple[int, int] | None:
    """(K, N) of a Conv (K = input channels per group * kernel area) or a Gemm/MatMul."""
    def shape(name: str) -> tuple[int, ...] | None:
        return t[name].shape if name in t else None

    op = node.op_type
    if op in ("Conv", "QLinearConv", "ConvInteger"):
        weight = shape(node.input[3 if op == "QLinearConv" else 1])
        return (math.prod(weight[1:]), weight[0]) if weight is not None and len(weight) > 2 else None
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        a, out = shape(node.input[0]), shape(node.output[0])
        if a is None or out is None or not a or not out:
            return None
        k = a[0] if op == "Gemm" and _attr(node, "transA", 0) and len(a) == 2 else a[-1]
        return (k, out[-1])
    return None




def _kind(node: onnx.NodeProto, t: dict[str, _Tensor]) -> str:
    """Convolutions that runtimes send to different kernels, so the calibrated predictor gives each
    its own efficiency: one filter per channel ("depthwise"), a first layer on a few input
    channels such as RGB ("stem"), 1x1 ("pointwise") or the kernel size ("3x3", "5x5": border
    handling and specialised kernels differ), and output channels below or not a multiple of the
    SIMD block ("narrow", "ragged": onnxruntime's blocked NCHWc path needs whole blocks of 16 on
    AVX-512, otherwise it falls back to a slower im2col GEMM). Measured on generated variants, these
    splits took the held-out share within 10% from about 65% to about 90% (benchmarks/predictor.py)."""
    if node.op_type not in ("Conv", "QLinearConv", "ConvInteger"):
        return ""
    weight = node.input[3 if node.op_type == "QLinearConv" else 1]
    shape = t[weight].shape if weight in t else None
    if shape is None or len(shape) < 3:
        return ""
    if _attr(node, "group", 1) > 1 and shape[1] == 1:
        return "depthwise"
    if shape[1] <= 4:
        return "stem"
    parts = ["pointwise"] if math.prod(shape[2:]) == 1 else ["x".join(str(d) for d in shape[2:])]
    if shape[0] < CHANNEL_BLOCK:
        parts.append("narrow")
    elif shape[0] % CHANNEL_BLOCK:
        parts.append("ragged")
    return "-".join(parts)


def _classify(g: _Graph, t: dict[str, _Tensor]) -> dict[int, str]:
    """Why each free node is free: 'view', 'folded', or 'fused into NAME'. Kernels are absent."""
    free: dict[int, str] = {}
    hosts = {i for i, n in enumerate(g.nodes) if _is_qdq_host(g, n)}
    for idx, node in enumerate(g.nodes):
        op = node.op_type
        data_inputs = [name for name in node.input if name]
        if op == "DequantizeLinear" and data_inputs and data_inputs[0] in g.constants:
            free[idx] = "fused: weight dequantized inside the int8 kernel"
            g.constants.update(node.output)
        elif op in ("Shape", "Size") and data_inputs and data_inputs[0] in t and t[data_inputs[0]].shape is not None:
            free[idx] = "folded: static shape"
            g.constants.update(node.output)
        elif op in FREE_OPS:
            free[idx] = "constant" if op == "Constant" else "view: no kernel"
            if data_inputs and all(name in g.constants for name in data_inputs):
                g.constants.update(node.output)
        elif data_inputs and all(name in g.constants for name in data_inputs):
            free[idx] = "folded: constant inputs, computed at session load"
            g.constants.update(node.output)
        elif op == "DequantizeLinear":
            sinks = list(g.sinks(node.output[0]))
            if all(s is not None and (s in hosts or g.nodes[s].op_type == "QuantizeLinear") for s in sinks):
                free[idx] = "fused: QDQ pair folded into the neighbouring int8 kernel"
        elif op == "QuantizeLinear":
            src = g.source(node.input[0])
            while src is not None and free.get(src, "").startswith("fused into"):  # e.g. a Relu
                src = g.source(g.nodes[src].input[0])
            if src is not None and (src in hosts or g.nodes[src].op_type == "DequantizeLinear"):
                free[idx] = "fused: output re-quantized inside the int8 kernel"
        elif op in FUSABLE_AFTER_CONV and node.input[0] not in g.outputs:
            src = g.producer.get(node.input[0])
            if (src is not None and src not in free and g.nodes[src].op_type in ("Conv", "Gemm")
                    and len(g.consumers.get(node.input[0], [])) == 1
                    and (op != "BatchNormalization" or all(n in g.constants for n in node.input[1:]))):
                free[idx] = f"fused into {g.nodes[src].op_type} '{g.nodes[src].name}'"
    return free


def _precision(node: onnx.NodeProto, g: _Graph, t: dict[str, _Tensor]) -> str:
    if node.op_type in QUANT_COMPUTE_OPS or node.op_type.startswith("QLinear") or _is_qdq_host(g, node):
        return "int8"
    types = {t[n].elem_type for n in [*node.input, *node.output] if n in t}
    return "fp16" if types & _HALF_TYPES else "fp32"


def _effective_bytes(idx: int, g: _Graph, t: dict[str, _Tensor], free: dict[int, str]) -> int | None:
    """Bytes a kernel moves: its inputs and outputs, looking through fused neighbours.

    A fused DequantizeLinear input is read as the int8 tensor behind it, and an output consumed
    only by fused nodes (QuantizeLinear, an activation) is written as the last of them.
    """
    node = g.nodes[idx]
    names: list[str] = []
    for name in node.input:
        prod = g.producer.get(name)
        if prod is not None and prod in free and g.nodes[prod].op_type == "DequantizeLinear":
            name = g.nodes[prod].input[0]
        names.append(name)
    for name in node.output:
        while len(g.consumers.get(name, [])) == 1 and name not in g.outputs:
            nxt = g.consumers[name][0]
            # a fused DequantizeLinear is read by the *next* kernel, not written by this one
            if (nxt not in free or not free[nxt].startswith("fused") or not g.nodes[nxt].output
                    or g.nodes[nxt].op_type == "DequantizeLinear"):
                break
            name = g.nodes[nxt].output[0]
        names.append(name)
    total = 0
    for name in dict.fromkeys(n for n in names if n):
        size = t[name].nbytes if name in t else None
        if size is None:
            return None
        total += size
    return total


def _peak_activation_bytes(g: _Graph, t: dict[str, _Tensor], free: dict[int, str], data_inputs: list[str]) -> int:
    """Max over graph order of the bytes of live activation tensors.

    Views and fused nodes share a buffer with their input (one alias group); a group's size is
    the smallest of its tensors, because a fused kernel only ever materialises the quantized one.
    A group is live from its first producer until its last consumer (forever if a graph output).
    """
    root: dict[str, str] = {name: name for name in data_inputs}
    for idx, node in enumerate(g.nodes):
        for out in node.output:
            if out in g.constants or not out:
                continue
            aliased = idx in free and node.op_type not in ("Shape", "Size") and node.input and node.input[0] in root
            root[out] = root[node.input[0]] if aliased else out
    size: dict[str, int] = {}
    last_use: dict[str, int] = {}
    for name, r in root.items():
        nbytes = t[name].nbytes if name in t else None
        if nbytes is not None:
            size[r] = min(size.get(r, nbytes), nbytes)
        uses = g.consumers.get(name, [])
        last = len(g.nodes) if name in g.outputs else max(uses, default=-1)
        last_use[r] = max(last_use.get(r, -1), last)
    live = {root[name] for name in data_inputs}
    peak = sum(size.get(r, 0) for r in live)
    for idx, node in enumerate(g.nodes):
        live |= {root[o] for o in node.output if o in root}
        peak = max(peak, sum(size.get(r, 0) for r in live))
        live = {r for r in live if last_use.get(r, -1) > idx}
    return peak


def analyze_onnx(model: str | Path | onnx.ModelProto) -> GraphCost:
    """Static per-op FLOPs, bytes, precision and memory of an ONNX model (batch 1)."""
    assumptions: list[str] = []
    proto = _concretize_and_infer(_load(model), assumptions)
    t = _tensor_table(proto)
    g = _Graph(proto)
    init_names = {i.name for i in proto.graph.initializer}
    data_inputs = [v.name for v in proto.graph.input if v.name not in init_names]
    free = _classify(g, t)

    ops: list[OpCost] = []
    unknown: list[str] = []
    for idx, node in enumerate(g.nodes):
        name = node.name or f"{node.op_type}_{idx}"
        precision = _precision(node, g, t)
        if idx in free:
            ops.append(OpCost(name, node.op_type, precision, 0, 0, True, free[idx]))
            continue
        flops = _flops(node, t)
        nbytes = _effective_bytes(idx, g, t, free)
        note = ""
        if flops is None or nbytes is None:
            unknown.append(name)
            note = "shape unknown: cost counted as 0"
        ops.append(OpCost(name, node.op_type, precision, flops or 0, nbytes or 0, False, note, _kind(node, t),
                          _channels(node, t)))
    if unknown:
        assumptions.append(f"{len(unknown)} op(s) with unknown shapes cost 0: {', '.join(unknown[:5])}")

    params = [i for i in proto.graph.initializer if i.data_type != TensorProto.INT64]
    weights_bytes = sum(_Tensor(i.data_type, tuple(i.dims)).nbytes or 0 for i in proto.graph.initializer)
    weights_bytes += sum(t[n.output[0]].nbytes or 0 for n in g.nodes
                         if n.op_type == "Constant" and n.output and n.output[0] in t)
    return GraphCost.from_ops(ops, param_count=sum(math.prod(i.dims) for i in params),
                              param_bytes=sum(_Tensor(i.data_type, tuple(i.dims)).nbytes or 0 for i in params),
                              weights_bytes=weights_bytes,
                              peak_activation_bytes=_peak_activation_bytes(g, t, free, data_inputs),
                              assumptions=assumptions)
