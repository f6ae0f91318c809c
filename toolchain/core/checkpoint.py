"""The trained model's weights next to its bundle, so a later build can start from them (warm start).

A bundle carries only the deployable ONNX file; retraining after drift should not start from random
weights. Every build therefore writes `NAME-VERSION-TARGET.pt` beside the bundle: the trained
(uncompressed) module's `state_dict` plus what rebuilds its architecture (the entry's keyword
arguments the search chose). `toolchain build --warm-start FILE` (and the fleet autopilot) rebuild the
model from the config with those arguments, load the weights and fine-tune on the data the config
names; distillation, pruning and quantization then run as in any build.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.errors import ToolchainError

FORMAT = 1


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], model_kwargs: dict[str, Any], project: str) -> Path:
    """Write atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, "project": project, "model_kwargs": dict(model_kwargs),
                "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ToolchainError(f"warm-start checkpoint {path} does not exist (builds write NAME-VERSION-TARGET.pt beside the bundle)") from None
    except Exception as exc:  # torch raises several unrelated types for a file that is not a checkpoint
        raise ToolchainError(f"warm-start checkpoint {path} cannot be read ({type(exc).__name__}); "
                             "pass a .pt file a toolchain build wrote") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or "state_dict" not in checkpoint:
        raise ToolchainError(f"warm-start checkpoint {path} is not a toolchain checkpoint (format {FORMAT})")
    return checkpoint


def warm_start(module: nn.Module, checkpoint: dict[str, Any], path: Path) -> nn.Module:
    """Load the checkpoint's weights into `module` (built from the config); refuse a different architecture."""
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ToolchainError(f"warm-start checkpoint {path} does not fit the config's model ({first}); "
                             "use the checkpoint of a build of this project") from None
    return module
