"""Accuracy of every candidate, measured in the device's runtime (onnxruntime, or LiteRT for `.tflite`)
on the held-out test split.

Accuracy measured in torch would hide quantization and exporter effects; this is the number the
gate compares and the bundle promises.
"""

from __future__ import annotations

from typing import ClassVar


from toolchain.core.artifact import Artifact
from toolchain.core.contract import BuildContext
from toolchain.runtime.sessions import model_logits


class EvaluatePass:
    name: ClassVar[str] = "evaluate"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        x, y = ctx.dataset.x_test, ctx.dataset.y_test
        for candidate in artifact.candidates:
            predicted = model_logits(candidate.path, x).argmax(axis=1)
            candidate.metrics["accuracy"] = float((predicted == y).mean())
            candidate.metrics["test_samples"] = int(len(y))
        reference = artifact.reference.metrics["accuracy"]
        for candidate in artifact.candidates:
            candidate.metrics["accuracy_drop"] = reference - candidate.metrics["accuracy"]
            ctx.console.print(f"  {candidate.name:<16} accuracy {candidate.metrics['accuracy']:.4f} "
                              f"(drop {100 * candidate.metrics['accuracy_drop']:+.2f} pp) on {len(y)} test samples")
        return artifact
