"""The task's metrics: each built-in checked against an independent computation (scikit-learn where it
has one), agreement on the three output kinds, and the rules that pick a metric and its allowed drop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, mean_absolute_error, mean_squared_error, r2_score, top_k_accuracy_score

from toolchain.core.config import parse_config
from toolchain.core.metrics import BUILTIN, allowed_drop, constant_baseline, output_agreement, resolve_metric
from toolchain.errors import ConfigError, ToolchainError

RNG = np.random.default_rng(0)
SCORES = RNG.normal(size=(200, 7)).astype(np.float32)
LABELS = RNG.integers(0, 7, 200)
VALUES = RNG.normal(size=200).astype(np.float32)
TARGETS = VALUES + RNG.normal(0, 0.3, 200).astype(np.float32)


def config(tmp_path: Path, extra: str = ""):
    return parse_config(f'[project]\nname = "t"\n[model]\nfile = "m.onnx"\n[data]\nsource = "npz:d.npz"\n{extra}',
                        tmp_path / "toolchain.toml")


def test_class_metrics_match_scikit_learn_and_do_not_care_about_softmax() -> None:
    probabilities = np.exp(SCORES) / np.exp(SCORES).sum(axis=1, keepdims=True)
    for outputs in ([SCORES], [probabilities]):
        assert BUILTIN["accuracy"].value(outputs, LABELS) == pytest.approx((SCORES.argmax(1) == LABELS).mean())
        assert BUILTIN["top5"].value(outputs, LABELS) == pytest.approx(top_k_accuracy_score(LABELS, SCORES, k=5, labels=range(7)))
        assert BUILTIN["f1_macro"].value(outputs, LABELS) == pytest.approx(f1_score(LABELS, SCORES.argmax(1), average="macro"))


def test_regression_metrics_match_scikit_learn_and_point_the_right_way() -> None:
    outputs = [VALUES[:, None]]  # a regressor's (n, 1) output against (n,) targets
    assert BUILTIN["mae"].value(outputs, TARGETS) == pytest.approx(mean_absolute_error(TARGETS, VALUES), rel=1e-6)
    assert BUILTIN["rmse"].value(outputs, TARGETS) == pytest.approx(np.sqrt(mean_squared_error(TARGETS, VALUES)), rel=1e-6)
    assert BUILTIN["r2"].value(outputs, TARGETS) == pytest.approx(r2_score(TARGETS, VALUES), rel=1e-6)
    assert BUILTIN["rmse"].drop(10.0, 10.5) == pytest.approx(0.5)  # higher error is worse
    assert BUILTIN["accuracy"].drop(0.9, 0.85) == pytest.approx(0.05)  # lower accuracy is worse
    with pytest.raises(ToolchainError, match="gives 2 value\\(s\\) per sample but y holds 1"):
        BUILTIN["rmse"].value([np.zeros((200, 2))], TARGETS)


def test_agreement_for_scores_sequences_class_maps_and_probability_maps() -> None:
    flipped = SCORES.copy()
    flipped[:50] = -flipped[:50]  # arg-max changes on (most of) the first 50 rows
    expected = (flipped.argmax(1) == SCORES.argmax(1)).mean()
    assert output_agreement(flipped, SCORES) == pytest.approx(expected)
    sequence = RNG.normal(size=(4, 24, 30))
    noisy = sequence + RNG.normal(0, 0.5, sequence.shape)
    assert output_agreement(noisy, sequence) == pytest.approx((noisy.argmax(-1) == sequence.argmax(-1)).mean())
    class_map = RNG.normal(size=(2, 3, 8, 8))
    assert output_agreement(class_map[:, [1, 0, 2]], class_map) == pytest.approx(
        (class_map[:, [1, 0, 2]].argmax(1) == class_map.argmax(1)).mean())
    # A probability map that is almost all zeros is judged in probability units, not by its tiny range.
    probability_map = np.zeros((2, 1, 8, 8))
    probability_map[0, 0, 2, 2] = 1e-6
    assert output_agreement(probability_map + 0.01, probability_map) == pytest.approx(0.99)
    values = RNG.normal(size=(100, 1)) * 10
    assert output_agreement(values + 1.0, values) == pytest.approx(1 - 1.0 / (values.max() - values.min()))
    # several outputs: the worst one counts
    assert BUILTIN["agreement"].value([SCORES, probability_map + 0.01], None, [SCORES, probability_map]) == pytest.approx(0.99)


def test_the_default_metric_follows_the_task_and_a_wrong_one_is_a_clear_error(tmp_path: Path) -> None:
    assert resolve_metric(config(tmp_path), "classification").name == "accuracy"
    assert resolve_metric(config(tmp_path), "regression").name == "rmse"
    assert resolve_metric(config(tmp_path), "unlabelled").name == "agreement"
    with pytest.raises(ConfigError, match="rmse needs a regression task, and the task is classification"):
        resolve_metric(config(tmp_path, '[eval]\nmetric = "rmse"\n'), "classification")
    with pytest.raises(ConfigError, match="accuracy needs labels \\(an array y\\), and the data has none"):
        resolve_metric(config(tmp_path, '[eval]\nmetric = "accuracy"\n'), "unlabelled")


def test_a_metric_function_is_called_with_the_outputs_and_y(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("import numpy as np\n\ndef within(outputs, y):\n"
                                      "    return float(np.mean(np.abs(outputs[:, 0] - y) < 0.5))\n")
    metric = resolve_metric(config(tmp_path, '[eval]\nmetric = "mine.py:within"\nhigher_is_better = true\n'), "regression")
    assert metric.name == "mine:within" and metric.higher_is_better
    assert metric.value([VALUES[:, None]], TARGETS) == pytest.approx(np.mean(np.abs(VALUES - TARGETS) < 0.5))
    (tmp_path / "nan.py").write_text("def bad(outputs, y):\n    return float('nan')\n")
    bad = resolve_metric(config(tmp_path, '[eval]\nmetric = "nan.py:bad"\nhigher_is_better = false\n'), "regression")
    with pytest.raises(ToolchainError, match="returned nan; it must return a finite number"):
        bad.value([VALUES[:, None]], TARGETS)


def test_the_allowed_drop_is_in_the_metric_units(tmp_path: Path) -> None:
    assert allowed_drop(config(tmp_path), BUILTIN["agreement"], 1.0) == (0.01, "[compress] max_accuracy_drop")
    assert allowed_drop(config(tmp_path), BUILTIN["rmse"], 50.0) == (pytest.approx(1.0), "2% of the reference rmse")
    assert allowed_drop(config(tmp_path, "[eval]\nmax_drop = 3.0\n"), BUILTIN["mae"], 50.0) == (3.0, "[eval] max_drop")


def test_the_constant_baseline_answers_the_training_splits_most_common_class_or_mean() -> None:
    y_train = np.array([3, 3, 3, 1, 0])
    accuracy, answer = constant_baseline(BUILTIN["accuracy"], [SCORES], y_train, LABELS, "classification")
    assert accuracy == pytest.approx(np.mean(LABELS == 3)) and "(3)" in answer
    binary = constant_baseline(BUILTIN["accuracy"], [SCORES[:, 0]], np.array([1, 1, 0]), LABELS % 2, "classification")
    assert binary[0] == pytest.approx(np.mean(LABELS % 2 == 1))  # one sigmoid score per sample
    train = np.array([1.0, 2.0, 6.0])
    rmse, _ = constant_baseline(BUILTIN["rmse"], [VALUES], train, TARGETS, "regression")
    assert rmse == pytest.approx(np.sqrt(mean_squared_error(TARGETS, np.full(200, 3.0))), rel=1e-6)
    assert constant_baseline(BUILTIN["agreement"], [SCORES], None, None, "unlabelled") is None


def test_a_model_no_better_than_a_constant_is_a_warning_note() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from toolchain.passes.shipping.evaluate import EvaluatePass

    def notes(scores: np.ndarray) -> list[str]:
        dataset = SimpleNamespace(y_train=np.array([2, 2, 1]), y_test=LABELS, task="classification")
        ctx = SimpleNamespace(metric=BUILTIN["accuracy"], dataset=dataset, notes=[], console=Console(quiet=True))
        reference = {"metric_value": BUILTIN["accuracy"].value([scores], LABELS)}
        EvaluatePass._against_a_constant(reference, [scores], ctx)
        assert reference["constant_baseline"] == pytest.approx(np.mean(LABELS == 2))
        return ctx.notes

    learned = np.eye(7, dtype=np.float32)[LABELS]  # right every time
    assert notes(learned) == []
    [note] = notes(np.eye(7, dtype=np.float32)[(LABELS + 1) % 7])  # wrong every time: worse than always 2
    assert note.startswith("WARNING: the model is not clearly better than always answering the most common class")
    constant = float(np.mean(LABELS == 2))  # right on a few more samples than the constant: chance, on 200
    lucky = np.where((LABELS == 2) | (np.arange(200) < 6), LABELS, (LABELS + 1) % 7)
    assert BUILTIN["accuracy"].value([np.eye(7, dtype=np.float32)[lucky]], LABELS) > constant
    assert len(notes(np.eye(7, dtype=np.float32)[lucky])) == 1
