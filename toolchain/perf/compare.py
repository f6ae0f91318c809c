"""Predicted latency, memory and budget fit of one model on several profiles, to choose hardware.

Used by `toolchain targets compare` and by the build report's "every profile" chart. Nothing is
measured: each number is the profile's calibrated prediction when it has a calibration, else the
roofline's, and each row says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.perf.cost_types import MIB

from toolchain.perf.graph_cost import analyze
from toolchain.errors import TargetError
from toolchain.perf.estimate import budget_verdicts, estimate
from toolchain.targets.profiles import Profile, list_profiles, resolve_target


def parse_targets(spec: str | None) -> list[Profile]:
    """`a,b,c` (ids, aliases or profile files) -> profiles, in order, without repeats; None: every shipped one."""
    if spec is None:
        return list_profiles()
    names = [part.strip() for part in spec.split(",")]
    if not spec.strip() or any(not name for name in names):
        raise TargetError(f"--targets must be a comma-separated list of profiles, got {spec!r}")
    profiles: dict[str, Profile] = {}
    for name in names:
        profile = resolve_target(name)
        profiles.setdefault(profile.id, profile)
    return list(profiles.values())


def compare_targets(model: Path, profiles: list[Profile]) -> list[dict[str, Any]]:
    """One row per profile: predicted latency and memory, the budgets, and whether the board can run it
    and all budgets are met (`not_supported` says why a board cannot run it whatever the budgets: a
    precision it does not accelerate, or a `.tflite` file on a board without LiteRT; an ONNX model is
    not refused there, a build translates it to `.tflite` for a board that runs only that)."""
    cost = analyze(model)
    size = Path(model).stat().st_size
    precisions = sorted({op.precision for op in cost.ops if not op.free})
    tflite = Path(model).suffix.lower() == ".tflite"
    rows = []
    for profile in profiles:
        predicted = estimate(cost, profile)
        budget = budget_verdicts(profile, predicted.latency_ms, size, predicted.memory_mb)
        unsupported = [p for p in precisions if p not in profile.precisions]
        not_supported = [f"does not list precision {', '.join(unsupported)} in its runtime"] if unsupported else []
        if tflite and "tflite" not in profile.formats:
            not_supported.append(f"runs only {', '.join(profile.formats)} models, not .tflite")
        rows.append({
            "target": profile.id, "name": profile.name,
            "latency_ms": round(predicted.latency_ms, 6), "prediction": "calibrated" if predicted.calibrated else "roofline",
            "basis": predicted.basis, "roofline_ms": round(predicted.roofline.latency_ms, 6), "bound": predicted.latency.bound,
            "memory_mb": round(predicted.memory_mb, 4), "memory_basis": predicted.memory_basis,
            "model_mb": round(size / MIB, 4), "precisions": precisions, "unsupported_precisions": unsupported,
            "not_supported": not_supported, "budget": budget, "fits": all(v["met"] for v in budget.values()) and not not_supported,
        })
    return rows
