"""A small MLP regressor for the diabetes example.

The toolchain calls an entry with only the arguments it declares: here the input shape, the number
of values to predict (`num_outputs`: 1 for this data's one target) and `hidden` from `[model] kwargs`.
It predicts in standardized units; the toolchain puts the targets' mean and spread after it in the
exported graph, so the device returns values in the data's own units.
"""

from torch import nn


def build_model(input_shape: list[int], num_outputs: int, hidden: int = 64) -> nn.Module:
    (features,) = input_shape
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_outputs),
    )
