"""Keras models as input: trained with Keras, pruned with tfmot (prune_low_magnitude + strip), QAT with
tfmot's quantize_model, converted to full-integer TFLite, gated, bundled, and served by the agent."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime_agent.bundle import read_bundle
from runtime_agent.model import LoadedModel
from runtime_agent.signing import load_public_key
from tests.conftest import REPO, run_cli
from tests.passes.test_tflite import litert_accuracy
from toolchain.core.config import load_config
from toolchain.core.data import load_dataset
from toolchain.training.keras import framework_of
from toolchain.export.tflite import INSTALL_HINT, tflite_extra_missing

pytestmark = [pytest.mark.slow,  # trains Keras models and builds
              pytest.mark.skipif(tflite_extra_missing() is not None,
                                 reason=f"the tflite extra is not installed ({tflite_extra_missing()}); {INSTALL_HINT}")]

CONFIG = """[project]
name = "kdigits"
[model]
entry = "model.py:build_model"
input_shape = [1, 8, 8]
kwargs = { width = 8 }
[data]
source = "sklearn:digits"
[train]
epochs = 20
[compress]
prune_ratio = 0.5
finetune_epochs = 4
qat_epochs = 4
"""


def keras_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "examples" / "keras_digits" / "model.py", root / "model.py")
    (root / "toolchain.toml").write_text(CONFIG)
    return root / "toolchain.toml"


@pytest.fixture(scope="module")
def keras_build(tmp_path_factory: pytest.TempPathFactory, isolated_home: Path):
    root = tmp_path_factory.mktemp("keras")
    config = keras_project(root / "project")
    result = run_cli("toolchain", "build", "--config", str(config), "--target", "stm32h7", "--budget", "quick",
                     "--out", str(root / "out"), check=True)
    bundle = read_bundle(Path(result.stdout.strip().splitlines()[-1]), load_public_key(isolated_home / "keys" / "signing.pub"))
    return bundle, json.loads((root / "out" / "report.json").read_text()), config


def kernel_zero_fraction(model: bytes) -> float:
    """Share of exact zeros in the weights of the convolutions and dense layers of a .tflite file."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    weights = [interpreter.get_tensor(int(op["inputs"][1])) for op in interpreter._get_ops_details()
               if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


def test_the_entry_decides_the_framework(keras_build) -> None:
    _, _, config = keras_build
    assert framework_of(load_config(config), 10) == "keras"
    assert framework_of(load_config(None), 10) == "torch"


def test_keras_model_is_pruned_quantization_aware_trained_and_gated(keras_build) -> None:
    bundle, report, config = keras_build
    assert [s["name"] for s in report["stages"]][:4] == ["train-keras", "prune-keras", "export-tflite-keras", "quantize-qat-keras"]
    assert report["train"]["framework"] == "keras" and report["train"]["val_accuracy"] > 0.8
    assert 0.45 <= report["prune"]["sparsity"] <= 0.55
    candidates = {c["name"]: c for c in report["candidates"]}
    assert set(candidates) == {"tflite-fp32", "tflite-int8", "tflite-int8-qat"}
    assert all(c["format"] == "tflite" and c["verdict"] for c in candidates.values())
    assert candidates["tflite-int8-qat"]["accuracy_drop"] <= 0.02
    shipped = bundle.manifest["metrics"]["shipped"]
    assert candidates[shipped["name"]]["accepted"]
    dataset = load_dataset(load_config(config), 0)
    assert shipped["accuracy"] == pytest.approx(litert_accuracy(bundle.model_bytes, dataset.x_test, dataset.y_test), abs=1e-9)
    assert kernel_zero_fraction(bundle.model_bytes) >= 0.4  # the stripped model's zeros reach the shipped file


def test_the_agent_serves_the_keras_bundle(keras_build) -> None:
    bundle, _, _ = keras_build
    samples = np.load(io.BytesIO(bundle.files["samples.npz"]))
    model = LoadedModel.from_bundle(bundle)
    prediction = model.predict(samples["x"])  # raw features in: the standardization is inside the graph
    np.testing.assert_allclose(prediction.logits, samples["logits"], atol=1e-5)
    assert np.mean(prediction.classes == samples["y"]) >= 0.75


def test_a_keras_model_for_an_onnx_only_board_is_one_clear_error(tmp_path: Path) -> None:
    config = keras_project(tmp_path / "project")
    result = run_cli("toolchain", "build", "--config", str(config), "--target", "jetson", "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "a Keras model ships as .tflite, and target jetson-orin-nano runs only onnx" in last
    assert "Traceback" not in result.stderr and "oneDNN" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
