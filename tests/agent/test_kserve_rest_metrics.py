"""Triton's HTTP client (tritonclient[http]) against the real agent, as a new user would call it: its
default binary tensors (`set_data_from_numpy(x)`), JSON tensors, a batch, a wrong shape; malformed
binary requests over a raw socket; and `/metrics` scraped and parsed with prometheus_client's parser.

The agent runs in-process (`running_agent`) on a two-input model built in the test, with real
onnxruntime and a real mosquitto.
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from runtime_agent.server import array_from_values
from tests.agent.test_multi_io import bare_outputs, two_input_bundle, two_input_data, two_input_model
from tests.agent_helpers import running_agent
from tests.conftest import provision_device
from tests.deploy.bundle_variants import variant
from tests.deploy.test_push_device import RawPusher
from toolchain.deploy.broker import ManagedBroker


def triton_inputs(x: dict[str, np.ndarray], binary: bool = True) -> list[triton_http.InferInput]:
    inputs = []
    for name, datatype in (("features", "FP32"), ("ids", "INT64")):
        tensor = triton_http.InferInput(name, list(x[name].shape), datatype)
        tensor.set_data_from_numpy(x[name]) if binary else tensor.set_data_from_numpy(x[name], binary_data=False)
        inputs.append(tensor)
    return inputs


def scrape(base: str) -> dict[str, Any]:
    """Every sample of `/metrics`, parsed by prometheus_client, as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def post(base: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", "/v2/models/m/infer", body=body, headers=headers)
    response = connection.getresponse()
    status, answer = response.status, json.loads(response.read())
    connection.close()
    return status, answer


def test_tritons_http_client_with_binary_and_json_tensors(broker: ManagedBroker, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    x = two_input_data(5, seed=21)  # a batch of 5
    score, total = bare_outputs(two_input_model(), x)
    labels = [["left", "right"][i] for i in score.argmax(axis=1)]
    with running_agent(device) as (agent, base):
        client = triton_http.InferenceServerClient(base.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata("m")
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]},
                                  {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}]

        # the client's default: tensors as binary data after the JSON header, every output binary
        result = client.infer("m", triton_inputs(x), request_id="b1")
        response = result.get_response()
        assert response["id"] == "b1" and all("binary_data_size" in o["parameters"] for o in response["outputs"])
        assert np.array_equal(result.as_numpy("score"), score) and np.array_equal(result.as_numpy("total"), total)
        assert result.as_numpy("class").tolist() == score.argmax(axis=1).tolist()
        assert [label.decode() for label in result.as_numpy("label")] == labels

        # JSON tensors, one output asked for as JSON and one as binary
        outputs = [triton_http.InferRequestedOutput("score", binary_data=False), triton_http.InferRequestedOutput("label")]
        result = client.infer("m", triton_inputs(x, binary=False), outputs=outputs)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["score", "label"]
        assert "data" in result.get_output("score") and "binary_data_size" in result.get_output("label")["parameters"]
        assert np.array_equal(result.as_numpy("score"), score)
        assert [label.decode() for label in result.as_numpy("label")] == labels

        for algorithm in ("gzip", "deflate"):  # a compressed request body
            result = client.infer("m", triton_inputs(x), request_compression_algorithm=algorithm)
            assert np.array_equal(result.as_numpy("score"), score)

        wrong = {"features": np.zeros((2, 5), np.float32), "ids": np.zeros((2, 3), np.int64)}
        with pytest.raises(InferenceServerException) as refused:
            client.infer("m", triton_inputs(wrong))
        assert refused.value.status() == "400"
        assert "input 'features' shape is [2, 5], the model expects [4] or a batch [n, 4]" in refused.value.message()
        client.close()


BAD_BINARY = [  # (Inference-Header-Content-Length: None, "json" for the right one, or this text; binary_data_size
    # of each input; bytes appended to the body; the reason expected)
    (None, {"features": 64, "ids": 96}, b"", "request body is not valid JSON"),
    ("12abc", {"features": 64, "ids": 96}, b"", "Inference-Header-Content-Length must be the JSON header's size in bytes"),
    ("10", {"features": 64, "ids": 96}, b"", "the first 10 bytes of the body (Inference-Header-Content-Length) are not valid JSON"),
    ("json", {"features": 64, "ids": 96}, b"\0" * 8,
     "the body has 168 bytes of binary data after the JSON header but the inputs' binary_data_size add up to 160"),
    ("json", {"features": 60, "ids": 100}, b"", "binary data of input 'features' is 60 bytes but FP32 'shape' [4, 4] needs 64"),
    ("json", {"features": -1, "ids": 96}, b"", "input 'features': binary_data_size must be a non-negative integer, got -1"),
]


def test_a_bad_binary_request_is_a_400_with_the_reason(broker: ManagedBroker, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    x = {"features": np.ones((4, 4), np.float32), "ids": np.ones((4, 3), np.int64)}
    raw = x["features"].tobytes() + x["ids"].tobytes()

    def request(sizes: dict[str, int], **extra: Any) -> bytes:
        return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(x[name].shape),
                                       "parameters": {"binary_data_size": sizes[name]}}
                                      for name, datatype in (("features", "FP32"), ("ids", "INT64"))], **extra}).encode()

    with running_agent(device) as (agent, base):
        for header, sizes, extra, message in BAD_BINARY:
            head = request(sizes)
            headers = {"Content-Type": "application/octet-stream"}
            if header is not None:
                headers["Inference-Header-Content-Length"] = str(len(head)) if header == "json" else header
            status, answer = post(base, head + raw + extra, headers)
            assert status == 400 and message in answer["error"], (header, answer)
        status, answer = post(base, head + raw, {"Content-Encoding": "br"})
        assert status == 400 and answer["error"] == "Content-Encoding 'br' is not supported; send the body as identity, gzip or deflate"
        status, answer = post(base, head + raw, {"Content-Encoding": "gzip"})
        assert status == 400 and answer["error"].startswith("the request body is not valid gzip")
        status, answer = post(base, gzip.compress(head + raw)[:-12], {"Content-Encoding": "gzip"})
        assert status == 400 and answer["error"] == "the gzip request body is cut short"
        # and the agent goes on serving the same tensors sent right; an output not asked as binary comes as JSON
        head = request({"features": 64, "ids": 96}, outputs=[{"name": "total"}])
        status, answer = post(base, head + raw, {"Inference-Header-Content-Length": str(len(head))})
        assert status == 200 and answer["outputs"] == [{"name": "total", "datatype": "INT64", "shape": [4, 1], "data": [3] * 4}]


def test_a_value_past_fp32s_range_is_inf_for_validation_with_no_warning() -> None:
    """`1e39` in a JSON FP32 tensor printed numpy's "overflow encountered in cast" with a source line into
    the agent's log; the value becomes inf, which validation refuses with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        array = array_from_values("FP32", [2], [1e39, 1.0])
    assert array.dtype == np.float32 and np.isinf(array[0]) and array[1] == 1.0


def test_metrics_count_the_requests_sent(broker: ManagedBroker, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    with running_agent(device) as (agent, base):
        client = triton_http.InferenceServerClient(base.removeprefix("http://"))
        before = scrape(base)
        assert before[("edge_agent_model_info", (("name", "m"), ("target", "raspberry-pi-5"), ("version", "1")))] == 1
        assert before[("edge_agent_model_version", ())] == 1
        assert before[("edge_agent_outbox_pending", ())] >= 0 and before[("edge_agent_resident_memory_bytes", ())] > 0
        assert not [key for key in before if key[0].startswith("edge_agent_drift")]  # no window closed yet
        for k in range(7):
            client.infer("m", triton_inputs(two_input_data(1 + k % 3, seed=k)))
        bad = {"features": np.zeros((2, 5), np.float32), "ids": np.zeros((2, 3), np.int64)}
        for _ in range(3):
            with pytest.raises(InferenceServerException):
                client.infer("m", triton_inputs(bad))
        with pytest.raises(InferenceServerException):
            client.infer("other", triton_inputs(bad))  # not served here: 404
        assert client.is_server_ready()
        client.close()
        drift = agent.close_window()["drift"]
        after = scrape(base)

    def rest(name: str, **labels: str) -> float:
        return after.get((name, tuple(sorted({"protocol": "rest", **labels}.items()))), 0)

    assert rest("edge_agent_requests_total", endpoint="infer", status="200") == 7
    assert rest("edge_agent_requests_total", endpoint="infer", status="400") == 3
    assert rest("edge_agent_requests_total", endpoint="infer", status="404") == 1
    assert rest("edge_agent_requests_total", endpoint="ready", status="200") == 1
    assert rest("edge_agent_requests_total", endpoint="metrics", status="200") == 1  # the first scrape
    assert rest("edge_agent_request_errors_total", endpoint="infer") == 4
    assert rest("edge_agent_inference_duration_seconds_count") == 11
    assert rest("edge_agent_inference_duration_seconds_bucket", le="+Inf") == 11
    buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value in after.items()
                     if name == "edge_agent_inference_duration_seconds_bucket")
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative
    assert 0 < rest("edge_agent_inference_duration_seconds_sum") < 11 * 10
    assert after[("edge_agent_drift", (("statistic", "n"),))] == sum(1 + k % 3 for k in range(7)) == drift["n"]
    assert after[("edge_agent_drift", (("statistic", "psi_max"),))] == pytest.approx(drift["psi_max"])
    assert after[("edge_agent_drift", (("statistic", "alarm"),))] == float(drift["alarm"])
    assert {dict(labels)["feature"] for name, labels in after if name == "edge_agent_drift_feature_psi"} == set(drift["psi"])
    assert agent.model is not None and not [key for key in after if key[0] == "edge_agent_probation"]


def test_metrics_show_a_push_and_its_probation(broker: ManagedBroker, tmp_path: Path) -> None:
    build = two_input_bundle(tmp_path / "b")
    version_2 = variant(build.bundle, tmp_path / "b" / "keys", tmp_path / "v2", version=2)
    device = provision_device(tmp_path / "dev", build, broker.url, window_s=3600,
                              extra="[probation]\nrequests = 100\nseconds = 600\n")
    pusher = RawPusher(broker)
    try:
        with running_agent(device, subscribed=True) as (agent, base):
            assert not [key for key in scrape(base) if key[0] in ("edge_agent_probation", "edge_agent_push_transfers")]
            pusher.push(version_2.read_bytes())
            deadline, installed = time.monotonic() + 60, ("edge_agent_push_transfers", (("state", "installed"),))
            while installed not in (metrics := scrape(base)):  # the transfer is marked installed after the swap
                assert time.monotonic() < deadline, "the push was not installed"
                time.sleep(0.05)
    finally:
        pusher.close()
    assert metrics[("edge_agent_model_version", ())] == 2
    assert metrics[("edge_agent_probation", (("state", "running"), ("version", "2")))] == 1
    assert metrics[installed] == 1
