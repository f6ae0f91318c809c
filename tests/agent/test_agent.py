"""The device side: refuses bad input with the reason, keeps serving, and never imports host packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime_agent.bundle import read_bundle
from runtime_agent.errors import InputError
from runtime_agent.model import LoadedModel
from runtime_agent.signing import load_public_key
from tests.conftest import REPO, Build, run_cli

AGENT_DIR = REPO / "runtime_agent"
ALLOWED = {"numpy", "onnxruntime", "paho", "cryptography", "ai_edge_litert", "runtime_agent",
           "grpc", "google"} | set(sys.stdlib_module_names)  # grpc, google.protobuf: the optional gRPC endpoint
FORBIDDEN = ("torch", "tensorflow", "toolchain", "onnx", "sklearn", "optuna")


@pytest.fixture(scope="module")
def model(default_build: Build) -> LoadedModel:
    return LoadedModel.from_bundle(read_bundle(default_build.bundle, load_public_key(default_build.pubkey)))


def test_imports_are_only_the_light_device_packages() -> None:
    found = set()
    for source in AGENT_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    assert found - ALLOWED == set()


def test_importing_every_agent_module_loads_no_host_package() -> None:
    modules = [f"runtime_agent.{p.stem}" for p in AGENT_DIR.glob("*.py") if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\nprint(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == ""


def test_single_sample_and_batch_are_served(model: LoadedModel) -> None:
    one = np.zeros((1, 8, 8), dtype=np.float32)
    assert len(model.predict(one).labels) == 1
    batch = model.predict(np.zeros((5, 1, 8, 8), dtype=np.float32))
    assert batch.scores.shape == (5, 10) and np.allclose(batch.scores.sum(axis=1), 1)


@pytest.mark.parametrize("x, message", [
    (np.zeros((1, 8, 8), dtype=np.float64), "input dtype is float64, the model expects float32; convert it with .astype('float32')"),
    (np.zeros((2, 1, 8, 9), dtype=np.float32), "input shape is [2, 1, 8, 9], the model expects [1, 8, 8] or a batch [n, 1, 8, 8]"),
    (np.zeros((0, 1, 8, 8), dtype=np.float32), "input shape is [0, 1, 8, 8]"),
    (np.full((1, 8, 8), np.nan, dtype=np.float32), "input has 64 NaN or infinite value(s)"),
    ([[0.0]], "input must be a numpy array, got list"),
])
def test_bad_input_is_refused_and_serving_continues(model: LoadedModel, x: object, message: str) -> None:
    with pytest.raises(InputError) as error:
        model.predict(x)
    assert message in str(error.value)
    assert model.predict(np.zeros((1, 8, 8), dtype=np.float32)).classes.shape == (1,)


def test_predict_cli_bad_input_is_one_line(default_build: Build, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((3, 4), dtype=np.float32))
    result = run_cli("edge-agent", "predict", "--bundle", str(default_build.bundle), "--input", str(tmp_path / "x.npy"),
                     "--pubkey", str(default_build.pubkey))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: input shape is [3, 4], the model expects [1, 8, 8] or a batch [n, 1, 8, 8]"


def test_predict_cli_refuses_a_tampered_bundle(default_build: Build, tmp_path: Path) -> None:
    data = bytearray(default_build.bundle.read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "b.bundle").write_bytes(bytes(data))
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), dtype=np.float32))
    result = run_cli("edge-agent", "predict", "--bundle", str(tmp_path / "b.bundle"), "--input", str(tmp_path / "x.npy"),
                     "--pubkey", str(default_build.pubkey))
    assert result.returncode == 2 and result.stderr.startswith(f"error: bundle {tmp_path / 'b.bundle'}")
    assert result.stdout == ""


def test_self_test_samples_in_the_bundle_reproduce(default_build: Build, model: LoadedModel) -> None:
    import io

    samples = np.load(io.BytesIO(model.bundle.files["samples.npz"]))
    assert np.allclose(model.logits(samples["x"]), samples["logits"], atol=1e-5)
