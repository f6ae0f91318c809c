"""Quantization-aware training of a Keras model with TF Model Optimization's `quantize_model`.

The (pruned) model gets fake-quant ops on weights and activations, is fine-tuned so it learns
around the rounding, and converts to a full-integer `.tflite` with the ranges it learned (the
input standardization in front is calibrated on training samples). It competes with post-training
INT8 at the gate: same precision, so the faster of the two within the accuracy budget ships.
"""

from __future__ import annotations

from typing import ClassVar

from toolchain.training import keras as keras_model
from toolchain.core.artifact import Artifact, Candidate
from toolchain.errors import ToolchainError, first_line
from toolchain.export.tflite import REPRESENTATIVE_SAMPLES, convert
from toolchain.quantize.int8 import representative_samples
from toolchain.training.fit import finetune_epochs, training_settings
from toolchain.core.contract import BuildContext

QAT_LR_SCALE = 0.1


class KerasQatPass:
    name: ClassVar[str] = "quantize-qat-keras"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        keras_model.require_keras(ctx.config)
        import tensorflow_model_optimization as tfmot

        data, normalize = ctx.dataset, artifact.metrics["train"]["normalize"]
        settings = training_settings(ctx)
        epochs = finetune_epochs(ctx, ctx.config.compress.qat_epochs)
        try:
            quantized = tfmot.quantization.keras.quantize_model(artifact.module)
        except Exception as exc:  # tfmot raises RuntimeError/ValueError naming the layer it cannot quantize
            raise ToolchainError(f"quantization-aware training cannot wrap this Keras model: {first_line(exc)} "
                                 "(use layers tfmot supports, or set [compress] qat = false)") from None
        with ctx.console.status(f"  quantization-aware training with tfmot ({epochs} epochs)"):
            history = keras_model.fit(quantized, data, normalize, lr=settings["lr"] * QAT_LR_SCALE,
                                      batch_size=int(settings["batch_size"]), epochs=epochs, patience=None, seed=ctx.seed)
        model = keras_model.with_normalization(quantized, data.input_shape, normalize)
        path = ctx.work_path("model-int8-qat.tflite")
        path.write_bytes(convert(model, "int8", representative_samples(data.x_train, REPRESENTATIVE_SAMPLES, ctx.seed)))
        candidate = Candidate(name="tflite-int8-qat", precision="int8", path=path, format="tflite", runtime="litert",
                              metrics={"method": "Keras, tfmot quantize_model (QAT), full-integer int8 (int8 I/O)",
                                       "qat_epochs": epochs, "qat_val_accuracy_fake_quant": history[-1]["val_accuracy"]})
        artifact.candidates.append(candidate)
        ctx.console.print(f"  {path.name}: {candidate.bytes:,} bytes after {epochs} QAT epochs")
        return artifact
