"""Quantization beyond static PTQ: dynamic INT8, and QAT and mixed precision when static INT8 misses the gate."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from toolchain.core.config import load_config
from toolchain.core.data import load_dataset
from toolchain.runtime.sessions import model_logits
from toolchain.passes.torch.export_onnx import ExportOnnxPass
from toolchain.passes.onnx.quantize_dynamic import QuantizeDynamicPass
from toolchain.passes.onnx.quantize_int8 import QuantizeInt8Pass
from toolchain.passes.onnx.quantize_mixed import MixedPrecisionPass
from toolchain.quantize.int8 import validation_accuracy
from toolchain.passes.torch.quantize_qat import QuantizeQatPass
from toolchain.quantize.qat import ActivationFakeQuant, candidate_ranges, prepare_qat, search_ranges
from toolchain.passes.torch.train import TrainPass
from toolchain.targets.profiles import resolve_target
from toolchain.core.contract import BuildContext
from toolchain.build.workflow import plan_passes, run_passes

pytestmark = pytest.mark.slow  # trains models

MODEL = """from torch import nn
def build_model(input_shape, num_classes, hidden=32):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
"""


def project(root: Path, noise_scale: float) -> Path:
    """Six informative features and one loud, useless one: per-tensor INT8 of the input crushes the
    informative ones, so the first layer is the sensitive one."""
    rng = np.random.default_rng(0)
    y = np.arange(900) % 3
    x = np.concatenate([rng.normal(size=(900, 6)) * 0.5 + np.eye(3, 6)[y], rng.normal(size=(900, 1)) * noise_scale], axis=1)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "d.npz", x=x, y=y)
    (root / "model.py").write_text(MODEL)
    (root / "toolchain.toml").write_text('[project]\nname = "mix"\n[model]\nentry = "model.py:build_model"\ninput_shape = [7]\n'
                                         '[data]\nsource = "npz:d.npz"\n[train]\nepochs = 60\n'
                                         '[compress]\nquantize = ["int8", "dynamic"]\nmax_accuracy_drop = 0.01\n')
    return root / "toolchain.toml"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mix")
    config = load_config(project(root / "p", noise_scale=25))
    ctx = BuildContext(config=config, profile=resolve_target("raspberry-pi-5"), dataset=load_dataset(config, 0),
                       out_dir=root / "out", work_dir=root)
    ctx.console.quiet = True
    artifact = run_passes([TrainPass(), ExportOnnxPass(), QuantizeInt8Pass(), QuantizeDynamicPass(), MixedPrecisionPass()], ctx)
    return artifact, ctx


def test_mixed_precision_keeps_the_sensitive_layer_in_float(built) -> None:
    artifact, ctx = built
    report = artifact.metrics["mixed"]
    assert report["validation_int8_drop"] > ctx.config.compress.max_accuracy_drop  # PTQ alone misses the gate
    ranked = list(report["sensitivity"])
    assert ranked[0] == report["float_layers"][0] and report["sensitivity"][ranked[0]] > 0.01
    mixed = artifact.candidate("onnx-mixed")
    assert mixed.precision == "mixed" and 0 < len(mixed.metrics["float_layers"]) < len(ranked)
    x, y = ctx.dataset.x_val, ctx.dataset.y_val
    assert validation_accuracy(artifact.reference.path, x, y) - validation_accuracy(mixed.path, x, y) <= 0.01
    graph = onnx.load(str(mixed.path)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the rest is still INT8


def test_dynamic_int8_runs_and_matches_fp32_closely(built) -> None:
    artifact, ctx = built
    dynamic = artifact.candidate("onnx-int8-dynamic")
    assert dynamic.precision == "int8" and dynamic.bytes < artifact.reference.bytes
    ops = {n.op_type for n in onnx.load(str(dynamic.path)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    logits = model_logits(dynamic.path, ctx.dataset.x_val)
    assert logits.shape == (len(ctx.dataset.x_val), 3)


def test_mixed_is_skipped_when_int8_is_already_good(tmp_path: Path) -> None:
    config = load_config(project(tmp_path / "p", noise_scale=0.5))
    ctx = BuildContext(config=config, profile=resolve_target("raspberry-pi-5"), dataset=load_dataset(config, 0),
                       out_dir=tmp_path / "out", work_dir=tmp_path)
    ctx.console.quiet = True
    artifact = run_passes([TrainPass(), ExportOnnxPass(), QuantizeInt8Pass(), QuantizeQatPass(), MixedPrecisionPass()], ctx)
    assert artifact.metrics["qat"]["decision"].startswith("not needed")
    assert artifact.metrics["mixed"]["decision"].startswith("not needed")
    assert [c.name for c in artifact.candidates] == ["onnx-fp32", "onnx-int8-qdq"]


def test_qat_recovers_what_static_int8_loses(tmp_path: Path) -> None:
    """The loud useless feature stretches the input's per-tensor range, so static INT8 crushes the six
    informative ones (PTQ forced to fail: min/max loses 10+ pp; the percentile and entropy ranges the
    quantize-int8 pass also tries clip part of that, and still miss the gate); QAT clips that range and
    adapts the weights to the grid."""
    config = load_config(project(tmp_path / "p", noise_scale=60))
    ctx = BuildContext(config=config, profile=resolve_target("raspberry-pi-5"), dataset=load_dataset(config, 0),
                       out_dir=tmp_path / "out", work_dir=tmp_path)
    ctx.console.quiet = True
    artifact = run_passes([TrainPass(), ExportOnnxPass(), QuantizeInt8Pass(), QuantizeQatPass(), MixedPrecisionPass()], ctx)
    report, limit = artifact.metrics["qat"], config.compress.max_accuracy_drop
    assert report["validation_int8_drop"] > limit  # static INT8 really fails, with the best calibration method
    assert report["validation_qat_drop"] <= limit, report
    assert report["ranges"][0]["quantile"] < 1.0  # the input range was clipped, not min/max
    qat = artifact.candidate("onnx-int8-qat")
    graph = onnx.load(str(qat.path)).graph
    assert qat.precision == "int8" and sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 3
    int8_weights = lambda path: sorted(tuple(t.dims) for t in onnx.load(str(path)).graph.initializer  # noqa: E731
                                       if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2)
    assert int8_weights(qat.path) == int8_weights(artifact.candidate("onnx-int8-qdq").path) == [(3, 32), (32, 7), (32, 32)]
    # Held-out test split (180 samples: one is 0.56 pp): QAT INT8 close to FP32, static INT8 further.
    x, y = ctx.dataset.x_test, ctx.dataset.y_test
    fp32 = validation_accuracy(artifact.reference.path, x, y)
    qat_drop = fp32 - validation_accuracy(qat.path, x, y)
    static_drop = fp32 - validation_accuracy(artifact.candidate("onnx-int8-qdq").path, x, y)
    assert qat_drop <= 0.03 and static_drop > qat_drop, (qat_drop, static_drop)
    assert artifact.metrics["mixed"]["decision"].startswith("not needed: onnx-int8-qat")  # QAT made it unnecessary


class Residual(torch.nn.Module):
    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def test_range_search_prices_all_candidates_at_once_as_plain_forwards_would() -> None:
    """The search prices a quantizer's candidates in one batched forward from its stage's input, here a
    residual block (the skip path sees the repeated batch too): the losses are those of one plain
    forward per candidate, and the lowest wins. With no time left, every range stays min/max."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())), nn.Conv2d(3, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(64, 3, 6, 6)
    x[:, 0] *= torch.where(torch.rand(64, 1, 1) < 0.05, 50.0, 1.0)  # a few loud samples stretch the range
    y = model(x).argmax(1)
    reference = prepare_qat(copy.deepcopy(model), symmetric_activations=False)
    first = next(m for m in reference.modules() if isinstance(m, ActivationFakeQuant))
    with torch.no_grad():
        reference(x)  # every quantizer at min/max, as the search starts
        candidates = candidate_ranges(x, symmetric=False, levels=first.levels)
        losses = []
        for _, (low, high) in candidates:
            first.set_range(low, high)
            losses.append(float(torch.nn.functional.cross_entropy(reference(x), y)))
    best = min(range(len(candidates)), key=lambda i: (losses[i], -candidates[i][0]))

    chosen = search_ranges(prepare_qat(copy.deepcopy(model), symmetric_activations=False), x, y)
    assert len(chosen) == 3 and len(candidates) > 1 and chosen[0]["candidates"] == len(candidates)
    assert chosen[0]["quantile"] == candidates[best][0] and chosen[0]["loss"] == pytest.approx(losses[best], rel=1e-5)
    untouched = search_ranges(prepare_qat(copy.deepcopy(model), symmetric_activations=False), x, y, seconds=0)
    assert [(r["quantile"], r["candidates"]) for r in untouched] == [(1.0, 0)] * 3
    step = (float(x.max()) - min(float(x.min()), 0.0)) / 255  # the zero point is an integer: bounds move < 1 step
    assert untouched[0]["low"] == pytest.approx(min(float(x.min()), 0.0), abs=step)
    assert untouched[0]["high"] == pytest.approx(float(x.max()), abs=step)


def test_the_profile_decides_which_quantizers_run(tmp_path: Path) -> None:
    config = load_config(project(tmp_path / "p", noise_scale=1))
    names = lambda target: [p.name for p in plan_passes(config, resolve_target(target))]  # noqa: E731
    assert "quantize-dynamic" in names("raspberry-pi-4") and "quantize-mixed" in names("raspberry-pi-4")
    assert not {"quantize-int8", "quantize-dynamic", "quantize-mixed"} & set(names("jetson-nano"))  # no INT8 on Maxwell
