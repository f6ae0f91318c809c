"""The latency sketch: percentiles within 1% of numpy's, exact merges, a JSON wire format, edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime_agent.sketch import MIN_VALUE, LatencySketch

QS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
ULPS = 1e-12  # relative slack for float rounding at a bucket edge (log, power, division)


def assert_within(sketch: LatencySketch, values: np.ndarray, accuracy: float = 0.01) -> float:
    """Every q: |estimate - numpy lower quantile| <= accuracy * exact. Returns the worst relative error."""
    worst = 0.0
    for q in QS:
        exact = float(np.quantile(values, q, method="lower"))
        estimate = sketch.quantile(q)
        error = abs(estimate - exact) / exact
        assert error <= accuracy * (1 + ULPS), (q, estimate, exact, error)
        worst = max(worst, error)
    return worst


def sketch_of(values: np.ndarray, accuracy: float = 0.01) -> LatencySketch:
    sketch = LatencySketch(accuracy)
    sketch.add_many(values)
    return sketch


@pytest.mark.parametrize("name, values", [
    ("lognormal", np.random.default_rng(0).lognormal(mean=0.5, sigma=1.2, size=20_000)),
    ("lognormal-narrow", np.random.default_rng(1).lognormal(mean=-1.0, sigma=0.1, size=5_000)),
    ("uniform", np.random.default_rng(2).uniform(0.05, 250.0, size=20_000)),
    ("heavy-tail", np.random.default_rng(3).pareto(1.5, size=10_000) + 0.2),
    ("small-n", np.random.default_rng(4).lognormal(size=7)),
])
def test_quantiles_match_numpy_lower_within_relative_accuracy(name: str, values: np.ndarray) -> None:
    sketch = sketch_of(values)
    assert sketch.count == len(values) and sketch.min == values.min() and sketch.max == values.max()
    assert sketch.sum == pytest.approx(values.sum(), rel=1e-12)
    worst = assert_within(sketch, values)
    assert worst > 0  # the estimate is a bucket value, not the sample itself


@pytest.mark.parametrize("accuracy", [0.001, 0.02, 0.05])
def test_other_accuracies_keep_their_own_bound(accuracy: float) -> None:
    values = np.random.default_rng(5).lognormal(mean=2.0, sigma=2.0, size=10_000)
    assert_within(sketch_of(values, accuracy), values, accuracy)


def test_values_on_bucket_edges_stay_within_accuracy() -> None:
    sketch = LatencySketch()
    edges = sketch.gamma ** np.arange(-200, 300, dtype=np.float64)
    values = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, np.inf)])
    sketch.add_many(values)
    assert_within(sketch, values)


def test_rank_convention_is_numpy_lower_not_interpolation() -> None:
    # Two far-apart values: "lower" says the median is the smaller one; linear would say their mean.
    sketch = sketch_of(np.array([1.0, 100.0]))
    assert sketch.quantile(0.5) == pytest.approx(1.0, rel=0.01)
    assert sketch.quantile(0.99) == pytest.approx(1.0, rel=0.01)
    assert sketch.quantile(1.0) == 100.0  # clamped to the exact max


def test_add_and_add_many_agree_bucket_for_bucket() -> None:
    values = np.random.default_rng(6).lognormal(mean=0.0, sigma=3.0, size=5_000)
    one_by_one = LatencySketch()
    for value in values:
        one_by_one.add(float(value))
    together = sketch_of(values)
    assert one_by_one.buckets == together.buckets
    assert (one_by_one.count, one_by_one.min, one_by_one.max) == (together.count, together.min, together.max)
    assert one_by_one.sum == pytest.approx(together.sum, rel=1e-12)


def test_merge_of_two_devices_equals_the_sketch_of_the_union() -> None:
    rng = np.random.default_rng(7)
    device_a = rng.lognormal(mean=-1.0, sigma=0.5, size=3_000)   # a fast board
    device_b = rng.lognormal(mean=1.5, sigma=0.8, size=1_000)    # a slow one
    a, b = sketch_of(device_a), sketch_of(device_b)
    a_before = a.to_dict()
    merged = LatencySketch.merged([a, b])
    assert a.to_dict() == a_before  # merged() leaves its inputs alone
    union = np.concatenate([device_a, device_b])
    expected, got = sketch_of(union).to_dict(), merged.to_dict()
    assert got["buckets"] == expected["buckets"]
    assert (got["count"], got["min"], got["max"]) == (expected["count"], expected["min"], expected["max"])
    assert got["sum"] == pytest.approx(expected["sum"], rel=1e-12)
    assert_within(merged, union)
    assert a.merge(b) is a and a.buckets == merged.buckets  # in place, chainable


def test_merge_is_exact_through_json_and_in_any_order() -> None:
    rng = np.random.default_rng(8)
    parts = [rng.lognormal(mean=m, sigma=0.7, size=500) for m in (-2.0, 0.0, 0.5, 3.0)]
    received = [LatencySketch.from_dict(json.loads(json.dumps(sketch_of(p).to_dict()))) for p in parts]
    forward = LatencySketch.merged(received)
    backward = LatencySketch.merged(reversed(received))
    union = sketch_of(np.concatenate(parts))
    assert forward.buckets == backward.buckets == union.buckets
    assert forward.count == union.count == 2000


def test_different_accuracies_refuse_to_merge() -> None:
    with pytest.raises(ValueError, match="different bucket layouts: relative_accuracy 0.01 vs 0.02"):
        LatencySketch(0.01).merge(LatencySketch(0.02))
    with pytest.raises(ValueError, match="different bucket layouts"):
        LatencySketch.merged([LatencySketch(0.02), LatencySketch(0.01)])
    assert LatencySketch.merged([sketch_of(np.ones(3), 0.02)]).relative_accuracy == 0.02  # layout of the first
    assert LatencySketch.merged([]).count == 0
    with pytest.raises(TypeError, match="LatencySketch"):
        LatencySketch().merge({"buckets": {}})  # type: ignore[arg-type]


def test_to_dict_is_json_safe_and_round_trips() -> None:
    sketch = sketch_of(np.random.default_rng(9).lognormal(size=1_000))
    data = sketch.to_dict()
    assert set(data) >= {"relative_accuracy", "count", "sum", "min", "max", "buckets"}
    assert all(isinstance(key, str) for key in data["buckets"])
    wire = json.loads(json.dumps(data))
    assert wire == data
    back = LatencySketch.from_dict(wire)
    assert back.to_dict() == data
    assert back.quantiles(QS) == sketch.quantiles(QS)
    # What the agent sends: the sketch plus its summary, side by side; extra keys are ignored.
    assert LatencySketch.from_dict({**data, **sketch.summary()}).to_dict() == data


def test_from_dict_rejects_inconsistent_input() -> None:
    good = sketch_of(np.array([1.0, 2.0, 3.0])).to_dict()
    with pytest.raises(ValueError, match="count 4 != the sum of its buckets"):
        LatencySketch.from_dict({**good, "count": 4})
    with pytest.raises(ValueError, match="missing 'buckets'"):
        LatencySketch.from_dict({k: v for k, v in good.items() if k != "buckets"})
    with pytest.raises(ValueError, match="not an integer"):
        LatencySketch.from_dict({**good, "buckets": {"x": 3}})
    with pytest.raises(ValueError, match="relative_accuracy must be in"):
        LatencySketch.from_dict({**good, "relative_accuracy": 1.5})
    with pytest.raises(ValueError, match=r"relative_accuracy must be in \[1e-06, 1\)"):  # its bucket ratio rounds to 1.0
        LatencySketch.from_dict({**good, "relative_accuracy": 1e-300})


def test_single_value() -> None:
    sketch = LatencySketch()
    sketch.add(3.7)
    for q in (0.0, 0.5, 1.0):
        assert sketch.quantile(q) == 3.7  # clamped to [min, max] = [3.7, 3.7]
    assert sketch.summary() == {"p50": 3.7, "p90": 3.7, "p99": 3.7}


def test_zeros_and_tiny_values_share_the_min_value_bucket() -> None:
    sketch = LatencySketch()
    sketch.add_many([0.0, 0.0, MIN_VALUE / 10, MIN_VALUE])
    assert len(sketch.buckets) == 1 and sketch.count == 4 and sketch.min == 0.0
    assert sketch.quantile(0.0) == 0.0 and sketch.quantile(1.0) == MIN_VALUE
    zeros = sketch_of(np.zeros(10))
    assert zeros.summary() == {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    mixed = sketch_of(np.array([0.0] * 10 + [5.0] * 90))
    assert mixed.quantile(0.0) == 0.0 and mixed.quantile(0.5) == pytest.approx(5.0, rel=0.01)
    assert 0.0 <= mixed.quantile(0.05) <= MIN_VALUE * 1.01  # a zero, known to within (1 + a) * min_value


def test_empty_sketch() -> None:
    sketch = LatencySketch()
    assert sketch.count == 0 and sketch.sum == 0.0 and sketch.min is None and sketch.max is None
    with pytest.raises(ValueError, match="empty sketch"):
        sketch.quantile(0.5)
    assert sketch.summary() == {"p50": None, "p90": None, "p99": None}
    data = json.loads(json.dumps(sketch.to_dict()))
    assert data["buckets"] == {} and LatencySketch.from_dict(data).count == 0
    sketch.add_many(np.array([]))
    assert sketch.count == 0
    assert LatencySketch().merge(sketch).count == 0


def test_bad_values_are_refused_and_nothing_is_counted() -> None:
    sketch = sketch_of(np.array([1.0, 2.0]))
    before = sketch.to_dict()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="latency"):
            sketch.add(bad)
        with pytest.raises(ValueError, match="latency"):
            sketch.add_many([3.0, bad])
    assert sketch.to_dict() == before
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
        sketch.quantile(1.5)
    with pytest.raises(ValueError, match="relative_accuracy"):
        LatencySketch(0.0)
