"""The roofline cost model on real exported models: FLOPs by hand, int8 QDQ, bounds, memory."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from toolchain.perf.graph_cost import analyze

from toolchain.perf.roofline import predict, roofline_fraction
from toolchain.errors import ToolchainError
from toolchain.targets.profiles import load_profile_file

CIN, COUT, K, H, W, CLASSES = 1, 4, 3, 8, 8, 10

PROFILE_TOML = """
id = "test-board"
name = "Test board"
aliases = ["tb"]

[cpu]
arch = "aarch64"
cores = 4
freq_ghz = 1.5
isa = ["neon"]

[memory]
ram_mb = 4096
bandwidth_gbs = 10.0

[compute]
fp32_gflops = 100.0
fp16_gflops = 200.0
int8_gops = 400.0
op_overhead_us = 5.0

[compute.cpu]
fp32_gflops = 10.0
fp16_gflops = 10.0
int8_gops = 20.0

[runtime]
formats = ["onnx"]
providers = ["CPUExecutionProvider"]
precisions = ["int8", "fp16", "fp32"]

[budget]
latency_ms = 10.0
model_mb = 1.0
ram_mb = 64.0
"""


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(CIN, COUT, K, padding=1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(COUT * H * W, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def _export(module: torch.nn.Module, path: Path, dynamo: bool, dtype: torch.dtype = torch.float32) -> Path:
    x = torch.randn(1, CIN, H, W, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=18, external_data=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("costmodel")
    module = TinyNet().eval()
    fp32 = _export(module, root / "fp32.onnx", dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((1, CIN, H, W)).astype(np.float32)} for _ in range(8)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    int8 = root / "int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    fp16 = _export(TinyNet().eval().half(), root / "fp16.onnx", dynamo=False, dtype=torch.float16)
    return {"module": module, "fp32": fp32, "int8": int8, "fp16": fp16, "root": root}


@pytest.fixture
def profile(tmp_path: Path):
    path = tmp_path / "board.toml"
    path.write_text(PROFILE_TOML)
    return load_profile_file(path)


def _op(cost, op_type: str):
    matches = [op for op in cost.ops if op.op_type == op_type and not op.free]
    assert len(matches) == 1, [op.to_dict() for op in cost.ops]
    return matches[0]


def test_conv_and_gemm_flops_equal_the_formula(models):
    cost = analyze(models["fp32"])
    conv_flops = 2 * 1 * COUT * H * W * (CIN // 1) * K * K + COUT * H * W  # + bias
    gemm_flops = 2 * 1 * CLASSES * (COUT * H * W) + CLASSES  # 2*M*N*K + bias
    assert _op(cost, "Conv").flops == conv_flops
    assert _op(cost, "Gemm").flops == gemm_flops
    assert cost.flops == conv_flops + gemm_flops  # the ReLU is fused into the conv


def test_bytes_count_inputs_outputs_and_weights(models):
    cost = analyze(models["fp32"])
    conv_elems = CIN * H * W + COUT * CIN * K * K + COUT + COUT * H * W
    assert _op(cost, "Conv").bytes == 4 * conv_elems
    gemm_elems = COUT * H * W + CLASSES * COUT * H * W + CLASSES + CLASSES
    assert _op(cost, "Gemm").bytes == 4 * gemm_elems


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_parameter_count_equals_torch(models, dynamo):
    path = models["fp32"] if not dynamo else _export(models["module"], models["root"] / "dynamo.onnx", dynamo=True)
    cost = analyze(path)
    expected = sum(p.numel() for p in models["module"].parameters())
    assert cost.param_count == expected
    assert cost.param_bytes == 4 * expected
    assert cost.kernel_ops == 2  # Conv(+Relu), Gemm; Flatten/Reshape is a view


def test_free_ops_and_peak_memory(models):
    cost = analyze(models["fp32"])
    notes = {op.op_type: op.note for op in cost.ops if op.free}
    assert set(notes) == {"Relu", "Flatten"}
    assert notes["Relu"].startswith("fused into Conv")
    # Peak: graph input and conv output are live together; the Gemm output is smaller.
    assert cost.peak_activation_bytes == 4 * (CIN * H * W + COUT * H * W)
    assert cost.weights_bytes == cost.param_bytes
    assert cost.peak_memory_bytes == cost.weights_bytes + cost.peak_activation_bytes
    assert any("batch" in a for a in cost.assumptions)


def test_qdq_int8_ops_are_int8_and_cheaper(models, profile):
    fp32, int8 = analyze(models["fp32"]), analyze(models["int8"])
    assert _op(int8, "Conv").precision == "int8"
    assert _op(int8, "Gemm").precision == "int8"
    assert _op(fp32, "Conv").precision == "fp32"
    # Same arithmetic, fewer bytes: the fused kernels read int8 weights and activations.
    assert _op(int8, "Conv").flops == _op(fp32, "Conv").flops
    assert _op(int8, "Conv").bytes < _op(fp32, "Conv").bytes
    assert int8.weights_bytes < fp32.weights_bytes
    # Weight DQs and Q->DQ pairs between fused ops are free; only input Q and output DQ run.
    kernels = sorted(op.op_type for op in int8.ops if not op.free)
    assert kernels == ["Conv", "DequantizeLinear", "Gemm", "QuantizeLinear"]
    p32, p8 = predict(fp32, profile), predict(int8, profile)
    assert p8.compute_ms < p32.compute_ms
    assert p8.memory_ms < p32.memory_ms


def test_fp16_model_uses_the_fp16_peak(models, profile):
    cost = analyze(models["fp16"])
    conv = _op(cost, "Conv")
    assert conv.precision == "fp16"
    row = next(r for r in predict(cost, profile).ops if r["op_type"] == "Conv")
    assert row["compute_ms"] == pytest.approx(conv.flops / 200e9 * 1000)


def test_bound_flips_with_bandwidth(models, profile):
    cost = analyze(models["fp32"])
    starved = predict(cost, dataclasses.replace(profile, bandwidth_gbs=1e-3))
    flooded = predict(cost, dataclasses.replace(profile, bandwidth_gbs=1e6))
    kernel_rows = lambda p: [r for r in p.ops if r["bound"] != "free"]  # noqa: E731
    assert {r["bound"] for r in kernel_rows(starved)} == {"memory"}
    assert {r["bound"] for r in kernel_rows(flooded)} == {"compute"}
    assert starved.memory_bound_ms == pytest.approx(starved.roofline_ms) and starved.compute_bound_ms == 0
    assert flooded.compute_bound_ms == pytest.approx(flooded.roofline_ms) and flooded.memory_bound_ms == 0


def test_prediction_adds_up(models, profile):
    cost = analyze(models["fp32"])
    pred = predict(cost, profile)
    assert pred.overhead_ms == pytest.approx(cost.kernel_ops * profile.op_overhead_us / 1000)
    assert pred.latency_ms == pytest.approx(pred.roofline_ms + pred.overhead_ms)
    assert pred.roofline_ms == pytest.approx(pred.compute_bound_ms + pred.memory_bound_ms)
    assert pred.roofline_ms == pytest.approx(sum(max(r["compute_ms"], r["memory_ms"]) for r in pred.ops))
    assert pred.peak_memory_mb == pytest.approx(cost.peak_memory_bytes / 2**20)
    # The CPU unit of this profile is 10x slower at fp32.
    on_cpu = predict(cost, profile, unit="cpu")
    assert on_cpu.compute_ms == pytest.approx(pred.compute_ms * 10)
    with pytest.raises(ValueError, match="unit"):
        predict(cost, profile, unit="gpu")
    json.dumps(cost.to_dict())
    json.dumps(pred.to_dict())


def test_roofline_fraction():
    assert roofline_fraction(1.0, 4.0) == 0.25
    with pytest.raises(ValueError):
        roofline_fraction(1.0, 0.0)


def test_accepts_a_proto_without_changing_it(models):
    proto = onnx.load(str(models["fp32"]))
    before = proto.SerializeToString()
    assert analyze(proto).flops == analyze(models["fp32"]).flops
    assert proto.SerializeToString() == before


def test_unreadable_model_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    with pytest.raises(ToolchainError, match="cannot read ONNX model"):
        analyze(bad)
