"""The device end of model pushes, driven at the protocol level (docs/push-protocol.md) with real
agents, a real mosquitto and re-signed bundle variants: install, every rejection, probation, rollback."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from runtime_agent.signing import write_keypair
from tests.deploy.bundle_variants import collapse, slower, variant
from tests.conftest import Build, Recorder, provision_device
from tests.agent_helpers import start_agent
from tests.agent_helpers import http, infer_body, running_agent
from toolchain.deploy.broker import ManagedBroker

PREFIX = "edge/v1/lab/dev-1/"
PROBATION = "[probation]\nrequests = 120\nseconds = 600\n"


class RawPusher:
    """Publishes an offer and chunks exactly as the protocol says, with knobs to misbehave."""

    def __init__(self, broker: ManagedBroker) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pusher-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def push(self, data: bytes, chunk_bytes: int = 16384, skip: set[int] = frozenset(), tamper: int | None = None,
             only: range | None = None, offer_id: str = "o1") -> str:
        transfer = hashlib.sha256(data).hexdigest()[:16]
        chunks = -(-len(data) // chunk_bytes)
        offer = {"schema": "cmd/1", "id": offer_id, "type": "push_offer", "transfer": transfer, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest(), "chunk_bytes": chunk_bytes, "chunks": chunks}
        self.client.publish(PREFIX + "cmd", json.dumps(offer), qos=1).wait_for_publish(5)
        for index in only if only is not None else range(chunks):
            if index in skip:
                continue
            piece = data[index * chunk_bytes:(index + 1) * chunk_bytes]
            if index == tamper:
                piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
            self.client.publish(f"{PREFIX}push/{transfer}/{index}", piece, qos=1)
        return transfer

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture()
def pusher(broker: ManagedBroker) -> Iterator[RawPusher]:
    raw = RawPusher(broker)
    yield raw
    raw.close()


def agent_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the agent logged (the device's own log: one line per install, rejection, verdict, rollback)."""
    return [r.getMessage() for r in caplog.records if r.name == "runtime_agent.agent"]


def final_ack(recorder: Recorder, transfer: str) -> dict:
    def done(r: Recorder):
        acks = [a for a in r.payloads(f"push/{transfer}/ack") if a["state"] in ("installed", "rejected")]
        return acks[-1] if acks else None
    return recorder.wait_for(done, timeout=60, what=f"final ack of {transfer}")


class SteadyClient:
    """Keeps sending REST inferences in a thread and counts failures: updates must never fail one."""

    def __init__(self, base: str, x: np.ndarray) -> None:
        self.base, self.body = base, infer_body(x)
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            status, answer = http("POST", f"{self.base}/v2/models/digits/infer", self.body)
            self.statuses.append(status)
            self.versions.add(answer.get("model_version", "?"))

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10)
        return self.statuses


def test_install_swaps_atomically_with_no_failed_request(default_build: Build, broker: ManagedBroker, pusher: RawPusher,
                                                         tmp_path: Path, digits) -> None:
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url, extra=PROBATION)
    v2 = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v2", version=2)
    with running_agent(device, subscribed=True) as (agent, base):
        client = SteadyClient(base, digits.x_test[:2])
        time.sleep(0.3)
        transfer = pusher.push(v2.read_bytes())
        ack = final_ack(recorder, transfer)
        time.sleep(0.3)
        statuses = client.stop()
        assert ack["state"] == "installed" and ack["received"] == [[0, ack["chunks"] - 1]]
        assert agent.model.bundle.version == 2
        assert http("GET", f"{base}/v2/models/digits")[1]["versions"] == ["2"]
    assert statuses and set(statuses) == {200} and client.versions == {"1", "2"}
    assert (device / "current.bundle").resolve() == (device / "slots" / "digits-2.bundle").resolve()
    assert (device / "previous.bundle").resolve() == (device / "slots" / "digits-1.bundle").resolve()
    installed = recorder.wait_for(lambda r: [e for e in r.payloads("/events") if e["type"] == "installed"], what="event")
    assert installed[0]["version"] == 2 and installed[0]["previous_version"] == 1
    assert recorder.wait_for(lambda r: [s for s in r.payloads("/status") if s.get("model_version") == 2], what="status v2")
    assert not list((device / "staging").glob("*.part"))
    recorder.close()


@pytest.mark.parametrize("case, reason", [
    ("tampered chunk", "sha256 of the received file does not match the offer"),
    ("truncated bundle", "is truncated"),
    ("wrong signing key", "signature check failed: signed by key"),
    ("older version", "version 1 is not newer than the installed version 1"),
    ("wrong target", "bundle is built for target 'raspberry-pi-4', this device is 'jetson-orin-nano'"),
])
def test_bad_updates_are_rejected_and_the_old_model_keeps_serving(case: str, reason: str, default_build: Build,
                                                                 broker: ManagedBroker, pusher: RawPusher, tmp_path: Path,
                                                                 digits, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime_agent")
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url)
    keys = default_build.pubkey.parent
    if case == "wrong signing key":
        other_key, _ = write_keypair(tmp_path / "other-key")
        data = variant(default_build.bundle, keys, tmp_path / "v", version=2, signing_key=other_key).read_bytes()
    elif case == "older version":
        data = variant(default_build.bundle, keys, tmp_path / "v", version=1).read_bytes()
    elif case == "wrong target":
        data = variant(default_build.bundle, keys, tmp_path / "v", version=2, target="raspberry-pi-4").read_bytes()
    else:
        data = variant(default_build.bundle, keys, tmp_path / "v", version=2).read_bytes()
        data = data[:-1000] if case == "truncated bundle" else data
    with running_agent(device, subscribed=True) as (agent, base):
        client = SteadyClient(base, digits.x_test[:2])
        transfer = pusher.push(data, tamper=3 if case == "tampered chunk" else None)
        ack = final_ack(recorder, transfer)
        time.sleep(0.2)
        statuses = client.stop()
        assert agent.model.bundle.version == 1
    recorder.close()
    assert ack["state"] == "rejected" and reason in ack["reason"]
    [event] = {e["seq"]: e for e in recorder.payloads("/events") if e["type"] == "rejected"}.values()  # at least once
    assert reason in event["reason"] and event["transfer"] == transfer
    assert [m for m in agent_log(caplog) if m.startswith(f"rejected push {transfer}: ") and reason in m]
    assert statuses and set(statuses) == {200}
    assert not (device / "current.bundle").is_symlink()  # nothing was installed


@pytest.mark.parametrize("transform, reason", [(slower(), "latency p90"), (collapse(3), "predictions shifted")])
def test_probation_rolls_back_a_worse_model(transform, reason: str, default_build: Build, broker: ManagedBroker,
                                            pusher: RawPusher, tmp_path: Path, digits, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime_agent")
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url, extra=PROBATION)
    worse = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v", version=2, transform=transform)
    with running_agent(device, subscribed=True) as (agent, _):
        for i in range(150):  # the previous model's baseline
            agent.infer(digits.x_test[i % 300: i % 300 + 1])
        transfer = pusher.push(worse.read_bytes())
        assert final_ack(recorder, transfer)["state"] == "installed"
        for i in range(130):
            agent.infer(digits.x_test[i % 300: i % 300 + 1])
        rollback = recorder.wait_for(lambda r: [e for e in r.payloads("/events") if e["type"] == "rollback"], what="rollback")
        assert agent.model.bundle.version == 1
        assert agent.infer(digits.x_test[:1]).classes.shape == (1,)
    recorder.close()
    assert rollback[0]["from_version"] == 2 and rollback[0]["to_version"] == 1 and reason in rollback[0]["reason"]
    assert (device / "current.bundle").resolve().name == "digits-1.bundle"
    again = json.loads((device / "refused-versions.json").read_text())
    assert again == [2]
    logged = agent_log(caplog)
    assert [m for m in logged if m.startswith(f"installed digits v2 (was v1) from push {transfer}")]
    assert [m for m in logged if m.startswith("probation failed: v2: ") and reason in m]
    assert [m for m in logged if m.startswith("rolled back v2 -> v1: probation failed: ") and reason in m]


def test_a_good_model_passes_probation_and_manual_rollback_works(default_build: Build, broker: ManagedBroker,
                                                                 pusher: RawPusher, tmp_path: Path, digits,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime_agent")
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url, extra=PROBATION)
    v2 = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v", version=2)
    with running_agent(device, subscribed=True) as (agent, _):
        for i in range(150):
            agent.infer(digits.x_test[i: i + 1])
        assert final_ack(recorder, pusher.push(v2.read_bytes()))["state"] == "installed"
        for i in range(130):
            agent.infer(digits.x_test[i: i + 1])
        passed = recorder.wait_for(lambda r: [e for e in r.payloads("/events") if e["type"] == "probation_passed"], what="verdict")
        assert passed[0]["version"] == 2
        pusher.client.publish(PREFIX + "cmd", json.dumps({"id": "rb-1", "type": "rollback"}), qos=1)
        rollback = recorder.wait_for(lambda r: [e for e in r.payloads("/events") if e["type"] == "rollback"], what="rollback")
        assert agent.model.bundle.version == 1
    recorder.close()
    assert rollback[0]["reason"] == "manual rollback (cmd rb-1)" and rollback[0]["cmd_id"] == "rb-1"
    logged = agent_log(caplog)
    assert [m for m in logged if re.fullmatch(r"probation passed: v2 after \d+ requests", m)]
    assert "rolled back v2 -> v1: manual rollback (cmd rb-1)" in logged
    assert (device / "current.bundle").resolve().name == "digits-1.bundle"


def test_manual_rollback_never_brings_back_a_model_that_failed_probation(default_build: Build, broker: ManagedBroker,
                                                                        pusher: RawPusher, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """After probation rolled v2 back, `previous` still points at v2: a manual rollback (an operator's retry)
    used to swap the refused model in again, and a restart then rolled it back once more."""
    caplog.set_level(logging.INFO, logger="runtime_agent")
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url)
    v2 = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v", version=2)
    with running_agent(device, subscribed=True) as (agent, _):
        assert final_ack(recorder, pusher.push(v2.read_bytes()))["state"] == "installed"
        assert agent.roll_back("probation failed: test", refuse=True)  # what a failed probation does
        pusher.client.publish(PREFIX + "cmd", json.dumps({"id": "rb-again", "type": "rollback"}), qos=1)
        [error] = recorder.wait_for(lambda r: [e for e in r.payloads("/events")
                                               if e["type"] == "error" and e.get("id") == "rb-again"], what="refusal")
        assert agent.model.bundle.version == 1
    recorder.close()
    reason = ("the previous model, v2, was rolled back after failing its probation on this device; "
              "push a newer version to replace v1")
    assert error["reason"] == f"rejected cmd: {reason}"
    assert f"rejected cmd: {reason}" in agent_log(caplog)
    assert (device / "current.bundle").resolve().name == "digits-1.bundle"


def test_a_retained_command_is_not_run_again_at_every_reconnect(default_build: Build, broker: ManagedBroker,
                                                                pusher: RawPusher, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A rollback published with retain (`mosquitto_pub -r`) rolled the device back and forth at every
    restart and broker reconnect; only `rotate_keys` is meant to be retained."""
    caplog.set_level(logging.INFO, logger="runtime_agent")
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url)
    command = {"id": "cfg-kept", "type": "config", "telemetry": {"window_s": 5}}
    pusher.client.publish(PREFIX + "cmd", json.dumps(command), qos=1, retain=True).wait_for_publish(5)
    with running_agent(device) as (agent, _):
        [error] = recorder.wait_for(lambda r: [e for e in r.payloads("/events")
                                               if e["type"] == "error" and e.get("id") == "cfg-kept"], what="refusal")
        assert agent.window_s == 0.5
        refusals = [m for m in agent_log(caplog) if m.startswith("rejected cmd:")]
        agent.handle_command(b"")  # what clearing it, as the reason says, delivers: no refusal
        assert [m for m in agent_log(caplog) if m.startswith("rejected cmd:")] == refusals
    recorder.close()
    assert error["reason"].startswith("rejected cmd: cmd cfg-kept is a retained config, not applied: it would run "
                                      "again at every reconnect; ")
    assert [m for m in agent_log(caplog) if m.startswith("rejected cmd: cmd cfg-kept is a retained config")]


def test_kill_9_mid_transfer_resumes_from_what_is_on_disk(default_build: Build, broker: ManagedBroker, pusher: RawPusher,
                                                          tmp_path: Path) -> None:
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url)
    data = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v", version=2, padding_bytes=3 << 20).read_bytes()
    chunks = -(-len(data) // 16384)
    agent = start_agent(device, tmp_path / "agent.log")
    try:
        recorder.wait_for(lambda r: [s for s in r.payloads("status") if s.get("state") == "online"],
                          timeout=60, what="the agent's birth")  # sent after it subscribed: an offer now arrives
        transfer = pusher.push(data, only=range(0, chunks // 2))
        recorder.wait_for(lambda r: any(a["received"] and a["received"][-1][1] >= chunks // 2 - 17
                                        for a in r.payloads(f"push/{transfer}/ack")), what="half the chunks")
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        held = json.loads((device / "staging" / f"{transfer}.json").read_text())["received"]
        recorder.messages.clear()
        agent = start_agent(device, tmp_path / "agent.log")
        recorder.wait_for(lambda r: [s for s in r.payloads("status") if s.get("state") == "online"],
                          timeout=60, what="the restarted agent's birth")  # subscribed again
        recorder.messages.clear()
        pusher.push(data, only=range(0), offer_id="o2")  # re-offer: the device says what it holds
        resumed = recorder.wait_for(lambda r: r.payloads(f"push/{transfer}/ack"), timeout=60, what="ack of the re-offer")[0]
        assert resumed["state"] == "receiving" and resumed["received"] == held
        missing = [i for i in range(chunks) if not any(a <= i <= b for a, b in held)]
        pusher.push(data, only=range(0), offer_id="o3")
        for index in missing:
            pusher.client.publish(f"{PREFIX}push/{transfer}/{index}", data[index * 16384:(index + 1) * 16384], qos=1)
        assert final_ack(recorder, transfer)["state"] == "installed"
    finally:
        agent.kill()
        recorder.close()


def test_restarted_agent_serves_the_installed_version_and_can_still_roll_back(default_build: Build, broker: ManagedBroker,
                                                                               pusher: RawPusher, tmp_path: Path) -> None:
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", default_build, broker.url)
    v2 = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v", version=2)
    with running_agent(device, subscribed=True):
        assert final_ack(recorder, pusher.push(v2.read_bytes()))["state"] == "installed"
    with running_agent(device) as (agent, _):
        assert agent.model.bundle.version == 2
        assert agent.roll_back("test") and agent.model.bundle.version == 1
    recorder.close()
