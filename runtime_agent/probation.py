"""Probation: a freshly installed model must do no worse than the one it replaced, or it is rolled back.

Signed and self-tested is not the same as good: a model can be 3x slower on this board, or answer one
class for everything. For a window after an install (a number of requests or a time, whichever comes
first) the new model's latency p90, error rate and distribution of answers are compared with what
the previous model did on the same device (the answers may instead match the new bundle's own
reference: a model retrained after drift is meant to answer differently); the first limit exceeded is
the rollback reason. The answers of a classifier are its predicted classes; those of any other model
(regression, unlabelled outputs) are its per-sample output means in the reference's quantile bins
(`reference.prediction_values`), so a regressor that collapses onto one value is caught the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from runtime_agent.drift import psi
from runtime_agent.sketch import LatencySketch


@dataclass(frozen=True)
class ProbationLimits:
    requests: int = 500
    seconds: float = 60.0
    max_latency_ratio: float = 2.0  # new p90 / previous p90
    max_error_rate_increase: float = 0.05
    max_prediction_psi: float = 0.25
    min_requests: int = 30  # below this a comparison would judge noise


@dataclass
class ModelStats:
    """What one model did since it became active: latency sketch, requests, errors, and how many answers
    fell in each prediction bin: a classifier's classes, or (`edges` given) the bins of its bundle's
    reference that its continuous answers fell in (`DriftMonitor.prediction_bins`)."""

    n_bins: int
    edges: tuple[float, ...] | None = None
    sketch: LatencySketch = field(default_factory=LatencySketch)
    requests: int = 0
    errors: int = 0
    answers: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.answers = np.zeros(self.n_bins, dtype=np.int64)

    def record_many(self, latencies_ms: list[float], bins: np.ndarray) -> None:
        """Count a run of requests: one latency per request, the prediction bins of all their samples."""
        self.sketch.add_many(latencies_ms)
        self.requests += len(latencies_ms)
        self.answers += np.bincount(bins, minlength=self.n_bins)[: self.n_bins]

    @property
    def error_rate(self) -> float:
        return self.errors / max(1, self.requests + self.errors)


class Probation:
    """`reference_fractions`: the new bundle's `reference.predictions.fractions` (per class, or per bin of
    `stats.edges`)."""

    def __init__(self, limits: ProbationLimits, stats: ModelStats, baseline: ModelStats | None,
                 reference_fractions: list[float]) -> None:
        self.limits, self.stats, self.baseline = limits, stats, baseline
        self.reference_fractions = reference_fractions
        self.started = time.monotonic()

    def _answer(self, index: int) -> str:
        """Bin `index` in words: a class, or the range of predicted values it holds."""
        edges = self.stats.edges
        if edges is None:
            return f"class {index}"
        low = f"{edges[index - 1]:.4g}" if index > 0 else "-inf"
        high = f"{edges[index]:.4g}" if index < len(edges) else "inf"
        return f"predicted values in ({low}, {high}]"

    def due(self) -> bool:
        return self.stats.requests + self.stats.errors >= self.limits.requests or \
            time.monotonic() - self.started >= self.limits.seconds

    def regression(self) -> str | None:
        """The reason to roll back, or None when the new model held up."""
        new, old, limits = self.stats, self.baseline, self.limits
        judged_old = old is not None and old.requests >= limits.min_requests
        if new.requests >= limits.min_requests and judged_old:
            ratio = new.sketch.quantile(0.9) / max(old.sketch.quantile(0.9), 1e-9)
            if ratio > limits.max_latency_ratio:
                return (f"latency p90 {new.sketch.quantile(0.9):.3f} ms is {ratio:.1f}x the previous model's "
                        f"{old.sketch.quantile(0.9):.3f} ms (limit {limits.max_latency_ratio:.1f}x)")
        judged_errors = new.requests + new.errors >= limits.min_requests  # a client's few bad requests are not a rate
        if judged_errors and old is not None and new.error_rate > old.error_rate + limits.max_error_rate_increase:
            return f"error rate {new.error_rate:.1%} vs {old.error_rate:.1%} before (limit +{limits.max_error_rate_increase:.0%})"
        if new.requests >= limits.min_requests:
            # Either yardstick will do: the previous model on this device's traffic (a device may see few
            # classes), or the new bundle's own reference (a model retrained after drift is *meant* to answer
            # differently from the one that drifted). A model that collapsed matches neither. The previous
            # model's histogram only counts when its bins mean the same: the same classes, or the same edges.
            yardsticks = {"the bundle's reference": np.asarray(self.reference_fractions)}
            if judged_old and (old.n_bins, old.edges) == (new.n_bins, new.edges) and old.answers.sum():
                yardsticks["the previous model"] = old.answers / old.answers.sum()
            shifts = {name: psi(expected, new.answers) for name, expected in yardsticks.items()}
            if min(shifts.values()) > limits.max_prediction_psi:
                top = int(new.answers.argmax())
                against = ", ".join(f"{shift:.2f} vs {name}" for name, shift in shifts.items())
                return (f"predictions shifted: PSI {against} (limit {limits.max_prediction_psi}; "
                        f"{new.answers[top] / new.answers.sum():.0%} of answers are {self._answer(top)})")
        return None
