"""MobileNetV2 (Sandler et al., 2018): inverted residual blocks with linear bottlenecks.

The layer table is the paper's; `width_mult` scales channels (rounded to multiples of 8, as in the
reference implementation) and strides are dropped once the feature map would shrink below 2x2, so
the same definition serves 224x224 images and small inputs such as upsampled 8x8 digits.
"""

from __future__ import annotations

from torch import nn

# (expansion t, output channels c, repeats n, first stride s) from Table 2 of the paper
PAPER_TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers = _conv_bn(cin, hidden, 1, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + _conv_bn(hidden, cout, 1, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def mobilenet_v2(input_shape: list[int], num_classes: int, width_mult: float = 1.0, last_channels: int = 1280,
                 dropout: float = 0.2) -> nn.Module:
    channels, height, width = input_shape
    size = min(height, width)
    cin = _divisible(32 * width_mult)
    stride = 2 if size >= 4 else 1
    size //= stride
    layers = _conv_bn(channels, cin, 3, stride)
    for expansion, c, repeats, first_stride in PAPER_TABLE:
        cout = _divisible(c * width_mult)
        for index in range(repeats):
            stride = first_stride if index == 0 and size // first_stride >= 2 else 1
            size //= stride
            layers.append(InvertedResidual(cin, cout, stride, expansion))
            cin = cout
    last = _divisible(last_channels * max(1.0, width_mult))
    layers += _conv_bn(cin, last, 1, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(last, num_classes))
