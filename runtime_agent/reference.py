"""Drift reference statistics, computed the same way on the host (at build) and on the device.

The host stores bin edges and expected fractions in the bundle; the device bins what it serves with
the same edges. Wide inputs (images) are summarised per channel (mean and spread) so the number of
monitored features stays small and the per-sample cost constant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_RAW_FEATURES = 256
N_BINS = 10


def feature_names(input_shape: tuple[int, ...]) -> list[str]:
    if int(np.prod(input_shape)) <= MAX_RAW_FEATURES:
        return [f"x{i}" for i in range(int(np.prod(input_shape)))]
    channels = input_shape[0] if len(input_shape) > 1 else 1
    return [f"c{c}_{stat}" for c in range(channels) for stat in ("mean", "std")]


def summary_features(batch: np.ndarray) -> np.ndarray:
    """(n, *input_shape) -> (n, k) monitored features, matching `feature_names`."""
    n = batch.shape[0]
    if int(np.prod(batch.shape[1:])) <= MAX_RAW_FEATURES:
        return batch.reshape(n, -1).astype(np.float64)
    # Images: per-channel mean and spread from one pass of float32 sums (no float64 copy of the pixels;
    # this runs on every served request).
    channels = batch.reshape(n, batch.shape[1] if batch.ndim > 2 else 1, -1)
    pixels = channels.shape[2]
    total = channels.sum(axis=2, dtype=np.float64)
    squares = np.einsum("ncp,ncp->nc", channels, channels).astype(np.float64)
    mean = total / pixels
    spread = np.sqrt(np.maximum(squares / pixels - mean * mean, 0.0))
    return np.stack([mean, spread], axis=2).reshape(n, -1)


def bin_edges(values: np.ndarray, n_bins: int = N_BINS) -> list[float]:
    """Interior quantile edges; ties collapse so constant features get a single bin."""
    quantiles = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return [float(v) for v in np.unique(quantiles)]


def bin_counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Counts per bin; bin i holds edges[i-1] < v <= edges[i] (open-ended first and last bins)."""
    return np.bincount(np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1)


def build_reference(batch: np.ndarray, predicted_classes: np.ndarray, n_classes: int) -> dict[str, Any]:
    """The bundle's `reference` section from training inputs and the shipped model's predictions."""
    features = summary_features(batch)
    names = feature_names(tuple(batch.shape[1:]))
    table = []
    for name, column in zip(names, features.T):
        edges = bin_edges(column)
        counts = bin_counts(column, edges)
        table.append({"name": name, "edges": edges, "fractions": (counts / counts.sum()).round(6).tolist()})
    monitored = features.mean(axis=1)
    prediction_counts = np.bincount(predicted_classes, minlength=n_classes)
    return {
        "n": int(batch.shape[0]),
        "features": table,
        "predictions": {"fractions": (prediction_counts / prediction_counts.sum()).round(6).tolist()},
        "monitored": {"name": "feature_mean", "mean": float(monitored.mean()), "std": float(monitored.std())},
    }
