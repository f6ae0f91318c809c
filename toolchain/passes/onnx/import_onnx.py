"""A model the user already has, as an ONNX file: the build's FP32 reference instead of a trained one.

The file is checked, its dynamic dimensions fixed (`[model] input_shape`; the batch axis stays
dynamic), an opset below 13 raised (per-channel INT8 needs it), shapes inferred and external data
inlined, then run once in onnxruntime on validation samples, so a file the runtime cannot run fails
here with the reason. Every later pass (quantizers, `.tflite` export, evaluation, benchmark, gate,
bundle) treats it like an exported model. Nothing assumes its outputs are logits: the task's metric
(or, without labels, agreement with this reference) judges the candidates.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.core.tensors import take
from toolchain.errors import ToolchainError, first_line
from toolchain.runtime.files import MIN_OPSET, import_onnx
from toolchain.runtime.sessions import model_outputs

CHECK_SAMPLES = 8


class ImportOnnxPass:
    name: ClassVar[str] = "import-onnx"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        model = ctx.config.model
        source = ctx.config.resolve(model.file)
        path = ctx.work_path("model-fp32.onnx")
        with ctx.console.status(f"  importing {source.name}"):
            info = import_onnx(source, model.input_shape, path)
            try:
                outputs = model_outputs(path, take(ctx.dataset.x_val, slice(0, CHECK_SAMPLES)))
            except Exception as exc:  # onnxruntime's own error types
                raise ToolchainError(f"model {source}: onnxruntime cannot run it on the data ({first_line(exc)})") from None
        bad = [spec["name"] for spec, out in zip(info["outputs"], outputs)
               if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all()]
        if bad:
            raise ToolchainError(f"model {source}: output(s) {bad} are NaN or infinite on validation samples; check the "
                                 "model and that the data is preprocessed the way it expects")
        info["output_shapes_on_data"] = {spec["name"]: list(out.shape[1:]) for spec, out in zip(info["outputs"], outputs)}
        artifact.metrics["import"] = info
        artifact.metrics["export"] = {"opset": MIN_OPSET if info["opset_converted_from"] else info["opset"],
                                      "source": "model file"}
        artifact.candidates.append(Candidate(name="onnx-fp32", precision="fp32", path=path,
                                             metrics={"method": f"imported from {source.name}"}))
        converted = f", opset {info['opset_converted_from']} raised to {MIN_OPSET}" if info["opset_converted_from"] else ""
        ctx.console.print(f"  {source.name}: inputs {info['fixed_input_dims']}, outputs "
                          f"{info['output_shapes_on_data']}{converted}")
        return artifact
