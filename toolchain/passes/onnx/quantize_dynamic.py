"""Dynamic INT8: weights quantized ahead of time, activations at run time, no calibration data.

Good for MatMul-heavy models (MLPs, transformers) on CPUs; on convolutions onnxruntime's dynamic
kernels are often far slower than FP32, which is exactly what the gate measures and refuses.
"""

from __future__ import annotations

from typing import ClassVar

from onnxruntime.quantization import QuantType, quantize_dynamic

from toolchain.core.artifact import Artifact, Candidate
from toolchain.quantize.int8 import prepared_reference
from toolchain.core.contract import BuildContext


class QuantizeDynamicPass:
    name: ClassVar[str] = "quantize-dynamic"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        output = ctx.work_path("model-int8-dynamic.onnx")
        quantize_dynamic(str(prepared_reference(artifact, ctx)), str(output), weight_type=QuantType.QInt8, per_channel=True)
        candidate = Candidate(name="onnx-int8-dynamic", precision="int8", path=output,
                              metrics={"method": "dynamic INT8 (weights per-channel, activations at run time)"})
        artifact.candidates.append(candidate)
        ctx.console.print(f"  {output.name}: {candidate.bytes:,} bytes ({candidate.bytes / artifact.source.bytes:.2f}x FP32)")
        return artifact
