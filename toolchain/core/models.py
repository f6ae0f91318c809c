"""Build the user's torch model from `[model] entry` and wrap it with the data's normalisation.

The normalisation is part of the exported graph, so the device is fed raw features exactly as the
data source produced them: no preprocessing code to keep in sync on the board.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.core.config import BuildConfig
from toolchain.core.data import load_python_function
from toolchain.errors import ConfigError


class Standardize(nn.Module):
    """(x - mean) / std with constants learned from the training split."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def model_factory(entry: str, config: BuildConfig, key: str):
    scheme, _, name = entry.partition(":")
    if scheme != "zoo":
        return load_python_function(entry, config.base_dir, key)
    from toolchain.core.zoo import MODELS

    if name not in MODELS:
        raise ConfigError(f"{key}: unknown built-in model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_user_model(config: BuildConfig, num_classes: int, **overrides: object) -> nn.Module:
    """Call the entry function and check it returns a module mapping one input to `num_classes` logits."""
    key = f"config {config.path}: [model] entry"
    factory = model_factory(config.model.entry, config, key)
    kwargs = {**config.model.kwargs, **overrides}
    try:
        module = factory(list(config.model.input_shape), num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key}: calling it as f(input_shape, num_classes, **kwargs) failed: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{key}: must return a torch.nn.Module, got {type(module).__name__}")
    module.eval()
    with torch.no_grad():
        try:
            out = module(torch.zeros(2, *config.model.input_shape))
        except Exception as exc:
            raise ConfigError(f"{key}: the model fails on input shape {[2, *config.model.input_shape]}: {exc}") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"{key}: the model outputs shape {list(out.shape)} for a batch of 2, expected [2, {num_classes}] "
                          f"(one logit per label)")
    return module


def build_normalized_model(config: BuildConfig, dataset, **overrides: object) -> tuple[nn.Module, dict[str, float]]:
    """The user's model behind a `Standardize` layer fitted on the training split; returns (model, constants)."""
    mean, std = float(dataset.x_train.mean()), float(dataset.x_train.std()) or 1.0
    body = build_user_model(config, len(dataset.labels), **overrides)
    return nn.Sequential(Standardize(mean, std), body), {"mean": mean, "std": std}
