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
