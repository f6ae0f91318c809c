"""A model the user already has, as a `.tflite` file: measured, predicted and bundled as it is.

There is no float graph to quantize from (a `.tflite` file is already compiled for its runtime), so
the file is the only candidate: its metric is measured in LiteRT (the agent's runtime), it is
benchmarked and predicted on the target, and the gate has nothing to compare it against, which the
report says. Its precision is read from the file (int8 when it holds quantized tensors, fp16 when
its weights are float16).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.errors import ToolchainError, first_line
from toolchain.export.tflite import INSTALL_HINT, tflite_extra_missing


def tflite_precision(path: Path) -> str:
    """int8 when the file holds integer-quantized tensors, fp16 when float16 ones, else fp32."""
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(path)).get_tensor_details()
    if any(np.dtype(d["dtype"]) in (np.int8, np.uint8) and d["quantization"][0] for d in details):
        return "int8"
    return "fp16" if any(np.dtype(d["dtype"]) == np.float16 for d in details) else "fp32"


class ImportTflitePass:
    name: ClassVar[str] = "import-tflite"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        source = ctx.config.resolve(ctx.config.model.file)
        if tflite_extra_missing():
            raise ToolchainError(f"model {source} is a .tflite file; {INSTALL_HINT}")
        path = ctx.work_path("model-imported.tflite")
        shutil.copyfile(source, path)
        try:
            precision = tflite_precision(path)
        except Exception as exc:  # the interpreter's ValueError/RuntimeError for a bad flatbuffer
            raise ToolchainError(f"model {source} cannot be loaded by LiteRT ({first_line(exc)})") from None
        candidate = Candidate(name=f"tflite-{precision}", precision=precision, path=path, format="tflite", runtime="litert",
                              metrics={"method": f"imported from {source.name} as it is"})
        artifact.candidates.append(candidate)
        artifact.reference_name = candidate.name
        artifact.metrics["import"] = {"file": str(source), "format": "tflite", "precision": precision,
                                      "inputs": [s.to_dict() for s in ctx.dataset.inputs]}
        artifact.metrics["export"] = {"source": "model file"}
        note = (f"{source.name} is bundled as it is: a .tflite file has no float graph to quantize from, so the gate "
                "had nothing to compare it against")
        ctx.notes.append(note)
        ctx.console.print(f"  {note} ({precision})")
        return artifact
