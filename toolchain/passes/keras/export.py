"""Convert the (pruned) Keras model to `.tflite` at FP32, and at FP16 and full-integer INT8 where the
profile lists them (post-training quantization, calibrated on seeded training samples).

The FP32 `.tflite` is the build's reference: accuracy drops and speed-ups are measured against it.
"""

from __future__ import annotations

from typing import ClassVar

from toolchain.training import keras as keras_model
from toolchain.core.artifact import Artifact
from toolchain.export.tflite import convert_candidates
from toolchain.core.contract import BuildContext

METHODS = {"fp32": "Keras, float32", "fp16": "Keras, float16 weights",
           "int8": "Keras, post-training full-integer int8 (int8 I/O)"}


class KerasExportTflitePass:
    name: ClassVar[str] = "export-tflite-keras"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        model = keras_model.with_normalization(artifact.module, ctx.dataset.input_shape, artifact.metrics["train"]["normalize"])
        artifact.metrics["export"] = {"format": "tflite", "converter": "tf.lite.TFLiteConverter.from_keras_model",
                                      "input": "raw features (Normalization layer in the graph)"}
        artifact.candidates.extend(convert_candidates(model, ctx, METHODS))
        return artifact
