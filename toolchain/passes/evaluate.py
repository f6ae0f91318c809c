"""Accuracy of every candidate, measured in the device's runtime (onnxruntime, or LiteRT for `.tflite`)
on the held-out test split.

Accuracy measured in torch would hide quantization and exporter effects; this is the number the
gate compares and the bundle promises.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from toolchain.artifact import Artifact
from toolchain.measure import make_session
from toolchain.workflow import BuildContext


def model_logits(path: Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits in batches, run by the code the device agent serves the same file with."""
    session = make_session(path, threads=0)  # every core (0: the runtime's default)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


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
