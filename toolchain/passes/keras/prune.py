"""Magnitude pruning of a Keras model with TF Model Optimization: `prune_low_magnitude`, then `strip`.

Every layer tfmot can prune (Dense, Conv2D, DepthwiseConv2D, ...) is wrapped; sparsity rises from 0
to `prune_ratio` over the first 70% of the fine-tuning steps (polynomial decay, ten pruning steps),
the rest recovers accuracy at the final sparsity. Stripping leaves a plain model whose zeroed weights
compress well (and that sparse-aware kernels can skip); the achieved sparsity goes to the report.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from toolchain.training import keras as keras_model
from toolchain.core.artifact import Artifact
from toolchain.training.fit import finetune_epochs, training_settings
from toolchain.core.contract import BuildContext

AUTO_SPARSITY = 0.5  # "auto" for Keras: tfmot's recommended starting point for magnitude pruning
FINETUNE_LR_SCALE = 0.3


def _sparsity(model: Any) -> float:
    kernels = [w for layer in model.layers for w in layer.trainable_weights if "kernel" in w.name]
    total = sum(int(np.prod(w.shape)) for w in kernels)
    return sum(int((w.numpy() == 0).sum()) for w in kernels) / total if total else 0.0


class KerasPrunePass:
    name: ClassVar[str] = "prune-keras"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        tf = keras_model.require_keras(ctx.config)
        import tensorflow_model_optimization as tfmot

        ratio = AUTO_SPARSITY if ctx.config.compress.prune_ratio == "auto" else float(ctx.config.compress.prune_ratio)
        data, trained = ctx.dataset, artifact.module
        normalize = artifact.metrics["train"]["normalize"]
        settings, epochs = training_settings(ctx), finetune_epochs(ctx)
        steps = epochs * math.ceil(len(data.x_train) / int(settings["batch_size"]))
        end = max(1, int(0.7 * steps))
        schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, ratio, begin_step=0, end_step=end, frequency=max(1, end // 10))
        layers = tf.keras.layers
        prunable = (layers.Dense, layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.DepthwiseConv2D,
                    layers.SeparableConv2D, layers.Conv2DTranspose)  # layers tfmot's registry prunes

        def wrap(layer: Any) -> Any:
            if isinstance(layer, prunable):
                return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
            return layer

        # `wrap` returns the trained layer objects themselves (wrapped or not), so no weights are re-initialised.
        pruned = tf.keras.models.clone_model(trained, clone_function=wrap)
        with ctx.console.status(f"  pruning to {100 * ratio:.0f}% sparsity with tfmot ({epochs} fine-tuning epochs)"):
            keras_model.fit(pruned, data, normalize, lr=settings["lr"] * FINETUNE_LR_SCALE,
                            batch_size=int(settings["batch_size"]), epochs=epochs, patience=None, seed=ctx.seed,
                            callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
        stripped = tfmot.sparsity.keras.strip_pruning(pruned)
        val_accuracy = keras_model.accuracy(stripped, data.x_val, data.y_val, normalize)
        sparsity, parameters = _sparsity(stripped), int(stripped.count_params())
        artifact.module = stripped
        artifact.metrics["prune"] = {
            "decision": "pruned", "title": "Magnitude pruning (tfmot)", "method": "prune_low_magnitude + strip_pruning",
            "summary": f"{100 * sparsity:.1f}% of the kernel weights are zero after {epochs} fine-tuning epochs "
                       f"(target {100 * ratio:.0f}%); the shapes stay, the zeros compress and sparse kernels skip them.",
            "target_sparsity": ratio, "sparsity": round(sparsity, 4), "finetune_epochs": epochs,
            "before": {"parameters": parameters, "val_accuracy": artifact.metrics["train"]["val_accuracy"]},
            "after": {"parameters": parameters, "nonzero_kernel_fraction": round(1 - sparsity, 4),
                      "val_accuracy": round(val_accuracy, 5)},
        }
        ctx.console.print(f"  kernel sparsity {100 * sparsity:.1f}%, val accuracy {val_accuracy:.4f}")
        return artifact
