"""The MQTT doorway (`runtime_agent.protocol`): what a real agent puts on the wire passes the validators the
monitor uses, malformed reports are refused with the reason, and every topic is built from one constant."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from runtime_agent.agent import Agent
from runtime_agent.config import load_agent_config
from runtime_agent.protocol import (TOPIC_ROOT, Malformed, ack_topic, chunk_topic, device_prefix, device_topic, parse_event,
                                    parse_status, parse_telemetry, parse_topic)
from tests.conftest import REPO, Build, provision_device
from toolchain.deploy.broker import ACL
from toolchain.deploy.bridge import NOTIFICATION_ROOT


@pytest.fixture(scope="module")
def wire(default_build: Build, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, Any]]]:
    """kind -> (topic, payload) of what a real agent sends: its outbox's messages and its birth."""
    device = provision_device(tmp_path_factory.mktemp("device"), default_build, "mqtt://127.0.0.1:1", "cam-1", "plant")
    agent = Agent(load_agent_config(device))
    agent.load()
    agent.infer(np.random.default_rng(0).uniform(0, 16, (8, 1, 8, 8)).astype(np.float32))
    agent.close_window()
    agent.emit_event("installed", transfer="0" * 16, version=2)
    messages = agent.outbox.pending(10)
    agent.outbox.close()
    sent = {parse_topic(m.topic)[2]: (m.topic, json.loads(m.payload)) for m in messages}
    return sent | {"status": (agent.config.topic("status"), agent.birth())}  # the birth goes out directly, not queued


def raw(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def test_what_the_agent_sends_passes_the_validators(wire: dict[str, tuple[str, dict[str, Any]]]) -> None:
    topic, telemetry = wire["telemetry"]
    assert parse_topic(topic) == ("plant", "cam-1", "telemetry") and topic == device_topic("plant", "cam-1", "telemetry")
    report = parse_telemetry(raw(telemetry), "cam-1")
    assert report.seq == telemetry["seq"] and report.n == 8 and report.stream == telemetry["stream"]
    assert set(report.drift["psi"]) == {f"x{i}" for i in range(64)}
    event = parse_event(raw(wire["events"][1]), "cam-1")
    assert (event.type, event.payload["version"]) == ("installed", 2)
    assert parse_status(raw(wire["status"][1]), "cam-1")["state"] == "online"
    assert parse_status(raw({"schema": "status/1", "state": "offline"}), "cam-1") == {"state": "offline"}
    expiring = parse_status(changed(wire["status"][1], certificates={"client_not_after": 2e9, "ca_not_after": 3e9}), "cam-1")
    assert (expiring["cert_not_after"], expiring["ca_not_after"]) == (2e9, 3e9)  # a birth without them: both None


def changed(payload: dict[str, Any], **fields: Any) -> bytes:
    return raw({**payload, **fields})


CASES: list[tuple[str, Callable[[dict[str, Any]], bytes], str]] = [
    ("telemetry", lambda p: b"\xff\xfe", "not UTF-8"),
    ("telemetry", lambda p: b"{not json", "not JSON"),
    ("telemetry", lambda p: b"[1, 2]", "expected a JSON object, got list"),
    ("telemetry", lambda p: raw(p).replace(b'"errors": 0', b'"errors": NaN'), "NaN is not valid JSON"),
    ("telemetry", lambda p: b" " * (1 << 20) + raw(p), "over the 1048576-byte limit"),
    ("telemetry", lambda p: changed(p, schema="events/1"), "'schema' must be 'telemetry/1', got 'events/1'"),
    ("telemetry", lambda p: changed(p, schema="telemetry/2"),
     "unsupported schema 'telemetry/2' (this version reads telemetry/1)"),
    ("telemetry", lambda p: changed(p, device_id="cam-2"), "'device_id' 'cam-2' is not the topic's device 'cam-1'"),
    ("telemetry", lambda p: changed(p, seq=0), "'seq' must be an integer >= 1, got 0"),
    ("telemetry", lambda p: changed(p, seq=True), "'seq' must be an integer >= 1, got True"),
    ("telemetry", lambda p: changed(p, window=[5.0, 1.0]), "'window' ends before it starts (5.0 > 1.0)"),
    ("telemetry", lambda p: changed(p, latency=[]), "'latency' must be an object (the sketch), got list"),
    ("telemetry", lambda p: changed(p, drift={"psi": {"x0": -1}}), "'drift.psi.x0' must be a finite number >= 0, got -1"),
    ("telemetry", lambda p: changed(p, stream="no spaces"), "'stream' must be 1-64 letters, digits, '-' or '_'"),
    ("status", lambda p: changed(p, state="sleeping"), "'state' must be 'online' or 'offline', got 'sleeping'"),
    ("status", lambda p: changed(p, model_version="2"), "'model_version' must be an integer >= 0, got '2'"),
    ("status", lambda p: changed(p, certificates=[1]), "'certificates' must be an object, got [1]"),
    ("status", lambda p: changed(p, certificates={"client_not_after": "soon"}),
     "'certificates.client_not_after' must be a finite number >= 0, got 'soon'"),
    ("events", lambda p: changed(p, type="no spaces"), "'type' must be a name of 1-64 letters, digits, '_', '-' or '.'"),
    ("events", lambda p: changed(p, ts="now"), "'ts' must be a finite number, got 'now'"),
]


@pytest.mark.parametrize("kind, corrupt, reason", CASES, ids=[reason[:40] for _, _, reason in CASES])
def test_malformed_reports_are_refused_with_the_reason(wire: dict[str, tuple[str, dict[str, Any]]], kind: str,
                                                      corrupt: Callable[[dict[str, Any]], bytes], reason: str) -> None:
    parse = {"telemetry": parse_telemetry, "status": parse_status, "events": parse_event}[kind]
    with pytest.raises(Malformed) as refused:
        parse(corrupt(wire[kind][1]), "cam-1")
    assert reason in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("topic, reason", [
    ("edge/v2/plant/cam-1/status", "unexpected topic"),
    ("x/edge/v1/plant/cam-1/status", "unexpected topic"),
    ("edge/v1/plant/cam-1/cmd", "unexpected topic"),
    ("edge/v1/plant/cam 1/status", "fleet and device in 'edge/v1/plant/cam 1/status' must be 1-64 letters"),
])
def test_unexpected_topics_are_refused(topic: str, reason: str) -> None:
    with pytest.raises(Malformed, match=re.escape(reason)):
        parse_topic(topic)


def test_every_topic_is_built_from_the_one_prefix(default_build: Build, tmp_path: Path) -> None:
    prefix = device_prefix("plant", "cam-1")
    assert prefix == f"{TOPIC_ROOT}/plant/cam-1/"
    assert chunk_topic("plant", "cam-1", "ab", 7) == prefix + "push/ab/7"
    assert ack_topic("plant", "cam-1", "ab") == prefix + "push/ab/ack"
    config = load_agent_config(provision_device(tmp_path, default_build, "mqtt://127.0.0.1:1", "cam-1", "plant"))
    assert config.topic("events") == prefix + "events"
    rules = [line.split()[-1] for line in ACL.splitlines() if line.startswith(("topic", "pattern"))]
    # fleet topics under the one prefix; the brokers' own bridge states under theirs (toolchain.deploy.bridge)
    assert rules and all(rule.startswith((TOPIC_ROOT + "/", NOTIFICATION_ROOT + "/")) for rule in rules)
    assert 1 <= sum(rule.startswith(NOTIFICATION_ROOT + "/") for rule in rules) <= 2  # the operator reads, a bridge writes


def test_no_module_spells_the_prefix_itself() -> None:
    """Only runtime_agent/protocol.py writes the topic root; everything else builds topics from it."""
    root = TOPIC_ROOT.encode()
    spelled = sorted(str(path.relative_to(REPO)) for package in ("toolchain", "runtime_agent")
                     for path in (REPO / package).rglob("*.py") if root in path.read_bytes())
    assert spelled == ["runtime_agent/protocol.py"]
