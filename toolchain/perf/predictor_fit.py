"""Fitting the predictor's parameters (`toolchain.perf.predictor`) to measured latencies and memory.

Latency is linear in the parameters once every kernel is known to be compute- or memory-bound, so
the fit alternates: classify each kernel under the current parameters, solve the non-negative least
squares problem that classification implies, repeat until the classification stops changing (a
few rounds). Rows are divided by the measured latency, so a 10% miss on a 20 us model weighs what
it does on a 20 ms one: the goal is relative accuracy.

Two parametrizations share the machinery: `free` (every operator group its own efficiency,
narrow-layer costs and overhead: a machine measured on dozens of generated variants) and `tied`
(a handful of multipliers on a prior model: a fleet that reports a few models).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import nnls

from toolchain.perf.cost_types import MIB, GraphCost
from toolchain.perf.predictor import (
    LatencyModel,
    MemoryModel,
    Peaks,
    error_summary,
    evaluate,
    group_key,
    relative_errors,
    rounded,
    tile_factor,
)

MAX_FIT_ROUNDS = 12
MIN_SCALE = 1e-3  # compute/memory multipliers stay above this, so efficiencies stay finite
CHANNEL_SCALE = 16.0  # ridge scale of the narrow-layer terms: 16 channels doubling a kernel's time


@dataclass(frozen=True)
class LatencySample:
    """One measured model: its static cost and measured p50 latency (ms)."""

    name: str
    cost: GraphCost
    latency_ms: float


@dataclass(frozen=True)
class FitReport:
    """How well a fit describes the samples it was fitted on (relative errors, predicted/measured - 1)."""

    samples: int
    parameters: int
    rounds: int
    median_abs_error: float
    max_abs_error: float
    within_10pct: float
    errors: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return rounded(asdict(self))


@dataclass(frozen=True)
class _Param:
    """One fitted number: a weighted sum of design columns, with its prior (the ridge's target)."""

    name: str
    columns: tuple[tuple[str, float], ...]  # (column, weight): the parameter multiplies each column by weight
    prior: float
    scale: float  # the ridge penalises (value - prior) / scale


Parametrization = Callable[[set[str], set[str], LatencyModel], list[_Param]]


def _channel_terms(prior: LatencyModel, group: str) -> tuple[float, float]:
    c_in, c_out = prior.channel_cost.get(group, (0.0, 0.0))
    return float(c_in), float(c_out)


def free_parametrization(groups: set[str], channel_groups: set[str], prior: LatencyModel) -> list[_Param]:
    """Every group its own efficiency, overhead and (for Conv/Gemm/MatMul) narrow-layer costs."""
    params = [_Param("run", (("run", 1.0),), prior.run_overhead_us / 1000, 0.05),
              _Param("far", (("far", 1.0),), prior.far_memory_scale, prior.memory_scale())]
    for group in sorted(groups):
        memory = prior.memory_scale(group)
        params.append(_Param(f"memory:{group}", ((f"memory:{group}", 1.0),), memory, memory))
        scale = prior.compute_scale(group)
        params.append(_Param(f"compute:{group}", ((f"compute:{group}", 1.0),), scale, scale))
        if group in channel_groups:
            c_in, c_out = _channel_terms(prior, group)
            params.append(_Param(f"in:{group}", ((f"in:{group}", 1.0),), c_in, scale * CHANNEL_SCALE))
            params.append(_Param(f"out:{group}", ((f"out:{group}", 1.0),), c_out, scale * CHANNEL_SCALE))
        overhead = prior.overhead_ms(group)
        params.append(_Param(f"overhead:{group}", ((f"overhead:{group}", 1.0),), overhead, max(overhead, 0.001)))
    return params


def _precision_of(group: str) -> str:
    return group.rsplit("/", 1)[-1]


def _operator_of(group: str) -> str:
    """`Conv-pointwise-ragged/int8` -> `Conv/int8`: the operator and precision without the variant."""
    op, _, precision = group.rpartition("/")
    return f"{op.split('-', 1)[0]}/{precision}"


def _multipliers(groups: set[str], prior: LatencyModel, key: Callable[[str], str]) -> list[_Param]:
    """One multiplier on the prior's compute, memory and overhead times per `key(group)` class, the
    far-memory term and the per-run cost. The prior's groups absent from the samples move with
    their class too."""
    groups = groups | set(prior.efficiency)
    params = [_Param("run", (("run", 1.0),), prior.run_overhead_us / 1000, 0.05),
              _Param("far", (("far", 1.0),), prior.far_memory_scale, prior.memory_scale())]
    for cls in sorted({key(g) for g in groups}):
        members = [g for g in sorted(groups) if key(g) == cls]
        compute: list[tuple[str, float]] = []
        for g in members:
            c_in, c_out = _channel_terms(prior, g)
            compute += [(f"compute:{g}", prior.compute_scale(g)), (f"in:{g}", c_in), (f"out:{g}", c_out)]
        params += [_Param(f"compute/{cls}", tuple(compute), 1.0, 1.0),
                   _Param(f"memory/{cls}", tuple((f"memory:{g}", prior.memory_scale(g)) for g in members), 1.0, 1.0),
                   _Param(f"overhead/{cls}", tuple((f"overhead:{g}", prior.overhead_ms(g)) for g in members), 1.0, 1.0)]
    return params


def tied_parametrization(groups: set[str], channel_groups: set[str], prior: LatencyModel) -> list[_Param]:
    """Few parameters for few models (a fleet): multipliers per precision on the prior's times."""
    return _multipliers(groups, prior, _precision_of)


def operator_parametrization(groups: set[str], channel_groups: set[str], prior: LatencyModel) -> list[_Param]:
    """Multipliers per operator and precision (`Conv/int8`), shared by its variants."""
    return _multipliers(groups, prior, _operator_of)


def _design(costs: Sequence[GraphCost], peaks: Peaks, model: LatencyModel) -> tuple[list[dict[str, float]], tuple[bool, ...]]:
    """Per graph: column -> value, each kernel charged to compute or memory by its bound under
    `model`; and every kernel's bound (True: compute), to tell when the classification settled."""
    rows, bounds = [], []
    for cost in costs:
        row: dict[str, float] = {"run": 1.0}
        far = model.far_fraction(cost)
        for op in cost.ops:
            if op.free:
                continue
            group = group_key(op)
            compute_ms, memory_ms, _ = model.op_ms(op, peaks, far)
            bounds.append(compute_ms > memory_ms)
            if compute_ms > memory_ms:
                roof_ms = model.roof_compute_ms(op, peaks)
                terms = {"compute": roof_ms}
                if op.channels is not None:
                    terms.update({"in": roof_ms / max(op.channels[0], 1), "out": roof_ms / max(op.channels[1], 1)})
                for kind, value in terms.items():
                    row[f"{kind}:{group}"] = row.get(f"{kind}:{group}", 0.0) + value
            else:
                row[f"memory:{group}"] = row.get(f"memory:{group}", 0.0) + op.bytes / peaks.bytes_per_ms
                row["far"] = row.get("far", 0.0) + far * op.bytes / peaks.bytes_per_ms
            row[f"overhead:{group}"] = row.get(f"overhead:{group}", 0.0) + 1.0
        rows.append(row)
    return rows, tuple(bounds)


def _model_from(values: dict[str, float], params: list[_Param], prior: LatencyModel) -> LatencyModel:
    """Fitted parameter values back into per-group efficiencies, narrow-layer costs and overheads;
    groups the fit did not touch keep the prior's values."""
    scale = {g: 1.0 / e for g, e in prior.efficiency.items()}
    channel = {g: list(_channel_terms(prior, g)) for g in prior.channel_cost}
    overhead = {g: o / 1000 for g, o in prior.overhead_us.items()}
    memory = {g: 1.0 / b for g, b in prior.group_bandwidth.items()}
    run_ms, far_scale = prior.run_overhead_us / 1000, prior.far_memory_scale
    for param in params:
        value = values[param.name]
        for column, weight in param.columns:
            kind, _, group = column.partition(":")
            if kind == "compute":
                scale[group] = max(value * weight, MIN_SCALE)
            elif kind in ("in", "out"):
                channel.setdefault(group, [0.0, 0.0])[0 if kind == "in" else 1] = value * weight
            elif kind == "overhead":
                overhead[group] = value * weight
            elif kind == "memory":
                memory[group] = max(value * weight, MIN_SCALE)
            elif kind == "far":
                far_scale = value * weight
            else:
                run_ms = value
    efficiency = {g: 1.0 / s for g, s in scale.items()}
    defaults = {precision: float(np.median([e for g, e in efficiency.items() if g.endswith("/" + precision)]))
                for precision in sorted({g.rsplit("/", 1)[-1] for g in efficiency})}
    defaults["*"] = float(np.median(list(efficiency.values()))) if efficiency else 1.0
    overhead_us = {g: o * 1000 for g, o in overhead.items()}
    default_overhead = float(np.median(list(overhead_us.values()))) if overhead_us else prior.default_overhead_us
    bandwidth = {g: 1.0 / m for g, m in memory.items()}
    default_bandwidth = float(np.median(list(bandwidth.values()))) if bandwidth else prior.bandwidth_efficiency
    return LatencyModel(efficiency, overhead_us, default_bandwidth, run_ms * 1000, defaults, default_overhead,
                        {g: v for g, v in channel.items() if any(v)}, prior.cache_mb, far_scale, bandwidth,
                        prior.conv_tile)


def _fit_classified(costs: Sequence[GraphCost], measured: np.ndarray, peaks: Peaks, prior: LatencyModel,
                    params: list[_Param], ridge: float) -> tuple[float, LatencyModel, int]:
    """The alternating fit for one prior: (sum of squared relative errors, best model, its round)."""
    penalty = math.sqrt(ridge)
    ridge_rows = np.diag([penalty / p.scale for p in params])
    ridge_targets = np.array([penalty * p.prior / p.scale for p in params])
    model, best, seen = prior, None, set()
    for round_index in range(1, MAX_FIT_ROUNDS + 1):
        design, bounds = _design(costs, peaks, model)
        if bounds in seen:
            break  # the classification repeats: converged (or cycling); keep the best seen
        seen.add(bounds)
        a = np.array([[sum(row.get(col, 0.0) * w for col, w in p.columns) for p in params] for row in design])
        solution, _ = nnls(np.vstack([a / measured[:, None], ridge_rows]),
                           np.concatenate([np.ones(len(measured)), ridge_targets]), maxiter=50 * len(params))
        model = _model_from({p.name: float(v) for p, v in zip(params, solution)}, params, prior)
        loss = float(np.sum((evaluate(costs, peaks, model) / measured - 1.0) ** 2))
        if best is None or loss < best[0]:
            best = (loss, model, round_index)
    assert best is not None
    return best


def fit_latency(samples: Sequence[LatencySample], peaks: Peaks, prior: LatencyModel,
                parametrization: Parametrization = free_parametrization, ridge: float = 1e-4,
                cache_mb: Sequence[float] | None = None) -> tuple[LatencyModel, FitReport]:
    """Fit a `LatencyModel` to measured samples, starting from (and regularised towards) `prior`.

    `ridge` pulls each parameter towards its prior, relative to the parameter's scale: with many
    samples (a host calibration) it only settles parameters the data cannot tell apart; with few
    (a fleet) it keeps those the data cannot see at home. `cache_mb`: candidate cache sizes for
    the far-memory term, the best fitting one is kept (None: the prior's).
    """
    if not samples:
        raise ValueError("no samples to fit")
    costs = [s.cost for s in samples]
    kernels = [op for cost in costs for op in cost.ops if not op.free]
    params = parametrization({group_key(op) for op in kernels},
                             {group_key(op) for op in kernels if op.channels is not None}, prior)
    measured = np.array([s.latency_ms for s in samples], dtype=np.float64)
    candidates = [replace(prior, cache_mb=float(c)) for c in cache_mb] if cache_mb else [prior]
    _, model, rounds = min((_fit_classified(costs, measured, peaks, p, params, ridge) for p in candidates),
                           key=lambda fit: fit[0])
    names = [s.name for s in samples]
    errors = relative_errors(dict(zip(names, evaluate(costs, peaks, model))), dict(zip(names, measured)))
    return model, FitReport(samples=len(samples), parameters=len(params), rounds=rounds, errors=errors,
                            **error_summary(errors))


@dataclass(frozen=True)
class MemorySample:
    """One model's peak RSS as measured in a fresh process (`toolchain.runtime.measure.measure_peak_rss`)."""

    name: str
    cost: GraphCost
    model_rss_mb: float
    baseline_rss_mb: float


def fit_memory(samples: Sequence[MemorySample]) -> tuple[MemoryModel, dict[str, Any]]:
    """Non-negative least squares of the model's RSS on (1, weights MB, activations MB), relative
    errors weighted alike; the runtime baseline is the median baseline of the measuring processes."""
    if not samples:
        raise ValueError("no memory samples to fit")
    a = np.array([[1.0, s.cost.weights_bytes / MIB, s.cost.peak_activation_bytes / MIB] for s in samples])
    y = np.array([s.model_rss_mb for s in samples])
    w = 1.0 / np.maximum(y, 1.0)
    (session, weights_factor, activations_factor), _ = nnls(a * w[:, None], y * w)
    model = MemoryModel(float(np.median([s.baseline_rss_mb for s in samples])), float(session),
                        float(weights_factor), float(activations_factor))
    errors = relative_errors({s.name: model.model_mb(s.cost) for s in samples},
                             {s.name: s.model_rss_mb for s in samples})
    return model, {"samples": len(samples), **error_summary(errors), "errors": rounded(errors)}


RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
CONV_TILES = (0, 8, 16, 32, 64)  # candidate output-channel tiles of spatial convolutions (0: none)


def choose_conv_tiles(samples: Sequence[LatencySample], peaks: Peaks, prior: LatencyModel,
                      tiles: Sequence[int] = CONV_TILES) -> dict[str, int]:
    """Per precision, the output-channel tile of spatial convolutions (`predictor.tile_factor`) under
    which a per-group fit from `prior` describes the samples best; none where no tile does better.

    A tile is a property of the runtime's kernels on this machine (XNNPACK's NR), not of a model,
    so it is chosen like the cache size: by how well the whole fit explains the measurements."""
    chosen: dict[str, int] = {}
    precisions = sorted({op.precision for s in samples for op in s.cost.ops
                         if not op.free and tile_factor(op, max(tiles)) != 1.0})
    for precision in precisions:
        losses = {}
        for tile in tiles:
            candidate = replace(prior, conv_tile={**chosen, precision: tile})
            _, report = fit_latency(samples, peaks, candidate, ridge=1e-3)
            losses[tile] = sum(e * e for e in report.errors.values())
        chosen[precision] = min(tiles, key=lambda t: (losses[t], t))
    return {p: t for p, t in chosen.items() if t}


def fit_shrunk(samples: Sequence[LatencySample], peaks: Peaks, prior: LatencyModel,
               cache_mb: Sequence[float] | None = None, ridges: Sequence[float] = RIDGES,
               folds: int = 4, seed: int = 0,
               conv_tiles: Sequence[int] = CONV_TILES) -> tuple[LatencyModel, FitReport, dict[str, Any]]:
    """The host calibration's fit: per-group parameters shrunk towards a few global ones.

    First a `tied` fit from `prior` (the roofline): one efficiency per precision, one memory and
    one overhead multiplier, and the cache size, refined per operator; then the convolution tiles
    (`choose_conv_tiles`). Its result is the prior of a `free` fit, every group its own numbers, whose
    ridge (how far a group may stray from the global values) is chosen by k-fold cross-validation
    on the samples: groups with little evidence stay near the global numbers, well-measured ones
    get their own. Returns the model, its report and the selection details.
    """
    tied, _ = fit_latency(samples, peaks, prior, tied_parametrization, ridge=1e-6, cache_mb=cache_mb)
    tied, _ = fit_latency(samples, peaks, tied, operator_parametrization, ridge=1e-3)
    if len(conv_tiles) > 1:
        tied = replace(tied, conv_tile=choose_conv_tiles(samples, peaks, tied, conv_tiles))
    order = np.random.default_rng(seed).permutation(len(samples))
    chunks = [set(chunk.tolist()) for chunk in np.array_split(order, min(folds, len(samples)))]
    scores: dict[float, float] = {}
    for ridge in ridges:
        errors: list[float] = []
        for test in chunks:
            train = [s for i, s in enumerate(samples) if i not in test]
            held = [samples[i] for i in sorted(test)]
            if not train or not held:
                continue
            model, _ = fit_latency(train, peaks, tied, ridge=ridge)
            predicted = evaluate([s.cost for s in held], peaks, model)
            errors += [p / s.latency_ms - 1.0 for p, s in zip(predicted, held)]
        scores[ridge] = float(np.mean(np.minimum(np.abs(errors), 0.3))) if errors else math.inf
    chosen = min(scores, key=lambda r: (scores[r], -r))
    model, report = fit_latency(samples, peaks, tied, ridge=chosen)
    return model, report, {"ridge": chosen, "cv_mean_abs_error": rounded(scores), "folds": len(chunks),
                           "conv_tile": model.conv_tile}
