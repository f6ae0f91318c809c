"""TFLite candidates for profiles whose runtime runs `.tflite` (Raspberry Pi, microcontrollers).

The FP32 ONNX reference is translated once to a TensorFlow SavedModel (onnx2tf), then converted at
FP32 (the format's own fallback), and at FP16 and full-integer INT8 where the profile lists those
precisions. INT8 is calibrated on the same seeded training samples as onnxruntime's static INT8.
Like the ONNX export, the FP32 translation is checked against the reference on real validation
samples in LiteRT, so a converter bug fails the build instead of shipping.

Without the `tflite` extra, a profile that also runs ONNX builds ONNX only (and the report says
so); a profile that runs only `.tflite` cannot be built and the error gives the install line.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from toolchain.core.artifact import Artifact
from toolchain.errors import ToolchainError
from toolchain.export.onnx import INPUT_NAME, output_scale
from toolchain.export.tflite import INSTALL_HINT, convert_candidates, onnx_to_saved_model, tflite_extra_missing
from toolchain.runtime.sessions import model_logits
from toolchain.core.contract import BuildContext

TOLERANCE = 1e-3  # FP32 TFLite vs FP32 ONNX, max |output difference| per unit of output_scale (XNNPACK reorders sums)
CHECK_SAMPLES = 64
METHODS = {"fp32": "onnx2tf, float32", "fp16": "onnx2tf, float16 weights",
           "int8": "onnx2tf, full-integer int8 (int8 I/O, per-channel weights)"}


class ExportTflitePass:
    name: ClassVar[str] = "export-tflite"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        missing = tflite_extra_missing()
        if missing:
            if "onnx" not in ctx.profile.formats:
                raise ToolchainError(f"target {ctx.profile.id} runs only .tflite models and the '{missing}' package "
                                     f"is missing; {INSTALL_HINT}")
            note = f"no .tflite candidates: the '{missing}' package is missing ({INSTALL_HINT})"
            ctx.notes.append(note)
            ctx.console.print(f"  [yellow]{note}[/]")
            return artifact
        source, inputs = artifact.source, ctx.dataset.inputs
        if len(inputs) > 1:  # the agent's LiteRT session serves one input and one output
            note = f"no .tflite candidates: the model takes {len(inputs)} inputs, and a .tflite model is served with one"
            ctx.notes.append(note)
            ctx.console.print(f"  [yellow]{note}[/]")
            return artifact
        with ctx.console.status("  translating the FP32 ONNX model to TensorFlow (onnx2tf)"):
            saved_model = onnx_to_saved_model(source.path, ctx.work_path("saved_model"), inputs[0].name if inputs else INPUT_NAME)
        candidates = convert_candidates(saved_model, ctx, METHODS)
        fp32, check = candidates[0], ctx.dataset.x_val[:CHECK_SAMPLES]
        reference = model_logits(source.path, check)
        difference, scale = float(np.abs(model_logits(fp32.path, check) - reference).max()), output_scale(reference)
        if difference > TOLERANCE * scale:
            raise ToolchainError(f"the TFLite translation changes the model's outputs by up to {difference:.2g} "
                                 f"(allowed {TOLERANCE:g} x the outputs' scale {scale:.3g}); report the model to onnx2tf or build for ONNX")
        fp32.metrics["max_abs_difference_vs_onnx"] = difference
        artifact.candidates.extend(candidates)
        return artifact
