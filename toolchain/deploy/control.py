"""Operator commands to devices (`rollback`, `config`, `rotate_keys` on each device's `cmd`), sent and awaited.

Every command carries an id generated here; the device answers on its `events` with the command's
own event naming it (`rollback`, `config` or `keys_rotated`, with `cmd_id`) or with an `error` event carrying the
same `id` and the reason it was refused. The listener subscribes before the command goes out, so the
answer cannot be missed; a device that does not answer within the timeout is reported as such.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from runtime_agent.protocol import CMD, EVENTS, SCHEMAS, device_topic
from toolchain.deploy.push.client import Listener, PushClient


ANSWERS = {"rotate_keys": "keys_rotated"}  # the event that answers a command, where not named like it


@dataclass(frozen=True)
class CommandResult:
    """One device's answer: `state` is `done`, `failed` (the device refused; `detail` says why) or
    `timeout` (no answer); `event` is the answering event."""

    fleet: str
    device: str
    command_id: str
    state: str
    detail: str
    event: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.state == "done"


class _Answer(Listener):
    """Waits for the event that answers one command on one device."""

    def __init__(self, fleet: str, device: str, kind: str, command_id: str) -> None:
        self.filters = (device_topic(fleet, device, EVENTS),)
        self.kind, self.command_id = kind, command_id
        self.event: dict[str, Any] | None = None
        self.arrived = threading.Event()

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            event = json.loads(payload) if payload else None
        except ValueError:
            return
        if not isinstance(event, dict) or self.arrived.is_set():
            return
        answered = (event.get("type") == self.kind and event.get("cmd_id") == self.command_id) or \
                   (event.get("type") == "error" and event.get("id") == self.command_id)
        if answered:
            self.event = event
            self.arrived.set()


def send_command(client: PushClient, fleet: str, devices: list[str], kind: str, fields: dict[str, Any],
                 timeout_s: float, retain: bool = False) -> list[CommandResult]:
    """Send command `kind` (with `fields`) to every device of `fleet` in `devices` at once and wait up to
    `timeout_s` in all for their answers; one result per device, in the order given. `retain`: the broker
    keeps the command for a device that is offline now (only for commands a device may apply again)."""
    answers = []
    for device in devices:
        answer = _Answer(fleet, device, ANSWERS.get(kind, kind), f"{kind}-{uuid.uuid4().hex[:12]}")
        client.add_listener(answer)  # subscribed (SUBACK) before the command can be answered
        answers.append(answer)
    try:
        for device, answer in zip(devices, answers):
            command = {"schema": SCHEMAS[CMD], "id": answer.command_id, "type": kind, **fields}
            client.publish(device_topic(fleet, device, CMD), json.dumps(command), retain=retain)
        deadline = time.monotonic() + timeout_s
        for answer in answers:
            answer.arrived.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for answer in answers:
            client.remove_listener(answer)
    return [_result(fleet, device, answer, timeout_s) for device, answer in zip(devices, answers)]


def _result(fleet: str, device: str, answer: _Answer, timeout_s: float) -> CommandResult:
    event = answer.event
    if event is None:
        return CommandResult(fleet, device, answer.command_id, "timeout", f"no answer within {timeout_s:g} s")
    if event["type"] == "error":
        return CommandResult(fleet, device, answer.command_id, "failed", str(event.get("reason", "")), event)
    if event["type"] == "rollback":
        detail = f"rolled back v{event.get('from_version')} -> v{event.get('to_version')}"
    elif event["type"] == "keys_rotated":
        detail = f"at rotation {event.get('rotation')}, trusts {', '.join(event.get('trusted') or [])}"
    else:
        detail = f"telemetry window now {event.get('telemetry', {}).get('window_s')} s"
    return CommandResult(fleet, device, answer.command_id, "done", detail, event)
