"""Fake quantization for quantization-aware training, matching what onnxruntime's static QDQ does.

The training graph sees the same grid the exported INT8 model will use, so the weights learn to live
with it:
- weights: per-output-channel symmetric INT8, scale = max|w| / 127 (onnxruntime's `WeightSymmetric`
  per-channel minmax), recomputed every step;
- activations entering a Conv / Linear: per-tensor, asymmetric UINT8 or symmetric INT8 (the profile's
  scheme), with a *learned* clipping range (LSQ, Esser et al. 2019, with the range in log space). A
  range that PTQ's min/max calibration sets too wide (one outlier channel, one outlier sample) is
  pulled in by the task loss.
`strip` turns the trained module back into a plain float module: each learned range becomes a
`clamp` (an ONNX `Clip`), so onnxruntime's min/max calibration of the export lands on the learned
range, and the weights are left on their INT8 grid, which re-quantizes exactly.
BatchNorm is folded into the convolution before training (`fold_batchnorm`), as the ONNX export would
fold it, so the weights trained are the weights quantized.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import fusion, parametrize

QUANTIZED = (nn.Conv2d, nn.Conv1d, nn.Linear)


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric INT8 weights with a straight-through gradient."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))).clamp_min(1e-12) / 127
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class ActivationFakeQuant(nn.Module):
    """Per-tensor fake quantization with a learnable range [low, high] (high - low = scale * levels).

    Initialised from the first batch's min/max, then learned; `low` is fixed at 0 for non-negative
    tensors (after a ReLU), as onnxruntime's calibration would find it."""

    def __init__(self, symmetric: bool) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.levels = 254 if symmetric else 255
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.offset = nn.Parameter(torch.zeros(()))  # low / scale for asymmetric ranges; unused when symmetric
        self.register_buffer("initialised", torch.tensor(False))

    def set_range(self, low: float, high: float) -> None:
        """Put the range at [low, high] (widened to contain zero; symmetric when the scheme is)."""
        if self.symmetric:
            bound = max(abs(low), abs(high), 1e-8)
            low, high = -bound, bound
        low = min(low, 0.0)  # the range always contains zero (exact zero padding)
        scale = max(high - low, 1e-8) / self.levels
        with torch.no_grad():
            self.log_scale.fill_(math.log(scale))
            self.offset.fill_(low / scale)
        self.initialised.fill_(True)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.log_scale.exp()
        if self.symmetric:
            return -scale * (self.levels // 2), scale * (self.levels // 2)
        low = _round_ste(self.offset.clamp(max=0)) * scale  # zero stays exactly representable
        return low, low + scale * self.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialised):
            self.set_range(float(x.min()), float(x.max()))  # min/max, as onnxruntime's calibration
        scale = self.log_scale.exp()
        low, high = self.bounds()
        clipped = torch.minimum(torch.maximum(x, low), high)
        return _round_ste((clipped - low) / scale) * scale + low


class _Clamp(nn.Module):
    """What a learned activation range becomes in the float export: a Clip node."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.low, self.high)


class QuantizedInput(nn.Module):
    """`layer(fake_quant(x))`: a quantized layer with its input's fake quantizer in front."""

    def __init__(self, layer: nn.Module, symmetric: bool) -> None:
        super().__init__()
        self.quantize_input = ActivationFakeQuant(symmetric)
        self.layer = layer
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.quantize_input(x))

    def strip(self) -> nn.Module:
        low, high = (float(b.detach()) for b in self.quantize_input.bounds())
        parametrize.remove_parametrizations(self.layer, "weight", leave_parametrized=True)
        return nn.Sequential(_Clamp(low, high), self.layer)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution in a `Sequential` into it (eval mode)."""
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, (nn.Conv1d, nn.Conv2d)) and isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module._modules[first] = fusion.fuse_conv_bn_eval(conv.eval(), norm.eval())
                module._modules[second] = nn.Identity()
    return module


def _replace(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        replacement = make(child)
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            _replace(child, make)


def prepare_qat(module: nn.Module, symmetric_activations: bool) -> nn.Module:
    """Fold BatchNorm, then put a fake quantizer on every Conv / Linear weight and input (in place)."""
    module = fold_batchnorm(module.eval())
    _replace(module, lambda m: QuantizedInput(m, symmetric_activations) if isinstance(m, QUANTIZED) else None)
    return module


def strip_qat(module: nn.Module) -> nn.Module:
    """The trained QAT module as a plain float module to export (learned ranges as clamps)."""
    _replace(module, lambda m: m.strip() if isinstance(m, QuantizedInput) else None)
    return module.eval()


CLIP_QUANTILES = (1.0, 0.99999, 0.9999, 0.999, 0.99, 0.98, 0.95)


def search_ranges(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, float]]:
    """Loss-aware initial ranges: for each activation quantizer in forward order, the clipping quantile
    of its calibration inputs that gives the lowest cross-entropy on (x, y) with everything before it
    already quantized. Min/max (PTQ's choice) is a candidate, so the search never starts worse than PTQ;
    a range one outlier stretches (a channel 1000x larger than the rest) gets clipped instead."""
    quantizers = [m for m in module.modules() if isinstance(m, ActivationFakeQuant)]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [q.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, q in enumerate(quantizers)]
    chosen = []
    module.eval()
    with torch.no_grad():
        for index, quantizer in enumerate(quantizers):
            quantizer.initialised.fill_(False)  # min/max from this very batch on the next forward
            module(x)
            values = inputs[index].flatten().float()
            if values.numel() > 1_000_000:
                values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
            trials = []
            for q in CLIP_QUANTILES:
                low, high = float(torch.quantile(values, 1 - q)), float(torch.quantile(values, q))
                quantizer.set_range(low, high)
                loss = float(nn.functional.cross_entropy(module(x), y))
                trials.append((loss, -q, low, high))
            loss, negative_q, low, high = min(trials)
            quantizer.set_range(low, high)
            chosen.append({"quantile": -negative_q, "low": low, "high": high, "loss": loss})
    for hook in hooks:
        hook.remove()
    return chosen
