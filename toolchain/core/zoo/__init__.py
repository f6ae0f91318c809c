"""Built-in model definitions, selectable with `[model] entry = "zoo:NAME"`.

torchvision does not work beside torch 2.13 here, so the few architectures the toolchain needs are
written out; each follows the entry-point convention `build(input_shape, num_classes, **kwargs)`.
"""

from typing import Callable

from torch import nn

from toolchain.core.zoo.mobilenet_v2 import mobilenet_v2

MODELS: dict[str, Callable[..., nn.Module]] = {"mobilenet_v2": mobilenet_v2}
