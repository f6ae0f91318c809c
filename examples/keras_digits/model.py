"""A small Keras CNN for the 8x8 digits: the toolchain trains, prunes (tfmot) and QAT-quantizes it.

Build it with `tf.keras` (Keras 2 from tf-keras, which TF Model Optimization supports; the toolchain
sets TF_USE_LEGACY_KERAS=1 before this file is imported). Inputs arrive channels-first, as the data
source gives them ([1, 8, 8]); `Permute` makes them channels-last for Conv2D.
"""

import tensorflow as tf


def build_model(input_shape, num_classes, width=16):
    keras = tf.keras
    return keras.Sequential([
        keras.Input(shape=tuple(input_shape)),
        keras.layers.Permute((2, 3, 1)),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(num_classes),
    ])
