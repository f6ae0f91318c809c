"""An installed bundle that no longer loads at start-up (bytes rotted or lost on the board's storage) is
replaced by the previous one, as an A/B updater boots its other slot: the agent serves, says so in one
ERROR line and a `rollback` event, and the next push replaces the broken slot. Without a usable previous
(none, unreadable too, or one that failed its probation here) the agent refuses to start, saying why."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.config import load_agent_config
from runtime_agent.errors import AgentError
from tests.conftest import Build, install_push, provision_device
from tests.deploy.bundle_variants import variant


def _device_with_two_versions(build: Build, tmp_path: Path) -> Path:
    """A device that served v1 and then installed v2: current -> v2's slot, previous -> v1's."""
    device = provision_device(tmp_path / "dev", build, "mqtt://127.0.0.1:1")
    agent = Agent(load_agent_config(device))
    agent.load()
    install_push(agent, variant(build.bundle, build.pubkey.parent, tmp_path / "bundles", version=2), 2)
    assert agent.model.bundle.version == 2
    agent.outbox.close()
    return device


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _events(agent: Agent, kind: str) -> list[dict]:
    payloads = [json.loads(message.payload) for message in agent.outbox.pending(1000) if message.kind == "event"]
    return [payload for payload in payloads if payload["type"] == kind]


def test_a_corrupt_installed_bundle_falls_back_to_the_previous_and_the_next_push_replaces_it(
        default_build: Build, digits, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    device = _device_with_two_versions(default_build, tmp_path)
    config = load_agent_config(device)
    broken = config.bundle_path.resolve()
    _flip_a_byte(broken)

    agent = Agent(config)
    with caplog.at_level(logging.ERROR, logger="runtime_agent"):
        agent.load()
    assert agent.model.bundle.version == 1
    assert agent.infer(digits.x_test[:1]).classes.shape == (1,)  # it serves
    assert agent.slots.previous.resolve() == broken  # pointers swapped on disk: a restart does not retry v2 first
    assert agent.slots.current.resolve() != broken
    [line] = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert "does not load" in line and "serving the previous model, v1" in line, line
    [event] = _events(agent, "rollback")
    assert (event["from_version"], event["to_version"], event["model_version"]) == (2, 1, 1)
    assert "does not load" in event["reason"]
    assert agent.roll_back("back to the broken one?") is False  # nothing usable to roll back to
    agent.outbox.close()

    restarted = Agent(config)  # the switch was durable: v1 loads as current, v2 stays refused as previous
    restarted.load()
    assert restarted.model.bundle.version == 1
    install_push(restarted, variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "bundles", version=3), 3)
    assert restarted.model.bundle.version == 3
    assert not broken.exists()  # the broken slot is pruned: current v3, previous v1
    assert restarted.slots.previous.resolve() != broken and restarted.roll_back("check") is True
    assert restarted.model.bundle.version == 1
    restarted.outbox.close()


@pytest.mark.parametrize("previous_state", ["corrupt too", "failed its probation"])
def test_without_a_usable_previous_the_agent_refuses_to_start_and_says_why(
        default_build: Build, tmp_path: Path, previous_state: str) -> None:
    device = _device_with_two_versions(default_build, tmp_path)
    config = load_agent_config(device)
    broken = config.bundle_path.resolve()
    previous = (device / "previous.bundle").resolve()
    _flip_a_byte(broken)
    if previous_state == "corrupt too":
        _flip_a_byte(previous)
    else:
        (device / "refused-versions.json").write_text(json.dumps([1]))

    agent = Agent(config)
    with pytest.raises(AgentError) as refused:
        agent.load()
    message = str(refused.value)
    expected = "the previous bundle is unusable too" if previous_state == "corrupt too" else \
        "the previous model, v1, failed its probation here"
    assert expected in message and "push or provision a new bundle" in message, message
    assert "\n" not in message
    assert (config.bundle_path.resolve(), (device / "previous.bundle").resolve()) == (broken, previous)  # untouched
    agent.outbox.close()
