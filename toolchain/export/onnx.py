"""torch -> ONNX: the exporter call every path shares (the export pass, distillation's and pruning's
cost estimates, QAT, the search's latency objective), with the exporter's chatter silenced and its
failures turned into one clear line."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from toolchain.errors import ToolchainError

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
TOLERANCE = 1e-4


def export_module(module: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    module = module.cpu().eval()
    example = (torch.zeros(2, *input_shape),)
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), dynamo=True, opset_version=OPSET, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as exc:
        raise ToolchainError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]} "
                             "(use operators the ONNX exporter supports)") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def output_scale(outputs: np.ndarray) -> float:
    """What a tolerance on a model's outputs is relative to: their largest magnitude, at least 1. Float32
    rounding grows with the values: two faithful runtimes differ by ~1e-6 on logits but by ~0.06 on a
    regression predicting prices in the hundreds of thousands."""
    return max(1.0, float(np.abs(outputs).max()))


def max_abs_difference(module: torch.nn.Module, path: Path, x: np.ndarray) -> tuple[float, float]:
    """max |onnxruntime - torch| on `x`, and the `output_scale` it is to be judged against."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        theirs = module(torch.from_numpy(x)).numpy()
    return float(np.abs(ours - theirs).max()), output_scale(theirs)
