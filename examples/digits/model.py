"""A small CNN for 8x8 single-channel digits.

`build_model(input_shape, num_classes, **kwargs)` is the entry-point convention of the toolchain:
it receives the config's `[model] input_shape`, the number of labels and `[model] kwargs`.
"""

import torch
from torch import nn


def build_model(input_shape: list[int], num_classes: int, width: int = 32) -> nn.Module:
    channels, height, width_px = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (height // 2) * (width_px // 2), 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, num_classes),
    )
