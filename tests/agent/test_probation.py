"""Probation's verdict on the predicted classes: the previous model or the bundle's own reference may vouch."""

from __future__ import annotations

import numpy as np

from runtime_agent.probation import ModelStats, Probation, ProbationLimits


def stats(classes: list[int], requests: int = 100) -> ModelStats:
    recorded = ModelStats(4)
    recorded.record_many([1.0] * requests, np.asarray(classes, dtype=np.int64))
    return recorded


UNIFORM = [0.25, 0.25, 0.25, 0.25]


def test_a_retrained_model_may_differ_from_the_drifted_one_if_it_matches_its_reference() -> None:
    drifted = stats([3] * 90 + [0] * 10)  # the old model on shifted inputs: mostly class 3
    retrained = stats([0, 1, 2, 3] * 25)  # the new one answers like its (fresh) training data
    assert Probation(ProbationLimits(), retrained, drifted, UNIFORM).regression() is None


def test_a_device_that_sees_few_classes_is_judged_against_its_previous_model() -> None:
    previous = stats([1] * 70 + [2] * 30)
    same_mix = stats([1] * 68 + [2] * 32)
    assert Probation(ProbationLimits(), same_mix, previous, UNIFORM).regression() is None


def test_a_collapsed_model_matches_neither_and_is_rolled_back() -> None:
    previous = stats([0, 1, 2, 3] * 25)
    collapsed = stats([2] * 100)
    reason = Probation(ProbationLimits(), collapsed, previous, UNIFORM).regression()
    assert reason is not None and reason.startswith("predictions shifted: PSI ")
    assert "vs the bundle's reference" in reason and "vs the previous model" in reason and "100% of answers are class 2" in reason


EDGES = (-1.0, 0.0, 1.0)  # a regressor's reference: four bins of its predicted values, a quarter each


def value_stats(bins: list[int], edges: tuple[float, ...] = EDGES) -> ModelStats:
    recorded = ModelStats(len(edges) + 1, edges)
    recorded.record_many([1.0] * 100, np.asarray(bins, dtype=np.int64))
    return recorded


def test_a_regressor_that_collapses_onto_one_value_is_rolled_back_naming_the_values() -> None:
    collapsed = value_stats([3] * 100)
    reason = Probation(ProbationLimits(), collapsed, value_stats([0, 1, 2, 3] * 25), UNIFORM).regression()
    assert reason is not None and reason.endswith("100% of answers are predicted values in (1, inf])")
    assert Probation(ProbationLimits(), value_stats([0, 1, 2, 3] * 25), None, UNIFORM).regression() is None


def test_a_previous_model_with_other_bins_does_not_vouch() -> None:
    """Bins of another reference hold other values: only the new bundle's own reference can judge."""
    previous = value_stats([3] * 100, edges=(-5.0, -4.0, -3.0))
    reason = Probation(ProbationLimits(), value_stats([3] * 100), previous, UNIFORM).regression()
    assert reason is not None and "vs the previous model" not in reason


def test_a_few_bad_requests_are_no_error_rate_but_a_model_refusing_its_traffic_is() -> None:
    """A client's 4 malformed requests among 6 (wrong shape, NaN: the input checks refuse them) made "error
    rate 66.7%" and rolled a good model back; a model that refuses what the previous one served still is."""
    previous = stats([0, 1, 2, 3] * 25)
    few = stats([0, 1], requests=2)
    few.errors = 4
    assert Probation(ProbationLimits(), few, previous, UNIFORM).regression() is None
    refusing = stats([0, 1], requests=2)
    refusing.errors = ProbationLimits().min_requests
    reason = Probation(ProbationLimits(), refusing, previous, UNIFORM).regression()
    assert reason is not None and reason.startswith("error rate 93.8% vs 0.0% before")
