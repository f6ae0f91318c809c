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
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import fusion, parametrize

from toolchain.core.models import sample_losses

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
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.exp()
        low, high = self.bounds()
        clipped = torch.minimum(torch.maximum(x, low), high)
        return _round_ste((clipped - low) / scale) * scale + low

    def at_ranges(self, chunks: tuple[torch.Tensor, ...], ranges: list[tuple[float, float]]) -> torch.Tensor:
        """Each chunk fake-quantized at its own range, concatenated along the batch (the last range stays set)."""
        outputs = []
        for chunk, (low, high) in zip(chunks, ranges, strict=True):
            self.set_range(low, high)
            outputs.append(self._fake_quantize(chunk))
        return torch.cat(outputs)


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
SEARCH_ELEMENTS = 1 << 24  # values of a stage input repeated for the candidates priced in one forward (64 MB)
QUANTILE_VALUES = 1_000_000  # the quantiles of a larger input are taken on a seeded subsample


class _Captured(Exception):
    """Ends a forward once the quantizer's input is captured: the candidates come from it."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


def candidate_ranges(x: torch.Tensor, symmetric: bool, levels: int) -> list[tuple[float, tuple[float, float]]]:
    """(quantile, (low, high)) for each clipping quantile of `x`, min/max first; a candidate within half a
    min/max quantization step of one already listed quantizes alike and is dropped (the larger quantile
    is kept, as a tie in the search would pick it)."""
    values = x.detach().flatten().float()
    if values.numel() > QUANTILE_VALUES:
        values = values[torch.randint(values.numel(), (QUANTILE_VALUES,), generator=torch.Generator().manual_seed(0))]
    ordered = values.sort().values
    at = lambda q: float(ordered[round(q * (len(ordered) - 1))])  # noqa: E731  (nearest rank: one sort for all)
    ranges = []
    for q in CLIP_QUANTILES:
        low, high = min(at(1 - q), 0.0), at(q)  # the range always contains zero (`set_range`)
        if symmetric:
            low, high = -max(-low, abs(high)), max(-low, abs(high))
        ranges.append((q, (low, high)))
    tolerance = max(ranges[0][1][1] - ranges[0][1][0], 1e-8) / levels / 2  # CLIP_QUANTILES[0] is min/max
    kept: list[tuple[float, tuple[float, float]]] = []
    for q, (low, high) in ranges:
        if all(abs(low - a) > tolerance or abs(high - b) > tolerance for _, (a, b) in kept):
            kept.append((q, (low, high)))
    return kept


def stages(module: nn.Module) -> list[nn.Module]:
    """`module` as a chain of stages that, run one after the other, compute its forward: nested plain
    `Sequential`s are flattened, any other module is one stage."""
    if type(module).forward is nn.Sequential.forward:
        return [stage for child in module for stage in stages(child)]
    return [module]


def _run(chain: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for stage in chain:
        x = stage(x)
    return x


def search_ranges(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seconds: float = math.inf,
                  on_step: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Loss-aware initial ranges: for each activation quantizer in forward order, the clipping quantile
    of its calibration inputs that gives the lowest task loss on (x, y) (`sample_losses`: cross-entropy, or
squared error for regression targets) with everything before it
    already quantized. Min/max (PTQ's choice) is a candidate, so the search never starts worse than PTQ;
    a range one outlier stretches (a channel 1000x larger than the rest) gets clipped instead.

    Cost: the layers before a quantizer run once (the input of every stage of `stages(module)` is kept
    as the search moves down the chain), the stage holding the quantizer and those after it run once
    for all its distinct candidates together (the stage input repeated along the batch, each copy
    quantized at one candidate; in groups of SEARCH_ELEMENTS values); a quantizer whose only distinct
    candidate is min/max costs no forward. The module must treat the samples of a batch independently
    (eval mode does). A quantizer whose pricing would end past `seconds` (at worst every candidate
    distinct, each a pass over its stage and the rest, as timed in a first pass) keeps min/max (as PTQ),
    its entry saying `candidates: 0`; fine-tuning still learns its range. `on_step(done, total)` follows."""
    quantizers = [m for m in module.modules() if isinstance(m, ActivationFakeQuant)]
    chain = stages(module.eval())
    deadline = time.perf_counter() + seconds
    chosen: list[dict[str, Any]] = []
    with torch.no_grad():
        stage_seconds, value = [], x
        for stage in chain:  # min/max for every quantizer not yet initialised (where one not searched stays)
            begun = time.perf_counter()
            value = stage(value)
            stage_seconds.append(time.perf_counter() - begun)
        stage_input = x
        for index, stage in enumerate(chain):
            worst = len(CLIP_QUANTILES) * sum(stage_seconds[index:])
            for quantizer in (m for m in stage.modules() if isinstance(m, ActivationFakeQuant)):
                low, high = (float(b) for b in quantizer.bounds())
                entry = {"quantile": 1.0, "low": low, "high": high, "loss": None, "candidates": 0}
                if time.perf_counter() + worst <= deadline:
                    entry = _search_one(chain[index:], stage_input, quantizer, y)
                chosen.append(entry)
                if on_step is not None:
                    on_step(len(chosen), len(quantizers))
            stage_input = stage(stage_input)
    return chosen


def _search_one(chain: list[nn.Module], x: torch.Tensor, quantizer: ActivationFakeQuant, y: torch.Tensor) -> dict[str, Any]:
    """Price every distinct candidate range of `quantizer` (in `chain[0]`, whose input is `x`) and set the best."""
    def capture(m: nn.Module, args: tuple) -> None:
        raise _Captured(args[0])

    hook = quantizer.register_forward_pre_hook(capture)
    try:
        chain[0](x)
        raise AssertionError("the quantizer is not run by its stage")
    except _Captured as captured:
        candidates = candidate_ranges(captured.value, quantizer.symmetric, quantizer.levels)
    finally:
        hook.remove()
    losses: list[float] = []
    if len(candidates) > 1:
        group_size = max(1, SEARCH_ELEMENTS // x.numel())
        for start in range(0, len(candidates), group_size):
            group = [r for _, r in candidates[start:start + group_size]]
            hook = quantizer.register_forward_hook(lambda m, args, out: m.at_ranges(args[0].chunk(len(group)), group))
            try:
                logits = _run(chain, x.repeat(len(group), *[1] * (x.dim() - 1)))
            finally:
                hook.remove()
            per_sample = sample_losses(logits, y.repeat(len(group), *[1] * (y.dim() - 1)))
            losses += per_sample.view(len(group), len(y)).mean(1).tolist()
    best = min(range(len(candidates)), key=lambda i: (losses[i], -candidates[i][0])) if losses else 0
    quantile, (low, high) = candidates[best]
    quantizer.set_range(low, high)
    return {"quantile": quantile, "low": low, "high": high, "loss": losses[best] if losses else None,
            "candidates": len(candidates)}
