"""Nothing the agent reports is lost: broker outages, `kill -9` of the agent, and the ACL fence."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from runtime_agent.outbox import Outbox
from tests.agent_helpers import start_agent
from tests.conftest import Build, Recorder, provision_device
from toolchain.deploy.broker import OPERATOR, ManagedBroker


def seqs_of(recorder: Recorder) -> list[int]:
    """Telemetry and event seqs in arrival order, de-duplicated the way the fleet monitor does."""
    seen, ordered = set(), []
    for payload in recorder.payloads("/telemetry") + recorder.payloads("/events"):
        if payload["seq"] not in seen:
            seen.add(payload["seq"])
            ordered.append(payload["seq"])
    return ordered


def arrival_order(recorder: Recorder) -> list[int]:
    seen, ordered = set(), []
    for topic, payload in recorder.messages:
        if topic.endswith(("/telemetry", "/events")) and payload:
            seq = json.loads(payload)["seq"]
            if seq not in seen:
                seen.add(seq)
                ordered.append(seq)
    return ordered


def last_committed_seq(device: Path) -> int:
    outbox = Outbox(device / "outbox.sqlite")
    try:
        return outbox.last_seq
    finally:
        outbox.close()


def test_a_20_second_broker_outage_loses_nothing(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url, window_s=0.25)
    agent = start_agent(device, tmp_path / "agent.log")
    try:
        recorder.wait_for(lambda r: len(r.payloads("/telemetry")) >= 5, what="telemetry before the outage")
        broker.stop()
        time.sleep(20)  # the agent keeps producing windows into its outbox meanwhile
        produced_during_outage = last_committed_seq(device)
        broker.start()  # the agent reconnects with backoff (up to 30 s) and drains its backlog
        recorder.wait_for(lambda r: max(seqs_of(r), default=0) > produced_during_outage + 4, timeout=90,
                          what="the backlog and new windows after the restart")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        final = last_committed_seq(device)
        recorder.wait_for(lambda r: max(seqs_of(r), default=0) >= final, timeout=60, what="the backlog")
    finally:
        agent.kill()
        recorder.close()
    order = arrival_order(recorder)
    assert order == list(range(1, final + 1)), "every seq exactly once, in order, after dedup"
    assert final >= 60  # ~80 windows produced during the 20 s outage alone


def test_kill_9_mid_stream_then_restart_loses_nothing(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url, window_s=0.1)
    first = start_agent(device, tmp_path / "agent.log")
    recorder.wait_for(lambda r: len(r.payloads("/telemetry")) >= 10, what="telemetry before the kill")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = last_committed_seq(device)
    second = start_agent(device, tmp_path / "agent.log")
    try:
        recorder.wait_for(lambda r: max(seqs_of(r), default=0) > killed_at + 10, what="telemetry after the restart")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        final = last_committed_seq(device)
        recorder.wait_for(lambda r: max(seqs_of(r), default=0) >= final, what="the rest")
    finally:
        second.kill()
        recorder.close()
    assert arrival_order(recorder) == list(range(1, final + 1))
    assert final > killed_at > 0


def test_acl_keeps_each_device_in_its_own_prefix(secure_broker: ManagedBroker) -> None:
    watcher = Recorder(secure_broker, client_id="watcher", username=OPERATOR, password=f"{OPERATOR}-secret")
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
    device.username_pw_set("dev-1", "dev-1-secret")
    acks: dict[int, object] = {}
    granted: dict[int, list] = {}
    done = threading.Event()
    device.on_publish = lambda c, u, mid, rc, p: (acks.__setitem__(mid, rc), done.set())
    device.on_subscribe = lambda c, u, mid, rcs, p: granted.__setitem__(mid, rcs)
    received: list[str] = []
    device.on_message = lambda c, u, message: received.append(message.topic)
    device.connect(secure_broker.host, secure_broker.port)
    device.loop_start()
    try:
        own = device.publish("edge/v1/lab/dev-1/telemetry", b'{"seq": 1}', qos=1)
        other = device.publish("edge/v1/lab/dev-2/telemetry", b'{"seq": 1}', qos=1)
        spoofed_cmd = device.publish("edge/v1/lab/dev-2/cmd", b'{"id": "x", "type": "rollback"}', qos=1)
        device.subscribe("edge/v1/lab/+/cmd", qos=1)  # tries to listen to every device's commands
        deadline = time.monotonic() + 10
        while (len(acks) < 3 or not granted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not acks[own.mid].is_failure
        assert acks[other.mid].is_failure and acks[spoofed_cmd.mid].is_failure  # "Not authorized"
        for target in ("dev-2", "dev-1"):
            watcher.client.publish(f"edge/v1/lab/{target}/cmd", f'{{"id": "to-{target}"}}', qos=1)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert received == ["edge/v1/lab/dev-1/cmd"]  # the broker delivers only its own commands
        assert [t for t, _ in watcher.messages if t.endswith("/telemetry")] == ["edge/v1/lab/dev-1/telemetry"]
    finally:
        device.loop_stop()
        device.disconnect()
        watcher.close()


def test_wrong_password_is_refused(secure_broker: ManagedBroker) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
    client.username_pw_set("dev-1", "guess")
    results = []
    client.on_connect = lambda c, u, f, rc, p: results.append(rc)
    client.connect(secure_broker.host, secure_broker.port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not results and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    assert results and results[0].is_failure


def test_example_acl_matches_the_generated_one() -> None:
    from toolchain.deploy.broker import ACL

    assert (Path(__file__).resolve().parents[2] / "examples" / "mosquitto" / "acl").read_text() == ACL
