"""Keras models as input: build the user's model, train it with Keras, wrap it for export.

A config whose `[model] entry` returns a Keras model (`tf.keras`, i.e. Keras 2 from `tf-keras`,
which TF Model Optimization supports) is built with the Keras passes (`plan_passes`). The model
is trained on standardized inputs; the standardization goes into the exported graph as a
`Normalization` layer in front of it, so the device is fed raw features exactly as for torch
models. It is added only at export time: pruning and quantization-aware training wrap the user's
layers one by one, and a layer of ours in the same graph would only get in their way.

TensorFlow is the optional `tflite` extra; `framework_of` needs no TensorFlow to tell torch from Keras.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from toolchain.core.config import BuildConfig
from toolchain.core.data import Dataset
from toolchain.errors import ConfigError, ToolchainError, first_line
from toolchain.export.tflite import (INSTALL_HINT, quiet_native_output, tensorflow, tensorflow_environment,
                                      tflite_extra_missing)

Framework = Literal["torch", "keras"]
KERAS_MODULES = ("tf_keras", "keras", "tensorflow")


def _entry_key(config: BuildConfig) -> str:
    return f"config {config.path}: [model] entry"


def call_entry(config: BuildConfig, num_classes: int) -> Any:
    """Call the user's entry function with the arguments it declares (`toolchain.core.models.call_factory`)."""
    from toolchain.core.models import call_factory, model_factory

    tensorflow_environment()  # the user's file may import TensorFlow
    try:
        with quiet_native_output():  # TensorFlow's import banners, if the file imports it
            factory = model_factory(config.model.entry, config, _entry_key(config))
    except ConfigError as exc:
        if any(f"No module named '{name}" in str(exc) for name in KERAS_MODULES):
            raise ConfigError(f"{exc}; Keras models need the tflite extra: {INSTALL_HINT}") from None
        raise
    return call_factory(factory, list(config.model.input_shape), num_classes, config.model.kwargs, _entry_key(config))


def framework_of(config: BuildConfig, num_classes: int) -> Framework:
    """`[model] framework`, or for "auto" what the entry function returns (built models: zoo = torch)."""
    if config.model.framework != "auto":
        return config.model.framework
    if config.model.entry.startswith("zoo:"):
        return "torch"
    model = call_entry(config, num_classes)
    return "keras" if type(model).__module__.split(".")[0] in KERAS_MODULES else "torch"


def require_keras(config: BuildConfig) -> Any:
    """TensorFlow with Keras 2, or a clear error."""
    missing = tflite_extra_missing()
    if missing:
        raise ToolchainError(f"{_entry_key(config)} returns a Keras model, which needs the '{missing}' package; {INSTALL_HINT}")
    return tensorflow()


def build_keras_model(config: BuildConfig, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """The user's Keras model, checked: Keras 2 (tf.keras), one input, `num_classes` logits."""
    tf = require_keras(config)
    model = call_entry(config, num_classes)
    key = _entry_key(config)
    if not isinstance(model, tf.keras.Model):
        hint = (" (a Keras 3 model: build it with `tf.keras` or `import tf_keras as keras`; TF Model Optimization "
                "supports Keras 2 only)" if type(model).__module__.startswith("keras") else "")
        raise ConfigError(f"{key}: must return a tf.keras.Model, got {type(model).__name__}{hint}")
    try:
        out = model(np.zeros((2, *input_shape), dtype=np.float32), training=False)
    except Exception as exc:
        raise ConfigError(f"{key}: the model fails on input shape {[2, *input_shape]}: {first_line(exc)}") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"{key}: the model outputs shape {list(out.shape)} for a batch of 2, expected [2, {num_classes}] "
                          "(one logit per label, no softmax)")
    return model


def compile_model(model: Any, lr: float) -> Any:
    tf = tensorflow()
    model.compile(optimizer=tf.keras.optimizers.Adam(lr),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def standardize(x: np.ndarray, normalize: dict[str, float]) -> np.ndarray:
    return ((x - normalize["mean"]) / normalize["std"]).astype(np.float32)


def with_normalization(inner: Any, input_shape: tuple[int, ...], normalize: dict[str, float]) -> Any:
    """`inner` behind a Normalization layer, so the exported graph takes raw features."""
    keras = tensorflow().keras
    inputs = keras.Input(shape=tuple(input_shape), name="input")
    scaled = keras.layers.Normalization(mean=normalize["mean"], variance=normalize["std"] ** 2, name="standardize")(inputs)
    return keras.Model(inputs, inner(scaled))


def accuracy(model: Any, x: np.ndarray, y: np.ndarray, normalize: dict[str, float]) -> float:
    """Accuracy of a model trained on standardized inputs, given raw `x`."""
    logits = model.predict(standardize(x, normalize), batch_size=256, verbose=0)
    return float((np.asarray(logits).argmax(axis=1) == y).mean())


def fit(model: Any, data: Dataset, normalize: dict[str, float], *, lr: float, batch_size: int, epochs: int,
        patience: int | None, seed: int, callbacks: Sequence[Any] = ()) -> list[dict[str, float]]:
    """Train on the standardized training split with Adam, keeping the weights of the best validation
    epoch (`patience` None: all epochs)."""
    tf = tensorflow()
    tf.keras.utils.set_random_seed(seed)
    compile_model(model, lr)
    stops = [tf.keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=patience,
                                              restore_best_weights=True)] if patience else []
    history = model.fit(standardize(data.x_train, normalize), data.y_train,
                        validation_data=(standardize(data.x_val, normalize), data.y_val), epochs=epochs,
                        batch_size=batch_size, verbose=0, shuffle=True, callbacks=[*callbacks, *stops]).history
    return [{"epoch": i + 1, "loss": round(float(loss), 5), "val_accuracy": round(float(acc), 5)}
            for i, (loss, acc) in enumerate(zip(history["loss"], history["val_accuracy"]))]
