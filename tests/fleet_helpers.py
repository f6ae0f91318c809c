"""Helpers of the fleet tests: publishing as a device (real agent payloads, a plain MQTT client), the
monitor started in-process, and waiting for a condition."""

from __future__ import annotations

import copy
import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from runtime_agent.agent import Agent
from runtime_agent.config import load_agent_config
from runtime_agent.drift import COVARIATE, PREDICTION, crossings, psi_threshold
from tests.conftest import BIN, Build, provision_device
from toolchain.deploy.broker import ManagedBroker
from toolchain.fleet.monitor import FleetMonitor

REFERENCE_SAMPLES = 1000
"""About the default build's training split: what `telemetry()`'s PSI thresholds rest on."""


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Injector:
    """A plain MQTT client that publishes what a device (or a broken device) would."""

    def __init__(self, managed: ManagedBroker, client_id: str = "injector", username: str | None = None,
                 password: str | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.connect(managed.host, managed.port)
        self.client.loop_start()
        self.sent = 0

    def publish(self, topic: str, payload: dict | bytes, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()
        self.sent += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def agent_payloads(build: Build, folder: Path) -> dict[str, dict]:
    """A telemetry window and a birth exactly as the agent makes them (in-process, real onnxruntime); for a
    module-scoped fixture of the tests that publish as devices."""
    device = provision_device(folder, build, "mqtt://127.0.0.1:1", "tmpl")
    agent = Agent(load_agent_config(device))
    agent.load()
    agent.infer(np.random.default_rng(0).uniform(0, 16, (8, 1, 8, 8)).astype(np.float32))
    telemetry = agent.close_window()
    birth = agent.birth()
    agent.outbox.close()
    assert telemetry["latency"]["count"] == 1 and set(telemetry["drift"]["psi"]) == {f"x{i}" for i in range(64)}
    return {"telemetry": telemetry, "birth": birth}


def telemetry(template: dict, device: str, seq: int, psi: float = 0.02, n: int = 500, stream: str | None = None,
              **drift: Any) -> dict:
    """The real payload with this device, seq and drift statistics (PSI `psi` on feature x5, 0.01 elsewhere,
    judged by the agent's rule for a window of `n` samples); ``stream`` None: no stream field, as from an agent
    older than outbox streams."""
    payload = copy.deepcopy(template)
    values = {name: 0.01 for name in payload["drift"]["psi"]}
    values["x5"] = psi
    payload.update(device_id=device, seq=seq, n=n, stream=stream)
    if stream is None:
        del payload["stream"]
    report = payload["drift"]
    report.update({"psi": values, "psi_max": max(values.values()), "prediction_psi": 0.01, "ph_alarm": False,
                   "n": n, "psi_threshold": psi_threshold(n, REFERENCE_SAMPLES, 10, len(values)),
                   "prediction_psi_threshold": psi_threshold(n, REFERENCE_SAMPLES, 10), **drift})
    report["psi_over"] = report["psi_sustained"] = [f for f, v in values.items() if v >= report["psi_threshold"]]  # a lasting shift
    report["crossings"] = crossings(report)  # the agent's own rule on these statistics
    report["alarm"] = any(c["kind"] == COVARIATE for c in report["crossings"])
    report["prediction_drift"] = any(c["kind"] == PREDICTION for c in report["crossings"])
    return payload


def started_monitor(managed: ManagedBroker, db: Path, **kwargs: Any) -> FleetMonitor:
    monitor = FleetMonitor(managed.url, db, **kwargs).start()
    assert monitor.wait_connected(10), "the monitor could not subscribe"
    return monitor


def start_fleet_command(*args: str) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """`toolchain fleet ARGS` as a long-running process; its stdout lines are collected as they come by the
    returned thread (it ends once the process has exited and every line is in)."""
    process = subprocess.Popen([str(BIN / "toolchain"), "fleet", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    return process, lines, reader


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus /metrics page (`parse_metrics`)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format parsed by prometheus_client's own parser: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}
