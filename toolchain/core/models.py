"""Build the user's torch model from `[model] entry` and wrap it with the data's normalisation.

The normalisation is part of the exported graph, so the device is fed raw features exactly as the
data source produced them: no preprocessing code to keep in sync on the board. For regression the
wrapper also maps the model's outputs back to the targets' units (`Unstandardize`), so the user's
network learns targets of mean 0 and spread 1 (an output layer never has to grow a bias of 150 to
predict a blood value) while every output of the exported graph is in the units of `y`.

With `[model] weights` the constants are the identity (mean 0, spread 1): pretrained weights were
trained on the user's own preprocessing, and a normalisation they never saw would break them.

How the entry function is called (`call_factory`): with only the arguments it declares.
* `input_shape` (one sample's shape, a list) and the output width under either name it declares,
  `num_classes` or `num_outputs` (the number of labels for classification, of target values for
  regression: 1 for a `y` of shape (n,), k for (n, k)), are passed by name;
* `[model] kwargs` (and the search's model parameters) are passed by name;
* a required parameter the toolchain cannot name (e.g. `def make(shape, classes)`) gets the old
  positional convention, `f(input_shape, num_classes, ...)`, if it is one of the first two;
* a `**kwargs` parameter receives `input_shape` and `num_classes` too, unless declared by name.
So `def make(hidden=64)`, `def make(input_shape, num_outputs, hidden=64)` and
`def make(input_shape, **kw)` all work; a parameter left without a value is one clear error.

The model must give one value per label (logits) for classification, shape (2, classes) for a batch
of 2, and one value per target for regression: (2, k), or (2,) / (2, 1) for one target.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from toolchain.core.config import BuildConfig
from toolchain.core.data import call_user_function, load_python_function
from toolchain.errors import ConfigError, first_line

FILLED = ("input_shape", "num_classes", "num_outputs")  # what the toolchain passes by name (the last two: the output width)


class Standardize(nn.Module):
    """(x - mean) / std, with constants from the training split (scalars, or one per target)."""

    def __init__(self, mean: float | np.ndarray, std: float | np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.tensor(np.asarray(std, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Unstandardize(Standardize):
    """x * std + mean: a standardized prediction back in the targets' units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


def model_factory(entry: str, config: BuildConfig, key: str):
    scheme, _, name = entry.partition(":")
    if scheme != "zoo":
        return load_python_function(entry, config.base_dir, key)
    from toolchain.core.zoo import MODELS

    if name not in MODELS:
        raise ConfigError(f"{key}: unknown built-in model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _parameters(factory: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin or C function: no signature to read
        return None


def factory_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """The default values of the entry's keyword arguments (those the toolchain does not fill itself)."""
    return {p.name: p.default for p in _parameters(factory) or []
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty and p.name not in FILLED}


def call_factory(factory: Callable[..., Any], input_shape: list[int], num_outputs: int, kwargs: dict[str, Any],
                 key: str) -> Any:
    """Call the entry with the arguments it declares (see the module docstring)."""
    parameters = _parameters(factory)
    if parameters is None:
        return call_user_function(factory, key, input_shape, num_outputs, **kwargs)
    given = {"input_shape": input_shape, "num_classes": num_outputs, "num_outputs": num_outputs}
    names = {p.name for p in parameters}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    unknown = [k for k in kwargs if k not in names and not var_keyword]
    if unknown:
        raise ConfigError(f"{key}: the entry has no parameter {', '.join(map(repr, unknown))} (it takes "
                          f"{', '.join(p.name for p in parameters) or 'none'}); fix [model] kwargs or the [search] space")
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    consumed: set[str] = set()  # what the entry received, by name or by position
    for index, p in enumerate(parameters):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in kwargs or p.name in given:
            value = kwargs[p.name] if p.name in kwargs else given[p.name]
            consumed.add(p.name)
        elif p.default is p.empty and index < 2 and p.kind is not p.KEYWORD_ONLY:
            value = given[FILLED[index]]  # the old convention: f(input_shape, num_classes, ...)
            consumed.add(FILLED[index])
        elif p.default is p.empty:
            raise ConfigError(f"{key}: the toolchain cannot fill the entry's required parameter {p.name!r}; it passes "
                              "input_shape, num_classes or num_outputs, and [model] kwargs, by name: rename the "
                              "parameter, give it a default, or set it in [model] kwargs")
        else:
            continue  # left at its default
        if p.kind is p.POSITIONAL_ONLY:
            if len(positional) != index:
                raise ConfigError(f"{key}: the entry's positional-only parameter {p.name!r} comes after one the toolchain "
                                  "leaves at its default; make them normal parameters")
            positional.append(value)
        else:
            keywords[p.name] = value
    if var_keyword:
        keywords.update({k: v for k, v in kwargs.items() if k not in names})
        keywords.update({k: given[k] for k in ("input_shape", "num_classes") if k not in consumed and k not in names})
    return call_user_function(factory, key, *positional, **keywords)


def output_width(dataset) -> int:
    """The number of values the model outputs per sample: one per label, or one per target."""
    if dataset.task == "classification":
        return len(dataset.labels)
    return 1 if dataset.y_train.ndim == 1 else int(dataset.y_train.shape[1])


def sample_losses(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One loss per sample: cross-entropy of the logits for class labels (int64 `y`), the mean squared
    error over the targets for regression (float `y`; outputs (n,), (n, 1) or (n, k) as `y`)."""
    if y.is_floating_point():
        return (outputs.reshape(len(y), -1) - y.reshape(len(y), -1)).pow(2).mean(1)
    return nn.functional.cross_entropy(outputs, y, reduction="none")


def build_user_model(config: BuildConfig, task: str, num_outputs: int, **overrides: object) -> nn.Module:
    """Call the entry function and check it returns a module mapping one input to `num_outputs` values."""
    key = f"config {config.path}: [model] entry"
    factory = model_factory(config.model.entry, config, key)
    kwargs = {**config.model.kwargs, **overrides}
    module = call_factory(factory, list(config.model.input_shape), num_outputs, kwargs, key)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{key}: must return a torch.nn.Module, got {type(module).__name__}")
    module.eval()
    with torch.no_grad():
        try:
            out = module(torch.zeros(2, *config.model.input_shape))
        except Exception as exc:
            raise ConfigError(f"{key}: the model fails on input shape {[2, *config.model.input_shape]}: {first_line(exc)}") from None
    shape = tuple(getattr(out, "shape", ()))
    if task == "classification":
        if shape != (2, num_outputs):
            raise ConfigError(f"{key}: the model outputs shape {list(shape)} for a batch of 2, expected [2, {num_outputs}] "
                              "(one logit per label)")
    elif shape not in ({(2,), (2, 1)} if num_outputs == 1 else {(2, num_outputs)}):
        raise ConfigError(f"{key}: the model outputs shape {list(shape)} for a batch of 2, expected [2, {num_outputs}] "
                          f"(one value per regression target)")
    return module


def build_normalized_model(config: BuildConfig, dataset, **overrides: object) -> tuple[nn.Module, dict[str, Any]]:
    """The user's model behind a `Standardize` layer (and, for regression, before an `Unstandardize`
    one), fitted on the training split or the identity with pretrained weights; returns (model, constants)."""
    pretrained = config.model.weights is not None
    x = dataset.x_train
    body = build_user_model(config, dataset.task, output_width(dataset), **overrides)
    layers = [Standardize(0.0, 1.0) if pretrained else Standardize(float(x.mean()), float(x.std()) or 1.0), body]
    if dataset.task == "regression":
        y = dataset.y_train.astype(np.float64)
        spread = y.std(axis=0)
        layers.append(Unstandardize(np.zeros_like(spread), np.ones_like(spread)) if pretrained
                      else Unstandardize(y.mean(axis=0), np.where(spread > 0, spread, 1.0)))
    model = nn.Sequential(*layers)
    return model, normalization(model)


def normalization(model: nn.Sequential) -> dict[str, Any]:
    """The wrapper's constants, for the report: input mean and std, and the targets' for regression."""
    constants = {"mean": float(model[0].mean), "std": float(model[0].std)}
    if len(model) > 2:
        constants.update(target_mean=model[2].mean.tolist(), target_std=model[2].std.tolist())
    return constants
