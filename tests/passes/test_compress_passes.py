"""Distillation and structured pruning: smaller models that still export, run and keep their accuracy.

One teacher (the digits CNN at width 16, 15 epochs) is trained once per module; each test runs one
compression branch on a copy of it. Accuracy bounds on this small data (360 validation samples):
the distilled student and the pruned model must pass the toolchain's own gate on validation (the
default 0.01 for distillation; 0.03 for a 0.5 pruning ratio with an 8-epoch fine-tune, set in that
test's config), and the pruned ONNX model must be within 0.04 of the unpruned one on the test split.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from runtime_agent.bundle import read_bundle
from runtime_agent.model import LoadedModel
from runtime_agent.signing import load_public_key, write_keypair
from tests.conftest import REPO, run_cli
from toolchain.core.config import load_config
from toolchain.perf.graph_cost import analyze
from toolchain.perf.roofline import predict
from toolchain.core.data import load_dataset
from toolchain.passes.torch.distill import DistillPass, scale_widths, width_kwargs
from toolchain.perf.module_cost import count_macs_params, module_cost
from toolchain.passes.torch.export_onnx import ExportOnnxPass
from toolchain.export.onnx import export_module
from toolchain.passes.torch.prune import PrunePass, prune_module
from toolchain.passes.onnx.quantize_int8 import QuantizeInt8Pass
from toolchain.passes.torch.quantize_qat import QuantizeQatPass
from toolchain.passes.torch.train import TrainPass
from toolchain.targets.profiles import load_profile_file, resolve_target
from toolchain.core.contract import BuildContext
from toolchain.build.workflow import plan_passes, run_passes

pytestmark = pytest.mark.slow  # trains a teacher, distils, prunes, builds

DIGITS = """
[project]
name = "digits"
[model]
entry = "model.py:build_model"
input_shape = [1, 8, 8]
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
kwargs = {{ width = 16 }}
[data]
source = "sklearn:digits"
[train]
epochs = 15
[compress]
quantize = ["int8"]
"""


def tight_profile(tmp_path: Path, latency_ms: float) -> Path:
    """The Raspberry Pi 4 profile with a much tighter latency budget."""
    text = (REPO / "targets" / "raspberry-pi-4.toml").read_text()
    text, count = re.subn(r"(?m)^latency_ms = .*$", f"latency_ms = {latency_ms}", text)
    assert count == 1
    text = text.replace('id = "raspberry-pi-4"', 'id = "tight-pi"').replace('aliases = ["rpi4", "pi4"]', "aliases = []")
    path = tmp_path / "tight-pi.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory):
    """(project folder, dataset, trained artifact) shared by the branches below."""
    root = tmp_path_factory.mktemp("digits")
    (root / "model.py").write_text((REPO / "examples" / "digits" / "model.py").read_text())
    (root / "toolchain.toml").write_text(DIGITS.format())
    config = load_config(root / "toolchain.toml")
    dataset = load_dataset(config, 0)
    ctx = BuildContext(config=config, profile=resolve_target("rpi4"), dataset=dataset, out_dir=root / "out", work_dir=root)
    ctx.console.quiet = True
    torch.manual_seed(0)
    artifact = run_passes([TrainPass()], ctx)
    return root, dataset, artifact


def branch(teacher, tmp_path: Path, compress: str, passes: list, profile=None):
    """Run `passes` on a copy of the trained teacher with these [compress] settings."""
    root, dataset, trained = teacher
    (root / f"{tmp_path.name}.toml").write_text(DIGITS.format() + compress + "\n")
    config = load_config(root / f"{tmp_path.name}.toml")
    ctx = BuildContext(config=config, profile=profile or resolve_target("rpi4"), dataset=dataset,
                       out_dir=tmp_path / "out", work_dir=tmp_path)
    ctx.console.quiet = True
    artifact = run_passes(passes, ctx, copy.deepcopy(trained))
    return artifact, ctx


def model_logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_pruning_removes_channels_and_keeps_accuracy(teacher, tmp_path: Path) -> None:
    _, dataset, trained = teacher
    artifact, ctx = branch(teacher, tmp_path, "prune_ratio = 0.5\nfinetune_epochs = 8\nmax_accuracy_drop = 0.03",
                           [PrunePass(), ExportOnnxPass()])
    report = artifact.metrics["prune"]
    assert report["decision"] == "pruned", report["summary"]
    before, after = report["before"], report["after"]
    # Physically smaller: counted independently on the shipped module, not only in the report.
    macs, params = count_macs_params(artifact.module, dataset.input_shape)
    unpruned_macs, unpruned_params = count_macs_params(trained.module, dataset.input_shape)
    assert (macs, params) == (after["macs"], after["parameters"])
    assert (unpruned_macs, unpruned_params) == (before["macs"], before["parameters"])
    assert params < 0.5 * unpruned_params and macs < 0.5 * unpruned_macs  # 0.5 per layer: ~1/4 between pruned layers
    assert after["latency_ms_predicted"] < before["latency_ms_predicted"]
    assert report["ignored_layers"] == ["1.11"]  # the classifier keeps its 10 outputs
    # It still exports, and onnxruntime gives the same output shape as before.
    x_test, y_test = dataset.x_test, dataset.y_test
    logits = model_logits(artifact.source.path, x_test)
    assert logits.shape == (len(x_test), 10)
    with torch.no_grad():
        unpruned = trained.module.eval()(torch.from_numpy(x_test)).numpy()
    assert unpruned.shape == logits.shape
    # Accuracy: the gate on validation, and within a few points of the unpruned model on the test split.
    assert report["metric"] == "accuracy" and report["metric_drop"] <= 0.03
    assert after["val_accuracy"] > after["val_accuracy_before_finetune"] - 1e-9
    pruned_acc, unpruned_acc = (logits.argmax(1) == y_test).mean(), (unpruned.argmax(1) == y_test).mean()
    assert pruned_acc >= unpruned_acc - 0.04, (pruned_acc, unpruned_acc)
    assert report["finetune"]["distilled_from_teacher"] is False


def test_distilled_student_is_smaller_faster_and_within_the_gate(teacher, tmp_path: Path) -> None:
    # Budget 0.035 ms: the width-16 teacher (~0.038 ms predicted) misses 80% of it (0.028 ms), so "auto"
    # searches: 0.75 (width 12, ~0.030 ms) misses too, 0.5 (width 8, ~0.023 ms) fits.
    _, dataset, trained = teacher
    budget = 0.035
    profile = load_profile_file(tight_profile(tmp_path, budget))
    artifact, ctx = branch(teacher, tmp_path, "distill = true", [DistillPass(), ExportOnnxPass()], profile=profile)
    report = artifact.metrics["distill"]
    assert report["decision"] == "distilled", report["summary"]
    limit = 0.8 * budget
    assert report["teacher"]["latency_ms_predicted"] > limit
    # "auto" took the largest tried multiplier that fits; every larger one tried did not.
    tried = report["candidates"]
    assert [c["multiplier"] for c in tried] == [0.75, 0.5, 0.35, 0.25][:len(tried)]
    assert tried[-1]["multiplier"] == report["multiplier"] and tried[-1]["fits"]
    assert not any(c["fits"] for c in tried[:-1])
    student, teacher_numbers = report["student"], report["teacher"]
    assert report["width_kwargs"]["width"]["teacher"] == 16 and report["width_kwargs"]["width"]["student"] < 16
    assert student["parameters"] < teacher_numbers["parameters"]
    assert student["macs"] < teacher_numbers["macs"]
    assert student["latency_ms_predicted"] <= limit < teacher_numbers["latency_ms_predicted"]
    # The shipped module is the student (also per the real export), the teacher stays for later passes.
    assert sum(p.numel() for p in artifact.module.parameters()) == student["parameters"]
    assert artifact.teacher is not None and sum(p.numel() for p in artifact.teacher.parameters()) == teacher_numbers["parameters"]
    exported = predict(analyze(artifact.source.path), profile).latency_ms
    assert exported == pytest.approx(student["latency_ms_predicted"], rel=1e-4)
    # The model as trained is exported too, as the yardstick of the gate's drops (and its fallback).
    assert artifact.reference.name == "onnx-fp32-trained" and artifact.source.name == "onnx-fp32"
    assert predict(analyze(artifact.reference.path), profile).latency_ms == pytest.approx(
        teacher_numbers["latency_ms_predicted"], rel=1e-4)
    # The default accuracy gate (0.01 on validation) holds.
    assert ctx.config.compress.max_accuracy_drop == 0.01
    assert teacher_numbers["val_accuracy"] - student["val_accuracy"] <= 0.01
    assert student["val_accuracy"] == pytest.approx(
        (model_logits(artifact.source.path, dataset.x_val).argmax(1) == dataset.y_val).mean(), abs=1e-4)


def test_auto_ratio_meets_a_tight_latency_budget(teacher, tmp_path: Path) -> None:
    _, dataset, trained = teacher
    budget = 0.03  # the unpruned width-16 model predicts ~0.038 ms on this board
    profile = load_profile_file(tight_profile(tmp_path, budget))
    assert profile.budget.latency_ms == budget
    artifact, ctx = branch(teacher, tmp_path, 'prune_ratio = "auto"\nfinetune_epochs = 3\nmax_accuracy_drop = 0.05',
                           [PrunePass(), ExportOnnxPass()], profile=profile)
    report = artifact.metrics["prune"]
    ratio = report["ratio"]
    assert report["before"]["latency_ms_predicted"] > budget
    assert 0 < ratio <= 0.7 and report["ratio_choice"].startswith("auto: the smallest ratio")
    # The model that was exported (after fine-tuning) meets the budget on the custom profile...
    assert predict(analyze(artifact.source.path), profile).latency_ms <= budget
    # ...and it is the smallest ratio on the 0.05 grid that does.
    example = torch.from_numpy(dataset.x_train[:2])
    smaller = prune_module(trained.module, round(ratio - 0.05, 2), example)
    assert module_cost(smaller, dataset.input_shape, profile, tmp_path / "smaller.onnx")["latency_ms_predicted"] > budget
    assert report["decision"] == "pruned", report["summary"]


def test_auto_ratio_uses_the_default_when_the_budget_is_already_met(teacher, tmp_path: Path) -> None:
    root, dataset, _ = teacher
    plan = [p.name for p in plan_passes(load_config(root / "toolchain.toml"), resolve_target("rpi4"))]
    assert "prune" not in plan and "distill" not in plan  # off by default
    artifact, ctx = branch(teacher, tmp_path, 'prune_ratio = "auto"\nfinetune_epochs = 2\nmax_accuracy_drop = 1', [PrunePass()])
    report = artifact.metrics["prune"]
    assert report["ratio"] == 0.3 and "already meets the latency budget" in report["ratio_choice"]
    assert [row["ratio"] for row in report["search"]] == [0.3]  # no search needed
    plan = [p.name for p in plan_passes(ctx.config, ctx.profile)]
    assert plan[:3] == ["train", "prune", "export-onnx"]


def test_mobilenet_width_mult_and_pruning_through_residuals(tmp_path: Path) -> None:
    """zoo:mobilenet_v2: the student scales width_mult; pruning handles depthwise convs and residual adds."""
    assert width_kwargs("zoo:mobilenet_v2", {"width_mult": 1.0, "last_channels": 1280}) == ["width_mult"]
    assert scale_widths({"width_mult": 1.0}, ["width_mult"], 0.35) == {"width_mult": 0.35}
    assert width_kwargs("m.py:f", {"hidden": 24, "depth": 3, "kernel_width": 3, "use_bn": True}) == ["hidden"]
    assert scale_widths({"hidden": 6}, ["hidden"], 0.25) == {"hidden": 4}
    from toolchain.core.zoo.mobilenet_v2 import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2([1, 8, 8], 10, width_mult=0.35, last_channels=128).eval()
    example = torch.randn(2, 1, 8, 8)
    pruned = prune_module(model, 0.5, example)
    macs, params = count_macs_params(model, (1, 8, 8))
    pruned_macs, pruned_params = count_macs_params(pruned, (1, 8, 8))
    assert pruned_params < 0.5 * params and pruned_macs < 0.5 * macs
    export_module(pruned, (1, 8, 8), tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = pruned(torch.from_numpy(x)).numpy()
    got = model_logits(tmp_path / "m.onnx", x)
    assert got.shape == (3, 10) and np.abs(got - expected).max() < 1e-4


def test_wide_models_are_pruned_to_simd_friendly_widths() -> None:
    """Layers of a wide model keep multiples of 16 channels (INT8 kernels work in blocks of 16); layers too
    narrow to lose a whole block and the classifier stay as they were. Narrow models keep free widths."""
    from toolchain.passes.torch.prune import _widths, channel_multiple
    from toolchain.core.zoo.mobilenet_v2 import mobilenet_v2

    torch.manual_seed(0)
    wide = mobilenet_v2([3, 32, 32], 10, width_mult=0.75).eval()
    assert channel_multiple(wide) == 16
    before, after = _widths(wide), _widths(prune_module(wide, 0.25, torch.randn(2, 3, 32, 32)))
    assert len(before) == len(after) and sum(after) < 0.85 * sum(before)
    for old, new in zip(before, after):
        assert new % 16 == 0 or new == old, (old, new)
        assert new == old or old >= 32
    narrow = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3), torch.nn.Flatten(),
                                 torch.nn.Linear(32 * 4 * 4, 10))
    assert channel_multiple(narrow) == 1


NO_WIDTH_MODEL = '''
from torch import nn

def build_model(input_shape, num_classes, depth=1):
    layers = [nn.Linear(input_shape[0], 16), nn.ReLU()] * depth
    return nn.Sequential(*layers, nn.Linear(16, num_classes))
'''

BLOBS_MODEL = '''
from torch import nn

def build_model(input_shape, num_classes, hidden=16):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
'''


def blobs_project(root: Path, model: str, compress: str, epochs: int = 10) -> Path:
    rng = np.random.default_rng(7)
    y = np.arange(600) % 3
    x = rng.normal(size=(600, 6)) + np.eye(3, 6)[y] * 6  # well separated: every model here can reach 100%
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "blobs.npz", x=x, y=y)
    (root / "model.py").write_text(model)
    kwargs = "kwargs = { hidden = 32 }\n" if "hidden" in model else ""
    (root / "toolchain.toml").write_text(
        '[project]\nname = "blobs"\n[model]\nentry = "model.py:build_model"\ninput_shape = [6]\nlabels = ["a", "b", "c"]\n'
        f'{kwargs}[data]\nsource = "npz:blobs.npz"\n[train]\nepochs = {epochs}\n[compress]\nquantize = ["int8"]\n{compress}\n')
    return root / "toolchain.toml"


def test_entry_without_a_width_kwarg_skips_distillation_with_a_note(tmp_path: Path) -> None:
    config = load_config(blobs_project(tmp_path / "p", NO_WIDTH_MODEL, "distill = true", epochs=2))
    ctx = BuildContext(config=config, profile=resolve_target("rpi4"), dataset=load_dataset(config, 0),
                       out_dir=tmp_path / "out", work_dir=tmp_path)
    ctx.console.quiet = True
    artifact = run_passes([TrainPass(), DistillPass(), ExportOnnxPass()], ctx)
    trained = artifact.metrics["train"]["parameters"]
    assert artifact.metrics["distill"]["decision"] == "skipped"
    assert artifact.teacher is None and sum(p.numel() for p in artifact.module.parameters()) == trained
    assert [n for n in ctx.notes if n.startswith("distillation skipped: the entry model.py:build_model has no width")]
    assert "width/channels/hidden" in ctx.notes[-1]


def test_build_with_distillation_and_pruning_ships_a_served_bundle(tmp_path: Path) -> None:
    config = blobs_project(tmp_path / "project", BLOBS_MODEL, "distill = true\nprune_ratio = 0.3\nfinetune_epochs = 5")
    private, public = write_keypair(tmp_path / "keys")
    out = tmp_path / "out"
    result = run_cli("toolchain", "build", "--target", "rpi4", "--config", str(config), "--out", str(out),
                     "--key", str(private), check=True)
    bundle = read_bundle(Path(result.stdout.splitlines()[-1]), load_public_key(public))
    model = LoadedModel.from_bundle(bundle)
    centres = np.eye(3, 6, dtype=np.float32) * 6
    assert model.predict(centres).labels == ["a", "b", "c"]
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]][:4] == ["train", "distill", "prune", "export-onnx"]
    # hidden 32 -> a 0.5x student (hidden 16; the teacher already fits rpi4's 100 ms) -> 0.3 pruned: 16 -> 11
    # per hidden layer. The shipped graph's first layer (ONNX or .tflite, whichever rpi4 got) maps 6 inputs to 11.
    shipped = tmp_path / bundle.model_artifact["path"]
    shipped.write_bytes(bundle.model_bytes)
    products = [op.channels for op in analyze(shipped).ops if op.op_type == "Gemm"]
    assert products[0] == (6, 11), products
    assert not [n for n in report["notes"] if "kept" in n], report["notes"]
    assert report["shipped"]["accuracy"] >= 0.95


def test_auto_ratio_caps_at_0_7_with_a_note_when_no_ratio_meets_the_budget(teacher, tmp_path: Path) -> None:
    profile = load_profile_file(tight_profile(tmp_path, 0.001))  # below the per-operator overhead alone
    artifact, ctx = branch(teacher, tmp_path, 'prune_ratio = "auto"\nfinetune_epochs = 1\nmax_accuracy_drop = 1',
                           [PrunePass()], profile=profile)
    report = artifact.metrics["prune"]
    assert report["ratio"] == 0.7 and [row["ratio"] for row in report["search"]] == [0.7]
    assert not report["search"][0]["meets_budget"]
    assert [n for n in ctx.notes if n.startswith("pruning: even a ratio of 0.7 misses the 0.001 ms latency budget of tight-pi")]


class OutlierChannel:
    """Make one channel 1000x louder before the second conv and 1000x quieter inside it: the float
    function is unchanged, but that channel stretches the per-tensor activation range so far that
    static INT8 rounds every other channel to zero (a known way PTQ fails)."""

    name = "outlier-channel"

    def run(self, artifact, ctx):
        body = artifact.module[1]
        norm, conv = body[1], body[3]
        with torch.no_grad():
            norm.weight[0] *= 1000
            norm.bias[0] *= 1000
            conv.weight[:, 0] /= 1000
        return artifact


def test_qat_recovers_a_cnn_that_static_int8_breaks(teacher, tmp_path: Path) -> None:
    _, dataset, trained = teacher
    artifact, ctx = branch(teacher, tmp_path, "", [OutlierChannel(), ExportOnnxPass(), QuantizeInt8Pass(), QuantizeQatPass()])
    report = artifact.metrics["qat"]
    assert report["validation_int8_drop"] > 0.5, report["decision"]  # static INT8 collapses
    assert report["validation_qat_drop"] <= ctx.config.compress.max_accuracy_drop, report["decision"]
    assert report["ranges"][1]["quantile"] < 1.0  # the second conv's input range was clipped
    x, y = dataset.x_test, dataset.y_test
    accuracy = lambda path: float((model_logits(path, x).argmax(1) == y).mean())  # noqa: E731
    assert accuracy(artifact.reference.path) - accuracy(artifact.candidate("onnx-int8-qat").path) <= 0.02
    # BatchNorm was folded before training, as the export folds it: no BatchNormalization in the QAT graph.
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(artifact.candidate("onnx-int8-qat").path)).graph.node)
