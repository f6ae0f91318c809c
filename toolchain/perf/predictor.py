"""A calibrated per-operator latency and memory predictor: the roofline, corrected by measurements.

Why: the roofline (`toolchain.perf.graph_cost.predict`) assumes every kernel reaches the data-sheet peak.
Real kernels do not, and by how much depends on the operator: a dense 3x3 convolution gets a good
share of the FLOP peak, a depthwise one is starved by memory, an int8 GEMV is mostly dispatch. So
each kernel is predicted as

    time = max(flops / (peak[precision] * efficiency[group]), bytes / (bandwidth * bandwidth_efficiency[group]))
           + overhead[group]

plus one fixed cost per inference (`run_overhead`), where a *group* is the operator type, its
variant (`toolchain.perf.graph_cost_onnx._kind`: depthwise, stem, pointwise, kernel size, narrow/ragged channel
counts) and its precision (`Conv-3x3/int8`, `Conv-depthwise/fp32`, ...). A Conv/Gemm's efficiency
also falls with narrow products (`channel_cost`: extra time per 1/K and 1/N), a spatial convolution
computes its output channels in whole tiles (`conv_tile`, `tile_factor`), and weights beyond a
fitted cache size pay a far-memory cost per byte. The parameters are fitted
(`toolchain.perf.predictor_fit`) by non-negative least squares on measured latencies of many models.

Peak memory: `runtime_baseline + session + weights_factor * weights + activations_factor * peak live
activations`, fitted on peak RSS of fresh processes (`MemoryModel`).

Without a calibration, predictions fall back to the uncalibrated roofline (`toolchain.perf.estimate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from toolchain.perf.cost_types import MIB, GraphCost, OpCost

from toolchain.perf.roofline import Prediction, predict as roofline_predict
from toolchain.targets.profiles import ComputeSpec, Profile


def group_key(op: OpCost) -> str:
    """The efficiency group of a kernel: operator type, variant and precision."""
    return f"{op.op_type}{'-' + op.kind if op.kind else ''}/{op.precision}"


def padded_channels(channels: int, tile: int) -> int:
    """Output channels a tiled kernel computes for a layer of `channels`: whole tiles, except that a
    layer that fits in half a tile gets the half-width kernel (0: no tiling)."""
    if tile <= 0:
        return channels
    half = max(tile // 2, 1)
    return half if channels <= half else -(-channels // tile) * tile


def tile_factor(op: OpCost, tile: int) -> float:
    """How much more arithmetic than its FLOPs a spatial (k x k, not 1x1 or depthwise) convolution
    runs when its output channels are computed in tiles of `tile` (padded / real channels).

    What it rests on: XNNPACK, LiteRT's CPU kernels, runs a dense convolution as an indirect GEMM
    whose microkernel writes a fixed number of output channels per call (NR), zero-padding the last
    tile, and picks a kernel of half that width when the layer fits in it. Measured on this
    project's FP32 `.tflite` variants on an AVX-512 host (benchmarks/predictor.py --runtime litert),
    3x3/5x5 convolutions ran at 85-103 GFLOP/s with 16, 32, 64 or 96 output channels but 72-77 with 24 or
    48 (24/32 and 48/64 of it), while the 1x1 ones (a plain GEMM) ran 48 channels at full speed:
    an NR of 32 for the spatial ones, which channel-count terms that fall smoothly with N cannot
    express (48 is slower than both 32 and 64). The tile is fitted per precision (0: none)."""
    spatial = op.op_type == "Conv" and op.kind.split("-", 1)[0] not in ("", "pointwise", "depthwise")
    if tile <= 0 or not spatial or op.channels is None:
        return 1.0
    return padded_channels(op.channels[1], tile) / max(op.channels[1], 1)


@dataclass(frozen=True)
class Peaks:
    """The peaks the efficiencies are relative to, frozen at fit time so a re-measured profile does
    not silently shift a calibration's meaning."""

    fp32_gflops: float
    fp16_gflops: float
    int8_gops: float
    bandwidth_gbs: float

    @classmethod
    def of(cls, profile: Profile) -> Peaks:
        c = profile.compute
        return cls(c.fp32_gflops, c.fp16_gflops, c.int8_gops, profile.bandwidth_gbs)

    def ops_per_ms(self, precision: str) -> float:
        return ComputeSpec(self.fp32_gflops, self.fp16_gflops, self.int8_gops).peak_ops_per_s(precision) / 1000

    @property
    def bytes_per_ms(self) -> float:
        return self.bandwidth_gbs * 1e9 / 1000


@dataclass(frozen=True)
class LatencyModel:
    """Fitted parameters. Groups absent from `efficiency` / `overhead_us` use the defaults (the
    median of the fitted groups of that precision, else of all), and are reported as uncalibrated."""

    efficiency: dict[str, float]  # group -> efficiency of wide layers (fraction of the peak)
    overhead_us: dict[str, float]  # group -> fixed cost per kernel
    bandwidth_efficiency: float  # default share of the bandwidth a memory-bound kernel reaches
    run_overhead_us: float  # fixed cost per inference (the runtime's call, binding inputs/outputs)
    default_efficiency: dict[str, float] = field(default_factory=dict)  # per precision, "*" for any
    default_overhead_us: float = 0.0
    # group -> [per input channel, per output channel]: extra multiples of the roofline time for
    # narrow layers (time * (1/efficiency + c_in / channels_in + c_out / channels_out)); a layer of
    # 3 or 8 channels fills a fraction of the SIMD lanes that a 64-channel one does
    channel_cost: dict[str, list[float]] = field(default_factory=dict)
    # Weights that do not fit the cache stream from far memory on every run: the share of a model's
    # weights above `cache_mb` costs `far_memory_scale` more per byte (0: no such term).
    cache_mb: float = 0.0
    far_memory_scale: float = 0.0
    # group -> its own bandwidth efficiency (an int8 GEMV streams its weights slower than an fp32 one)
    group_bandwidth: dict[str, float] = field(default_factory=dict)
    # precision -> output channels per microkernel tile of spatial convolutions (`tile_factor`)
    conv_tile: dict[str, int] = field(default_factory=dict)

    def compute_scale(self, group: str, channels: tuple[int, int] | None = None) -> float:
        """Multiplier on the roofline compute time: 1 / efficiency, plus the narrow-layer terms."""
        if group in self.efficiency:
            scale = 1.0 / self.efficiency[group]
        else:
            precision = group.rsplit("/", 1)[-1]
            scale = 1.0 / self.default_efficiency.get(precision, self.default_efficiency.get("*", 1.0))
        if channels is not None and group in self.channel_cost:
            c_in, c_out = self.channel_cost[group]
            scale += c_in / max(channels[0], 1) + c_out / max(channels[1], 1)
        return scale

    def far_fraction(self, cost: GraphCost) -> float:
        """The share of the model's weights beyond the cache (0 when they fit or without the term)."""
        weights_mb = cost.weights_bytes / MIB
        return max(0.0, 1.0 - self.cache_mb / weights_mb) if self.cache_mb > 0 and weights_mb > 0 else 0.0

    def op_ms(self, op: OpCost, peaks: Peaks, far: float = 0.0) -> tuple[float, float, float]:
        """(compute, memory, overhead) ms of one kernel of a model whose `far_fraction` is `far`;
        the kernel takes max(compute, memory) + overhead."""
        group = group_key(op)
        compute_ms = self.roof_compute_ms(op, peaks) * self.compute_scale(group, op.channels)
        memory_ms = op.bytes / peaks.bytes_per_ms * (self.memory_scale(group) + far * self.far_memory_scale)
        return compute_ms, memory_ms, self.overhead_ms(group)

    def roof_compute_ms(self, op: OpCost, peaks: Peaks) -> float:
        """The kernel's FLOPs at the peak, counting the padding of its last channel tile."""
        return op.flops * tile_factor(op, self.conv_tile.get(op.precision, 0)) / peaks.ops_per_ms(op.precision)

    def overhead_ms(self, group: str) -> float:
        return self.overhead_us.get(group, self.default_overhead_us) / 1000

    def memory_scale(self, group: str | None = None) -> float:
        """Multiplier on bytes / bandwidth (1 / bandwidth efficiency) of a group's kernels."""
        return 1.0 / self.group_bandwidth.get(group or "", self.bandwidth_efficiency)

    @classmethod
    def roofline(cls, profile: Profile) -> LatencyModel:
        """The uncalibrated model as parameters: every efficiency 1, the profile's per-op overhead."""
        return cls({}, {}, 1.0, 0.0, {"*": 1.0}, profile.op_overhead_us)

    def to_dict(self) -> dict[str, Any]:
        return {key: rounded(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyModel:
        return cls(efficiency={k: float(v) for k, v in data["efficiency"].items()},
                   overhead_us={k: float(v) for k, v in data["overhead_us"].items()},
                   bandwidth_efficiency=float(data["bandwidth_efficiency"]),
                   run_overhead_us=float(data["run_overhead_us"]),
                   default_efficiency={k: float(v) for k, v in data.get("default_efficiency", {}).items()},
                   default_overhead_us=float(data.get("default_overhead_us", 0.0)),
                   channel_cost={k: [float(x) for x in v] for k, v in data.get("channel_cost", {}).items()},
                   cache_mb=float(data.get("cache_mb", 0.0)), far_memory_scale=float(data.get("far_memory_scale", 0.0)),
                   group_bandwidth={k: float(v) for k, v in data.get("group_bandwidth", {}).items()},
                   conv_tile={k: int(v) for k, v in data.get("conv_tile", {}).items()})


@dataclass(frozen=True)
class MemoryModel:
    """Peak RSS of a process serving one model (MB): the runtime's own baseline (interpreter, numpy,
    onnxruntime loaded), a fixed per-session cost, and what the weights and live activations add
    (factors above 1: onnxruntime keeps the serialized model, the initializers and pre-packed
    copies; activations live in an arena that rounds up)."""

    runtime_baseline_mb: float
    session_mb: float
    weights_factor: float
    activations_factor: float

    def model_mb(self, cost: GraphCost) -> float:
        """What loading and running the model adds to the runtime's baseline."""
        return (self.session_mb + self.weights_factor * cost.weights_bytes / MIB
                + self.activations_factor * cost.peak_activation_bytes / MIB)

    def process_mb(self, cost: GraphCost) -> float:
        return self.runtime_baseline_mb + self.model_mb(cost)

    def to_dict(self) -> dict[str, Any]:
        return {key: rounded(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryModel:
        return cls(**{key: float(data[key]) for key in ("runtime_baseline_mb", "session_mb", "weights_factor",
                                                         "activations_factor")})


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- prediction


def predict_latency(cost: GraphCost, profile: Profile, model: LatencyModel, peaks: Peaks | None = None) -> Prediction:
    """Calibrated latency of `cost`; same `Prediction` shape as the roofline's (parts add up).

    `roofline_ms` stays the *uncalibrated* roofline of the profile, so `roofline_fraction` keeps
    its meaning (how close the runtime gets to the hardware) whatever the calibration says.
    """
    peaks = peaks or Peaks.of(profile)
    roof = roofline_predict(cost, profile)
    rows: list[dict[str, Any]] = []
    far = model.far_fraction(cost)
    cb = mb = overhead = compute_total = memory_total = 0.0
    for op in cost.ops:
        row = {"name": op.name, "op_type": op.op_type, "precision": op.precision, "group": group_key(op),
               "flops": op.flops, "bytes": op.bytes, "compute_ms": 0.0, "memory_ms": 0.0, "overhead_ms": 0.0,
               "time_ms": 0.0, "bound": "free"}
        if not op.free:
            compute_ms, memory_ms, op_overhead = model.op_ms(op, peaks, far)
            bound = "compute" if compute_ms > memory_ms else "memory"
            row.update(compute_ms=compute_ms, memory_ms=memory_ms, overhead_ms=op_overhead,
                       time_ms=max(compute_ms, memory_ms) + op_overhead, bound=bound)
            cb += compute_ms if bound == "compute" else 0.0
            mb += memory_ms if bound == "memory" else 0.0
            overhead += op_overhead
            compute_total += compute_ms
            memory_total += memory_ms
        rows.append(row)
    overhead += model.run_overhead_us / 1000
    return Prediction(profile=profile.id, unit="runtime", latency_ms=cb + mb + overhead, roofline_ms=roof.roofline_ms,
                      compute_bound_ms=cb, memory_bound_ms=mb, overhead_ms=overhead, compute_ms=compute_total,
                      memory_ms=memory_total, kernel_ops=cost.kernel_ops, peak_memory_mb=cost.peak_memory_bytes / MIB,
                      ops=rows)


def uncalibrated_groups(cost: GraphCost, model: LatencyModel) -> list[str]:
    """Kernel groups of `cost` the calibration never saw (predicted with its defaults)."""
    return sorted({group_key(op) for op in cost.ops if not op.free} - set(model.efficiency))


# ----------------------------------------------------------------------------- errors


def relative_errors(predicted: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """predicted / measured - 1 per name."""
    return {name: predicted[name] / measured[name] - 1.0 for name in measured}


def share_within(errors: dict[str, float], tolerance: float) -> float:
    """The share of relative errors within +-tolerance (0 without errors)."""
    return float(sum(abs(e) <= tolerance for e in errors.values()) / len(errors)) if errors else 0.0


def error_summary(errors: dict[str, float]) -> dict[str, float]:
    """Median and max absolute error and the share within 10% (0 samples: zeros)."""
    if not errors:
        return {"median_abs_error": 0.0, "max_abs_error": 0.0, "within_10pct": 0.0}
    values = np.abs(np.fromiter(errors.values(), dtype=np.float64))
    return {"median_abs_error": float(np.median(values)), "max_abs_error": float(values.max()),
            "within_10pct": share_within(errors, 0.10)}


def evaluate(costs: Sequence[GraphCost], peaks: Peaks, model: LatencyModel) -> np.ndarray:
    """Predicted latency (ms) of each graph under `model` (the `max` applied per kernel)."""
    out = np.empty(len(costs))
    for i, cost in enumerate(costs):
        total, far = model.run_overhead_us / 1000, model.far_fraction(cost)
        for op in cost.ops:
            if not op.free:
                compute_ms, memory_ms, overhead_ms = model.op_ms(op, peaks, far)
                total += max(compute_ms, memory_ms) + overhead_ms
        out[i] = total
    return out
