"""Drift reference statistics, computed the same way on the host (at build) and on the device.

The host stores bin edges and expected fractions in the bundle; the device bins what it serves with
the same edges. Wide inputs (images) are summarised per channel (mean and spread) so the number of
monitored features stays small and the per-sample cost constant. A model with several inputs gets
each input's features under the input's name (`"{input}.x0"`), so PSI is kept per input.

What a model answers is watched too, by one value per sample (`prediction_values`): the predicted
class of a classifier, else the mean of the sample's first output (a regressor's predicted value),
binned by quantiles of the reference like an input feature, so a continuous output drifts by the
same PSI.

A classifier's reference is also kept **per predicted class** (`by_class`: the monitored statistic's mean
and std, and each feature's bin counts), so the device can tell a change of the input distribution from
a change of the class mix (a camera that sees one product for an hour): see `runtime_agent.drift`. And
when labelled validation samples are given, the model's confidences are calibrated on them
(`confidence`, see `runtime_agent.confidence`) for the label-free accuracy estimate.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import numpy as np

from runtime_agent.confidence import fit_calibration

MAX_RAW_FEATURES = 256
N_BINS = 10
TASKS = ("classification", "regression", "unlabelled")
MAX_CONDITIONAL_CLASSES = 100
"""Classifiers with more classes keep no per-class reference (its size grows as classes x features x bins;
at 100 classes and 64 features about 64,000 counts)."""

Features = Union[np.ndarray, Mapping[str, np.ndarray]]
"""A batch: one array `(n, *shape)` for a one-input model, or one such array per input name (in order)."""
Shapes = Union[Sequence[int], Mapping[str, Sequence[int]]]
"""One sample's shape, or one per input name (in order), matching `Features`."""


def concat(batches: Sequence[Features]) -> Features:
    """Batches of the same model joined along the sample axis, of the same kind as each batch."""
    if isinstance(batches[0], Mapping):
        return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    return np.concatenate(batches)


def feature_names(input_shape: Shapes) -> list[str]:
    """The monitored features' names; with several inputs, each input's are prefixed by its name."""
    if isinstance(input_shape, Mapping):
        return [f"{name}.{feature}" for name, shape in input_shape.items() for feature in feature_names(shape)]
    size = int(np.prod(input_shape))
    if size <= MAX_RAW_FEATURES:
        return [f"x{i}" for i in range(size)]
    channels = input_shape[0] if len(input_shape) > 1 else 1
    return [f"c{c}_{stat}" for c in range(channels) for stat in ("mean", "std")]


def summary_features(batch: Features) -> np.ndarray:
    """(n, *input_shape) -> (n, k) monitored features, matching `feature_names`."""
    if isinstance(batch, Mapping):
        return np.concatenate([summary_features(array) for array in batch.values()], axis=1)
    n = batch.shape[0]
    if int(np.prod(batch.shape[1:])) <= MAX_RAW_FEATURES:
        return batch.reshape(n, -1).astype(np.float64)
    # Images: per-channel mean and spread from one pass of float32 sums (no float64 copy of the pixels;
    # this runs on every served request). Narrow types (uint8, float16, bool) would overflow the squares.
    if batch.dtype not in (np.float32, np.float64):
        batch = batch.astype(np.float32)
    channels = batch.reshape(n, batch.shape[1] if batch.ndim > 2 else 1, -1)
    pixels = channels.shape[2]
    total = channels.sum(axis=2, dtype=np.float64)
    squares = np.einsum("ncp,ncp->nc", channels, channels).astype(np.float64)
    mean = total / pixels
    spread = np.sqrt(np.maximum(squares / pixels - mean * mean, 0.0))
    return np.stack([mean, spread], axis=2).reshape(n, -1)


def prediction_values(first_output: np.ndarray, task: str) -> np.ndarray:
    """One value per sample that prediction drift watches: a classifier's predicted class (the argmax of
    its scores over the last axis), else the mean of the sample's first output (for a regressor with
    one output: the predicted value itself)."""
    if task == "classification":
        return first_output.argmax(axis=-1)
    return first_output.reshape(len(first_output), -1).mean(axis=1, dtype=np.float64)


def bin_edges(values: np.ndarray, n_bins: int = N_BINS) -> list[float]:
    """Interior quantile edges; ties collapse so constant features get a single bin."""
    quantiles = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return [float(v) for v in np.unique(quantiles)]


def bin_counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Counts per bin; bin i holds edges[i-1] < v <= edges[i] (open-ended first and last bins)."""
    return np.bincount(np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1)


def _binned(values: np.ndarray) -> dict[str, Any]:
    edges = bin_edges(values)
    counts = bin_counts(values, edges)
    return {"edges": edges, "fractions": (counts / counts.sum()).round(6).tolist()}


def _by_class(features: np.ndarray, monitored: np.ndarray, table: list[dict[str, Any]], predicted: np.ndarray,
              n_classes: int) -> dict[str, Any]:
    """The per-predicted-class reference: samples per class, the monitored statistic's mean and std per
    class (0 for a class never predicted), and, into each feature of `table`, its bin counts per class."""
    counts = np.bincount(predicted, minlength=n_classes)
    means, stds = np.zeros(n_classes), np.zeros(n_classes)
    for c in np.flatnonzero(counts):
        values = monitored[predicted == c]
        means[c], stds[c] = values.mean(), values.std()
    for j, entry in enumerate(table):
        edges = np.asarray(entry["edges"])
        bins = np.searchsorted(edges, features[:, j], side="left")
        joint = np.bincount(predicted * (len(edges) + 1) + bins, minlength=n_classes * (len(edges) + 1))
        entry["class_counts"] = joint.reshape(n_classes, len(edges) + 1).tolist()
    return {"n": counts.tolist(), "mean": [round(float(v), 9) for v in means], "std": [round(float(v), 9) for v in stds]}


def build_reference(inputs: Features, first_output: np.ndarray, task: str, n_classes: int,
                    validation: tuple[np.ndarray, np.ndarray | None] | None = None) -> dict[str, Any]:
    """The bundle's `reference` section from training inputs and the shipped model's first output on them.

    `inputs`: an array for a one-input model, or a dict of arrays by input name in the manifest's order.
    `first_output`: the model's first output `(n, ...)`. Classification keeps the predicted-class
    fractions (`n_classes` of them) and, up to `MAX_CONDITIONAL_CLASSES`, the per-class reference
    (`by_class`, and `class_counts` per feature); other tasks get quantile bins of `prediction_values`
    under `predictions` (`{"name": "output_mean", "edges", "fractions"}`). `validation`: the model's first
    output on the validation split and its labels; a classifier with labels gets its `confidence`
    calibration from them."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    features = summary_features(inputs)
    shapes = {name: array.shape[1:] for name, array in inputs.items()} if isinstance(inputs, Mapping) else inputs.shape[1:]
    table = [{"name": name, **_binned(column)} for name, column in zip(feature_names(shapes), features.T)]
    predicted = prediction_values(np.asarray(first_output), task)
    if task == "classification":
        counts = np.bincount(predicted, minlength=n_classes)
        predictions: dict[str, Any] = {"fractions": (counts / counts.sum()).round(6).tolist()}
    else:
        predictions = {"name": "output_mean", **_binned(predicted)}
    monitored = features.mean(axis=1)
    reference = {
        "n": len(features),
        "features": table,
        "predictions": predictions,
        "monitored": {"name": "feature_mean", "mean": float(monitored.mean()), "std": float(monitored.std())},
    }
    if task == "classification" and n_classes <= MAX_CONDITIONAL_CLASSES:
        reference["by_class"] = _by_class(features, monitored, table, predicted, n_classes)
    if task == "classification" and validation is not None and validation[1] is not None:
        calibration = fit_calibration(*validation)
        if calibration is not None:
            reference["confidence"] = calibration
    return reference
