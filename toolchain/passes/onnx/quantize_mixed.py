"""Mixed precision: when full INT8 loses too much of the task's metric, keep the most sensitive layers in float.

Sensitivity of a layer = the validation metric lost when only that layer is quantized. Layers are
then returned to float, most sensitive first, until the validation drop is within the gate's limit
(`[eval] max_drop`, in the metric's units). Validation data decides (the test split stays untouched
for the gate), and each layer's number goes into the report.
"""

from __future__ import annotations

from typing import ClassVar

import onnx

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.core.metrics import allowed_drop
from toolchain.quantize.calibration_choice import quantize_as_chosen
from toolchain.quantize.int8 import int8_validation_drops, prepared_reference, validation_metric

QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")
MAX_LAYERS = 64  # beyond this the per-layer scan costs more than it saves; larger models use the first 64


class MixedPrecisionPass:
    name: ClassVar[str] = "quantize-mixed"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        drops = int8_validation_drops(artifact, ctx)
        if "onnx-int8-qdq" not in drops:
            return artifact
        metric, reference = ctx.metric, artifact.reference.path
        fp32_value = artifact.metrics["validation_metric"][artifact.reference.name]
        limit, _ = allowed_drop(ctx.config, metric, fp32_value)
        best = min(drops, key=drops.get)
        report = {"metric": metric.name, "validation_fp32": fp32_value, "validation_int8_drop": drops["onnx-int8-qdq"]}
        artifact.metrics["mixed"] = report
        if drops[best] <= limit:
            report["decision"] = (f"not needed: {best} loses {metric.format_drop(drops[best])} of {metric.name} on validation "
                                  f"(<= {metric.format_drop(limit)})")
            ctx.console.print(f"  {report['decision']}")
            return artifact
        prepared = prepared_reference(artifact, ctx)
        layers = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in QUANTIZABLE][:MAX_LAYERS]
        probe = ctx.work_path("model-mixed-probe.onnx")
        sensitivity = {}
        with ctx.console.status(f"  sensitivity of {len(layers)} layers"):
            for layer in layers:
                quantize_as_chosen(artifact, ctx, probe, exclude=[n for n in layers if n != layer])
                sensitivity[layer] = metric.drop(fp32_value, validation_metric(probe, ctx, reference))
        ranked = sorted(layers, key=lambda name: sensitivity[name], reverse=True)
        report["sensitivity"] = {name: round(sensitivity[name], 5) for name in ranked}
        output = ctx.work_path("model-mixed.onnx")
        for count in range(1, len(ranked)):
            kept_float = ranked[:count]
            quantize_as_chosen(artifact, ctx, output, exclude=kept_float)
            drop = metric.drop(fp32_value, validation_metric(output, ctx, reference))
            if drop <= limit:
                report.update(float_layers=kept_float, validation_drop=drop,
                              decision=f"{count} of {len(layers)} layers kept in float: validation drop {metric.format_drop(drop)}")
                artifact.candidates.append(Candidate(name="onnx-mixed", precision="mixed", path=output,
                                                     metrics={"method": "static QDQ INT8 with the most sensitive layers in FP32",
                                                              "float_layers": kept_float}))
                ctx.console.print(f"  {report['decision']}")
                return artifact
        report["decision"] = f"no mix within the {metric.name} gate short of all-float; falling back"
        ctx.console.print(f"  {report['decision']}")
        return artifact
