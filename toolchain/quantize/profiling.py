"""Per-layer time of an ONNX model on this host, from onnxruntime's own profiler, mapped back to the
Conv/Gemm/MatMul nodes of the file.

onnxruntime runs a rewritten graph, so its kernels are not the file's nodes: FP32 convolutions become
NCHWc kernels with their activation fused in, named after the tensor they write (`hardtanh_3_nchwc`);
a QDQ convolution becomes one QLinearConv with its Q/DQ pairs folded in, named after the Conv plus a
suffix (`node_Conv_811_token_4`); Q/DQ pairs that could not fold run as kernels of their own, named
after the file's Q/DQ nodes. A kernel is owned by the quantizable node it computes: found by its name
(stripped of those suffixes) as a node or as a tensor of the file, then walked from a fused
activation or a QuantizeLinear up to the node that produced its input, and from a DequantizeLinear
down to the node it feeds. So a node's INT8 time includes the Q/DQ it needs, and its FP32 time the
activation fused into it. Kernels that no quantizable node owns (Add, pooling, layout transposes) are
summed under `OTHER`.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from toolchain.runtime.measure import make_feeds

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FUSED_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh")
OTHER = "(other kernels)"
PROFILE_RUNS = 20  # runs profiled (a kernel's time is its median over them) ...
PROFILE_SECONDS = 1.0  # ... or fewer once this long has passed (at least MIN_PROFILE_RUNS)
MIN_PROFILE_RUNS = 5


def profile_kernels(path: Path, input_shape: tuple[int, ...], work_dir: Path, threads: int = 1) -> dict[str, float]:
    """Median microseconds per run of every kernel onnxruntime runs for `path`, by kernel name, with the
    session configured as the latency measurement configures it (`threads`, full graph optimization)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(work_dir / f"profile-{path.stem}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = make_feeds(session, input_shape)
    session.run(None, feeds)  # warm-up (first-run allocations): profiled too, the median outweighs it
    deadline = time.perf_counter() + PROFILE_SECONDS
    for run in range(PROFILE_RUNS):
        if run >= MIN_PROFILE_RUNS and time.perf_counter() > deadline:
            break
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            durations[event["name"].removesuffix("_kernel_time")].append(event["dur"])
    return {name: float(np.median(times)) for name, times in durations.items()}


@dataclass
class _Graph:
    order: list[onnx.NodeProto]  # topological, as ONNX stores them
    nodes: dict[str, onnx.NodeProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]

    @classmethod
    def load(cls, path: Path) -> _Graph:
        graph = onnx.load(str(path), load_external_data=False).graph
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)
        return cls(list(graph.node), {n.name: n for n in graph.node}, {o: n for n in graph.node for o in n.output}, consumers)

    def owner(self, kernel: str) -> str | None:
        """The quantizable node that a kernel computes (see the module docstring), or None."""
        base = re.sub(r"(_token_\d+)+$", "", kernel).removesuffix("_nchwc")
        node = self.nodes.get(base) or self.producer.get(base)
        while node is not None and node.op_type not in QUANTIZABLE:
            if node.op_type == "DequantizeLinear":
                fed = self.consumers.get(node.output[0], [])
                node = fed[0] if len(fed) == 1 and fed[0].op_type in QUANTIZABLE else None
            elif node.op_type == "QuantizeLinear" or node.op_type in FUSED_ACTIVATIONS:
                node = self.producer.get(node.input[0])
            else:
                node = None
        return node.name if node is not None else None


def node_times(path: Path, kernels: dict[str, float]) -> dict[str, float]:
    """Microseconds per run of each quantizable node of `path` (kernels it owns summed), and `OTHER`."""
    graph = _Graph.load(path)
    times: dict[str, float] = defaultdict(float)
    for kernel, us in kernels.items():
        times[graph.owner(kernel) or OTHER] += us
    return dict(times)


def slower_in_int8(fp32: dict[str, float], int8: dict[str, float]) -> dict[str, dict[str, float]]:
    """The nodes whose INT8 kernel (with its Q/DQ) took longer than their FP32 kernel, with both times."""
    return {name: {"fp32_us": fp32[name], "int8_us": int8[name]}
            for name in int8 if name != OTHER and name in fp32 and int8[name] > fp32[name]}


def leading_nodes(path: Path, nodes: list[str]) -> list[str]:
    """Those of `nodes` that run in float from the graph's input on: every quantizable node upstream of
    one is in `nodes` too, so keeping them in float adds one float-to-INT8 transition where the float
    part ends and none in the middle of the INT8 part (each transition costs a Q/DQ pair, and on x86 a
    layout change between onnxruntime's NCHWc float and NHWC INT8 kernels)."""
    graph = _Graph.load(path)
    chosen = set(nodes)
    floating: set[str] = set()  # tensors computed from the inputs by float-kept or unquantized nodes only
    for node in graph.order:  # topological: every producer is decided before its consumers
        is_float = node.op_type not in QUANTIZABLE or node.name in chosen
        if is_float and all(t in floating or t not in graph.producer for t in node.input if t):  # initializers: no producer
            floating.update(node.output)
    return [name for name in nodes if graph.nodes[name].output[0] in floating]
