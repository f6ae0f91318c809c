"""The label-free accuracy estimate: isotonic calibration at build time, expected correctness on the device."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from runtime_agent.confidence import (PROBABILITIES, SOFTMAX, Calibration, fit_calibration, isotonic, score_kind,
                                      top_confidence)
from runtime_agent.drift import DriftMonitor
from runtime_agent.reference import build_reference


def overconfident(n: int, seed: int, hard_share: float = 0.5, temperature: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 5-class model that is right less often than its softmax says. Each input has true class
    probabilities ``softmax(z)`` (peaked for easy inputs, flat for a `hard_share` of hard ones) and its label
    is drawn from them; the model answers ``temperature * z``: the right ranking, over-confident, as networks
    are. Changing `hard_share` is a covariate shift: the inputs' mix moves, what a confidence means does not."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 5)) * np.where(rng.random(n) < hard_share, 0.5, 2.5)[:, None]
    probabilities = np.exp(z - z.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    labels = (rng.random(n)[:, None] > probabilities.cumsum(1)).sum(1)
    return z * temperature, labels


def test_isotonic_matches_scikit_learns_fit() -> None:
    rng = np.random.default_rng(0)
    x = rng.random(500).round(2)  # ties on purpose
    y = (rng.random(500) < x).astype(float)
    knots, fitted = isotonic(x, y)
    reference = IsotonicRegression().fit(x, y)
    assert np.all(np.diff(fitted) >= 0)
    np.testing.assert_allclose(fitted, reference.predict(knots), atol=1e-12)


def test_calibrated_confidences_estimate_the_accuracy_that_raw_softmax_overstates() -> None:
    logits, labels = overconfident(4000, seed=1)
    calibration = fit_calibration(logits[:2000], labels[:2000])
    assert calibration is not None and calibration["scores"] == SOFTMAX and calibration["n"] == 2000
    held_out, truth = logits[2000:], labels[2000:]
    true_accuracy = float(np.mean(held_out.argmax(1) == truth))
    raw = float(top_confidence(held_out, SOFTMAX).mean())
    estimated = float(Calibration(calibration).expected_correct(held_out).mean())
    print(f"\ntrue accuracy {true_accuracy:.3f}, raw mean confidence {raw:.3f}, calibrated estimate {estimated:.3f}")
    assert raw - true_accuracy > 0.1  # over-confident
    assert abs(estimated - true_accuracy) < 0.02
    # a covariate shift towards hard inputs: the accuracy drops, the estimate follows it
    hard, hard_labels = overconfident(2000, seed=2, hard_share=0.85)
    hard_accuracy = float(np.mean(hard.argmax(1) == hard_labels))
    hard_estimate = float(Calibration(calibration).expected_correct(hard).mean())
    print(f"shifted to hard inputs: true accuracy {hard_accuracy:.3f}, estimate {hard_estimate:.3f}")
    assert hard_accuracy < true_accuracy - 0.1 and abs(hard_estimate - hard_accuracy) < 0.03


def test_probabilities_are_taken_as_they_are_and_too_few_samples_ship_no_calibration() -> None:
    logits, labels = overconfident(600, seed=3)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = shifted / shifted.sum(1, keepdims=True)
    assert score_kind(probabilities) == PROBABILITIES and score_kind(logits) == SOFTMAX
    np.testing.assert_allclose(top_confidence(probabilities, PROBABILITIES), top_confidence(logits, SOFTMAX), rtol=1e-9)
    assert fit_calibration(probabilities, labels)["scores"] == PROBABILITIES
    assert fit_calibration(logits[:49], labels[:49]) is None
    with pytest.raises(ValueError, match="scores must be"):
        Calibration({"scores": "logits", "confidence": [0.5], "accuracy": [0.5]})
    with pytest.raises(ValueError, match="sorted confidence knots"):
        Calibration({"scores": SOFTMAX, "confidence": [0.9, 0.5], "accuracy": [0.5, 0.6]})


def test_the_monitor_reports_the_windows_estimated_accuracy() -> None:
    logits, labels = overconfident(3000, seed=4)
    x = np.random.default_rng(5).standard_normal((3000, 4))
    reference = build_reference(x[:1000], logits[:1000], "classification", 5, validation=(logits[1000:2000], labels[1000:2000]))
    monitor = DriftMonitor(reference, (4,))
    served = logits[2000:]
    monitor.update(x[2000:], served.argmax(1), monitor.expected_correct(served))
    report = monitor.window_report()
    true_accuracy = float(np.mean(served.argmax(1) == labels[2000:]))
    assert abs(report["estimated_accuracy"] - true_accuracy) < 0.03
    monitor.update(x[:10], served[:10].argmax(1))  # no confidences given: no estimate for the window
    assert monitor.window_report()["estimated_accuracy"] is None
    without = DriftMonitor(build_reference(x[:1000], logits[:1000], "classification", 5), (4,))
    assert without.expected_correct(served) is None
