"""What a torch module costs on a target: parameters, MACs, FLOPs and predicted latency, measured on its
real ONNX export (the graph the device will run), so distillation and pruning choose widths by the same
numbers the gate later checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.export.onnx import export_module
from toolchain.perf.graph_cost import analyze
from toolchain.perf.roofline import predict
from toolchain.targets.profiles import Profile


def count_macs_params(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs for one sample, parameters), counted by torch-pruning's op counter."""
    import torch_pruning as tp

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(module, torch.zeros(1, *input_shape))
    finally:
        module.train(was_training)
    return int(macs), int(params)


def module_cost(module: nn.Module, input_shape: tuple[int, ...], profile: Profile, path: Path) -> dict[str, Any]:
    """Params, MACs, FLOPs and predicted latency on `profile` of a module, via its real ONNX export."""
    module = module.cpu()
    was_training = module.training
    try:
        export_module(module, input_shape, path)
    finally:
        module.train(was_training)
    cost = analyze(path)
    macs, params = count_macs_params(module, input_shape)
    return {"parameters": params, "macs": macs, "flops": int(cost.flops),
            "latency_ms_predicted": round(predict(cost, profile).latency_ms, 6)}
