"""Pretrained torch weights (`[model] weights = "ckpt.pt"`) loaded into the entry's model.

The file is read with `torch.load(weights_only=True)`: tensors and plain containers only, never
arbitrary pickled code from a file someone sent. It may be
* a `state_dict` (`torch.save(model.state_dict(), path)`), or
* a checkpoint dict holding one under `state_dict`, `model_state_dict` or `model` (what training
  scripts and this toolchain's own `NAME-VERSION-TARGET.pt` write),
with the `module.` prefix of `DataParallel` removed. Its keys match either the user's own module
(what the entry returns: the usual case) or the whole wrapped model the toolchain trains (its
`Standardize` constants included: a checkpoint of an earlier build); both are accepted, and
anything else, a shape that differs included, is one clear error naming the first keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.core.config import BuildConfig
from toolchain.errors import ConfigError

HOLDERS = ("state_dict", "model_state_dict", "model")  # where checkpoint dicts keep the state_dict
SHOWN = 4  # keys named in an error


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in value.items())


def read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    """The state_dict in the file at `path`; `key` names the config key in errors."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist (paths are relative to the config file)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a file that is not a checkpoint
        hint = ("it holds pickled objects beyond tensors (a whole model?); save model.state_dict() instead"
                if "weights_only" in str(exc) or "Unsupported global" in str(exc) else "it is not a torch.save file")
        raise ConfigError(f"{key}: {path} cannot be read as torch weights ({type(exc).__name__}): {hint}") from None
    state = content if _is_state_dict(content) else next(
        (content[h] for h in HOLDERS if isinstance(content, dict) and _is_state_dict(content.get(h))), None)
    if state is None:
        found = (f"a dict with keys {', '.join(map(str, list(content)[:SHOWN]))}" if isinstance(content, dict)
                 else type(content).__name__)
        raise ConfigError(f"{key}: {path} holds {found}, not a state_dict (names -> tensors) nor a checkpoint dict "
                          f"with one under {', '.join(HOLDERS)}")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _mismatch(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading into a module whose state_dict is `target`, or None."""
    def first(keys: list[str]) -> str:
        return ", ".join(keys[:SHOWN]) + (f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")

    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        return "; ".join(part for part in (missing and f"missing keys {first(missing)}",
                                           unexpected and f"unexpected keys {first(unexpected)}") if part)
    shapes = [f"{k} {list(state[k].shape)} vs the model's {list(v.shape)}" for k, v in target.items() if state[k].shape != v.shape]
    return f"shapes differ: {first(shapes)}" if shapes else None


def load_weights(model: nn.Sequential, config: BuildConfig) -> str:
    """Load `[model] weights` into `model` (`build_normalized_model`'s wrapper, the user's module at
    index 1); returns which part the keys matched, for the report."""
    key = f"config {config.path}: [model] weights"
    path = config.resolve(config.model.weights)
    state = read_state_dict(path, key)
    body = model[1]
    whole = _mismatch(state, model.state_dict())
    if whole is None:
        model.load_state_dict(state)
        return "the whole model (normalisation constants included)"
    problem = _mismatch(state, body.state_dict())
    if problem is not None:
        raise ConfigError(f"{key}: {path} does not fit the entry's model: {problem}; build the model with the arguments "
                          "the weights were trained with ([model] kwargs)")
    body.load_state_dict(state)
    return "the entry's module"
