"""A user's project outside the repository: paths resolve from its config, and versions rise per build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime_agent.bundle import read_bundle
from runtime_agent.model import LoadedModel
from runtime_agent.signing import load_public_key, write_keypair
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # builds twice

MODEL = '''
from torch import nn

def build_model(input_shape, num_classes, hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''

CONFIG = '''
[project]
name = "blobs"
version = 5
[model]
entry = "src/model.py:build_model"
input_shape = [6]
labels = ["a", "b", "c"]
kwargs = { hidden = 24 }
[data]
source = "npz:data/blobs.npz"
[train]
epochs = 15
[compress]
quantize = ["int8"]
max_accuracy_drop = 0.02
'''


def make_project(root: Path) -> Path:
    rng = np.random.default_rng(7)
    y = np.arange(600) % 3
    x = rng.normal(size=(600, 6)) + np.eye(3, 6)[y] * 4
    (root / "src").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "src" / "model.py").write_text(MODEL)
    np.savez(root / "data" / "blobs.npz", x=x, y=y)
    (root / "toolchain.toml").write_text(CONFIG)
    return root / "toolchain.toml"


def test_project_elsewhere_builds_twice_with_rising_versions(tmp_path: Path) -> None:
    config = make_project(tmp_path / "somewhere" / "project")
    private, public = write_keypair(tmp_path / "keys")
    out = tmp_path / "out"
    args = ("toolchain", "build", "--target", "rpi4", "--config", str(config), "--out", str(out), "--key", str(private))
    first = run_cli(*args, check=True)
    second = run_cli(*args, "--seed", "1", check=True)
    assert Path(first.stdout.splitlines()[-1]) == out / "blobs-5-raspberry-pi-4.bundle"
    assert Path(second.stdout.splitlines()[-1]) == out / "blobs-6-raspberry-pi-4.bundle"
    bundle = read_bundle(out / "blobs-6-raspberry-pi-4.bundle", load_public_key(public))
    assert bundle.manifest["labels"] == ["a", "b", "c"] and bundle.manifest["provenance"]["seed"] == 1
    assert bundle.manifest["provenance"]["config"] == str(config)
    assert bundle.manifest["input"]["shape"] == [6]
    candidates = [(c["format"], c["precision"]) for c in bundle.manifest["metrics"]["candidates"]]
    assert candidates[:2] == [("onnx", "fp32"), ("onnx", "int8")]  # rpi4: no fp16 (the A72 has no FP16 arithmetic)
    assert candidates[2:] in ([], [("tflite", "fp32"), ("tflite", "int8")])  # .tflite too when the extra is installed
    model = LoadedModel.from_bundle(bundle)
    centres = np.eye(3, 6, dtype=np.float32) * 4
    assert model.predict(centres).labels == ["a", "b", "c"]
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == 6 and report["train"]["max_epochs"] == 15
    assert "created a new signing key" not in first.stderr + second.stderr
