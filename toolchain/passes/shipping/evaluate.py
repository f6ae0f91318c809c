"""The task's metric for every candidate, measured in the device's runtime (onnxruntime, or LiteRT for
`.tflite`) on the held-out test split.

A metric measured in torch would hide quantization and exporter effects; this is the number the gate
compares and the bundle promises. Every candidate gets `metric` (its name), `metric_value` and
`metric_drop` (how much worse than the reference, in the metric's units); classifiers also keep
`accuracy` and `accuracy_drop`, whatever the gate's metric. The reference also gets `constant_baseline`:
the metric of one answer for every sample (the training split's most common class, or its mean), and a
warning note when it is not clearly better than that.
"""

from __future__ import annotations

import math
from typing import ClassVar

from rich.markup import escape

from toolchain.core.artifact import Artifact
from toolchain.core.contract import BuildContext
from toolchain.core.metrics import BUILTIN, constant_baseline
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
        self._against_a_constant(reference.metrics, outputs[reference.name], ctx)
        return artifact

    @staticmethod
    def _against_a_constant(reference: dict, outputs: list, ctx: BuildContext) -> None:
        """Say so, loudly, when the reference is not clearly better than one answer for every sample (a
        training that diverged, labels that do not match the inputs): every gate verdict is then relative to
        nothing. "Clearly": by two standard errors of a share measured on the test split (accuracy at 10.3%
        against a constant's 9.7% on 360 digits is chance), or by 5% of an error metric's constant value."""
        metric, data = ctx.metric, ctx.dataset
        baseline = constant_baseline(metric, outputs, data.y_train, data.y_test, data.task)
        if baseline is None:
            return
        value, answer = baseline
        reference["constant_baseline"] = value
        if metric.fraction:
            share = min(max(value, 1 / len(data.y_test)), 1 - 1 / len(data.y_test))
            margin = 2 * math.sqrt(share * (1 - share) / len(data.y_test))
        else:
            margin = 0.05 * abs(value)
        if -metric.drop(value, reference["metric_value"]) < margin:
            note = (f"WARNING: the model is not clearly better than always answering {answer}: {metric.name} "
                    f"{metric.format_value(reference['metric_value'])} vs {metric.format_value(value)} on the test split. "
                    "It learned nothing usable: check that the labels match the inputs, or train it again "
                    "(a lower [train] lr, more epochs)")
            ctx.notes.append(note)
            ctx.console.print(f"  [bold yellow]{escape(note)}[/]")
