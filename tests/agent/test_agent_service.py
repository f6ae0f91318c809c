"""The running agent against a real mosquitto and real onnxruntime: REST serving, telemetry, commands."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime_agent.sketch import LatencySketch
from tests.agent_helpers import http, infer_body, running_agent
from tests.conftest import BIN, Build, Recorder, provision_device, run_cli
from toolchain.deploy.broker import ManagedBroker


def test_kserve_v2_endpoints_and_bad_requests(default_build: Build, broker: ManagedBroker, tmp_path: Path, digits: Any) -> None:
    device = provision_device(tmp_path / "dev", default_build, broker.url)
    with running_agent(device) as (agent, base):
        assert http("GET", f"{base}/v2/health/live") == (200, {"live": True})
        assert http("GET", f"{base}/v2/health/ready") == (200, {"ready": True})
        status, meta = http("GET", f"{base}/v2/models/digits")
        assert status == 200 and meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"

        status, answer = http("POST", f"{base}/v2/models/digits/infer", infer_body(digits.x_test[:16]))
        assert status == 200 and answer["id"] == "r1" and answer["model_version"] == "1"
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["logits"]["shape"] == [16, 10] and len(outputs["logits"]["data"]) == 160
        assert np.mean(np.array(outputs["class"]["data"]) == digits.y_test[:16]) >= 0.9

        bad = [
            (infer_body(digits.x_test[:2].astype(np.float64), "FP64"), "input dtype is float64, the model expects float32"),
            (infer_body(np.zeros((2, 1, 8, 9), np.float32)), "input shape is [2, 1, 8, 9], the model expects [1, 8, 8]"),
            ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [float("nan")] * 64}]},
             "input has 64 NaN or infinite value(s)"),
            ({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 63}]},
             "'data' has 63 values but 'shape' [1, 1, 8, 8] needs 64"),
            ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [0.0]}]}, "unknown input 'pixels'"),
            ({"nope": 1}, "request must be a JSON object with 'inputs'"),
        ]
        for body, message in bad:
            status, answer = http("POST", f"{base}/v2/models/digits/infer", body)
            assert status == 400 and message in answer["error"], answer
        assert http("POST", f"{base}/v2/models/other/infer", infer_body(digits.x_test[:1]))[0] == 404
        assert http("POST", f"{base}/v2/models/digits/versions/7/infer", infer_body(digits.x_test[:1]))[0] == 404
        status, answer = http("POST", f"{base}/v2/models/digits/versions/1/infer",
                              {**infer_body(digits.x_test[:3]), "outputs": [{"name": "label"}]})
        assert status == 200 and [o["name"] for o in answer["outputs"]] == ["label"]
        assert answer["outputs"][0]["data"] == [digits.labels[i] for i in digits.y_test[:3]]


def test_telemetry_carries_exact_mergeable_latency_percentiles(default_build: Build, broker: ManagedBroker,
                                                               tmp_path: Path, digits: Any) -> None:
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url, window_s=3600)
    latencies = np.random.default_rng(3).lognormal(mean=-1.0, sigma=0.6, size=2000)
    with running_agent(device) as (agent, _):
        batch = agent.model.validate(digits.x_test[:1])
        prediction = agent.model.predict_batch(batch)
        for value in latencies:
            agent.record(float(value), batch, prediction.classes)
        agent.close_window()
        [telemetry] = recorder.wait_for(lambda r: r.payloads("/telemetry"), what="telemetry")
    recorder.close()
    assert telemetry["n"] == 2000 and telemetry["requests"] == 2000 and telemetry["model_version"] == 1
    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        exact = np.quantile(latencies, q, method="lower")
        assert abs(telemetry["latency"][key] - exact) <= 0.01 * exact + 1e-12
    received = LatencySketch.from_dict(telemetry["latency"])
    assert received.count == 2000 and received.to_dict()["buckets"] == LatencySketch.from_dict(telemetry["latency"]).to_dict()["buckets"]


def test_birth_status_is_retained_and_lwt_says_offline(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", default_build, broker.url)
    process = subprocess.Popen([str(BIN / "edge-agent"), "run", "--device-dir", str(device)])
    try:
        late = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a subscriber that arrives later still sees the retained birth
            late = Recorder(broker, topic="edge/v1/lab/dev-1/status", client_id=f"late-{time.monotonic_ns()}")
            time.sleep(0.3)
            if late.payloads("/status"):
                break
            late.close()
        birth = late.payloads("/status")[-1]
        assert birth["state"] == "online" and birth["model_version"] == 1 and birth["profile"] == "jetson-orin-nano"
        process.kill()  # no clean disconnect: the broker publishes the will
        late.wait_for(lambda r: r.payloads("/status")[-1]["state"] == "offline", timeout=90, what="LWT")
        late.close()
    finally:
        process.kill()
        process.wait()


def test_drift_shift_raises_psi_and_an_alarm_event(default_build: Build, broker: ManagedBroker, tmp_path: Path, digits: Any) -> None:
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url, window_s=3600)
    spread = digits.x_train.reshape(len(digits.x_train), -1).std(axis=0).reshape(1, 1, 8, 8)
    with running_agent(device) as (agent, _):
        agent.infer(digits.x_test)
        stable = agent.close_window()
        agent.infer((digits.x_test + spread).astype(np.float32))
        shifted = agent.close_window()
        recorder.wait_for(lambda r: r.payloads("/events"), what="drift alarm event")
    recorder.close()
    assert stable["drift"]["psi_max"] < 0.25 and shifted["drift"]["psi_max"] > 0.25
    # delivery is at least once (the outbox resends what the broker has not acknowledged): one alarm, by seq
    [event] = {e["seq"]: e for e in recorder.payloads("/events") if e["type"] == "drift_alarm"}.values()
    assert event["psi_max"] == shifted["drift"]["psi_max"]


def test_malformed_commands_are_rejected_with_reasons_and_serving_goes_on(default_build: Build, broker: ManagedBroker,
                                                                         tmp_path: Path, digits: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    recorder = Recorder(broker, topic="edge/v1/lab/dev-1/events")
    device = provision_device(tmp_path / "dev", default_build, broker.url, window_s=3600)
    rng = np.random.default_rng(0)
    kinds = [lambda: rng.bytes(int(rng.integers(1, 300))),
             lambda: b'{"id": 1, "type": "config"}',
             lambda: b'["a list"]',
             lambda: b'{"id": "x", "type": "format-disk"}',
             lambda: json.dumps({"id": "c", "type": "config", "telemetry": {"window_s": -3}}).encode(),
             lambda: b"{" * 5000]
    payloads = [kinds[i % len(kinds)]() for i in range(9_990)] + [b"x" * (1 << 20)] * 10
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sender", protocol=mqtt.MQTTv5)
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    with running_agent(device) as (agent, base):
        time.sleep(0.5)
        served: list[int] = []
        for index, payload in enumerate(payloads):
            sender.publish("edge/v1/lab/dev-1/cmd", payload, qos=1)
            if index % 1000 == 0:
                served.append(http("POST", f"{base}/v2/models/digits/infer", infer_body(digits.x_test[:4]))[0])
        recorder.wait_for(lambda r: len({e["seq"] for e in r.payloads("/events")}) >= 10_000,
                          timeout=180, what="10,000 rejection events")
        events = recorder.payloads("/events")
        assert served == [200] * 10
        assert http("GET", f"{base}/v2/health/ready")[0] == 200
    sender.loop_stop()
    recorder.close()
    events = list({e["seq"]: e for e in events}.values())  # at-least-once delivery: de-duplicate by seq
    assert len(events) == 10_000 and all(e["type"] == "error" for e in events)
    reasons = {e["reason"] for e in events}
    assert "rejected cmd: message is 1048576 bytes, over the 65536-byte limit" in reasons
    assert any("not UTF-8 JSON" in r for r in reasons) and any("'id' must be a string" in r for r in reasons)
    assert any("'type' must be one of push_offer, rollback, config, rotate_keys, got 'format-disk'" in r for r in reasons)
    assert any("expected a JSON object, got list" in r for r in reasons)
    assert any("config needs telemetry.window_s between 0.05 and 86400" in r for r in reasons)


def test_a_config_command_changes_the_window(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    recorder = Recorder(broker, topic="edge/v1/lab/dev-1/events")
    device = provision_device(tmp_path / "dev", default_build, broker.url, window_s=3600)
    with running_agent(device) as (agent, _):
        time.sleep(0.5)
        sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sender.connect(broker.host, broker.port)
        sender.publish("edge/v1/lab/dev-1/cmd", json.dumps({"id": "c1", "type": "config", "telemetry": {"window_s": 2}}), qos=1)
        sender.loop(1)
        recorder.wait_for(lambda r: r.payloads("/events"), what="config event")
        assert agent.window_s == 2.0
        sender.disconnect()
    recorder.close()
    assert recorder.payloads("/events")[0] == {**recorder.payloads("/events")[0], "type": "config", "cmd_id": "c1"}


@pytest.mark.parametrize("toml, message", [
    ('device_id = "d"\nbroker = "http://x"\n', "'broker' must look like mqtt://HOST:PORT"),
    ('device_id = "bad id!"\nbroker = "mqtt://h:1"\n', "'device_id' must be 1-64 letters"),
    ('device_id = "d"\nbroker = "mqtt://h:1"\ncolour = 1\n', "unknown key(s) ['colour']"),
    ('device_id = "d"\nbroker = "mqtt://h:1"\n[telemetry]\nwindow_s = "10"\n', "'window_s' must be seconds between 0.05 and 86400"),
    ('device_id = "d"\nbroker = "mqtt://h:1"\n[serve]\nthreads = -1\n', "'threads' must be an integer 0..256"),
    ('device_id = "d"\nbroker = "mqtt://h:1"\n[serve]\nspin_us = -2\n', "'spin_us' must be microseconds 0..1000000, or -1"),
    ('device_id = "d"\nbroker = "mqtt://h:1"\n[serve]\nport = 8500\ngrpc_port = 8500\n', "grpc_port 8500 is also the REST port"),
    ('broker = "mqtt://h:1"\n', "required key 'device_id' is missing"),
])
def test_bad_agent_config_is_one_line(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "agent.toml").write_text(toml)
    result = run_cli("edge-agent", "run", "--device-dir", str(tmp_path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'agent.toml'}") and message in line


def test_missing_key_or_bundle_refuses_to_serve(tmp_path: Path, default_build: Build) -> None:
    (tmp_path / "agent.toml").write_text('device_id = "d"\nbroker = "mqtt://127.0.0.1:1"\n')
    no_key = run_cli("edge-agent", "run", "--device-dir", str(tmp_path))
    assert no_key.returncode == 2 and no_key.stderr.startswith(f"error: public key {tmp_path / 'trusted.pub'} does not exist")
    (tmp_path / "trusted.pub").write_bytes(default_build.pubkey.read_bytes())
    no_bundle = run_cli("edge-agent", "run", "--device-dir", str(tmp_path))
    assert no_bundle.returncode == 2 and no_bundle.stderr.strip() == f"error: bundle {tmp_path / 'current.bundle'} does not exist"
