"""The task's metric for every candidate, measured in the device's runtime (onnxruntime, or LiteRT for
`.tflite`) on the held-out test split.

A metric measured in torch would hide quantization and exporter effects; this is the number the gate
compares and the bundle promises. Every candidate gets `metric` (its name), `metric_value` and
`metric_drop` (how much worse than the reference, in the metric's units); classifiers also keep
`accuracy` and `accuracy_drop`, whatever the gate's metric.
"""

from __future__ import annotations

from typing import ClassVar

from toolchain.core.artifact import Artifact
from toolchain.core.contract import BuildContext
from toolchain.core.metrics import BUILTIN
from toolchain.core.tensors import count
from toolchain.runtime.sessions import model_outputs


class EvaluatePass:
    name: ClassVar[str] = "evaluate"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        x, y, metric = ctx.dataset.x_test, ctx.dataset.y_test, ctx.metric
        reference = artifact.reference
        outputs = {c.name: model_outputs(c.path, x) for c in artifact.candidates}
        accuracy = BUILTIN["accuracy"] if ctx.dataset.task == "classification" else None
        for candidate in artifact.candidates:
            got, expected = outputs[candidate.name], outputs[reference.name]
            candidate.metrics.update(metric=metric.name, metric_value=metric.value(got, y, expected), test_samples=count(x))
            if accuracy is not None:
                candidate.metrics["accuracy"] = accuracy.value(got, y)
        for candidate in artifact.candidates:
            values = candidate.metrics
            values["metric_drop"] = metric.drop(reference.metrics["metric_value"], values["metric_value"])
            if accuracy is not None:
                values["accuracy_drop"] = reference.metrics["accuracy"] - values["accuracy"]
            ctx.console.print(f"  {candidate.name:<16} {metric.name} {metric.format_value(values['metric_value'])} "
                              f"(drop {metric.format_drop(values['metric_drop'])}) on {count(x)} test samples")
        return artifact
