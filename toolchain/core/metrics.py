"""The task's metric: what the gate, mixed precision and the report measure a candidate by.

A `Metric` turns a model's outputs on a split (a list, one array per output, batch first) into one
number, with a direction (higher or lower is better) and a unit. `drop(reference, value)` is always
"how much worse than the reference", in the metric's units, so one gate rule serves every task:
accuracy loses percentage points, RMSE gains target units.

Never assume the outputs are logits: class metrics use the arg-max (the same for logits and for
probabilities), and `agreement` compares a candidate with the reference model on the same inputs,
for data without labels:
* score outputs (`N x C` or sequences `N x T x C`, C >= 2): the share of positions whose arg-max
  over the last axis equals the reference's;
* class maps `N x C x H x W` (C >= 2): the share of pixels whose arg-max over channels agrees;
* anything else (values, one-channel maps such as a detector's probability map): one minus the mean
  absolute error as a share of the output's scale: 1 for outputs that lie in [0, 1] (probabilities:
  the error is in probability, so a map that is nearly all zeros is not judged by its tiny range),
  else the reference's range over the split;
and with several outputs, the worst of them (the promise must hold for every output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from toolchain.core.config import BUILTIN_METRICS, BuildConfig
from toolchain.errors import ConfigError, ToolchainError, first_line

Outputs = list[np.ndarray]
RELATIVE_ERROR_DROP = 0.02  # default max_drop of an error metric (mae, rmse): 2% of the reference value


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    fraction: bool  # a share in [0, 1]: drops read in percentage points
    needs_labels: bool
    compute: Callable[[Outputs, np.ndarray | None, Outputs | None], float]

    def value(self, outputs: Outputs, y: np.ndarray | None, reference: Outputs | None = None) -> float:
        try:
            value = float(self.compute(outputs, y, reference))
        except ToolchainError:
            raise
        except Exception as exc:
            raise ToolchainError(f"[eval] metric {self.name}: computing it failed: {type(exc).__name__}: {first_line(exc)}; "
                                 "fix the metric (or pick a built-in one)") from None
        if not np.isfinite(value):
            raise ToolchainError(f"[eval] metric {self.name} returned {value}; it must return a finite number")
        return value

    def drop(self, reference_value: float, value: float) -> float:
        """How much worse `value` is than the reference, in the metric's units (negative: better)."""
        return reference_value - value if self.higher_is_better else value - reference_value

    def format_drop(self, drop: float) -> str:
        return f"{100 * drop:.2f} pp" if self.fraction else f"{drop:.4g}"

    def format_value(self, value: float) -> str:
        return f"{value:.4f}" if self.fraction else f"{value:.4g}"


def _predicted_classes(outputs: Outputs) -> np.ndarray:
    scores = outputs[0]
    return scores.reshape(len(scores), -1).argmax(axis=1) if scores.ndim > 1 else (scores > 0.5).astype(np.int64)


def _accuracy(outputs: Outputs, y: np.ndarray | None, _: Outputs | None) -> float:
    return float((_predicted_classes(outputs) == y).mean())


def _top5(outputs: Outputs, y: np.ndarray | None, _: Outputs | None) -> float:
    scores = outputs[0].reshape(len(outputs[0]), -1)
    k = min(5, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def _f1_macro(outputs: Outputs, y: np.ndarray | None, _: Outputs | None) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, _predicted_classes(outputs), average="macro", labels=np.unique(y), zero_division=0))


def _values(outputs: Outputs, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predicted = outputs[0].reshape(len(outputs[0]), -1).astype(np.float64)
    truth = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    if predicted.shape != truth.shape:
        raise ToolchainError(f"the model gives {predicted.shape[1]} value(s) per sample but y holds {truth.shape[1]}; "
                             "they must match for a regression metric")
    return predicted, truth


def _mae(outputs: Outputs, y: np.ndarray | None, _: Outputs | None) -> float:
    predicted, truth = _values(outputs, y)
    return float(np.abs(predicted - truth).mean())


def _rmse(outputs: Outputs, y: np.ndarray | None, _: Outputs | None) -> float:
    predicted, truth = _values(outputs, y)
    return float(np.sqrt(((predicted - truth) ** 2).mean()))


def _r2(outputs: Outputs, y: np.ndarray | None, _: Outputs | None) -> float:
    predicted, truth = _values(outputs, y)
    residual = ((predicted - truth) ** 2).sum()
    total = ((truth - truth.mean(axis=0)) ** 2).sum()
    return float(1.0 - residual / total) if total > 0 else 0.0


def output_agreement(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Agreement of one output with the reference's (see the module docstring), in [0, 1]."""
    if candidate.shape != reference.shape:
        raise ToolchainError(f"an output has shape {list(candidate.shape)} but the reference's has {list(reference.shape)}")
    if reference.ndim in (2, 3) and reference.shape[-1] >= 2:
        return float((candidate.argmax(axis=-1) == reference.argmax(axis=-1)).mean())
    if reference.ndim == 4 and reference.shape[1] >= 2:
        return float((candidate.argmax(axis=1) == reference.argmax(axis=1)).mean())
    a, r = candidate.astype(np.float64), reference.astype(np.float64)
    if not r.size:
        return 1.0
    scale = 1.0 if 0.0 <= r.min() and r.max() <= 1.0 else float(r.max() - r.min())
    if scale == 0.0:
        return float(np.array_equal(a, r))
    return float(np.clip(1.0 - np.abs(a - r).mean() / scale, 0.0, 1.0))


def _agreement(outputs: Outputs, _: np.ndarray | None, reference: Outputs | None) -> float:
    if reference is None:
        raise ToolchainError("agreement needs the reference model's outputs")
    return min(output_agreement(c, r) for c, r in zip(outputs, reference))


BUILTIN: dict[str, Metric] = {
    "accuracy": Metric("accuracy", True, True, True, _accuracy),
    "top5": Metric("top5", True, True, True, _top5),
    "f1_macro": Metric("f1_macro", True, True, True, _f1_macro),
    "mae": Metric("mae", False, False, True, _mae),
    "rmse": Metric("rmse", False, False, True, _rmse),
    "r2": Metric("r2", True, True, True, _r2),
    "agreement": Metric("agreement", True, True, False, _agreement),
}
assert set(BUILTIN) == set(BUILTIN_METRICS)
CLASS_METRICS = ("accuracy", "top5", "f1_macro")
REGRESSION_METRICS = ("mae", "rmse", "r2")


def _user_metric(spec: str, config: BuildConfig) -> Metric:
    from toolchain.core.data import load_python_function

    function = load_python_function(spec, config.base_dir, f"config {config.path}: [eval] metric")

    def compute(outputs: Outputs, y: np.ndarray | None, _: Outputs | None) -> float:
        return function(outputs[0] if len(outputs) == 1 else outputs, y)

    return Metric(Path(spec.rpartition(":")[0]).stem + ":" + spec.rpartition(":")[2], bool(config.eval.higher_is_better),
                  False, True, compute)


def resolve_metric(config: BuildConfig, task: str) -> Metric:
    """The metric `[eval] metric` names, or the task's default (accuracy / rmse / agreement without labels).
    `task` is the data's: classification, regression, or unlabelled."""
    name = config.eval.metric
    where = f"config {config.path}: [eval] metric"
    if name is None:
        return BUILTIN[{"classification": "accuracy", "regression": "rmse"}.get(task, "agreement")]
    if name not in BUILTIN:
        return _user_metric(name, config)
    metric = BUILTIN[name]
    if metric.needs_labels and task == "unlabelled":
        raise ConfigError(f"{where}: {name} needs labels (an array y), and the data has none; "
                          "use metric = \"agreement\" or add y to the data")
    if name in CLASS_METRICS and task != "classification":
        raise ConfigError(f"{where}: {name} needs class labels, and the task is {task}; use one of {', '.join(REGRESSION_METRICS)}")
    if name in REGRESSION_METRICS and task != "regression":
        raise ConfigError(f"{where}: {name} needs a regression task, and the task is {task}; "
                          f"use one of {', '.join(CLASS_METRICS)} or set [model] task = \"regression\"")
    return metric


def allowed_drop(config: BuildConfig, metric: Metric, reference_value: float) -> tuple[float, str]:
    """The gate's limit in the metric's units, and where it comes from (for the verdicts)."""
    if config.eval.max_drop is not None:
        return config.eval.max_drop, "[eval] max_drop"
    if metric.fraction:
        return config.compress.max_accuracy_drop, "[compress] max_accuracy_drop"
    if metric.name in REGRESSION_METRICS:
        return RELATIVE_ERROR_DROP * abs(reference_value), f"{100 * RELATIVE_ERROR_DROP:g}% of the reference {metric.name}"
    return config.compress.max_accuracy_drop, "[compress] max_accuracy_drop (set [eval] max_drop in your metric's units)"


def constant_baseline(metric: Metric, outputs: Outputs, y_train: np.ndarray | None, y_test: np.ndarray | None,
                      task: str) -> tuple[float, str] | None:
    """The metric of a model that learned nothing: the same answer for every test sample, the training
    split's most common class (classification) or its mean (regression), shaped like `outputs`; and what
    that answer is, for the message. None where there is no such answer (no labels, a metric that cannot
    score it)."""
    if y_train is None or y_test is None or not len(y_train) or task not in ("classification", "regression"):
        return None
    first = outputs[0]
    if task == "classification":
        classes, counts = np.unique(y_train, return_counts=True)
        common = int(classes[counts.argmax()])
        if first.ndim > 1 and first.reshape(len(first), -1).shape[1] > common:
            constant = np.zeros_like(first).reshape(len(first), -1)
            constant[:, common] = 1
            constant = constant.reshape(first.shape)
        else:  # one score per sample (a sigmoid): above 0.5 is class 1
            constant = np.full_like(first, float(common))
        answer = f"the most common class of the training split ({common})"
    else:
        constant = np.broadcast_to(np.asarray(y_train, np.float64).mean(axis=0), first.shape).astype(first.dtype)
        answer = "the training split's mean"
    try:
        return metric.value([constant, *outputs[1:]], y_test, outputs), answer
    except ToolchainError:
        return None
