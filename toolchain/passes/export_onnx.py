"""Export the trained module to ONNX (the FP32 reference candidate) and prove the export is faithful.

Uses torch's supported exporter (`dynamo=True`; the TorchScript one is deprecated in torch 2.9+) with
a dynamic batch axis, then checks the file with `onnx.checker` and compares onnxruntime's outputs
with torch's on real validation samples: a silent exporter bug fails the build here, not on a device.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import torch

from toolchain.artifact import Artifact, Candidate
from toolchain.errors import ToolchainError
from toolchain.workflow import BuildContext

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


def max_abs_difference(module: torch.nn.Module, path: Path, x: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        theirs = module(torch.from_numpy(x)).numpy()
    return float(np.abs(ours - theirs).max())


class ExportOnnxPass:
    name: ClassVar[str] = "export-onnx"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        path = ctx.work_path("model-fp32.onnx")
        with ctx.console.status("  exporting with torch.onnx (dynamo)"):
            export_module(artifact.module, ctx.dataset.input_shape, path)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        difference = max_abs_difference(artifact.module, path, ctx.dataset.x_val[:64])
        if difference > TOLERANCE:
            raise ToolchainError(f"the ONNX export differs from torch by {difference:.2e} (> {TOLERANCE}); "
                                 "the model uses an operator the exporter translates wrongly")
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        artifact.metrics["export"] = {"opset": opset, "max_abs_difference_vs_torch": difference,
                                      "nodes": len(model.graph.node)}
        artifact.candidates.append(Candidate(name="onnx-fp32", precision="fp32", path=path))
        ctx.console.print(f"  opset {opset}, {len(model.graph.node)} nodes, max |onnx - torch| = {difference:.1e}")
        return artifact
