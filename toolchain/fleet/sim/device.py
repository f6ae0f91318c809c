"""One simulated device: the real device agent and its real MQTT link, fed by a replayed request stream.

Only inference is replayed (by the worker, batched over every device of the process, on the bundle's
real onnxruntime model). Everything a fleet sees of a device is the agent's own code: `Agent.record`
(latency sketch, drift statistics against the bundle's reference, probation), `Agent.close_window`
(the telemetry payload and its `drift_alarm` event), `Agent.emit_event`, the durable `Outbox` with its
`seq`, command handling (`config`, `push_offer`, `rollback`), pushes and installs, and `MqttLink`'s
birth, last will, in-order at-least-once delivery and acks.

What differs from a real device, and why:
- The agent serves a `LoadedModel` shared by the devices of one process (`SimAgent`): a thousand
  onnxruntime sessions of the same model would only cost memory. A device that installs a pushed
  model loads its own, as a real one does.
- The outbox runs with ``synchronous=NORMAL`` (still WAL, still survives a kill of the process): the
  devices of a simulation share one disk, and a thousand fsyncs per second would measure that disk,
  not the fleet.
- `LoopLink` is `MqttLink` without its two threads: a `SharedLoop` drives every device's socket from
  the worker's one thread, and the worker pumps the outbox of a link when the link asks for it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import paho.mqtt.client as mqtt

from runtime_agent.agent import Active, Agent, Window
from runtime_agent.config import AgentConfig, load_agent_config
from runtime_agent.model import LoadedModel
from runtime_agent.mqtt_link import MqttLink
from runtime_agent.outbox import Outbox
from runtime_agent.protocol import STATUS, STATUS_OFFLINE
from toolchain.fleet.sim.netloop import SharedLoop

INDEX_CHUNK = 4096  # pool indices drawn per refill: the stream is the same however requests are grouped
MAX_BACKOFF_S = 30.0


class SimAgent(Agent):
    """The device agent serving a model it was handed instead of one it loaded (see the module docstring)."""

    def __init__(self, config: AgentConfig, model: LoadedModel) -> None:
        super().__init__(config)
        self.outbox.close()
        self.outbox = Outbox(config.queue_path, max_messages=config.queue_max_messages, synchronous="NORMAL")
        with self._lock:
            self._active = Active(model)

    def attach(self, link: MqttLink) -> None:
        """Route push acks and status re-announcements through `link` (what `Agent.run` does)."""
        self._link = link

    def restart_window(self) -> None:
        """Start the current window now (the simulation's start), not when the device was set up."""
        with self._lock:
            self._window = Window()


class LoopLink(MqttLink):
    """`MqttLink` driven by a `SharedLoop`: no network thread, no pump thread.

    ``woken`` is the worker's set of links whose outbox has something to publish (the link adds itself
    when the agent or an ack wakes it); the worker calls `pump` for each.
    """

    def __init__(self, config: AgentConfig, outbox: Outbox, birth: Callable[[], dict[str, Any]],
                 on_command: Callable[[bytes, bool], None], on_chunk: Callable[[str, int, bytes], None], woken: set) -> None:
        self._woken = woken
        super().__init__(config, outbox, birth, on_command, on_chunk)

    def start(self) -> "LoopLink":
        """Set the connection up like `MqttLink.start` (clean start, no session kept); `connect` dials."""
        self.prepare()
        return self

    def connect(self) -> None:
        """Open the socket and send CONNECT (OSError if the broker cannot be reached)."""
        self.client.reconnect()

    def wake(self) -> None:
        super().wake()
        self._woken.add(self)

    def pump(self) -> None:
        """One round of `MqttLink`'s pump: publish what the outbox holds, within the in-flight window."""
        self._wake.clear()
        if self.connected.is_set():
            self._publish_pending()

    def say_offline(self) -> mqtt.MQTTMessageInfo:
        """The retained `offline` status a stopping agent publishes (the LWT covers the other ways to die)."""
        return self.client.publish(self.config.topic(STATUS), json.dumps(STATUS_OFFLINE), qos=1, retain=True)


class SimDevice:
    """A device folder brought to life: agent, link, its sample stream, and its reconnect schedule."""

    def __init__(self, index: int, device_dir: Path, model: LoadedModel, loop: SharedLoop, woken: set, seed: int,
                 pool_size: int) -> None:
        config = load_agent_config(device_dir)
        self.index, self.id = index, config.device_id
        self.agent = SimAgent(config, model)
        self.link = LoopLink(config, self.agent.outbox, self.agent.birth, self.agent.handle_command,
                             self.agent.receiver.chunk, woken).start()
        self.agent.attach(self.link)
        self.first_seq = self.agent.outbox.last_seq + 1  # a kept work folder goes on where the last run ended
        loop.add(self.link.client)
        self._on_connect = self.link.client.on_connect
        self.link.client.on_connect = self._connected
        self.refused: str | None = None  # the broker's last refusal (bad credentials, not authorised)
        self._rng = np.random.default_rng([seed, index])
        self._pool_size = pool_size
        self._indices = np.empty(0, dtype=np.int64)
        self._backoff, self._retry_at = 1.0, 0.0
        self.next_close = math.inf
        self.windows = 0
        self.requests = 0
        self.correct = 0
        self.since_report: tuple[float, int, int] = (time.time(), 0, 0)  # accuracy not yet reported: start, n, correct

    def begin(self, t0: float, first_close: float) -> None:
        """The simulation starts: a fresh window and accuracy count from `t0`, the first report at `first_close`."""
        self.agent.restart_window()
        self.since_report = (t0, 0, 0)
        self.next_close = first_close

    # -- the replayed request stream -----------------------------------------------------------
    def next_samples(self, count: int) -> np.ndarray:
        """Pool indices of this device's next `count` requests (seeded per device; chunking-independent)."""
        while self._indices.size < count:
            self._indices = np.concatenate([self._indices, self._rng.integers(0, self._pool_size, INDEX_CHUNK)])
        taken, self._indices = self._indices[:count], self._indices[count:]
        return taken

    def served(self, latency_ms: float, batch: np.ndarray, classes: np.ndarray, correct: int,
               scores: np.ndarray | None = None) -> None:
        """Account a run of single-sample requests in the agent (with the model's scores, for the label-free
        accuracy estimate), and their ground truth here."""
        record = self.agent.record
        for j in range(len(classes)):
            record(latency_ms, batch[j:j + 1], classes[j:j + 1], None, None if scores is None else scores[j:j + 1])
        start, n, right = self.since_report
        self.since_report = (start, n + len(classes), right + correct)
        self.requests += len(classes)
        self.correct += correct

    def close_window(self, now: float, accuracy_every: int) -> None:
        """The agent's window report, and every `accuracy_every` windows an `accuracy` event (ground truth)."""
        self.agent.close_window()
        self.windows += 1
        if accuracy_every and self.windows % accuracy_every == 0:
            start, n, right = self.since_report
            self.agent.emit_event("accuracy", window=[start, now], n=n, correct=right,
                                  accuracy=round(right / n, 6) if n else None)
            self.since_report = (now, 0, 0)
        self.link.wake()

    # -- connection ----------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self.link.connected.is_set()

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
        else:
            self.refused, self._backoff = None, 1.0
        self._on_connect(client, userdata, flags, reason_code, properties)

    def dial(self, now: float) -> str | None:
        """Connect now; on failure schedule a retry with exponential backoff and return the reason."""
        try:
            self.link.connect()
        except OSError as exc:
            self._retry_at = now + self._backoff
            self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)
            return exc.strerror or str(exc)
        self._retry_at = now + self._backoff  # if this attempt is refused, the next waits
        self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)
        return None

    def keep_connected(self, now: float) -> None:
        """Redial a lost connection when its backoff has passed (what paho's own loop would do)."""
        if not self.online and self.link.client.socket() is None and now >= self._retry_at:
            self.dial(now)

    def report(self) -> dict[str, Any]:
        """What this device sent, for the simulation's result (compare with what a monitor stored)."""
        outbox = self.agent.outbox
        return {"device": self.id, "index": self.index, "stream": getattr(outbox, "stream", None),
                "first_seq": self.first_seq, "last_seq": outbox.last_seq, "pending": len(outbox),
                "dropped_telemetry": outbox.dropped_telemetry,
                "windows": self.windows, "requests": self.requests, "correct": self.correct,
                "model_version": self.agent.model.bundle.version if self.agent.model else None}

    def close(self) -> None:
        self.agent.outbox.close()
