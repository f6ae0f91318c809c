"""What a model will cost on a profile: the calibrated predictor when the profile has a calibration,
the uncalibrated roofline otherwise, always saying which (`basis`) so a number is never mistaken for
a measured or calibrated one. `toolchain bench`, `toolchain targets compare`, the build's benchmark
and its report all read predictions through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from toolchain.perf.calibration import Calibration, find_calibration
from toolchain.perf.cost_types import MIB, GraphCost
from toolchain.perf.roofline import Prediction, predict as roofline_predict
from toolchain.perf.predictor import predict_latency, uncalibrated_groups
from toolchain.targets.profiles import Profile


@dataclass
class Estimate:
    """Predicted latency and memory of one model on one profile."""

    profile: str
    latency: Prediction  # calibrated when `calibrated`, else the roofline itself
    roofline: Prediction  # always the uncalibrated roofline (for the roofline fraction)
    calibrated: bool
    basis: str  # one line: which calibration (and how good), or why the roofline was used
    memory_mb: float  # predicted peak RSS of a process serving the model (calibrated) or weights + activations
    memory_basis: str  # "process" | "weights+activations" | "tensor arena" (weights stay in flash)
    uncalibrated_groups: list[str] = field(default_factory=list)

    @property
    def latency_ms(self) -> float:
        return self.latency.latency_ms

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "latency_ms": round(self.latency_ms, 6),
                "roofline_latency_ms": round(self.roofline.latency_ms, 6), "calibrated": self.calibrated,
                "basis": self.basis, "memory_mb": round(self.memory_mb, 4), "memory_basis": self.memory_basis,
                "bound": self.latency.bound, "uncalibrated_groups": self.uncalibrated_groups}


def estimate(cost: GraphCost, profile: Profile, calibration: Calibration | None | bool = True) -> Estimate:
    """`calibration=True` looks the profile's calibration up; None/False forces the roofline."""
    if calibration is True:
        calibration, basis = find_calibration(profile, cost.runtime)
    elif isinstance(calibration, Calibration):
        basis = calibration.summary()
    else:
        calibration, basis = None, "uncalibrated roofline (calibration not used)"
    roofline = roofline_predict(cost, profile)
    if profile.weights_in_flash:
        return Estimate(profile.id, roofline, roofline, False, basis if calibration is None else "uncalibrated roofline "
                        "(calibrations describe a process-based runtime, not TFLite Micro)",
                        cost.peak_activation_bytes / MIB, "tensor arena")
    if calibration is None:
        return Estimate(profile.id, roofline, roofline, False, basis, cost.peak_memory_bytes / MIB, "weights+activations")
    latency = predict_latency(cost, profile, calibration.latency, calibration.peaks)
    memory = calibration.memory
    return Estimate(profile.id, latency, roofline, True, basis,
                    memory.process_mb(cost) if memory else cost.peak_memory_bytes / MIB,
                    "process" if memory else "weights+activations", uncalibrated_groups(cost, calibration.latency))


def budget_verdicts(profile: Profile, latency_ms: float, size_bytes: int, memory_mb: float) -> dict[str, dict[str, Any]]:
    """Each budget of the profile against the predicted value: {value, budget, met}. `model_mb` is
    the flash/storage budget (the model file), `ram_mb` the memory budget."""
    checks = {"latency_ms": latency_ms, "model_mb": size_bytes / MIB, "ram_mb": memory_mb}
    return {key: {"value": round(value, 4), "budget": getattr(profile.budget, key), "met": value <= getattr(profile.budget, key)}
            for key, value in checks.items()}
