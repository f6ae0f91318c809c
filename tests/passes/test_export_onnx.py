"""The export check (onnxruntime vs torch) judges differences against the outputs' scale: a regression
on prices in the hundreds of thousands differs by a few hundredths between two faithful runtimes
(float32 rounding), which an absolute 1e-4 took for an exporter bug and failed the build on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from toolchain.core.artifact import Artifact
from toolchain.core.config import parse_config
from toolchain.core.contract import BuildContext
from toolchain.core.data import load_dataset
from toolchain.export.onnx import TOLERANCE, output_scale
from toolchain.passes.torch.export_onnx import ExportOnnxPass
from toolchain.targets.profiles import resolve_target


def test_large_regression_outputs_export_within_a_tolerance_relative_to_their_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "prices.npz", x=rng.normal(size=(200, 10)).astype(np.float32),
             y=rng.uniform(1e5, 7e5, 200).astype(np.float32))
    config = parse_config('[project]\nname = "prices"\n[model]\nentry = "m.py:f"\ninput_shape = [10]\ntask = "regression"\n'
                          '[data]\nsource = "npz:prices.npz"\n', tmp_path / "toolchain.toml")
    ctx = BuildContext(config=config, profile=resolve_target("rpi5"), dataset=load_dataset(config, 0), out_dir=tmp_path / "out",
                       work_dir=tmp_path, console=Console(file=io.StringIO()))
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    with torch.no_grad():  # what training on such targets ends with: outputs ~4e5
        module[2].weight.mul_(1e5)
        module[2].bias.fill_(3e5)
    export = ExportOnnxPass().run(Artifact(module=module), ctx).metrics["export"]
    assert export["output_scale"] > 1e5
    assert TOLERANCE < export["max_abs_difference_vs_torch"] <= TOLERANCE * export["output_scale"]  # rounding, not a bug
    assert output_scale(np.array([[0.2, -0.5]])) == 1.0  # logits and probabilities keep the absolute tolerance
