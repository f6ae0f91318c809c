"""Train the user's Keras model with Keras: Adam, early stopping on validation accuracy, seeded.

The same settings as the torch path (`[train]`, the budget's epochs and patience), on inputs
standardized with the training split's mean and spread (put into the exported graph later).
"""

from __future__ import annotations

from typing import ClassVar

from toolchain.training import keras as keras_model
from toolchain.core.artifact import Artifact
from toolchain.errors import ConfigError, ToolchainError
from toolchain.training.fit import training_settings
from toolchain.core.contract import BuildContext


class KerasTrainPass:
    name: ClassVar[str] = "train-keras"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        if ctx.warm_start is not None:
            raise ToolchainError("--warm-start fine-tunes torch checkpoints; a Keras model trains from its entry function")
        data, config = ctx.dataset, ctx.config
        if data.task != "classification":
            raise ConfigError(f"config {config.path}: [model] entry returns a Keras model, and Keras models are trained for "
                              f"classification only (this task is {data.task}); build a torch model for it")
        if config.model.weights is not None:
            raise ConfigError(f"config {config.path}: [model] weights loads torch weights, and the entry returns a Keras "
                              "model; load Keras weights inside the entry function instead")
        tf = keras_model.require_keras(config)
        model = keras_model.build_keras_model(config, data.input_shape, len(data.labels))
        normalize = {"mean": float(data.x_train.mean()), "std": float(data.x_train.std()) or 1.0}
        settings = training_settings(ctx)
        patience = config.train.patience or ctx.settings.patience
        with ctx.console.status(f"  training with Keras (up to {settings['epochs']} epochs)"):
            history = keras_model.fit(model, data, normalize, lr=settings["lr"], batch_size=int(settings["batch_size"]),
                                      epochs=int(settings["epochs"]), patience=patience, seed=ctx.seed)
        val_accuracy = keras_model.accuracy(model, data.x_val, data.y_val, normalize)
        best = max(history, key=lambda h: h["val_accuracy"])
        artifact.module = model
        artifact.metrics["train"] = {
            "framework": "keras", "warm_start": None, "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
            "epochs_run": len(history), "best_epoch": best["epoch"], "max_epochs": int(settings["epochs"]),
            "patience": patience, "settings": settings, "model_kwargs": {}, "val_accuracy": round(val_accuracy, 5),
            "train_accuracy": round(keras_model.accuracy(model, data.x_train, data.y_train, normalize), 5),
            "parameters": int(model.count_params()), "normalize": normalize, "history": history,
        }
        ctx.console.print(f"  best epoch {best['epoch']} of {len(history)}: val accuracy {val_accuracy:.4f}, "
                          f"{model.count_params():,} parameters")
        return artifact
