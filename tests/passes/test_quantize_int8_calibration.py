"""The quantize-int8 pass chooses its calibration (method, final activation in float) by the build's
metric on validation, and the layers it keeps in float from onnxruntime's per-layer profile: checked
on small models with real onnxruntime, every recorded number recomputed here with bare sessions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.config import load_config
from toolchain.core.contract import BuildContext
from toolchain.core.data import load_dataset
from toolchain.export.onnx import export_module
from toolchain.passes.onnx.quantize_int8 import QuantizeInt8Pass
from toolchain.quantize.calibration_choice import choose_calibration, final_activations
from toolchain.quantize.int8 import Calibration, quantize_int8, representative_samples
from toolchain.quantize.profiling import OTHER, leading_nodes, node_times, profile_kernels
from toolchain.targets.profiles import resolve_target


def bare_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def trial_calibration(trial: dict) -> Calibration:
    """The calibration a recorded trial used (its percentile is recorded for the percentile method only)."""
    return Calibration(trial["method"], trial["percentile"] or Calibration().percentile)


def context(root: Path, x: np.ndarray, y: np.ndarray, input_shape: list[int]) -> BuildContext:
    np.savez(root / "d.npz", x=x, y=y)
    (root / "model.py").write_text("def build_model(input_shape, num_classes):\n    raise NotImplementedError\n")
    (root / "toolchain.toml").write_text(f'[project]\nname = "q"\n[model]\nentry = "model.py:build_model"\ninput_shape = {input_shape}\n'
                                         '[data]\nsource = "npz:d.npz"\n[compress]\nquantize = ["int8"]\n')
    config = load_config(root / "toolchain.toml")
    ctx = BuildContext(config=config, profile=resolve_target("raspberry-pi-5"), dataset=load_dataset(config, 0),
                       out_dir=root / "out", work_dir=root / "work", seed=0)
    ctx.work_dir.mkdir()
    ctx.console.quiet = True
    return ctx


@pytest.fixture(scope="module")
def softmax_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Artifact, BuildContext]:
    """A classifier whose file ends in Softmax (it emits probabilities), on six informative features and
    one loud useless one (its outliers stretch min/max ranges, so the methods differ), quantized by the pass."""
    root = tmp_path_factory.mktemp("softmax")
    rng = np.random.default_rng(0)
    y = np.arange(900) % 3
    x = np.concatenate([rng.normal(size=(900, 6)) * 0.5 + np.eye(3, 6)[y], rng.standard_t(2, size=(900, 1)) * 10], axis=1)
    ctx = context(root, x.astype(np.float32), y, [7])
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(7, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.Adam(body.parameters(), lr=0.01)
    features, labels = torch.from_numpy(ctx.dataset.x_train), torch.from_numpy(ctx.dataset.y_train)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(body(features), labels).backward()
        optimizer.step()
    fp32 = ctx.work_path("model-fp32.onnx")
    export_module(torch.nn.Sequential(body, torch.nn.Softmax(dim=1)), (7,), fp32)
    artifact = Artifact(candidates=[Candidate(name="onnx-fp32", precision="fp32", path=fp32)])
    return QuantizeInt8Pass().run(artifact, ctx), ctx


def test_the_chosen_calibration_has_the_smallest_validation_drop_of_those_tried(softmax_build, tmp_path: Path) -> None:
    """Every trial is rebuilt here and scored with a bare onnxruntime session: the recorded numbers are
    those, and the chosen one is the first of the smallest drops (ties go to the simplest)."""
    artifact, ctx = softmax_build
    report = artifact.metrics["int8_calibration"]
    prepared = ctx.work_path("model-fp32-prepared.onnx")
    x, y = ctx.dataset.x_val, ctx.dataset.y_val
    fp32 = float((bare_outputs(artifact.reference.path, x).argmax(axis=1) == y).mean())
    assert report["metric"] == "accuracy" and report["validation_fp32"] == pytest.approx(fp32)
    assert [t["method"] for t in report["trials"]][:3] == ["minmax", "percentile", "entropy"]
    drops = []
    for index, trial in enumerate(report["trials"]):
        path = tmp_path / f"trial-{index}.onnx"
        samples = representative_samples(ctx.dataset.x_train, trial["samples"], ctx.seed)
        quantize_int8(prepared, path, samples, ctx.profile.providers, exclude=trial["float_nodes"], calibration=trial_calibration(trial))
        value = float((bare_outputs(path, x).argmax(axis=1) == y).mean())
        assert trial["validation_value"] == pytest.approx(value) and trial["validation_drop"] == pytest.approx(fp32 - value)
        drops.append(fp32 - value)
    assert report["trials"][0]["samples"] == 256 and report["trials"][1]["samples"] == 16  # min/max sees more samples
    chosen = min(range(len(drops)), key=lambda i: round(drops[i], 9))
    assert report["chosen"] == report["trials"][chosen]["label"]
    plain = artifact.candidate("onnx-int8-qdq")
    assert plain.metrics["calibration"] == report["chosen"] and report["chosen"] in plain.metrics["method"]
    assert float((bare_outputs(plain.path, x).argmax(axis=1) == y).mean()) == pytest.approx(fp32 - drops[chosen])
    assert artifact.metrics["validation_metric"]["onnx-int8-qdq"] == pytest.approx(fp32 - drops[chosen])
    assert any(note.startswith("INT8 calibration: ") and report["chosen"] in note for note in ctx.notes)
    assert sorted(p.name for p in ctx.work_dir.glob("model-int8-trial-*")) == []  # the others are deleted


def test_a_final_softmax_is_tried_in_float(softmax_build, tmp_path: Path) -> None:
    artifact, ctx = softmax_build
    report = artifact.metrics["int8_calibration"]
    prepared = ctx.work_path("model-fp32-prepared.onnx")
    softmax = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and report["final_activations"] == final_activations(prepared) == softmax
    kept = [t for t in report["trials"] if t["float_nodes"]]
    best_method = min(report["trials"][:3], key=lambda t: round(t["validation_drop"], 9))
    assert len(kept) == 1 and kept[0]["float_nodes"] == softmax and kept[0]["method"] == best_method["method"]  # quick: best method only
    path = tmp_path / "kept.onnx"
    samples = representative_samples(ctx.dataset.x_train, kept[0]["samples"], ctx.seed)
    quantize_int8(prepared, path, samples, ctx.profile.providers, exclude=softmax, calibration=trial_calibration(kept[0]))
    graph = onnx.load(str(path)).graph
    node = next(n for n in graph.node if n.op_type == "Softmax")
    producer = {o: n.op_type for n in graph.node for o in n.output}
    assert producer[node.input[0]] == "DequantizeLinear" and node.output[0] in {o.name for o in graph.output}
    quantize_int8(prepared, tmp_path / "all.onnx", samples, ctx.profile.providers, calibration=trial_calibration(kept[0]))
    x = ctx.dataset.x_val
    assert len(np.unique(bare_outputs(tmp_path / "all.onnx", x))) <= 256  # a quantized Softmax: 8-bit probabilities
    probabilities = bare_outputs(path, x)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5) and len(np.unique(probabilities)) > 256


CNN_CHANNELS = 8


class SmallCnn(torch.nn.Module):
    """A stem conv, a depthwise conv, a 1x1 conv with a residual add, pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        c = CNN_CHANNELS
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.ReLU())
        self.depthwise = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1, groups=c), torch.nn.ReLU6())
        self.pointwise = torch.nn.Conv2d(c, c, 1)
        self.head = torch.nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.pointwise(self.depthwise(h))
        return self.head(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The small CNN's pre-processed FP32 file and its INT8 file, by the toolchain's quantizer."""
    root = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    fp32, prepared, int8 = root / "fp32.onnx", root / "prepared.onnx", root / "int8.onnx"
    export_module(SmallCnn().eval(), (3, 16, 16), fp32)
    from onnxruntime.quantization import quant_pre_process
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    samples = np.random.default_rng(0).normal(size=(16, 3, 16, 16)).astype(np.float32)
    quantize_int8(prepared, int8, samples, ("CPUExecutionProvider",))
    return prepared, int8


def test_the_profile_maps_every_quantized_layer_back_to_its_node(cnn, tmp_path: Path) -> None:
    prepared, int8 = cnn
    graph = onnx.load(str(int8)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[0] in dequantized and n.input[1] in dequantized}
    assert len(quantized) == 4  # stem, depthwise, pointwise, head
    for path in (prepared, int8):
        kernels = profile_kernels(path, (3, 16, 16), tmp_path)
        times = node_times(path, kernels)
        assert set(times) - {OTHER} == quantized and all(us > 0 for us in times.values())
        assert sum(times.values()) == pytest.approx(sum(kernels.values()))  # every kernel counted once
    assert not list(tmp_path.iterdir())  # the profiler's trace files are removed


def test_leading_layers_are_those_reached_from_the_input_through_float_layers_only(cnn) -> None:
    prepared, _ = cnn
    convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Conv", "Gemm")]
    stem, depthwise, pointwise, head = convs
    assert leading_nodes(prepared, [stem, depthwise, head]) == [stem, depthwise]
    assert leading_nodes(prepared, [depthwise, pointwise]) == []  # the stem before them stays INT8
    assert leading_nodes(prepared, convs) == convs


def test_the_thorough_budget_crosses_every_method_with_the_final_activation_in_float(softmax_build, tmp_path: Path) -> None:
    artifact, ctx = softmax_build
    thorough = dataclasses.replace(ctx, budget="thorough", work_dir=tmp_path, notes=[])
    fp32 = artifact.metrics["int8_calibration"]["validation_fp32"]
    choice = choose_calibration(ctx.work_path("model-fp32-prepared.onnx"), artifact.reference.path, thorough, fp32)
    trials = choice.report["trials"]
    methods = [(t["method"], t["percentile"], t["samples"]) for t in trials]
    assert methods[:4] == [("minmax", None, 256), ("percentile", 99.99, 128), ("percentile", 99.999, 128), ("entropy", None, 128)]
    assert methods[4:] == methods[:4] and [t["float_nodes"] for t in trials] == [[]] * 4 + [artifact.metrics["int8_calibration"]["final_activations"]] * 4
    best = min(range(len(trials)), key=lambda i: round(trials[i]["validation_drop"], 9))
    assert choice.report["chosen"] == trials[best]["label"] and choice.path.exists()
    assert [p.name for p in tmp_path.glob("model-int8-trial-*")] == [choice.path.name]
