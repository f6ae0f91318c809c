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
from pathlib import Path
from collections import deque
from typing import Any, Callable

import numpy as np

from runtime_agent import __version__, durable
from runtime_agent.bundle import Bundle, read_bundle
from runtime_agent.certificates import expiry as certificate_expiry
from runtime_agent.config import AgentConfig
from runtime_agent.drift import COVARIATE, DriftMonitor
from runtime_agent.errors import AgentError, InputError
from runtime_agent.faults import crash_point
from runtime_agent.model import LoadedModel, Prediction
from runtime_agent.outbox import Outbox
from runtime_agent.probation import ModelStats, Probation
from runtime_agent.process import release_free_memory, rss_mb
from runtime_agent.protocol import (COMMAND_TYPES, EVENTS, MAX_COMMAND_BYTES, ONLINE, SCHEMAS, STATUS, TELEMETRY,
                                    ack_topic)
from runtime_agent.push_receiver import PushReceiver, Transfer
from runtime_agent.reference import Features, concat
from runtime_agent.keyring import Keyring, load_keyring, rotate
from runtime_agent.sketch import LatencySketch
from runtime_agent.slots import Slots
from runtime_agent.updates import check_update, self_test

log = logging.getLogger(__name__)

TRIM_EVERY_S = 60.0  # how often the main loop hands glibc's free pages back (`process.release_free_memory`)


def _command_ids(command: dict[str, Any]) -> dict[str, Any]:
    """The fields that let a sender match an error to its command."""
    return {key: command[key] for key in ("id", "transfer") if isinstance(command.get(key), str)}


class Window:
    """Counters of one telemetry window; replaced, never reset in place, so a report is a snapshot."""

    def __init__(self) -> None:
        self.started = time.time()
        self.sketch = LatencySketch()
        self.samples = 0
        self.requests = 0
        self.errors = 0


class Active:
    """A serving model with its drift monitor and the statistics probation compares."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.monitor = DriftMonitor(model.bundle.manifest["reference"], model.input_shapes)
        self.stats = ModelStats(self.monitor.n_prediction_bins, self.monitor.prediction_edges)

    def account(self, latencies_ms: list[float], batches: list[Features], drift_values: list[np.ndarray],
                scores: list[np.ndarray | None]) -> None:
        """Feed a run of requests, in arrival order (Page-Hinkley is sequential), to drift and probation.
        `drift_values`: each request's `Prediction.drift_values` (classes, or continuous values);
        `scores`: a classifier's first output per request (or None), whose calibrated confidences
        (`DriftMonitor.expected_correct`) are computed here for the whole run at once."""
        predicted = np.concatenate(drift_values)
        known = [values for values in scores if values is not None]
        self.monitor.update(concat(batches), predicted,
                            self.monitor.expected_correct(np.concatenate(known)) if known else None)
        self.stats.record_many(latencies_ms, self.monitor.prediction_bins(predicted))


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.outbox = Outbox(config.queue_path, max_messages=config.queue_max_messages)
        self.window_s = config.window_s
        self.slots = Slots(config.device_dir, config.bundle_path)
        self.receiver = PushReceiver(config.device_dir / "staging", self._send_ack, self._install_async)
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()  # one install or rollback at a time
        self._bench_lock = threading.Lock()  # one benchmark job at a time
        self._window = Window()
        self._served: deque[tuple[Active, float, Features, np.ndarray, np.ndarray | None]] = deque()  # not yet accounted
        self._active: Active | None = None
        self._previous: Active | None = None
        self._probation: Probation | None = None
        self._probation_state: dict[str, Any] | None = None  # in the retained status: {version, state}
        self._refused_path = config.device_dir / "refused-versions.json"
        self._probation_path = config.device_dir / "probation.json"  # `_probation_state`, kept across restarts
        self._link = None  # the MqttLink once running: acks go out directly, not through the outbox
        self._last_drift: dict[str, Any] = {}  # the last closed window's, for /metrics

    # -- model -------------------------------------------------------------------------------
    def _load_model(self, bundle: Bundle) -> LoadedModel:
        return LoadedModel.from_bundle(bundle, threads=self.config.serve_threads, spin_us=self.config.serve_spin_us)

    def load(self) -> LoadedModel:
        """Verify and load the installed bundle (and the previous one, for rollback); refuse anything unverified.
        First finish a slot switch that a crash cut in half."""
        self.slots.recover()
        key = self.keyring()
        previous, previous_error = None, None
        if self.slots.previous.exists():
            try:
                previous = Active(self._load_model(read_bundle(self.slots.previous, key, installed=True)))
            except AgentError as exc:
                previous_error = exc
        try:
            active = Active(self._load_model(read_bundle(self.config.bundle_path, key, installed=True)))
        except AgentError as exc:
            active, previous = self._fall_back(exc, previous, previous_error), None
        else:
            if previous_error is not None:
                log.warning("previous bundle unusable, rollback disabled: %s", previous_error)
        with self._lock:
            self._active, self._previous = active, previous
        self._resume_update()
        self._drop_superseded_pushes(self.slots.current_sha256())
        return self.model

    def _fall_back(self, error: AgentError, previous: Active | None, previous_error: AgentError | None) -> Active:
        """The installed bundle no longer loads (bytes rotted or lost on the board's storage, a model its runtime
        now refuses): serve the previous one and make it current, as an A/B updater boots its other slot, rather
        than leave the device without a model. Not a previous model that failed its probation here (the refusal
        `roll_back` makes too); with none usable, the error, and why previous could not stand in, stops the agent."""
        if previous is None and previous_error is None:
            raise error  # a device that never had two bundles: the error says it all
        if previous is None or previous.model.bundle.version in self._refused():
            why = (f"the previous bundle is unusable too ({previous_error})" if previous is None else
                   f"the previous model, v{previous.model.bundle.version}, failed its probation here")
            raise AgentError(f"{error}; {why}: push or provision a new bundle") from error
        failed_version = self.slots.slot_version(self.slots.current)
        self.slots.roll_back()
        version = previous.model.bundle.version
        reason = f"the installed bundle does not load ({error})"
        log.error("%s: serving the previous model, v%s; push a new bundle to replace it", reason, version)
        self.emit_event("rollback", from_version=failed_version, to_version=version, reason=reason,
                        model_version=version)  # not yet the active model's: it becomes so on return
        return previous

    def _drop_superseded_pushes(self, installed_sha256: str) -> None:
        """Free the staging space of unfinished pushes whose bundles could no longer install (not newer)."""
        version = self._version()
        self.receiver.drop_superseded(version, f"v{version} is installed; a push must be newer", installed_sha256)

    def _resume_update(self) -> None:
        """After a restart: finish a rollback that was recorded (refused version, or the probation record says
        rolled back) before its switch happened, and start again a probation that was running (its statistics
        died with the process). A record of a version that never became current is an install cut short."""
        version = self._active.model.bundle.version
        try:
            saved = json.loads(self._probation_path.read_text())
        except (OSError, ValueError):
            saved = None
        recorded = saved is not None and saved.get("version") == version and saved.get("state") == "rolled_back"
        if (version in self._refused() or recorded) and self._previous is not None:
            self.roll_back(f"finishing the rollback of v{version} that a restart interrupted")
            return
        if saved is None or (saved.get("state") == "running" and saved.get("version") != version):
            return
        self._probation_state = saved
        if saved.get("state") == "running":
            self._start_probation(self._active, self._previous)

    def _set_probation_state(self, state: dict[str, Any]) -> None:
        self._probation_state = state
        durable.write_text(self._probation_path, json.dumps(state))

    def keyring(self) -> Keyring:
        """The keys that may sign a bundle now (`trusted/` and the older single `trusted.pub`)."""
        return load_keyring(self.config.keyring_path, self.config.pubkey_path)

    def rotate_keys(self, command: dict[str, Any]) -> None:
        """Apply a `rotate_keys` chain (each signed rotation once, in order); answer unless it is a replay."""
        with self._update_lock:  # never while a push is being verified against the keyring
            keyring, applied, answer = rotate(self.config.keyring_path, self.config.pubkey_path,
                                              command.get("rotations"), command["id"])
        if applied:
            log.warning("key rotation(s) %s applied: trusted %s, revoked %s", applied, sorted(keyring.trusted),
                        sorted(keyring.revoked))
        if answer:
            self.emit_event("keys_rotated", cmd_id=command["id"], rotation=keyring.seq, applied=applied,
                            trusted=sorted(keyring.trusted), revoked=sorted(keyring.revoked))

    @property
    def model(self) -> LoadedModel | None:
        return self._active.model if self._active else None

    def infer(self, batch: Any) -> Prediction:
        """One request: predict, and record latency, counts and drift statistics."""
        active = self._active  # one snapshot: a swap during this request cannot fail it
        if active is None:
            raise AgentError("no model is loaded")
        started = time.perf_counter()
        try:
            samples = active.model.validate(batch)
        except InputError:
            with self._lock:
                self._window.errors += 1
                active.stats.errors += 1
            raise
        prediction = active.model.predict_batch(samples)
        self.record((time.perf_counter() - started) * 1000, samples, prediction.drift_values, active,
                    prediction.logits if prediction.classes is not None else None)
        return prediction

    ACCOUNT_EVERY = 64  # requests: accounting runs in vectorised batches, off the typical request's path

    def record(self, latency_ms: float, batch: Features, drift_values: np.ndarray, active: Active | None = None,
               scores: np.ndarray | None = None) -> None:
        """Account one served request (`drift_values`: its `Prediction.drift_values`; `scores`: a classifier's
        first output, for the label-free accuracy estimate). Only queued here (a deque append is atomic);
        every `ACCOUNT_EVERY` requests, and before a window closes, `account` does the work for all, the
        calibrated confidences included (~7 us a request one by one, ~0.5 us per sample in a run)."""
        self._served.append((active or self._active, latency_ms, batch, drift_values, scores))
        if len(self._served) >= self.ACCOUNT_EVERY:
            self.account()

    def account(self) -> None:
        """Add the queued requests to the window (latency sketch, counts) and to their model's drift and
        probation statistics; end the probation when it is due."""
        with self._lock:
            runs: dict[int, tuple[Active, list[float], list[Features], list[np.ndarray], list[np.ndarray | None]]] = {}
            latencies: list[float] = []
            window = self._window
            for _ in range(len(self._served)):  # only what is queued now; later appends wait for the next call
                active, latency_ms, batch, drift_values, scores = self._served.popleft()
                latencies.append(latency_ms)
                window.samples += len(drift_values)
                run = runs.setdefault(id(active), (active, [], [], [], []))
                run[1].append(latency_ms)
                run[2].append(batch)
                run[3].append(drift_values)
                run[4].append(scores)
            window.sketch.add_many(latencies)
            window.requests += len(latencies)
            for active, *run in runs.values():
                active.account(*run)
            probation = self._probation
        if probation is not None and probation.due():
            self.end_probation(probation)

    # -- telemetry and events ------------------------------------------------------------------
    def _version(self) -> int | None:
        return self.model.bundle.version if self.model else None

    def birth(self) -> dict[str, Any]:
        manifest = self.model.bundle.manifest if self.model else {}
        return {"schema": SCHEMAS[STATUS], "state": ONLINE, "device_id": self.config.device_id,
                "model_version": manifest.get("version"), "model_name": manifest.get("name"),
                "agent_version": __version__, "profile": manifest.get("target"), "ts": time.time(),
                "probation": self._probation_state, **certificate_expiry(self.config)}

    def emit_event(self, kind: str, **fields: Any) -> int:
        payload = {"schema": SCHEMAS[EVENTS], "type": kind, "device_id": self.config.device_id,
                   "model_version": self._version(), "ts": time.time(), **fields}
        return self.outbox.put(self.config.topic(EVENTS), payload, kind="event")

    def close_window(self) -> dict[str, Any]:
        """Snapshot and reset the window's counters; queue its telemetry (and an alarm event if any)."""
        self.account()
        with self._lock:
            window, self._window = self._window, Window()
            drift = self._active.monitor.window_report() if self._active else {}
        sketch = window.sketch
        latency = {**sketch.to_dict(), **(sketch.summary() if sketch.count else {"p50": None, "p90": None, "p99": None})}
        payload = {"schema": SCHEMAS[TELEMETRY], "device_id": self.config.device_id, "window": [window.started, time.time()],
                   "model_name": self.model.bundle.manifest["name"] if self.model else None,
                   "model_version": self._version(), "n": window.samples, "requests": window.requests,
                   "errors": window.errors, "latency": latency, "drift": drift, "rss_mb": round(rss_mb(), 2),
                   "queue": {"pending": len(self.outbox), "dropped_telemetry": self.outbox.dropped_telemetry}}
        self.outbox.put(self.config.topic(TELEMETRY), payload, kind="telemetry")
        self._last_drift = drift
        for kind, in_drift in (("drift_alarm", drift.get("alarm")), ("prediction_drift", drift.get("prediction_drift"))):
            if in_drift:  # the device's verdict (`runtime_agent.drift.crossings`): every consumer reads the same rule
                crossed = [c for c in drift["crossings"] if (c["kind"] == COVARIATE) == (kind == "drift_alarm")]
                log.info("%s: %s", kind.replace("_", " "), "; ".join(
                    f"{c['statistic']} {c['value']:g} >= {c['threshold']:g}" for c in crossed))
                self.emit_event(kind, crossings=crossed, psi_max=drift.get("psi_max"),
                                prediction_psi=drift.get("prediction_psi"), ph_alarm=drift.get("ph_alarm"),
                                window=payload["window"])
        return payload

    # -- commands ------------------------------------------------------------------------------
    def handle_command(self, raw: bytes, retained: bool = False) -> None:
        """Validate a `cmd` message; anything malformed becomes an `error` event with the reason. A retained
        copy (`retained`: the broker hands it over at every subscribe) is applied only for `rotate_keys`, whose
        chain is idempotent: a rollback or config published with retain by mistake would run again at every
        reconnect and restart, flipping the model each time. An empty payload is how MQTT clears a retained
        message, never a command: ignored."""
        if not raw:
            return
        command: dict[str, Any] = {}
        try:
            command = self._parse_command(raw)
            if retained and command["type"] != "rotate_keys":
                raise AgentError(f"cmd {command['id']} is a retained {command['type']}, not applied: it would run again "
                                 "at every reconnect; publish commands without retain, and clear this one with an "
                                 "empty retained message on the topic")
            self._apply(command)
        except AgentError as exc:
            log.warning("rejected cmd: %s", exc)
            self.emit_event("error", reason=f"rejected cmd: {exc}", **_command_ids(command))
        except Exception as exc:  # a command must never take the agent down
            log.exception("command failed")
            self.emit_event("error", reason=f"cmd failed: {type(exc).__name__}: {exc}", **_command_ids(command))

    @staticmethod
    def _parse_command(raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_COMMAND_BYTES:
            raise AgentError(f"message is {len(raw)} bytes, over the {MAX_COMMAND_BYTES}-byte limit")
        try:
            command = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise AgentError(f"not UTF-8 JSON ({type(exc).__name__})") from None
        if not isinstance(command, dict):
            raise AgentError(f"expected a JSON object, got {type(command).__name__}")
        if not isinstance(command.get("id"), str) or not 0 < len(command["id"]) <= 128:
            raise AgentError("'id' must be a string of 1-128 characters")
        if command.get("type") not in COMMAND_TYPES:
            raise AgentError(f"'type' must be one of {', '.join(COMMAND_TYPES)}, got {command.get('type')!r}")
        return command

    def _apply(self, command: dict[str, Any]) -> None:
        if command["type"] == "push_offer":
            self.receiver.offer(command)
            return
        if command["type"] == "rotate_keys":
            self.rotate_keys(command)
            return
        if command["type"] == "rollback":
            if not self.roll_back(f"manual rollback (cmd {command['id']})", cmd_id=command["id"]):
                raise AgentError(f"cmd {command['id']}: no previous model to roll back to")
            return
        window_s = command.get("telemetry", {}).get("window_s") if isinstance(command.get("telemetry"), dict) else None
        if not isinstance(window_s, (int, float)) or isinstance(window_s, bool) or not 0.05 <= window_s <= 86400:
            raise AgentError(f"cmd {command['id']}: config needs telemetry.window_s between 0.05 and 86400")
        self.window_s = float(window_s)
        log.info("telemetry window set to %g s (cmd %s)", self.window_s, command["id"])
        self.emit_event("config", cmd_id=command["id"], telemetry={"window_s": self.window_s})

    # -- updates -------------------------------------------------------------------------------
    def _send_ack(self, transfer: str, payload: dict[str, Any]) -> None:
        if self._link is not None:
            self._link.publish_now(ack_topic(self.config.fleet, self.config.device_id, transfer), payload)

    def _install_async(self, transfer: Transfer, path: Path) -> None:
        """Verification and session creation take a while: keep them off the MQTT network thread."""
        job = transfer.offer.get("job") == "bench"  # a benchmark job rides the push channel; it is never installed
        threading.Thread(target=self.bench if job else self.install, args=(transfer, path),
                         name=f"{'bench' if job else 'install'}-{transfer.transfer}", daemon=True).start()

    def bench(self, transfer: Transfer, path: Path) -> None:
        """Verify a benchmark job like a bundle, time its models beside serving (runtime_agent.bench_job),
        answer with a `bench_result` event, then the transfer's final state `done`."""
        from runtime_agent.bench_job import JobLedger, read_job, run_job

        with self._bench_lock:  # one job at a time: two would time each other
            try:
                self.receiver.check_hash(transfer, path)
                job = read_job(path, self.keyring(), self.config.device_id)
                JobLedger(self.config.device_dir / "bench-jobs.json").admit(job)
            except AgentError as exc:
                self._reject(transfer, f"benchmark job refused: {exc}")
                return
            log.info("benchmark job %s: %d model(s), %d runs each", transfer.transfer, len(job.models), job.runs)
            manifest = self.model.bundle.manifest
            result = run_job(job, manifest.get("providers", []), self.config.serve_threads, self.config.serve_spin_us)
        self.emit_event("bench_result", transfer=transfer.transfer, profile=manifest["target"], **result)
        self.receiver.set_state(transfer, "done")

    def _reject(self, transfer: Transfer, reason: str) -> None:
        log.warning("rejected push %s: %s", transfer.transfer, reason)
        self.emit_event("rejected", transfer=transfer.transfer, reason=reason)
        self.receiver.set_state(transfer, "rejected", reason)

    def _refused(self) -> set[int]:
        try:
            return set(json.loads(self._refused_path.read_text()))
        except (OSError, ValueError):
            return set()

    def install(self, transfer: Transfer, path: Path) -> None:
        """Verify, self-test, store in a slot, switch atomically; report every outcome."""
        with self._update_lock:
            try:
                crash_point("install:staged")
                self.receiver.check_hash(transfer, path)
                running = self.model.bundle.manifest
                if self.slots.current.is_symlink() and self.slots.current_sha256() == transfer.sha256:
                    self._installed_before(transfer)
                    return
                bundle = check_update(path, self.keyring(), running, self._refused())
                model = self._load_model(bundle)
                self_test(model)
                crash_point("install:verified")
                slot = self.slots.store(path, bundle.manifest["name"], bundle.version)
                crash_point("install:slot_written")
                # recorded before the switch, so that a restart right after it still runs the probation
                self._set_probation_state({"version": bundle.version, "state": "running"})
                self.slots.activate(slot, f"{running['name']}-{running['version']}.bundle")
                crash_point("install:switched")
                self._swap_in(Active(model), bundle)
            except AgentError as exc:
                self._reject(transfer, str(exc))
                return
            except OSError as exc:  # a full or failing disk: the running model stays
                self._reject(transfer, f"cannot store the bundle in {self.slots.slots}: {exc.strerror or exc}")
                return
            log.info("installed %s v%s (was v%s) from push %s; probation started", bundle.manifest["name"],
                     bundle.version, running["version"], transfer.transfer)
            self.emit_event("installed", transfer=transfer.transfer, version=bundle.version,
                            previous_version=running["version"])
            self.receiver.set_state(transfer, "installed")
            self._drop_superseded_pushes(transfer.sha256)

    def _installed_before(self, transfer: Transfer) -> None:
        """The pushed file is the one running: a restart came between its switch and its report."""
        previous = self._previous.model.bundle.version if self._previous else None
        log.info("push %s is the installed v%s (a restart interrupted its report)", transfer.transfer, self._version())
        self.emit_event("installed", transfer=transfer.transfer, version=self._version(), previous_version=previous)
        self.receiver.set_state(transfer, "installed")

    def _start_probation(self, new: Active, old: Active | None) -> None:
        with self._lock:
            self._probation = Probation(self.config.probation, new.stats, old.stats if old else None,
                                        new.model.bundle.manifest["reference"]["predictions"]["fractions"])

    def _swap_in(self, new: Active, bundle: Bundle) -> None:
        with self._lock:
            old = self._active
            self._previous, self._active = old, new
        self._start_probation(new, old)
        if self._link is not None:
            self._link.announce()

    def end_probation(self, probation: Probation) -> None:
        with self._lock:
            if self._probation is not probation:
                return  # already judged by another thread
            self._probation = None
        reason = probation.regression()
        if reason is None:
            self._set_probation_state({"version": self._version(), "state": "passed"})
            log.info("probation passed: v%s after %d requests", self._version(), probation.stats.requests)
            self.emit_event("probation_passed", version=self._version(), requests=probation.stats.requests)
            if self._link is not None:
                self._link.announce()
        else:
            log.warning("probation failed: v%s: %s", self._version(), reason)
            self.roll_back(f"probation failed: {reason}", refuse=True)

    def roll_back(self, reason: str, refuse: bool = False, cmd_id: str | None = None) -> bool:
        """Swap back to the previous model (pointer and memory); False when there is none. `cmd_id`: the
        command that asked for it, echoed in the event so the sender can match the answer. A previous model
        that failed its probation here stays refused: rolling back to it would serve it again (until a restart
        undid it), so that is an AgentError."""
        with self._update_lock:
            with self._lock:
                old, previous = self._active, self._previous
                if previous is None:
                    return False
                if previous.model.bundle.version in self._refused():
                    raise AgentError(f"the previous model, v{previous.model.bundle.version}, was rolled back after "
                                     f"failing its probation on this device; push a newer version to replace "
                                     f"v{old.model.bundle.version}")
                self._active, self._previous, self._probation = previous, old, None
            # The records first, the switch last: a restart in between finishes the rollback (`_resume_update`).
            if refuse:
                refused = self._refused() | {old.model.bundle.version}
                durable.write_text(self._refused_path, json.dumps(sorted(refused)))
            self._set_probation_state({"version": old.model.bundle.version, "state": "rolled_back"})
            crash_point("rollback:recorded")
            self.slots.roll_back()
            crash_point("rollback:switched")
        log.warning("rolled back v%s -> v%s: %s", old.model.bundle.version, previous.model.bundle.version, reason)
        self.emit_event("rollback", from_version=old.model.bundle.version, to_version=previous.model.bundle.version,
                        reason=reason, **({"cmd_id": cmd_id} if cmd_id else {}))
        if self._link is not None:
            self._link.announce()
        return True

    # -- main loop -----------------------------------------------------------------------------
    def metrics_state(self) -> dict[str, Any]:
        """What `GET /metrics` reads at scrape time (runtime_agent.metrics)."""
        return {"drift": self._last_drift, "outbox_pending": len(self.outbox), "outbox_dropped_telemetry": self.outbox.dropped_telemetry,
                "transfers": self.receiver.states(), "probation": self._probation_state, "rss_bytes": rss_mb() * (1 << 20)}

    def run(self, stop: threading.Event, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve REST (and gRPC) and MQTT until `stop` is set; closes a telemetry window every `window_s`."""
        from runtime_agent.endpoints import start_endpoints
        from runtime_agent.mqtt_link import MqttLink

        self.load()
        servers = start_endpoints(self, self.config)
        link = self._link = MqttLink(self.config, self.outbox, self.birth, self.handle_command, self.receiver.chunk).start()
        if on_ready is not None:
            on_ready(servers[0].port)
        try:
            next_close = time.monotonic() + self.window_s
            next_trim = time.monotonic() + TRIM_EVERY_S
            while not stop.wait(max(0.0, next_close - time.monotonic())):
                self.close_window()  # also ends a probation that is due (see `account`)
                link.wake()
                if time.monotonic() >= next_trim:  # at a window's close, at most once a minute
                    release_free_memory()
                    next_trim = time.monotonic() + TRIM_EVERY_S
                next_close += self.window_s
                if next_close < time.monotonic():  # fell behind (suspended): skip, don't burst
                    next_close = time.monotonic() + self.window_s
        finally:
            for server in servers:
                server.stop()
            link.stop()
            self._link = None
            self.outbox.close()

