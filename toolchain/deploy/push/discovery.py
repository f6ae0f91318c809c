"""Which devices there are: every device keeps a retained ``status`` on the broker (its birth, or the
LWT's ``offline``), so subscribing to them is a snapshot of a fleet without asking any device."""

from __future__ import annotations

import json
import time
from typing import Any

from runtime_agent.protocol import ONLINE, STATUS, device_topic, parse_topic
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push.client import Listener, PushClient, borrowed_client
from toolchain.errors import ToolchainError


class _StatusCollector(Listener):
    def __init__(self, topic_filter: str) -> None:
        self.filters = (topic_filter,)
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}  # (fleet, device) -> status
        self.last = time.monotonic()

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        try:
            fleet, device, _ = parse_topic(topic)
            status = json.loads(payload)
        except ValueError:  # Malformed is a ValueError too
            return
        if isinstance(status, dict):
            self.statuses[(fleet, device)] = status
            self.last = time.monotonic()


def _collect_statuses(client: PushClient, topic_filter: str, timeout_s: float,
                      quiet_s: float = 0.3) -> dict[tuple[str, str], dict[str, Any]]:
    """Retained status messages under a filter: they arrive right after the subscription is granted,
    so this returns once none came for `quiet_s` (or at `timeout_s`)."""
    collector = _StatusCollector(topic_filter)
    deadline = time.monotonic() + timeout_s
    client.add_listener(collector)
    try:
        collector.last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - collector.last < quiet_s:
            time.sleep(0.02)
    finally:
        client.remove_listener(collector)
    return dict(collector.statuses)


def device_statuses(broker: PushClient | BrokerLogin | str, fleet: str, timeout_s: float = 2.0) -> dict[str, dict[str, Any]]:
    """Every device of `fleet` with a retained status, and that status (`state`, `model_version`, ...)."""
    with borrowed_client(broker) as client:
        found = _collect_statuses(client, device_topic(fleet, "+", STATUS), timeout_s)
    return {device: status for (_, device), status in sorted(found.items())}


def discover_devices(broker: PushClient | BrokerLogin | str, fleet: str, timeout_s: float = 2.0) -> list[str]:
    """Devices of `fleet` whose retained status says online, sorted."""
    return [device for device, status in device_statuses(broker, fleet, timeout_s).items()
            if status.get("state") == ONLINE]


def fleet_of_devices(client: PushClient, devices: list[str], fleet: str | None) -> str:
    """The one fleet the named devices report in (`fleet` when given): commands go to one fleet at a time."""
    if fleet is not None:
        return fleet
    fleets = {find_fleet(client, name) for name in devices}
    if len(fleets) > 1:
        raise ToolchainError(f"the devices report in different fleets ({', '.join(sorted(fleets))}); "
                             "address one fleet at a time with --fleet")
    return fleets.pop()


def find_fleet(broker: PushClient | BrokerLogin | str, device: str, timeout_s: float = 2.0) -> str:
    """The fleet a device reports in, from its retained status; a clear error when none or several."""
    with borrowed_client(broker) as client:
        found = _collect_statuses(client, device_topic("+", device, STATUS), timeout_s)
    fleets = sorted(fleet for fleet, _ in found)
    if not fleets:
        raise ToolchainError(f"device {device!r} has no status on the broker (never connected?); pass --fleet NAME")
    if len(fleets) > 1:
        raise ToolchainError(f"device {device!r} reports in several fleets ({', '.join(fleets)}); pass --fleet NAME")
    return fleets[0]
