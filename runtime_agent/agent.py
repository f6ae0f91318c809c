"""The device agent: serve the installed bundle, measure every request, report each window over MQTT.

Serving never waits on the network: telemetry and events go into the durable outbox, and the MQTT
link drains it whenever the broker is reachable. A bad request or a malformed command is answered with
a reason (HTTP 400, an `error` event) and the agent keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from runtime_agent import __version__
from runtime_agent.bundle import read_bundle
from runtime_agent.config import AgentConfig
from runtime_agent.drift import DriftMonitor, alarm
from runtime_agent.errors import AgentError, InputError
from runtime_agent.model import LoadedModel, Prediction
from runtime_agent.outbox import Outbox
from runtime_agent.signing import load_public_key
from runtime_agent.sketch import LatencySketch

log = logging.getLogger(__name__)
MAX_COMMAND_BYTES = 64 * 1024
COMMAND_TYPES = ("push_offer", "rollback", "config")


def rss_mb() -> float:
    """Resident memory of this process, from /proc (0.0 where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Window:
    """Counters of one telemetry window; replaced, never reset in place, so a report is a snapshot."""

    def __init__(self) -> None:
        self.started = time.time()
        self.sketch = LatencySketch()
        self.samples = 0
        self.requests = 0
        self.errors = 0


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.outbox = Outbox(config.queue_path, max_messages=config.queue_max_messages)
        self.window_s = config.window_s
        self._lock = threading.Lock()
        self._window = Window()
        self._model: LoadedModel | None = None
        self._monitor: DriftMonitor | None = None

    # -- model -------------------------------------------------------------------------------
    def load(self) -> LoadedModel:
        """Verify and load the installed bundle; refuse to serve anything unverified."""
        bundle = read_bundle(self.config.bundle_path, load_public_key(self.config.pubkey_path))
        model = LoadedModel.from_bundle(bundle)
        monitor = DriftMonitor(bundle.manifest["reference"], model.input_shape)
        with self._lock:
            self._model, self._monitor = model, monitor
        return model

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def infer(self, batch: Any) -> Prediction:
        """One request: predict, and record latency, counts and drift statistics."""
        model = self._model
        if model is None:
            raise AgentError("no model is loaded")
        started = time.perf_counter()
        try:
            samples = model.validate(batch)
        except InputError:
            with self._lock:
                self._window.errors += 1
            raise
        prediction = model.predict_batch(samples)
        self.record((time.perf_counter() - started) * 1000, samples, prediction.classes)
        return prediction

    def record(self, latency_ms: float, batch: np.ndarray, classes: np.ndarray) -> None:
        """Account one served request in the current window (latency sketch, counts, drift)."""
        with self._lock:
            window = self._window
            window.sketch.add(latency_ms)
            window.requests += 1
            window.samples += len(classes)
            if self._monitor is not None:
                self._monitor.update(batch, classes)

    # -- telemetry and events ------------------------------------------------------------------
    def _version(self) -> int | None:
        return self._model.bundle.version if self._model else None

    def birth(self) -> dict[str, Any]:
        manifest = self._model.bundle.manifest if self._model else {}
        return {"schema": "status/1", "state": "online", "device_id": self.config.device_id,
                "model_version": manifest.get("version"), "model_name": manifest.get("name"),
                "agent_version": __version__, "profile": manifest.get("target"), "ts": time.time()}

    def emit_event(self, kind: str, **fields: Any) -> int:
        payload = {"schema": "events/1", "type": kind, "device_id": self.config.device_id,
                   "model_version": self._version(), "ts": time.time(), **fields}
        return self.outbox.put(self.config.topic("events"), payload, kind="event")

    def close_window(self) -> dict[str, Any]:
        """Snapshot and reset the window's counters; queue its telemetry (and an alarm event if any)."""
        with self._lock:
            window, self._window = self._window, Window()
            drift = self._monitor.window_report() if self._monitor else {}
        sketch = window.sketch
        latency = {**sketch.to_dict(), **(sketch.summary() if sketch.count else {"p50": None, "p90": None, "p99": None})}
        payload = {"schema": "telemetry/1", "device_id": self.config.device_id, "window": [window.started, time.time()],
                   "model_version": self._version(), "n": window.samples, "requests": window.requests,
                   "errors": window.errors, "latency": latency, "drift": drift, "rss_mb": round(rss_mb(), 2),
                   "queue": {"pending": len(self.outbox), "dropped_telemetry": self.outbox.dropped_telemetry}}
        self.outbox.put(self.config.topic("telemetry"), payload, kind="telemetry")
        if drift and alarm(drift):
            self.emit_event("drift_alarm", psi_max=drift.get("psi_max"), prediction_psi=drift.get("prediction_psi"),
                            ph_alarm=drift.get("ph_alarm"), window=payload["window"])
        return payload

    # -- commands ------------------------------------------------------------------------------
    def handle_command(self, raw: bytes) -> None:
        """Validate a `cmd` message; anything malformed becomes an `error` event with the reason."""
        try:
            command = self._parse_command(raw)
            self._apply(command)
        except AgentError as exc:
            self.emit_event("error", reason=f"rejected cmd: {exc}")
        except Exception as exc:  # a command must never take the agent down
            log.exception("command failed")
            self.emit_event("error", reason=f"cmd failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _parse_command(raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_COMMAND_BYTES:
            raise AgentError(f"message is {len(raw)} bytes, over the {MAX_COMMAND_BYTES}-byte limit")
        try:
            command = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise AgentError(f"not UTF-8 JSON ({type(exc).__name__})") from None
        if not isinstance(command, dict):
            raise AgentError(f"expected a JSON object, got {type(command).__name__}")
        if not isinstance(command.get("id"), str) or not 0 < len(command["id"]) <= 128:
            raise AgentError("'id' must be a string of 1-128 characters")
        if command.get("type") not in COMMAND_TYPES:
            raise AgentError(f"'type' must be one of {', '.join(COMMAND_TYPES)}, got {command.get('type')!r}")
        return command

    def _apply(self, command: dict[str, Any]) -> None:
        if command["type"] != "config":
            raise AgentError(f"cmd {command['id']}: '{command['type']}' is not supported by agent {__version__} yet")
        window_s = command.get("telemetry", {}).get("window_s") if isinstance(command.get("telemetry"), dict) else None
        if not isinstance(window_s, (int, float)) or isinstance(window_s, bool) or not 0.05 <= window_s <= 86400:
            raise AgentError(f"cmd {command['id']}: config needs telemetry.window_s between 0.05 and 86400")
        self.window_s = float(window_s)
        self.emit_event("config", cmd_id=command["id"], telemetry={"window_s": self.window_s})

    # -- main loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve REST and MQTT until `stop` is set; closes a telemetry window every `window_s`."""
        from runtime_agent.mqtt_link import MqttLink
        from runtime_agent.server import InferenceServer

        self.load()
        server = InferenceServer(self, self.config.serve_host, self.config.serve_port).start()
        link = MqttLink(self.config, self.outbox, self.birth, self.handle_command).start()
        if on_ready is not None:
            on_ready(server.port)
        try:
            next_close = time.monotonic() + self.window_s
            while not stop.wait(max(0.0, next_close - time.monotonic())):
                self.close_window()
                link.wake()
                next_close += self.window_s
                if next_close < time.monotonic():  # fell behind (suspended): skip, don't burst
                    next_close = time.monotonic() + self.window_s
        finally:
            server.stop()
            link.stop()
            self.outbox.close()

