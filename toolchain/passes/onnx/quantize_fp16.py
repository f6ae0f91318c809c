"""FP16 weights and activations, inputs and outputs kept FP32 so clients send the same tensors.

Worth it where the hardware has fast half precision (Jetson GPUs, Cortex-A76 and newer); the gate
drops it where it is not really faster, e.g. on x86 CPUs whose onnxruntime kernels upcast.
"""

from __future__ import annotations

from typing import ClassVar

import onnx
import onnx_ir
from onnxruntime.transformers.float16 import convert_float_to_float16

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.contract import BuildContext


class QuantizeFp16Pass:
    name: ClassVar[str] = "quantize-fp16"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        source = artifact.source
        output = ctx.work_path("model-fp16.onnx")
        converted = onnx_ir.from_proto(convert_float_to_float16(onnx.load(str(source.path)), keep_io_types=True))
        converted.graph.sort()  # the converter appends its input Casts last; the ONNX spec wants topological order
        model = onnx_ir.to_proto(converted)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(output))
        candidate = Candidate(name="onnx-fp16", precision="fp16", path=output, metrics={"method": "float16, fp32 I/O"})
        artifact.candidates.append(candidate)
        ctx.console.print(f"  {output.name}: {candidate.bytes:,} bytes ({candidate.bytes / source.bytes:.2f}x FP32)")
        return artifact
