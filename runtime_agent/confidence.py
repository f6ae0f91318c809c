"""A label-free accuracy estimate: the model's own confidences, calibrated at build time.

Confidence-based performance estimation (CBPE, as NannyML does it): a classifier whose top-class
probability is *calibrated* is right, on average, as often as that probability says. So the mean of the
calibrated confidences over a window is the expected accuracy of that window, with no label in sight.
Raw softmax confidences of a neural network are not calibrated (usually over-confident), hence:

* at build time (`fit_calibration`, called by `reference.build_reference` on the host) the shipped
  model's top-class confidence on the **validation split** is mapped to "was it right" by isotonic
  regression (pool-adjacent-violators: a monotone step function, no shape assumed), and the knots go
  into the bundle's `reference.confidence`;
* on the device (`Calibration.expected_correct`) every served sample's confidence is looked up on those
  knots (linear interpolation between them), and `DriftMonitor` averages them per window into
  `estimated_accuracy`.

What it rests on: the confidences stay calibrated on the traffic. That holds under covariate shift
that moves samples across the model's confidence levels (the usual case, and the one the benchmark
`benchmarks/drift_real.py` measures), not under concept shift (the same inputs now meaning another
class), which no label-free estimate can see.

Only numpy (device side).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

SOFTMAX, PROBABILITIES = "softmax", "probabilities"
"""How the first output becomes probabilities: softmax of logits, or already probabilities (rows in [0, 1]
that sum to 1, e.g. a model ending in a softmax)."""
MIN_CALIBRATION_SAMPLES = 50
"""Fewer labelled validation samples than this: no calibration is shipped (the estimate would be noise)."""
MAX_KNOTS = 200
"""Knots kept in the bundle (the isotonic steps, thinned evenly when there are more)."""


def score_kind(first_output: np.ndarray) -> str:
    """``PROBABILITIES`` when every row already is a probability vector, else ``SOFTMAX``."""
    rows = np.asarray(first_output, dtype=np.float64).reshape(len(first_output), -1)
    is_probability = rows.size and rows.min() >= 0.0 and rows.max() <= 1.0 and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3)
    return PROBABILITIES if is_probability else SOFTMAX


def top_confidence(first_output: np.ndarray, kind: str) -> np.ndarray:
    """Each sample's top-class probability (softmax over the last axis first, for ``SOFTMAX``)."""
    scores = np.asarray(first_output, dtype=np.float64)
    scores = scores.reshape(len(scores), -1)
    if kind == SOFTMAX:
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        return 1.0 / shifted.sum(axis=1)  # the top class's exp is exp(0) = 1
    return scores.max(axis=1)


def isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares non-decreasing fit of ``y`` on ``x`` (pool adjacent violators).

    Returns the distinct ``x`` values (sorted) and the fitted value at each: ties in ``x`` are pooled
    first, then any adjacent pair of blocks whose means decrease is merged, until none does."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    values, start = np.unique(xs, return_index=True)
    sums = np.add.reduceat(ys, start)
    counts = np.diff(np.append(start, len(xs))).astype(np.float64)
    means: list[float] = []
    weights: list[float] = []
    firsts: list[int] = []
    for i, (total, count) in enumerate(zip(sums, counts)):
        mean, weight, first = total / count, count, i
        while means and means[-1] > mean:
            mean = (means[-1] * weights[-1] + mean * weight) / (weights[-1] + weight)
            weight += weights.pop()
            means.pop()
            first = firsts.pop()
        means.append(mean)
        weights.append(weight)
        firsts.append(first)
    fitted = np.empty(len(values))
    for j, first in enumerate(firsts):
        end = firsts[j + 1] if j + 1 < len(firsts) else len(values)
        fitted[first:end] = means[j]
    return values, fitted


def fit_calibration(first_output: np.ndarray, labels: np.ndarray) -> dict[str, Any] | None:
    """The bundle's ``reference.confidence`` from the model's first output on labelled validation samples
    (None with fewer than ``MIN_CALIBRATION_SAMPLES``): ``{scores, confidence: [knots], accuracy: [values],
    n, validation_accuracy}``."""
    labels = np.asarray(labels).ravel()
    if len(labels) < MIN_CALIBRATION_SAMPLES:
        return None
    kind = score_kind(first_output)
    rows = np.asarray(first_output, dtype=np.float64).reshape(len(labels), -1)
    correct = (rows.argmax(axis=1) == labels).astype(np.float64)
    knots, accuracy = isotonic(top_confidence(rows, kind), correct)
    if len(knots) > MAX_KNOTS:
        keep = np.unique(np.linspace(0, len(knots) - 1, MAX_KNOTS).round().astype(int))
        knots, accuracy = knots[keep], accuracy[keep]
    return {"scores": kind, "confidence": [round(float(v), 6) for v in knots],
            "accuracy": [round(float(v), 6) for v in accuracy], "n": int(len(labels)),
            "validation_accuracy": round(float(correct.mean()), 6)}


class Calibration:
    """The device's side of ``reference.confidence``: each sample's expected correctness."""

    def __init__(self, section: Mapping[str, Any]) -> None:
        self.kind = section.get("scores")
        if self.kind not in (SOFTMAX, PROBABILITIES):
            raise ValueError(f"reference.confidence.scores must be {SOFTMAX!r} or {PROBABILITIES!r}, got {self.kind!r}")
        self.knots = np.asarray(section.get("confidence", []), dtype=np.float64)
        self.accuracy = np.asarray(section.get("accuracy", []), dtype=np.float64)
        if self.knots.size == 0 or self.knots.shape != self.accuracy.shape or np.any(np.diff(self.knots) < 0):
            raise ValueError("reference.confidence needs as many accuracy values as sorted confidence knots (at least one)")

    def expected_correct(self, first_output: np.ndarray) -> np.ndarray:
        """Per sample: the calibrated probability that the model's answer is right."""
        return np.interp(top_confidence(first_output, self.kind), self.knots, self.accuracy)
