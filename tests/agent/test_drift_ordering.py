"""Drift alarms that hold on real traffic orders (issue 19): the class-conditional reference, the
autocorrelation-aware allowance and PSI thresholds that know the window's sample count.

The synthetic task: 4 classes whose inputs differ in mean (so the class mix moves the overall monitored
statistic, as it does on real data); streams are seeded. ``benchmarks/drift_real.py`` measures the same
on the digits and an image set.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime_agent.drift import (COVARIATE, PREDICTION, PSI_SIGNIFICANT, DriftMonitor, LongRunVariance, PageHinkley,
                                 alarm, half_sample, psi, psi_threshold)
from runtime_agent.reference import build_reference

CLASS_MEANS = np.array([-1.5, -0.5, 0.5, 1.5])
FEATURES = 6
WINDOW = 100


def samples(classes: np.ndarray, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    return rng.standard_normal((len(classes), FEATURES)) * 0.8 + CLASS_MEANS[classes][:, None] + shift


@pytest.fixture(scope="module")
def reference() -> dict:
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, 8000)
    return build_reference(samples(classes, rng), np.eye(4)[classes], "classification", 4)


def replay(monitor: DriftMonitor, classes: np.ndarray, rng: np.random.Generator, shift: float = 0.0) -> list[dict]:
    reports = []
    for start in range(0, len(classes), WINDOW):
        chunk = classes[start:start + WINDOW]
        monitor.update(samples(chunk, rng, shift), chunk)
        reports.append(monitor.window_report())
    return reports


def bursts(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    return np.repeat(rng.integers(0, 4, n // length + 1), length)[:n]


def test_bursts_of_one_class_raise_no_covariate_alarm_but_did_with_the_overall_reference(reference: dict) -> None:
    classes = bursts(30_000, 20, np.random.default_rng(1))
    conditional = replay(DriftMonitor(reference, (FEATURES,)), classes, np.random.default_rng(2))
    overall_reference = {key: value for key, value in reference.items() if key != "by_class"}
    overall = replay(DriftMonitor(overall_reference, (FEATURES,)), classes, np.random.default_rng(2))
    covariate = sum(alarm(r) for r in conditional)
    print(f"\nbursts of 20, 30,000 samples: {covariate} covariate alarm windows per-class, "
          f"{sum(alarm(r) for r in overall)} against the overall reference")
    assert covariate == 0
    assert sum(alarm(r) for r in overall) >= 20  # the class mix alone looked like drift
    assert all(r["conditional"] for r in conditional) and not any(r["conditional"] for r in overall)


def test_a_one_class_stream_is_prediction_drift_only(reference: dict) -> None:
    reports = replay(DriftMonitor(reference, (FEATURES,)), np.full(5000, 2), np.random.default_rng(3))
    assert not any(alarm(r) for r in reports)
    assert all(r["prediction_drift"] and [c["kind"] for c in r["crossings"]] == [PREDICTION] for r in reports)


def test_a_1_sigma_covariate_shift_is_caught_within_a_window_in_any_order(reference: dict) -> None:
    rng = np.random.default_rng(4)
    for classes in (rng.integers(0, 4, 3000), bursts(3000, 20, rng), np.sort(rng.integers(0, 4, 3000))):
        monitor = DriftMonitor(reference, (FEATURES,))
        assert not any(alarm(r) for r in replay(monitor, classes[:2000], rng))
        shifted = replay(monitor, classes[2000:], rng, shift=float(reference["monitored"]["std"]))
        first = shifted[0]
        assert alarm(first) and first["crossings"][0]["kind"] == COVARIATE
        assert {"statistic", "value", "threshold"} <= set(first["crossings"][0])
        assert first["crossings"][0]["value"] >= first["crossings"][0]["threshold"]


def ar1(phi: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(n) * np.sqrt(1 - phi * phi)
    z = np.empty(n)
    z[0] = rng.standard_normal()
    for i in range(1, n):
        z[i] = phi * z[i - 1] + noise[i]
    return z


def test_long_run_variance_measures_the_inflation_of_block_means() -> None:
    for phi, inflation in ((0.0, 1.0), (0.5, 3.0)):
        vif = LongRunVariance()
        for z in ar1(phi, 60_000, seed=5):
            vif.update(z)
        assert vif.vif == pytest.approx(inflation, rel=0.3), (phi, vif.vif)
        assert vif.scale == pytest.approx(1 / np.sqrt(min(max(vif.vif, 1.0), 4.0)))


def test_autocorrelated_stable_traffic_raises_no_alarm_where_plain_page_hinkley_does() -> None:
    """An AR(1) stream with phi 0.5 (block means vary 3x more than independent samples'): the monitor's
    Page-Hinkley, whose allowance widens by the measured inflation, stays quiet over 100,000 samples;
    the same detector on the raw stream alarms again and again."""
    z = ar1(0.5, 100_000, seed=6)
    reference = {"n": 10_000, "features": [{"name": "x0", "edges": [0.0], "fractions": [0.5, 0.5]}],
                 "predictions": {"fractions": [1.0]}, "monitored": {"name": "feature_mean", "mean": 0.0, "std": 1.0}}
    monitor = DriftMonitor(reference, (1,))
    detections = 0
    for start in range(0, len(z), 1000):
        monitor.update(z[start:start + 1000, None], np.zeros(1000, dtype=np.int64))
        detections += monitor.window_report()["ph_alarm"]
    plain = PageHinkley(0.0, 1.0).update_many(z)
    print(f"\nAR(1) phi 0.5, 100,000 samples: {detections} windows with a monitor detection, {plain} plain detections")
    assert detections == 0 and plain >= 20


def test_psi_threshold_grows_for_small_windows_and_keeps_stable_windows_quiet() -> None:
    assert psi_threshold(100_000, 1e9, 10) == PSI_SIGNIFICANT
    assert psi_threshold(50, 5000, 10, 64) > psi_threshold(100, 5000, 10, 64) > psi_threshold(2000, 5000, 10, 64) == PSI_SIGNIFICANT
    assert psi_threshold(100, 300, 10) > psi_threshold(100, 5000, 10)  # a thin reference needs more evidence
    assert psi_threshold(0, 5000, 10) == float("inf")
    rng = np.random.default_rng(7)
    expected = np.full(10, 0.1)
    small = [psi(expected, np.bincount(rng.integers(0, 10, 50), minlength=10), half_sample(50)) for _ in range(2000)]
    over_fixed = sum(value >= PSI_SIGNIFICANT for value in small)
    over_threshold = sum(value >= psi_threshold(50, 1e9, 10) for value in small)
    print(f"\n2000 stable windows of 50 samples: {over_fixed} at PSI >= 0.25, {over_threshold} over the threshold")
    assert over_fixed > 200 and over_threshold <= 6  # PSI_FALSE_ALARM = 1e-3 per window: 2 expected, <= 6 at 99%
