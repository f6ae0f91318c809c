"""The per-operator roofline: how long a graph should take on a profile, before any calibration.

Why per operator and not one roofline for the whole graph: a model is a chain of kernels that run
one after another, each limited by *its own* bottleneck. A 3x3 convolution is compute-bound, the
ReLU and the quantize nodes around it are memory-bound, and a tiny model is mostly launch overhead.
A single global roofline (total FLOPs vs total bytes) averages those away and can be wrong by
several times; summing `max(compute, memory) + overhead` per kernel keeps each one honest, and the
per-op breakdown says *which* ops to blame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from toolchain.perf.cost_types import MIB, GraphCost
from toolchain.targets.profiles import Profile


@dataclass
class Prediction:
    """Predicted latency of a graph on one compute unit of a profile.

    `compute_bound_ms + memory_bound_ms + overhead_ms == latency_ms`: the roofline time is split by
    which limit each op hit. `compute_ms` / `memory_ms` are the pure sums (FLOPs/peak, bytes/bw)
    over kernel ops, useful to compare candidates on one axis.
    """

    profile: str
    unit: str
    latency_ms: float
    roofline_ms: float
    compute_bound_ms: float
    memory_bound_ms: float
    overhead_ms: float
    compute_ms: float
    memory_ms: float
    kernel_ops: int
    peak_memory_mb: float
    ops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bound(self) -> str:
        """The largest of the three parts: what to attack first."""
        parts = {"compute": self.compute_bound_ms, "memory": self.memory_bound_ms, "overhead": self.overhead_ms}
        return max(parts, key=parts.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bound": self.bound}


def predict(cost: GraphCost, profile: Profile, unit: str = "runtime") -> Prediction:
    """Roofline latency of `cost` on `profile`: per kernel, max(FLOPs/peak, bytes/bw) + overhead.

    `unit="runtime"` uses the unit the runtime runs models on (`profile.compute`, the accelerator
    when there is one); `unit="cpu"` uses `profile.cpu_compute`. Each op uses the peak of its own
    precision, so an int8 conv is cheaper than its fp32 twin exactly where the board has int8 units.
    """
    if unit not in ("runtime", "cpu"):
        raise ValueError(f"unit must be 'runtime' or 'cpu', got {unit!r}")
    spec = profile.compute if unit == "runtime" else profile.cpu_compute
    bandwidth = profile.bandwidth_gbs * 1e9
    overhead_ms = profile.op_overhead_us / 1000
    rows: list[dict[str, Any]] = []
    totals = {"compute": 0.0, "memory": 0.0, "cb": 0.0, "mb": 0.0, "overhead": 0.0}
    for op in cost.ops:
        row = {"name": op.name, "op_type": op.op_type, "precision": op.precision, "flops": op.flops,
               "bytes": op.bytes, "compute_ms": 0.0, "memory_ms": 0.0, "overhead_ms": 0.0,
               "time_ms": 0.0, "bound": "free"}
        if not op.free:
            compute_ms = op.flops / spec.peak_ops_per_s(op.precision) * 1000
            memory_ms = op.bytes / bandwidth * 1000
            bound = "compute" if compute_ms > memory_ms else "memory"
            roof = max(compute_ms, memory_ms)
            row.update(compute_ms=compute_ms, memory_ms=memory_ms, overhead_ms=overhead_ms,
                       time_ms=roof + overhead_ms, bound=bound)
            totals["compute"] += compute_ms
            totals["memory"] += memory_ms
            totals["cb" if bound == "compute" else "mb"] += roof
            totals["overhead"] += overhead_ms
        rows.append(row)
    roofline = totals["cb"] + totals["mb"]
    return Prediction(
        profile=profile.id,
        unit=unit,
        latency_ms=roofline + totals["overhead"],
        roofline_ms=roofline,
        compute_bound_ms=totals["cb"],
        memory_bound_ms=totals["mb"],
        overhead_ms=totals["overhead"],
        compute_ms=totals["compute"],
        memory_ms=totals["memory"],
        kernel_ops=cost.kernel_ops,
        peak_memory_mb=cost.peak_memory_bytes / MIB,
        ops=rows,
    )


def roofline_fraction(roofline_ms: float, measured_ms: float) -> float:
    """Achieved fraction of the attainable roofline: 1.0 = as fast as the hardware allows.

    Values above 1 mean the model beat the prediction (the profile's peaks are too pessimistic or
    the runtime fused more than the cost model assumes).
    """
    if measured_ms <= 0:
        raise ValueError(f"measured latency must be > 0 ms, got {measured_ms}")
    return roofline_ms / measured_ms
