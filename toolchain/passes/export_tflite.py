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

from typing import Any, ClassVar

import numpy as np

from toolchain.artifact import Artifact, Candidate
from toolchain.errors import ToolchainError
from toolchain.litert_convert import (INSTALL_HINT, REPRESENTATIVE_SAMPLES, TFLITE_PRECISIONS, convert,
                                      onnx_to_saved_model, tflite_extra_missing)
from toolchain.passes.evaluate import model_logits
from toolchain.passes.export_onnx import INPUT_NAME
from toolchain.passes.quantize_int8 import calibration_samples
from toolchain.workflow import BuildContext

TOLERANCE = 1e-3  # FP32 TFLite vs FP32 ONNX, max |logit difference| (XNNPACK reorders sums)
CHECK_SAMPLES = 64
METHODS = {"fp32": "onnx2tf, float32", "fp16": "onnx2tf, float16 weights",
           "int8": "onnx2tf, full-integer int8 (int8 I/O, per-channel weights)"}


def tflite_precisions(precisions: tuple[str, ...]) -> list[str]:
    """FP32 always (the format's fallback), then the profile's FP16 and INT8."""
    return [p for p in TFLITE_PRECISIONS if p == "fp32" or p in precisions]


def convert_candidates(source: Any, ctx: BuildContext, methods: dict[str, str]) -> list[Candidate]:
    """`source` (a SavedModel folder or a Keras model) as one `.tflite` candidate per precision the
    profile takes, INT8 calibrated on seeded training samples."""
    samples = calibration_samples(ctx.dataset.x_train, REPRESENTATIVE_SAMPLES, ctx.seed)
    candidates = []
    for precision in tflite_precisions(ctx.profile.precisions):
        with ctx.console.status(f"  converting to TFLite {precision}"):
            path = ctx.work_path(f"model-{precision}.tflite")
            path.write_bytes(convert(source, precision, samples))
        candidates.append(Candidate(name=f"tflite-{precision}", precision=precision, path=path, format="tflite",
                                    runtime="litert", metrics={"method": methods[precision]}))
        ctx.console.print(f"  {path.name}: {path.stat().st_size:,} bytes")
    return candidates


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
        reference = artifact.reference
        with ctx.console.status("  translating the FP32 ONNX model to TensorFlow (onnx2tf)"):
            saved_model = onnx_to_saved_model(reference.path, ctx.work_path("saved_model"), INPUT_NAME)
        candidates = convert_candidates(saved_model, ctx, METHODS)
        fp32, check = candidates[0], ctx.dataset.x_val[:CHECK_SAMPLES]
        difference = float(np.abs(model_logits(fp32.path, check) - model_logits(reference.path, check)).max())
        if difference > TOLERANCE:
            raise ToolchainError(f"the TFLite translation changes the model's outputs by up to {difference:.2g} "
                                 f"(allowed {TOLERANCE:g}); report the model to onnx2tf or build for ONNX")
        fp32.metrics["max_abs_difference_vs_onnx"] = difference
        artifact.candidates.extend(candidates)
        return artifact
