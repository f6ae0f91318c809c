"""`toolchain build --measure-on DEVICE`: every candidate is timed by a real agent (through a real mosquitto)
and the gate decides on those numbers; the report shows them beside the host's and the prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.agent.test_multi_io import _model, old_style_bundle
from tests.agent_helpers import running_agent
from tests.conftest import provision_device, run_cli
from toolchain.deploy.broker import ManagedBroker
from toolchain.resources import profiles_dir


def onnx_only_pi5(folder: Path) -> Path:
    """raspberry-pi-5 as a user's profile file running ONNX only (the device serves ONNX; no .tflite export)."""
    text = (profiles_dir() / "raspberry-pi-5.toml").read_text()
    formats = next(line for line in text.splitlines() if line.startswith("formats = "))
    path = folder / "raspberry-pi-5-onnx.toml"
    path.write_text(text.replace(formats, 'formats = ["onnx"]'))
    return path


def linear_digits_classifier(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """A least-squares linear classifier of the digits (~90% accurate, no training loop), as an ONNX file."""
    from onnx import TensorProto, helper

    weights, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], np.eye(10)[y], rcond=None)
    nodes = [helper.make_node("MatMul", ["input", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])]
    path.write_bytes(_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 64])],
                            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
                            {"w": weights[:-1].astype(np.float32), "b": weights[-1].astype(np.float32)}))


@pytest.mark.slow
def test_a_build_measured_on_the_device_gates_on_its_numbers(broker: ManagedBroker, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    served = old_style_bundle(tmp_path / "served")  # a raspberry-pi-5 device
    x, y = (data.data / 16.0).astype(np.float32), data.target
    linear_digits_classifier(tmp_path / "digits.onnx", x[:1200], y[:1200])
    np.savez(tmp_path / "digits.npz", x=x[:1200], y=y[:1200], x_test=x[1200:], y_test=y[1200:])
    monkeypatch.setenv("EDGE_TOOLCHAIN_DEVICE_BENCH", str(tmp_path / "results"))
    device = provision_device(tmp_path / "dev", served, broker.url)
    with running_agent(device):
        result = run_cli("toolchain", "build", "--target", str(onnx_only_pi5(tmp_path)), "--out", str(tmp_path / "dist"),
                         "--model", str(tmp_path / "digits.onnx"), "--data", f"npz:{tmp_path / 'digits.npz'}",
                         "--key", str(served.out / "keys" / "signing.key"), "--measure-on", "dev-1", "--broker", broker.url,
                         check=True)
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert report["benchmark"]["device"]["device"] == "dev-1" and report["benchmark"]["device"]["profile"] == "raspberry-pi-5"
    assert Path(report["benchmark"]["device"]["stored"]).parent == tmp_path / "results" / "raspberry-pi-5"
    candidates = report["candidates"]
    assert len(candidates) >= 2
    for candidate in candidates:
        assert candidate["latency_ms_p50_device"] > 0 and "device_error" not in candidate, candidate
        assert candidate["prediction_error_device"] == pytest.approx(
            candidate["latency_ms_predicted"] / candidate["latency_ms_p50_device"] - 1, abs=1e-3)
    judged = [c for c in candidates if c["name"] != report["reference"]["name"] and "allowed" not in c["verdict"]]
    assert judged and all("measured on the device" in c["verdict"] for c in judged), [c["verdict"] for c in candidates]
    html = (tmp_path / "dist" / "report.html").read_text()
    assert 'id="device"' in html and "Measured on device dev-1" in html
    assert "measured" in result.stderr and "on dev-1" in result.stderr
