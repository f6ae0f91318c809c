"""Mergeable latency percentiles: a DDSketch-style histogram with logarithmic buckets.

Why: a fleet needs p50/p90/p99 over many devices and many windows. Percentiles themselves do not
merge (the mean of two p99s is not the p99 of the union), but histograms with *fixed* bucket edges do:
every device uses the same edges, so adding the counts of two sketches gives exactly the sketch of the
union, and every percentile read from it keeps the same error bound (Masson, Rim & Lee, "DDSketch",
VLDB 2019).

Buckets. With relative accuracy ``a`` (default 1%), ``gamma = (1 + a) / (1 - a)`` and a value
``x > 0`` (a latency in milliseconds) lands in bucket ``i = ceil(log_gamma(x))``, the interval
``(gamma**(i-1), gamma**i]``. The bucket's representative value ``2 * gamma**i / (gamma + 1)`` is within
relative distance ``a`` of every point of that interval. Counts live in a sparse ``{index: count}``
dict: at 1% a range of 1 ns .. 1000 s is ~1400 possible buckets, and a real window fills a few dozen.

Tiny values and zero. ``log`` is undefined at 0, and sub-nanosecond latencies are meaningless, so
every value ``x <= min_value`` (``MIN_VALUE`` = 1e-6 ms = 1 ns) is counted in the bucket of
``min_value`` itself (the *min value bucket*). For such values the guarantee is absolute, not
relative: the estimate is off by at most ``(1 + a) * min_value``. The sketch keeps the exact ``min`` and
``max``: ranks 0 and n-1 answer them exactly, and every other estimate is clamped to ``[min, max]``
(which can only bring it closer), so a sketch of zeros answers 0 exactly. Negative, NaN and infinite values are
refused with ValueError (they are bugs in the caller, not latencies).

Rank convention (what ``quantile(q)`` estimates). For ``n`` values sorted ascending ``v[0] <= ... <=
v[n-1]``, ``quantile(q)`` estimates ``v[floor(q * (n - 1))]``: the *lower* neighbour, exactly
``numpy.quantile(values, q, method="lower")``. This is DDSketch's own rank (``rank = q * (n - 1)``, the
first bucket whose cumulative count exceeds it). The estimate is within relative accuracy ``a`` of that
sample value (plus a few float ulps at a bucket edge, and the ``min_value`` caveat above). It does not
interpolate: an interpolated quantile can be a value no request ever took.

Empty sketch: ``quantile`` raises ValueError("... empty ..."); ``summary()`` returns ``None`` for each
percentile, which is what telemetry sends as JSON ``null``; ``min``/``max`` are ``None``.

Wire format (``to_dict``, part of the telemetry ``latency`` object)::

    {"relative_accuracy": 0.01, "count": 3, "sum": 7.5, "min": 1.5, "max": 3.0,
     "min_value": 1e-06, "buckets": {"21": 1, "55": 2}}

Bucket keys are strings (JSON object keys are), sorted by index; ``from_dict`` ignores keys it does not
know (the agent adds ``p50``/``p90``/``p99`` next to these).

Only numpy and the standard library are used (device side).
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache
from typing import Any, Iterable, Mapping

import numpy as np

DEFAULT_RELATIVE_ACCURACY = 0.01
# Finer than a millionth would take millions of buckets per decade, and far enough below it the bucket
# ratio (1 + a) / (1 - a) rounds to exactly 1.0 in floating point: no layout at all.
MIN_RELATIVE_ACCURACY = 1e-6
MIN_VALUE = 1e-6  # ms (= 1 ns); values at or below it share its bucket


class LatencySketch:
    """Log-bucket histogram of non-negative latencies (ms) with exact merge and relative-error quantiles."""

    __slots__ = ("relative_accuracy", "min_value", "gamma", "_log_gamma", "_min_index",
                 "_buckets", "_count", "_sum", "_min", "_max")

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY, min_value: float = MIN_VALUE) -> None:
        relative_accuracy = float(relative_accuracy)
        if not MIN_RELATIVE_ACCURACY <= relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy must be in [{MIN_RELATIVE_ACCURACY:g}, 1), got {relative_accuracy!r}")
        min_value = float(min_value)
        if not (math.isfinite(min_value) and min_value > 0.0):
            raise ValueError(f"min_value must be a positive finite number, got {min_value!r}")
        self.relative_accuracy = relative_accuracy
        self.min_value = min_value
        self.gamma, self._log_gamma, self._min_index = _layout(relative_accuracy, min_value)
        self._buckets: dict[int, int] = {}
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    # -- bucket mapping ---------------------------------------------------------------------
    def _indices(self, values: np.ndarray) -> np.ndarray:
        """Bucket index of each value (> 0). add() and add_many() both come here, so they always agree."""
        return _bucket_indices(values, self._log_gamma)

    def value_of(self, index: int) -> float:
        """Representative value of bucket ``index``: within relative accuracy of all of (g^(i-1), g^i]."""
        return 2.0 * self.gamma ** index / (self.gamma + 1.0)

    # -- adding -----------------------------------------------------------------------------
    def add(self, x: float) -> None:
        """Count one latency (ms, >= 0). Same bucket as add_many() would choose (both use numpy's log)."""
        x = float(x)
        if not 0.0 <= x < math.inf:
            raise ValueError(f"a latency must be a finite number >= 0, got {x!r}")
        if x <= self.min_value:
            key = self._min_index
        else:
            key = math.ceil(float(np.log(x)) / self._log_gamma)
        self._buckets[key] = self._buckets.get(key, 0) + 1
        self._count += 1
        self._sum += x
        if x < self._min:
            self._min = x
        if x > self._max:
            self._max = x

    def add_many(self, values: Iterable[float] | np.ndarray) -> None:
        """Count many latencies at once (vectorised); all or nothing if any value is invalid."""
        array = np.asarray(values, dtype=np.float64).ravel()
        if array.size == 0:
            return
        if not np.all(np.isfinite(array)):
            raise ValueError("latency values must be finite (got NaN or infinity)")
        low = float(array.min())
        if low < 0.0:
            raise ValueError(f"latency values must be >= 0, got {low!r}")
        tiny = array <= self.min_value
        indices = np.empty(array.shape, dtype=np.int64)
        indices[tiny] = self._min_index
        indices[~tiny] = self._indices(array[~tiny])
        keys, counts = np.unique(indices, return_counts=True)
        buckets = self._buckets
        for key, count in zip(keys.tolist(), counts.tolist()):
            buckets[key] = buckets.get(key, 0) + count
        self._count += int(array.size)
        self._sum += float(array.sum())
        self._min = min(self._min, low)
        self._max = max(self._max, float(array.max()))

    def merge(self, other: "LatencySketch") -> "LatencySketch":
        """Add ``other``'s counts into this sketch (exact); returns self. Same accuracy and min_value only."""
        if not isinstance(other, LatencySketch):
            raise TypeError(f"can only merge a LatencySketch, not {type(other).__name__}")
        if other.relative_accuracy != self.relative_accuracy or other.min_value != self.min_value:
            raise ValueError(
                f"cannot merge sketches with different bucket layouts: relative_accuracy "
                f"{self.relative_accuracy} vs {other.relative_accuracy}, min_value {self.min_value} vs "
                f"{other.min_value}; their buckets have different edges")
        for key, count in other._buckets.items():
            self._buckets[key] = self._buckets.get(key, 0) + count
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)
        return self

    @classmethod
    def merged(cls, sketches: Iterable["LatencySketch"]) -> "LatencySketch":
        """A new sketch holding the union of ``sketches`` (none is modified); layout of the first one.

        With no sketches at all, an empty default sketch.
        """
        sketches = list(sketches)
        if not sketches:
            return cls()
        result = cls(sketches[0].relative_accuracy, sketches[0].min_value)
        for sketch in sketches:
            result.merge(sketch)
        return result

    def copy(self) -> "LatencySketch":
        return LatencySketch(self.relative_accuracy, self.min_value).merge(self)

    # -- reading ----------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum

    @property
    def min(self) -> float | None:
        return self._min if self._count else None

    @property
    def max(self) -> float | None:
        return self._max if self._count else None

    @property
    def buckets(self) -> dict[int, int]:
        """A copy of the sparse counts, ``{bucket index: count}``, sorted by index."""
        return dict(sorted(self._buckets.items()))

    def __len__(self) -> int:
        return self._count

    def quantile(self, q: float) -> float:
        """Estimate of ``numpy.quantile(values, q, method="lower")``, within relative accuracy.

        Raises ValueError for q outside [0, 1] or an empty sketch.
        """
        q = float(q)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
        if self._count == 0:
            raise ValueError("quantile of an empty sketch is undefined (no latencies were added)")
        rank = q * (self._count - 1)  # 0-based rank of the lower neighbour: floor(rank)
        if rank < 1.0:
            return self._min  # the smallest sample is known exactly
        if rank >= self._count - 1:
            return self._max  # and so is the largest
        running = 0
        for key in sorted(self._buckets):
            running += self._buckets[key]
            if running > rank:
                break
        return min(max(self.value_of(key), self._min), self._max)

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        return [self.quantile(q) for q in qs]

    def summary(self) -> dict[str, float | None]:
        """``{"p50", "p90", "p99"}`` for telemetry (ms); each ``None`` when the sketch is empty."""
        if self._count == 0:
            return {"p50": None, "p90": None, "p99": None}
        return {"p50": self.quantile(0.5), "p90": self.quantile(0.9), "p99": self.quantile(0.99)}

    # -- wire format ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state (bucket keys are strings, sorted by index); see the module docstring."""
        return {"relative_accuracy": self.relative_accuracy, "count": self._count, "sum": self._sum,
                "min": self.min, "max": self.max, "min_value": self.min_value,
                "buckets": {str(key): count for key, count in sorted(self._buckets.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencySketch":
        """Rebuild a sketch from ``to_dict()`` output (as is, or after a JSON round trip); checks consistency."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a latency sketch must be a JSON object, got {type(data).__name__}")
        for key in ("relative_accuracy", "count", "buckets"):
            if key not in data:
                raise ValueError(f"latency sketch is missing {key!r}")
        sketch = cls(_finite(data["relative_accuracy"], "relative_accuracy"),
                     _finite(data.get("min_value", MIN_VALUE), "min_value"))
        highest = _highest_index(sketch._log_gamma)
        raw = data["buckets"]
        if not isinstance(raw, Mapping):
            raise ValueError("latency sketch 'buckets' must be an object {index: count}")
        buckets: dict[int, int] = {}
        for key, count in raw.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"latency sketch bucket key {key!r:.40} is not an integer") from None
            if not sketch._min_index <= index <= highest:
                raise ValueError(f"latency sketch bucket {index} is outside [{sketch._min_index}, {highest}]")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"latency sketch bucket {key!r} has a bad count {count!r}")
            if count:
                buckets[index] = buckets.get(index, 0) + count
        count = data["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count != sum(buckets.values()):
            raise ValueError(f"latency sketch count {count!r} != the sum of its buckets ({sum(buckets.values())})")
        sketch._buckets = buckets
        sketch._count = count
        sketch._sum = _finite(data.get("sum", 0.0), "sum")
        if count:
            low, high = data.get("min"), data.get("max")
            # Without min/max (an older or foreign sender), fall back to the bucket edges.
            sketch._min = _finite(low, "min") if low is not None else sketch.value_of(min(buckets))
            sketch._max = _finite(high, "max") if high is not None else sketch.value_of(max(buckets))
        return sketch

    def __repr__(self) -> str:
        return (f"LatencySketch(relative_accuracy={self.relative_accuracy}, count={self._count}, "
                f"buckets={len(self._buckets)})")


@lru_cache(maxsize=16)
def _layout(relative_accuracy: float, min_value: float) -> tuple[float, float, int]:
    """(gamma, log(gamma), the min value bucket) of a bucket layout. Cached: the monitor rebuilds a sketch
    from every telemetry window, all in the one default layout, and the bucket of ``min_value`` goes
    through numpy's log (as every value does, so the two always agree), which costs more than the rest
    of the rebuild."""
    gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy)
    log_gamma = math.log(gamma)
    return gamma, log_gamma, int(_bucket_indices(np.array([min_value]), log_gamma)[0])


def _bucket_indices(values: np.ndarray, log_gamma: float) -> np.ndarray:
    return np.ceil(np.log(values) / log_gamma).astype(np.int64)


@lru_cache(maxsize=16)
def _highest_index(log_gamma: float) -> int:
    """The highest bucket index whose representative value (`LatencySketch.value_of`) stays finite."""
    return math.floor(math.log(sys.float_info.max) / log_gamma) - 1


def _finite(value: Any, what: str) -> float:
    """A JSON number of a sketch as a finite float; ValueError for anything else (an integer too large
    for a float included), so a malformed report is refused with the field's name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"latency sketch '{what}' must be a number, got {value!r:.40}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"latency sketch '{what}' must be finite, got {value!r:.40}")
    return number
