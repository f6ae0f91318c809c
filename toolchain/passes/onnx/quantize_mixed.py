"""Mixed precision: when full INT8 loses too much of the task's metric, keep the most sensitive layers in float.

Sensitivity of a layer = the validation metric lost when only that layer is quantized. Layers are
then returned to float, most sensitive first, until the validation drop is within the gate's limit
(`[eval] max_drop`, in the metric's units): the fewest such layers are found by bisection, since
keeping more in float loses less. Both steps share the budget's `mixed_search_seconds` (a real
model has hundreds of layers and each probe is a full quantization; the scan stops at half the
budget and ranks unscanned layers last). Validation data decides (the test split stays untouched
for the gate), and each layer's number goes into the report.
"""

from __future__ import annotations

import time
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
        deadline = time.monotonic() + ctx.settings.mixed_search_seconds
        sensitivity = self.sensitivity(artifact, ctx, prepared, layers, fp32_value, deadline)
        # Layers the budget left unscanned rank after the scanned ones, in graph order.
        ranked = sorted(sensitivity, key=sensitivity.get, reverse=True) + [n for n in layers if n not in sensitivity]
        report["sensitivity"] = {name: round(sensitivity[name], 5) for name in ranked if name in sensitivity}
        if len(sensitivity) < len(layers):
            report["scanned"] = f"{len(sensitivity)} of {len(layers)} layers within the {ctx.budget} budget's {ctx.settings.mixed_search_seconds:g} s"
        output = ctx.work_path("model-mixed.onnx")
        drops_by_count: dict[int, float] = {}  # in the order tried: the last one is what `output` holds

        def drop_with(count: int) -> float:
            """Validation drop with the `count` most sensitive layers in float (quantized into `output`)."""
            quantize_as_chosen(artifact, ctx, output, exclude=ranked[:count])
            drops_by_count.pop(count, None)
            drops_by_count[count] = metric.drop(fp32_value, validation_metric(output, ctx, reference))
            return drops_by_count[count]

        # Keeping more layers in float loses less, so bisect for the fewest that meet the gate
        # (a handful of quantizations instead of one per layer).
        low, high = 0, len(ranked) - 1
        if high < 1 or drop_with(high) > limit:
            report["decision"] = f"no mix within the {metric.name} gate short of all-float; falling back"
            ctx.console.print(f"  {report['decision']}")
            return artifact
        while high - low > 1 and time.monotonic() < deadline:
            middle = (low + high) // 2
            low, high = (low, middle) if drop_with(middle) <= limit else (middle, high)
        kept_float = ranked[:high]
        drop = drops_by_count[high] if list(drops_by_count)[-1] == high else drop_with(high)
        report.update(float_layers=kept_float, validation_drop=drop, tried={str(k): round(v, 5) for k, v in sorted(drops_by_count.items())},
                      decision=f"{high} of {len(layers)} layers kept in float: validation drop {metric.format_drop(drop)}")
        artifact.candidates.append(Candidate(name="onnx-mixed", precision="mixed", path=output,
                                             metrics={"method": "static QDQ INT8 with the most sensitive layers in FP32",
                                                      "float_layers": kept_float}))
        ctx.console.print(f"  {report['decision']}")
        return artifact

    @staticmethod
    def sensitivity(artifact: Artifact, ctx: BuildContext, prepared, layers: list[str], fp32_value: float,
                    deadline: float) -> dict[str, float]:
        """The validation drop with only each layer quantized, scanning in graph order until half the
        time budget is spent (the bisection that follows needs the rest)."""
        probe, reference = ctx.work_path("model-mixed-probe.onnx"), artifact.reference.path
        stop = deadline - ctx.settings.mixed_search_seconds / 2
        found: dict[str, float] = {}
        with ctx.console.status(f"  sensitivity of {len(layers)} layers"):
            for layer in layers:
                if found and time.monotonic() >= stop:
                    break
                quantize_as_chosen(artifact, ctx, probe, exclude=[n for n in layers if n != layer])
                found[layer] = ctx.metric.drop(fp32_value, validation_metric(probe, ctx, reference))
        return found
