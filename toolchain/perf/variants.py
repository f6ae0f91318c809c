"""Generated model variants for calibrating the latency/memory predictor on a machine.

Why generated models and not a zoo: the fit needs many graphs whose operators, sizes and precisions
vary *independently* (a wide shallow CNN, a narrow deep one, 1x1 vs 5x5 kernels, depthwise blocks,
weight-heavy MLPs), so that each operator type's efficiency and overhead can be told apart. Real
models mix everything at once. The graphs are built directly with `onnx.helper` (milliseconds each,
where a torch export takes seconds), in the shape the toolchain's own exports have: a dynamic batch
axis, the input standardised by `Sub`/`Div` in the graph, Conv/Gemm/Relu/MaxPool/Add, and the INT8
twins come from the very quantizer a build uses (`toolchain.passes.onnx.quantize_int8.quantize_int8`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FAMILIES = ("cnn", "mobile", "mlp")
CLASSES = 10
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class VariantSpec:
    """One generated model: its family, size knobs and precision (int8 = static QDQ of the fp32 twin)."""

    family: str  # "cnn" (dense convs), "mobile" (depthwise + pointwise blocks), "mlp" (Gemm chain)
    width: int  # channels (cnn, mobile) or hidden units (mlp)
    depth: int  # conv blocks or hidden layers
    kernel: int  # conv kernel size (1 for mlp)
    resolution: int  # input height = width in pixels (cnn, mobile); input features (mlp)
    precision: str  # "fp32" | "int8"

    @property
    def name(self) -> str:
        return f"{self.family}-w{self.width}-d{self.depth}-k{self.kernel}-r{self.resolution}-{self.precision}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape (no batch axis)."""
        return (self.resolution,) if self.family == "mlp" else (3, self.resolution, self.resolution)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


class _Builder:
    """Accumulates nodes and initializers with unique names; seeded He-initialised weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = f"t{len(self.nodes)}_{op.lower()}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{len(self.nodes)}", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, kernel: int, group: int = 1) -> str:
        fan_in = cin // group * kernel * kernel
        w = self.rng.standard_normal((cout, cin // group, kernel, kernel)) * math.sqrt(2.0 / fan_in)
        i = len(self.inits)
        out = self.node("Conv", [x, self.const(f"conv{i}.w", w), self.const(f"conv{i}.b", np.zeros(cout))],
                        kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4, group=group)
        return self.node("Relu", [out])

    def gemm(self, x: str, fan_in: int, fan_out: int, relu: bool = True) -> str:
        w = self.rng.standard_normal((fan_out, fan_in)) * math.sqrt(2.0 / fan_in)
        i = len(self.inits)
        out = self.node("Gemm", [x, self.const(f"fc{i}.w", w), self.const(f"fc{i}.b", np.zeros(fan_out))], transB=1)
        return self.node("Relu", [out]) if relu else out


def build_fp32(spec: VariantSpec, seed: int = 0) -> onnx.ModelProto:
    """The FP32 graph of `spec`: standardise, body of the family, classifier head."""
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown family {spec.family!r}; expected one of {FAMILIES}")
    b = _Builder(seed)
    x = b.node("Div", [b.node("Sub", [INPUT_NAME, b.const("mean", np.array(0.1))]), b.const("std", np.array(1.1))])
    if spec.family == "mlp":
        features = spec.resolution
        for _ in range(spec.depth):
            x, features = b.gemm(x, features, spec.width), spec.width
        b.gemm(x, features, CLASSES, relu=False)
    else:
        x, size = b.conv(x, 3, spec.width, 3 if spec.family == "mobile" else spec.kernel), spec.resolution
        for block in range(spec.depth):
            if spec.family == "mobile":
                skip = x
                x = b.conv(b.conv(x, spec.width, spec.width, spec.kernel, group=spec.width), spec.width, spec.width, 1)
                x = b.node("Add", [x, skip])
            else:
                x = b.conv(x, spec.width, spec.width, spec.kernel)
            if block % 2 == 1 and size >= 8:
                x, size = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), size // 2
        x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
        b.gemm(x, spec.width, CLASSES, relu=False)
    b.nodes[-1].output[0] = OUTPUT_NAME  # the classifier's Gemm writes the graph output
    graph = helper.make_graph(
        b.nodes, spec.name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *spec.input_shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="toolchain.perf.variants")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_variant(spec: VariantSpec, folder: Path, seed: int = 0) -> Path:
    """Write `spec` as `folder/NAME.onnx` (int8: quantized from an fp32 twin written beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    fp32_spec = VariantSpec(**{**asdict(spec), "precision": "fp32"})
    fp32 = folder / f"{fp32_spec.name}.onnx"
    if not fp32.exists():
        onnx.save(build_fp32(fp32_spec, seed), str(fp32))
    if spec.precision == "fp32":
        return fp32
    if spec.precision != "int8":
        raise ValueError(f"unsupported variant precision {spec.precision!r}")
    from toolchain.quantize.int8 import quantize_int8

    out = folder / f"{spec.name}.onnx"
    samples = np.random.default_rng(seed).standard_normal((8, *spec.input_shape)).astype(np.float32)
    quantize_int8(fp32, out, samples, providers=("CPUExecutionProvider",))
    return out


def write_tflite_variant(spec: VariantSpec, folder: Path, seed: int = 0) -> Path:
    """Write `spec` as `folder/NAME.tflite`: the fp32 ONNX twin through the build's own converter
    (onnx2tf, then FP32 or full-integer INT8 calibrated on seeded samples), as a build makes them."""
    from toolchain.export.tflite import convert, onnx_to_saved_model

    fp32 = write_variant(VariantSpec(**{**asdict(spec), "precision": "fp32"}), folder, seed)
    saved = folder / f"{fp32.stem}-saved-model"
    if not saved.exists():
        onnx_to_saved_model(fp32, saved, INPUT_NAME)
    out = folder / f"{spec.name}.tflite"
    samples = np.random.default_rng(seed).standard_normal((16, *spec.input_shape)).astype(np.float32)
    out.write_bytes(convert(saved, spec.precision, samples))
    return out


def _grid() -> Iterator[VariantSpec]:
    """Every candidate spec; each runs in well under 10 ms on one core of a laptop. MLP weights stay
    under ~12 MB: bigger ones depend on what else shares the last-level cache, which is noise here."""
    for precision in ("fp32", "int8"):
        for width in (8, 16, 24, 32, 48, 64, 96):
            for depth in (1, 2, 3, 4):
                for kernel in (1, 3, 5):
                    for resolution in (16, 24, 32):
                        if width * width * kernel * kernel * depth * resolution * resolution <= 64 * 64 * 9 * 3 * 32 * 32:
                            yield VariantSpec("cnn", width, depth, kernel, resolution, precision)
                for resolution in (16, 32):
                    yield VariantSpec("mobile", width * 2, depth, 3, resolution, precision)
        for width in (64, 128, 256, 384, 512, 768, 1024):
            for depth in (1, 2, 3):
                for features in (64, 256):
                    yield VariantSpec("mlp", width, depth, 1, features, precision)


def sample_specs(count: int, seed: int = 0) -> list[VariantSpec]:
    """`count` distinct specs drawn (seeded) from the grid, balanced over families and precisions.

    Drawn round-robin from the (family, precision) strata so every operator type and precision is
    represented whatever `count` is; a split into fit and held-out sets then stays representative.
    """
    strata: dict[tuple[str, str], list[VariantSpec]] = {}
    for spec in _grid():
        strata.setdefault((spec.family, spec.precision), []).append(spec)
    rng = random.Random(seed)
    for specs in strata.values():
        rng.shuffle(specs)
    keys = sorted(strata)
    chosen: list[VariantSpec] = []
    while len(chosen) < count and any(strata.values()):
        for key in keys:
            if strata[key] and len(chosen) < count:
                chosen.append(strata[key].pop())
    return chosen


def split_specs(specs: list[VariantSpec], held_out_fraction: float, seed: int = 0) -> tuple[list[VariantSpec], list[VariantSpec]]:
    """Disjoint (fit, held-out) lists: every `1/fraction`-th spec of each (family, precision) stratum
    is held out (after a seeded shuffle), so both sides cover every operator type."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    strata: dict[tuple[str, str], list[VariantSpec]] = {}
    for spec in specs:
        strata.setdefault((spec.family, spec.precision), []).append(spec)
    rng = random.Random(seed)
    fit: list[VariantSpec] = []
    held: list[VariantSpec] = []
    for key in sorted(strata):
        group = strata[key]
        rng.shuffle(group)
        n_held = min(len(group) - 1, round(len(group) * held_out_fraction)) if len(group) > 1 else 0
        held += group[:n_held]
        fit += group[n_held:]
    return fit, held
