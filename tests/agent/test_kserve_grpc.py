"""Triton's gRPC client (tritonclient[grpc]) against a real `edge-agent run` process with `[serve]
grpc_port`: health, metadata, infer with raw contents (the client's default) and with typed `contents`
(through the client's own generated stub), a batch, refused requests with INVALID_ARGUMENT and the reason,
the gRPC requests in `/metrics`; and an agent without grpcio, which serves REST and refuses a grpc_port in
one line.

The agent runs as its own process: Triton's client and the agent's stubs both define the protocol's
`inference.*` messages, and one process' protobuf registry holds each name once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from runtime_agent.config import load_agent_config
from runtime_agent.errors import AgentError
from tests.agent.test_kserve_rest_metrics import scrape
from tests.agent.test_multi_io import bare_outputs, two_input_bundle, two_input_data, two_input_model
from tests.agent_helpers import http, start_agent
from tests.conftest import REPO, provision_device, run_cli
from toolchain.deploy.broker import ManagedBroker, free_port

WITHOUT_GRPC = "import sys; sys.modules['grpc'] = None; from runtime_agent.cli import main; raise SystemExit(main(sys.argv[1:]))"


def with_grpc_port(device: Path) -> int:
    port = free_port()
    toml = device / "agent.toml"
    toml.write_text(toml.read_text().replace("[serve]\n", f"[serve]\ngrpc_port = {port}\n"))
    return port


@pytest.fixture()
def grpc_agent(broker: ManagedBroker, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A running `edge-agent run` serving the two-input model: (gRPC address, REST base URL)."""
    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    port = with_grpc_port(device)
    process = start_agent(device, tmp_path / "agent.log")
    assert f"and grpc://127.0.0.1:{port} as dev-1" in (tmp_path / "agent.log").read_text()
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{load_agent_config(device).serve_port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def triton_inputs(x: dict[str, np.ndarray]) -> list[triton_grpc.InferInput]:
    inputs = []
    for name, datatype in (("features", "FP32"), ("ids", "INT64")):
        tensor = triton_grpc.InferInput(name, list(x[name].shape), datatype)
        tensor.set_data_from_numpy(x[name])  # raw_input_contents
        inputs.append(tensor)
    return inputs


def contents_request(x: dict[str, np.ndarray], model: str = "m") -> service_pb2.ModelInferRequest:
    """A ModelInferRequest with typed `contents` (fp32_contents, int64_contents), built with Triton's own stubs."""
    request = service_pb2.ModelInferRequest(model_name=model, id="c1")
    features = request.inputs.add(name="features", datatype="FP32", shape=x["features"].shape)
    features.contents.fp32_contents.extend(x["features"].ravel().tolist())
    ids = request.inputs.add(name="ids", datatype="INT64", shape=x["ids"].shape)
    ids.contents.int64_contents.extend(x["ids"].ravel().tolist())
    return request


def test_tritons_grpc_client_health_metadata_and_infer(grpc_agent: tuple[str, str]) -> None:
    address, base = grpc_agent
    client = triton_grpc.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m")
    assert client.get_server_metadata().name == "edge-agent"
    meta = client.get_model_metadata("m", as_json=True)
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "4"]},
                              {"name": "ids", "datatype": "INT64", "shape": ["-1", "3"]}]
    assert [o["name"] for o in meta["outputs"]] == ["score", "total", "class", "label"]

    x = two_input_data(6, seed=31)  # a batch of 6
    score, total = bare_outputs(two_input_model(), x)
    labels = [["left", "right"][i] for i in score.argmax(axis=1)]
    result = client.infer("m", triton_inputs(x), request_id="r1")
    assert result.get_response().id == "r1" and len(result.get_response().raw_output_contents) == 4
    assert np.array_equal(result.as_numpy("score"), score) and np.array_equal(result.as_numpy("total"), total)
    assert result.as_numpy("class").tolist() == score.argmax(axis=1).tolist()
    assert [label.decode() for label in result.as_numpy("label")] == labels
    result = client.infer("m", triton_inputs(x), outputs=[triton_grpc.InferRequestedOutput("label")])
    assert [o.name for o in result.get_response().outputs] == ["label"]

    # typed contents, through Triton's generated stub: the answer comes back in contents too
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(contents_request(x))
        assert response.id == "c1" and not response.raw_output_contents
        outputs = {o.name: o for o in response.outputs}
        assert list(outputs["score"].shape) == [6, 2] and list(outputs["label"].shape) == [6]
        assert np.array_equal(np.array(outputs["score"].contents.fp32_contents, np.float32).reshape(6, 2), score)
        assert list(outputs["total"].contents.int64_contents) == total.ravel().tolist()
        assert [b.decode() for b in outputs["label"].contents.bytes_contents] == labels

        bad = contents_request(x)
        bad.inputs[0].contents.fp32_contents.pop()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "contents.fp32_contents of input 'features' has 23 values but 'shape' [6, 4] needs 24"
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(contents_request(x, model="other"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "this device serves 'm' version 1" in refused.value.details()
    client.close()


def _input(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


BAD_REQUESTS = [  # what Triton's client sends, and the reason the agent gives (REST's, word for word)
    ([_input("features", np.zeros((2, 5), np.float32), "FP32"), _input("ids", np.zeros((2, 3), np.int64), "INT64")],
     "input 'features' shape is [2, 5], the model expects [4] or a batch [n, 4]"),
    ([_input("features", np.zeros((2, 4), np.float64), "FP64"), _input("ids", np.zeros((2, 3), np.int64), "INT64")],
     "input 'features' dtype is float64, the model expects float32; convert it with .astype('float32')"),
    ([_input("features", np.full((1, 4), np.nan, np.float32), "FP32"), _input("ids", np.zeros((1, 3), np.int64), "INT64")],
     "input 'features' has 4 NaN or infinite value(s); clean the data before sending it"),
    ([_input("features", np.zeros((2, 4), np.float32), "FP32")],
     "missing input(s) 'ids'; the model's inputs are 'features', 'ids'"),
]


def test_a_bad_grpc_request_is_invalid_argument_with_the_reason(grpc_agent: tuple[str, str]) -> None:
    address, base = grpc_agent
    client = triton_grpc.InferenceServerClient(address)
    for inputs, message in BAD_REQUESTS:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("m", inputs)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert refused.value.message() == message
    with grpc.insecure_channel(address) as channel:  # one raw entry for two inputs
        request = service_pb2.ModelInferRequest(model_name="m", raw_input_contents=[np.zeros((1, 4), np.float32).tobytes()])
        request.inputs.add(name="features", datatype="FP32", shape=[1, 4])
        request.inputs.add(name="ids", datatype="INT64", shape=[1, 3])
        with pytest.raises(grpc.RpcError) as refused:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.details() == (
            "raw_input_contents has 1 entries but the request has 2 inputs; send one per input, in the order of 'inputs'")
    ok = client.infer("m", triton_inputs(two_input_data(2, seed=32)))  # and the agent goes on serving
    assert ok.as_numpy("score").shape == (2, 2)
    client.close()
    after = scrape(base)

    def grpc_sample(name: str, **labels: str) -> float:
        return after[(name, tuple(sorted({"protocol": "grpc", **labels}.items())))]

    assert grpc_sample("edge_agent_requests_total", endpoint="infer", status="INVALID_ARGUMENT") == len(BAD_REQUESTS) + 1
    assert grpc_sample("edge_agent_requests_total", endpoint="infer", status="OK") == 1
    assert grpc_sample("edge_agent_request_errors_total", endpoint="infer") == len(BAD_REQUESTS) + 1
    assert grpc_sample("edge_agent_inference_duration_seconds_count") == len(BAD_REQUESTS) + 2


def test_without_grpcio_rest_serves_and_a_grpc_port_is_one_line(broker: ManagedBroker, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", WITHOUT_GRPC, "run", "--device-dir", str(device)], env=env,
                               stdout=open(tmp_path / "rest.log", "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b"serving" not in (tmp_path / "rest.log").read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "rest.log").read_text()
            time.sleep(0.05)
        assert http("GET", f"http://127.0.0.1:{load_agent_config(device).serve_port}/v2/health/ready") == (200, {"ready": True})
    finally:
        process.terminate()
        process.wait(timeout=30)
    with_grpc_port(device)
    result = subprocess.run([sys.executable, "-c", WITHOUT_GRPC, "run", "--device-dir", str(device)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: [serve] grpc_port needs the agent's gRPC extra (grpc is not installed): "
        "pip install 'edge-toolchain[agent-grpc]' (grpcio>=1.85.1 and protobuf>=7.35.1)"]


def test_a_bad_or_taken_grpc_port_is_one_line(broker: ManagedBroker, tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text('device_id = "d"\nbroker = "mqtt://h:1"\n[serve]\ngrpc_port = 70000\n')
    with pytest.raises(AgentError, match=r"\[serve\]: 'grpc_port' must be a port 1..65535, got 70000"):
        load_agent_config(tmp_path)

    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    port = with_grpc_port(device)
    with socket.socket() as taken:  # another process holds the port
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_cli("edge-agent", "run", "--device-dir", str(device), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [  # only ours: grpcio's C core printed a bind failure line before it
        f"error: port {port} on 127.0.0.1 is already in use (another agent?); set another in [serve] grpc_port of "
        f"{device.resolve() / 'agent.toml'}"]
