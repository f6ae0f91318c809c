"""The latency-aware INT8 variant (`onnx-int8-fast`, the layers profiled slower in INT8 on this host
kept in float) on a small MobileNetV2, and how the gate judges two INT8 candidates. Whether the
variant is added depends on this host's timing, so the tests check structure and consistency (the
recorded timings support the decision), never a timing threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.passes.test_gate import candidate, gate
from tests.passes.test_quantize_int8_calibration import trial_calibration
from toolchain.core.artifact import Artifact
from toolchain.core.config import load_config
from toolchain.core.data import load_dataset
from toolchain.passes.torch.export_onnx import ExportOnnxPass
from toolchain.passes.onnx.quantize_int8 import EVERY_SLOWER, FAST_MIN_GAIN, LEADING_SLOWER, QuantizeInt8Pass
from toolchain.quantize.int8 import prepared_reference, quantize_int8, representative_samples, validation_accuracy
from toolchain.quantize.profiling import OTHER, leading_nodes, node_times, profile_kernels, slower_in_int8
from toolchain.passes.torch.train import TrainPass
from toolchain.targets.profiles import resolve_target
from toolchain.core.contract import BuildContext
from toolchain.build.workflow import run_passes

pytestmark = pytest.mark.slow  # trains a MobileNetV2

DATA = """import numpy as np
def load():
    rng = np.random.default_rng(0)
    y = np.arange(400) % 4
    grid = np.linspace(-1, 1, 32, dtype=np.float32)
    angle = y[:, None, None] * np.pi / 4
    x = np.sin(6 * (np.cos(angle) * grid[None, :, None] + np.sin(angle) * grid[None, None, :]))
    x = np.repeat(x[:, None], 3, axis=1) + rng.normal(scale=0.3, size=(400, 3, 32, 32))
    return x.astype(np.float32), y
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Artifact, BuildContext]:
    """A width-0.35 MobileNetV2 on seeded 3x32x32 gratings, trained two epochs, then INT8-quantized."""
    root = tmp_path_factory.mktemp("fast")
    (root / "data.py").write_text(DATA)
    (root / "toolchain.toml").write_text(
        '[project]\nname = "mnv2"\n[model]\nentry = "zoo:mobilenet_v2"\ninput_shape = [3, 32, 32]\n'
        'labels = ["a", "b", "c", "d"]\nkwargs = { width_mult = 0.35, last_channels = 128 }\n'
        '[data]\nsource = "python:data.py:load"\n[train]\nepochs = 2\nbatch_size = 32\n'
        '[compress]\nquantize = ["int8"]\ncalibration_samples = 64\n')
    config = load_config(root / "toolchain.toml")
    ctx = BuildContext(config=config, profile=resolve_target("raspberry-pi-5"), dataset=load_dataset(config, 0),
                       out_dir=root / "out", work_dir=root / "work", seed=0)
    ctx.work_dir.mkdir()
    ctx.console.quiet = True
    return run_passes([TrainPass(), ExportOnnxPass(), QuantizeInt8Pass()], ctx), ctx


def float_and_int8_layers(path: Path) -> tuple[set[str], set[str]]:
    """Conv/Gemm nodes by how they run: data and weight from DequantizeLinear (INT8 kernel) or plain float."""
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    int8 = {n.name for n in layers if n.input[0] in dequantized and n.input[1] in dequantized}
    return {n.name for n in layers} - int8, int8


def test_the_profile_covers_every_layer_and_finds_the_slower_ones(built, tmp_path: Path) -> None:
    """Independent of this host's speed: every Conv/Gemm of MobileNetV2 gets a time in FP32 and in INT8,
    and the slower set is exactly those whose INT8 time is the larger."""
    artifact, ctx = built
    prepared = prepared_reference(artifact, ctx)
    plain = artifact.candidate("onnx-int8-qdq")
    layers = {n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Conv", "Gemm")}
    assert len(layers) == 53 and float_and_int8_layers(plain.path) == (set(), layers)  # 52 convs and the head
    fp32 = node_times(prepared, profile_kernels(prepared, ctx.dataset.input_shape, tmp_path))
    int8 = node_times(plain.path, profile_kernels(plain.path, ctx.dataset.input_shape, tmp_path))
    assert set(fp32) - {OTHER} == set(int8) - {OTHER} == layers
    slower = slower_in_int8(fp32, int8)
    assert set(slower) == {name for name in layers if int8[name] > fp32[name]}
    assert all(slower[name] == {"fp32_us": fp32[name], "int8_us": int8[name]} for name in slower)


def test_a_variant_keeps_exactly_the_claimed_layers_in_float_and_its_accuracy(built) -> None:
    """Independent of timing: the stem, the first depthwise conv and a later one given as slower, the
    variant from the input keeps the first two in float, and its accuracy stays."""
    artifact, ctx = built
    prepared = prepared_reference(artifact, ctx)
    convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    leading = leading_nodes(prepared, [convs[0], convs[1], convs[7]])
    assert leading == convs[:2]
    plain = artifact.candidate("onnx-int8-qdq")
    chosen = next(t for t in artifact.metrics["int8_calibration"]["trials"] if t["label"] == plain.metrics["calibration"])
    samples = representative_samples(ctx.dataset.x_train, chosen["samples"], ctx.seed)
    variant = ctx.work_path("test-variant.onnx")
    quantize_int8(prepared, variant, samples, ctx.profile.providers, exclude=leading, calibration=trial_calibration(chosen))
    floats, int8 = float_and_int8_layers(variant)
    assert floats == set(leading) and len(int8) == 51
    x, y = ctx.dataset.x_val, ctx.dataset.y_val
    assert abs(validation_accuracy(variant, x, y) - validation_accuracy(plain.path, x, y)) <= 0.01


def test_the_recorded_timings_support_the_decision(built) -> None:
    artifact, ctx = built
    report = artifact.metrics["int8_fast"]
    assert any(note.startswith("latency-aware INT8: ") for note in ctx.notes)
    timings = report["int8_vs_fp32_p50_ms"]
    names = [c.name for c in artifact.candidates]
    if timings["onnx-int8-qdq"] >= timings["fp32"]:
        assert report["decision"].startswith("skipped") and "p50_ms" not in report and "onnx-int8-fast" not in names
        return
    profile = report["profile_us"]
    assert report["slower_in_int8"] == [name for name, us in profile.items() if us["int8"] > us["fp32"]]
    if not report["slower_in_int8"]:
        assert report["variants"] == {} and report["decision"].startswith("not added: no layer") and "onnx-int8-fast" not in names
        return
    assert report["variants"][EVERY_SLOWER] == report["slower_in_int8"]
    leading = leading_nodes(prepared_reference(artifact, ctx), report["slower_in_int8"])
    assert report["variants"].get(LEADING_SLOWER, report["slower_in_int8"]) == (leading or report["slower_in_int8"])
    p50 = report["p50_ms"]
    assert set(p50) == {"onnx-int8-qdq", *report["variants"]}
    assert report["best"] == min(report["variants"], key=p50.__getitem__)
    assert report["gain"] == pytest.approx(1 - p50[report["best"]] / p50["onnx-int8-qdq"], abs=1e-4)
    if report["gain"] < FAST_MIN_GAIN:
        assert report["decision"].startswith("not added") and "onnx-int8-fast" not in names
        return
    assert report["decision"].startswith("added") and names == ["onnx-fp32", "onnx-int8-qdq", "onnx-int8-fast"]
    fast = artifact.candidate("onnx-int8-fast")
    assert fast.precision == "int8" and fast.metrics["float_layers"] == report["float_layers"] == report["variants"][report["best"]]
    floats, _ = float_and_int8_layers(fast.path)
    assert floats == set(report["float_layers"])
    x, y = ctx.dataset.x_val, ctx.dataset.y_val
    plain = artifact.candidate("onnx-int8-qdq")
    assert abs(validation_accuracy(fast.path, x, y) - validation_accuracy(plain.path, x, y)) <= 0.01


def test_an_mlp_is_profiled_like_any_model(tmp_path: Path) -> None:
    """No stem, no depthwise conv: its Gemm layers are profiled all the same when INT8 is faster here;
    either way the decision and the calibration choice are recorded, and no final activation is tried in float."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(200, 5)).astype(np.float32), y=np.arange(200) % 2)
    (tmp_path / "model.py").write_text("from torch import nn\ndef build_model(input_shape, num_classes):\n"
                                       "    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))\n")
    (tmp_path / "toolchain.toml").write_text('[project]\nname = "mlp"\n[model]\nentry = "model.py:build_model"\ninput_shape = [5]\n'
                                            '[data]\nsource = "npz:d.npz"\n[train]\nepochs = 2\n')
    config = load_config(tmp_path / "toolchain.toml")
    ctx = BuildContext(config=config, profile=resolve_target("raspberry-pi-5"), dataset=load_dataset(config, 0),
                       out_dir=tmp_path / "out", work_dir=tmp_path)
    ctx.console.quiet = True
    artifact = run_passes([TrainPass(), ExportOnnxPass(), QuantizeInt8Pass()], ctx)
    calibration, report = artifact.metrics["int8_calibration"], artifact.metrics["int8_fast"]
    assert calibration["final_activations"] == [] and len(calibration["trials"]) == 3
    assert report["decision"].startswith(("skipped", "not added", "added"))
    if not report["decision"].startswith("skipped"):
        assert set(report["profile_us"]) == {n.name for n in onnx.load(str(artifact.reference.path)).graph.node if n.op_type == "Gemm"}


def test_the_faster_of_two_int8_candidates_ships() -> None:
    """One precision, nothing traded: the fast variant needs only to be faster than the plain INT8 (not
    `min_speedup`), while the plain INT8 still needs `min_speedup` over FP32."""
    fp32, plain = candidate("fp32", "fp32", 0, 1.0, 1.0), candidate("int8", "int8", 0.002, 0.48, 0.4)
    result = gate(fp32, plain, candidate("int8-fast", "int8", 0.001, 0.46, 0.39))
    assert result.shipped.name == "int8-fast" and "superseded by int8-fast" in result.candidate("int8").verdict
    slower = gate(fp32, plain, candidate("int8-fast", "int8", 0.001, 0.49, 0.39))
    assert slower.shipped.name == "int8" and "need >= 1.00x on both" in slower.candidate("int8-fast").verdict
    alone = gate(fp32, candidate("int8", "int8", 0.05, 0.48, 0.4), candidate("int8-fast", "int8", 0.004, 0.46, 0.39))
    assert alone.shipped.name == "int8-fast" and "vs fp32" in alone.candidate("int8-fast").verdict
