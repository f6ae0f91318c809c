"""The fleet monitor: one persistent MQTT session that reads every device's reports into the fleet store.

Subscribes (QoS 1) to every device's ``status``, ``telemetry`` and ``events`` topics of a fleet (``fleet="+"``:
all fleets) as the broker's operator account, with a *persistent session* (`toolchain.deploy.mqtt`; a session
expiry of a day by default, a client id kept in the database): while the monitor is down or restarting,
the broker queues what the devices send and delivers it when the monitor comes back.

Every message is validated against the topic schema (DESIGN.md; the validators are the device side's own,
`runtime_agent.protocol`); a malformed one (not UTF-8 JSON, wrong types, unknown schema, a ``device_id``
that is not the topic's, a sketch that does not add up) is counted, logged, recorded in the store's
``rejected`` table and acknowledged: it never stops the monitor. A message is acknowledged (PUBACK,
manual) only after it is committed to the database, so a monitor that dies mid-message gets it again.
The network thread only queues what arrives; a writer thread stores whatever has queued up in one
transaction (`FleetStore.batch`, a savepoint per message), then acknowledges it: one message when the
fleet is quiet, more under load, never waiting to fill a batch (storing a telemetry window costs ~70 us
inside a batch of 50 against ~210 us with a commit of its own). Duplicates (the agents deliver at least
once) are dropped by the store's ``(fleet, device, stream, seq)`` key. ``stream`` is the id of the agent's outbox file (a re-flashed device
starts a new one, with seq from 1 again); messages without it (agents older than the field) are stream ``''``.

A database that drops the connection (PostgreSQL restarted, the network to it gone) stops nothing: the
store raises `DatabaseLost`, which no handler of one message's failure takes, so the whole batch in hand
stays unacknowledged and is tried again, reconnecting with backoff (RECONNECT_FIRST_S doubling to
RECONNECT_MAX_S), with one line logged when the outage begins and one when it ends; meanwhile the broker
queues the rest (its in-flight window bounds what the monitor holds), and a monitor stopped or killed
during the outage leaves it all to the broker's session. A commit that went through just before the drop
is dropped again by the keys when the batch is retried.

``status`` (the retained birth and the LWT) sets a device online or offline. After each committed batch
that changed a fleet, the monitor recomputes from the database the share of reporting devices (a
telemetry window, not offline) whose latest window is in drift alarm (the agent's own rule, see
`toolchain.fleet.store`); when the share reaches ``alarm_threshold`` it raises a ``fleet_drift_alarm``
fleet event (stored with device ``*``, logged, passed to ``on_notice``), and a ``fleet_drift_cleared`` one
when it drops below again. The alarm state is kept in the database, so a restarted monitor neither
forgets nor repeats it (`FleetStore.evaluate_fleet_alarm`). It is evaluated before the batch is
acknowledged, unless the fleet was evaluated less than ``evaluate_every_s`` (EVALUATE_EVERY_S) ago: then
as soon as that time is up (the writer wakes for it, more messages or not). Why: an evaluation looks up
every device's latest window under the alarm row lock that all workers share; once per batch it cost
more than the batch itself under load (the broker's in-flight window drains the queue before every
acknowledgement, so "nothing more waiting" did not tell load apart).

Several workers (``group``): each subscribes through the MQTT v5 shared subscription ``$share/GROUP/...``
with its own persistent session (client id ``<database's>-GROUP-<worker>``), so the broker hands every
message to one of them; they write one PostgreSQL database, whose keys drop what two of them might both
store, and each evaluates the fleet alarm from that database after its own commits, so whichever worker
commits last sees every window. A batch that deadlocks with another worker's is retried. Shared
subscriptions get no retained messages: a worker group learns device states from live status messages.
"""

from __future__ import annotations

import fcntl
import logging
import math
import queue
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from runtime_agent.drift import MIN_PSI_SAMPLES
from runtime_agent.protocol import (EVENTS, ONLINE, REPORT_KINDS, STATUS, TOPIC_ROOT, Malformed, parse_event,
                                    parse_status, parse_telemetry, parse_topic, device_topic, valid_id)
from toolchain.deploy.mqtt import BrokerLogin, OperatorSession
from toolchain.errors import ToolchainError, first_line
from toolchain.fleet.store import FLEET_ALARM, DatabaseLost, FleetStore, TelemetryRecord, window_alarm
from toolchain.fleet.store.backend import is_postgres
from toolchain.fleet.store.codec import decode

log = logging.getLogger(__name__)

DEFAULT_ALARM_THRESHOLD = 0.3
DEFAULT_SESSION_EXPIRY_S = 86400
MAX_BATCH = 500  # messages stored in one transaction at most (the broker's in-flight window bounds it too)
BATCH_TRIES = 5  # a batch another writer's deadlocked with is tried again this often
EVALUATE_EVERY_S = 0.5  # a fleet's drift alarm is evaluated this often at most (then as soon as it is due)
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.25, 5.0  # waits between tries to reach a database that dropped us

Notice = Callable[[str, dict[str, Any]], None]


def claim_session(db_path: Path | str, client_id: str) -> Any:
    """Hold the MQTT session `client_id` of the SQLite file `db_path` for this process (an open file with an
    exclusive flock beside the database; released when closed, or when the process dies), or a one-line
    ToolchainError. Two monitors on one file (say `fleet dashboard` started beside `fleet monitor`) share its
    client id, and the broker let each take the session over from the other every second, for ever, with
    nothing said. PostgreSQL: None (workers sharing one database name themselves with --worker)."""
    if is_postgres(db_path):
        return None
    db = Path(db_path)
    handle = open(db.with_name(f".{db.name}.{client_id}.lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ToolchainError(f"another monitor is running on {db} (MQTT session {client_id}); run one per database "
                             "(`fleet dashboard` is the monitor with its page, or add --dashboard-port to `fleet monitor`)") from None
    return handle


class FleetMonitor:
    """Listen to a fleet (``fleet="+"``: every fleet) and keep the store current; see the module docstring.

    ``start()`` runs it in paho's background thread (``stop()`` ends it), ``run_forever()`` blocks until
    Ctrl-C or ``stop()``. ``on_notice(kind, info)`` is called (from the writer thread, after the commit) for ``status``
    changes and for ``fleet_drift_alarm`` / ``fleet_drift_cleared``; ``on_stored(kind)`` after every message
    committed to the store (``status``, ``telemetry``, ``events``; not duplicates), so a reader such as the
    dashboard refreshes only when there is something new. ``stats`` counts messages:
    ``processed``, ``telemetry``, ``events``, ``status``, ``duplicates``, ``malformed``, ``store_errors``.
    ``group``: join that worker group (shared subscription) as ``worker`` (default: the host name; give
    each worker on one machine its own, and restart a worker under the same name: its session holds what
    the broker handed it). ``evaluate_every_s``: how often at most a fleet's drift alarm is evaluated (0:
    after every batch that changed the fleet, before it is acknowledged).
    """

    def __init__(self, broker_url: str, db_path: Path | str, username: str | None = None, password: str | None = None,
                 fleet: str = "+", *, ca_file: Path | str | None = None, client_cert: Path | str | None = None, client_id: str | None = None,
                 alarm_threshold: float = DEFAULT_ALARM_THRESHOLD, min_samples: int = MIN_PSI_SAMPLES,
                 session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S, keepalive_s: int = 30,
                 retention_s: float | None = 30 * 86400, on_notice: Notice | None = None,
                 on_stored: Callable[[str], None] | None = None, group: str | None = None,
                 worker: str | None = None, on_telemetry: Callable[[TelemetryRecord], None] | None = None,
                 evaluate_every_s: float = EVALUATE_EVERY_S) -> None:
        login = BrokerLogin(broker_url, username, password, ca_file, client_cert)
        login.address("the broker")  # refuse a bad URL or CA file before the store is created
        if fleet != "+" and not valid_id(fleet):
            raise ToolchainError(f"--fleet must be '+' (all) or 1-64 letters, digits, '-' or '_', got {fleet!r}")
        if not 0.0 < alarm_threshold <= 1.0:
            raise ToolchainError(f"the fleet alarm threshold must be a share in (0, 1], got {alarm_threshold!r}")
        worker = worker or socket.gethostname().split(".")[0]
        for option, value in (("--workers-group", group), ("--worker", worker if group else None)):
            if value is not None and not valid_id(value):
                raise ToolchainError(f"{option} must be 1-64 letters, digits, '-' or '_', got {value!r}")
        self.broker_url, self.fleet = broker_url, fleet
        self.alarm_threshold, self.min_samples = float(alarm_threshold), int(min_samples)
        self.retention_s = retention_s
        self.evaluate_every_s = float(evaluate_every_s)
        self.on_notice, self.on_stored = on_notice, on_stored
        self.on_telemetry = on_telemetry  # a stored window, after its commit (the metrics' ingest lag)
        share = f"$share/{group}/" if group else ""
        self.topics = [share + device_topic(fleet, "+", kind) for kind in REPORT_KINDS]
        self.store = FleetStore(db_path)
        self.client_id = client_id or (f"{self.store.client_id}-{group}-{worker}" if group else self.store.client_id)
        try:
            self._claim = claim_session(db_path, self.client_id)
        except BaseException:
            self.store.close()
            raise
        self.stats: Counter[str] = Counter()
        self.subscribed = threading.Event()
        self.refused: str | None = None
        self._connected_once = False
        self._connect_result = threading.Event()
        self._stop = threading.Event()
        self._started = False
        self._touched: set[str] = set()  # fleets whose share the batch being stored may have moved
        self._unevaluated: set[str] = set()  # fleets whose share moved since their last evaluation
        self._evaluated_at: dict[str, float] = {}
        self._outage: tuple[float, float] | None = None  # a database outage: (since, the next wait)
        self._last_prune = 0.0
        self._inbox: queue.Queue[tuple[str, bytes, bool, int, int] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="fleet-monitor-writer", daemon=True)
        self._deferred: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = None  # callbacks until the commit
        self.session = OperatorSession(login, self.client_id, session_expiry_s=session_expiry_s, keepalive_s=keepalive_s,
                                       reconnect_max_s=30, manual_ack=True, what="the broker")
        self.host, self.port, self.client = self.session.host, self.session.port, self.session.client
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = lambda c, u: log.warning("cannot reach the broker at %s:%s; retrying", self.host, self.port)
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "FleetMonitor":
        """Load the fleet state from the store, connect (retrying with backoff) and listen in the background.

        A second call while running does nothing."""
        if self._started:
            return self
        if self._stop.is_set():
            raise ToolchainError("this monitor was stopped; make a new FleetMonitor")
        for fleet in self.store.fleets():  # the threshold may differ from the last run's
            if self.fleet in ("+", fleet):
                self._evaluate(fleet)
        self.session.connect_async()
        self._writer.start()
        self.client.loop_start()
        self._started = True
        return self

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """True once subscribed; False on timeout (still retrying); ToolchainError if the broker refused us."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.subscribed.is_set():
                return True
            if self.refused is not None:
                raise ToolchainError(f"the broker at {self.host}:{self.port} refused the monitor: {self.refused}")
            self._connect_result.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.subscribed.is_set()

    def stop(self) -> None:
        """Disconnect (the broker keeps the session and queues for it) and close the store. Idempotent."""
        self._stop.set()
        if self._started:
            self._started = False
            self._inbox.put(None)  # store and acknowledge what has arrived, then disconnect
            self._writer.join()
            self.session.disconnect(end_session=False)
            self.client.loop_stop()
        self.store.close()
        if self._claim is not None:
            self._claim.close()  # the session is free for the next monitor
            self._claim = None

    def run_forever(self) -> None:
        """Run until Ctrl-C (KeyboardInterrupt) or `stop()` from another thread."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> "FleetMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- MQTT callbacks ------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            log.error("the broker refused the monitor's connection: %s", reason_code)
            self._connect_result.set()
            return
        self.refused = None
        self._connected_once = True
        log.info("connected to %s:%s as %s (session %s)", self.host, self.port, self.client_id,
                 "resumed" if flags.session_present else "new")
        # Subscribing again on a resumed session is harmless and re-sends the retained statuses (the
        # current truth about every device); queued messages of the session arrive either way.
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in self.topics])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        failed = [str(code) for code in reason_codes if code.is_failure]
        if failed:
            self.refused = f"subscription refused ({', '.join(failed)}); the monitor needs read access to {TOPIC_ROOT}/#"
            log.error("%s", self.refused)
        else:
            self.subscribed.set()
        self._connect_result.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.subscribed.clear()
        failed = self.session.take_socket_error()
        if failed is not None and not self._connected_once:  # e.g. the client certificate: retrying will not help
            self.refused = failed
            log.error("cannot connect to the broker at %s:%s: %s", self.host, self.port, failed)
            self._connect_result.set()
        elif not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put((message.topic, bytes(message.payload), bool(message.retain), message.mid, message.qos))

    # -- storing -------------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        """The writer thread: store what has queued up (at least one message) in one transaction, repeat."""
        while True:
            try:
                item = self._inbox.get(timeout=self._next_evaluation())
            except queue.Empty:
                self._evaluate_changed()
                continue
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self._store_batch(batch)
                except Exception:  # never let the writer die: the monitor would silently stop storing
                    self.stats["errors"] += 1
                    log.exception("failed to store %d messages", len(batch))
            if item is None:
                if self._outage is None:
                    self._evaluate_changed(due_only=False)
                else:
                    log.warning("stopping without the fleet database: what was not stored is left unacknowledged "
                                "for the broker to send again")
                return

    def _next_evaluation(self) -> float | None:
        """Seconds until the first fleet evaluation falls due; None when none is waiting."""
        if not self._unevaluated:
            return None
        due = min(self._evaluated_at.get(fleet, -math.inf) for fleet in self._unevaluated) + self.evaluate_every_s
        return max(0.0, due - time.monotonic())

    def _store_batch(self, batch: list[tuple[str, bytes, bool, int, int]]) -> None:
        """Handle each message in one transaction; after the commit acknowledge them, run the callbacks and
        re-evaluate the fleets it changed. A batch that deadlocks with another worker's (rare: the store
        updates device rows last, in one order) is undone and tried again. A batch the database dropped
        its connection under (PostgreSQL restarted) is held, unacknowledged, and tried again until the
        database is back (`_wait_for_database`); keys drop what a commit that went through before the
        drop already stored."""
        conflicts = 0
        while True:
            stats, acks = self.stats.copy(), []
            self._deferred, self._touched = [], set()
            try:
                with self.store.batch():
                    windows: list[tuple[TelemetryRecord, float, tuple[int, int]]] = []
                    for topic, payload, retained, mid, qos in batch:
                        verdict = self._store_one(topic, payload, retained)
                        if isinstance(verdict, tuple):
                            windows.append((*verdict, (mid, qos)))
                        elif verdict:
                            acks.append((mid, qos))
                    acks.extend(self._store_windows(windows))
                break
            except self.store.retryable as exc:
                self.stats.clear()
                self.stats.update(stats)  # counted again by the next try
                conflicts += 1
                log.warning("batch of %d messages conflicted with another writer (try %d of %d): %s", len(batch),
                            conflicts, BATCH_TRIES, first_line(exc))
                if conflicts < BATCH_TRIES:
                    continue
                self.stats["store_errors"] += len(batch)
                return
            except (DatabaseLost, *self.store.errors, ToolchainError) as exc:
                self.stats.clear()
                self.stats.update(stats)
                if isinstance(exc, DatabaseLost):  # the store's own error: no handler of one message takes it
                    if self._wait_for_database(len(batch), exc):
                        continue
                    return  # stopping: the broker re-sends what was not acknowledged
                # The commit failed: nothing of the batch is stored or acknowledged; the broker re-sends it all.
                self.stats["store_errors"] += len(batch)
                log.error("cannot commit %d messages: %s", len(batch), exc)
                return
            finally:
                deferred, self._deferred = self._deferred, None
        if self._outage is not None:
            log.warning("the fleet database %s is back after %.1f s; storing again", self.store.path,
                        time.monotonic() - self._outage[0])
            self._outage = None
        self._evaluate_changed()
        for mid, qos in acks:
            self.client.ack(mid, qos)
        for function, args in deferred:
            self._callback(function, *args)
        self.stats["processed"] += len(acks)

    def _wait_for_database(self, held: int, exc: DatabaseLost) -> bool:
        """The database dropped the connection: log it once per outage, wait (backing off to
        RECONNECT_MAX_S) and return True to try again; False when the monitor is stopping (what it holds
        stays unacknowledged: the broker's session re-sends it)."""
        if self._outage is None:
            self.stats["database_outages"] += 1
            log.error("%s; holding %d messages unacknowledged and reconnecting every %g s at most", exc, held,
                      RECONNECT_MAX_S)
            self._outage = (time.monotonic(), RECONNECT_FIRST_S)
        since, wait = self._outage
        if self._stop.wait(wait):
            return False
        self._outage = (since, min(2 * wait, RECONNECT_MAX_S))
        return True

    def _evaluate_changed(self, due_only: bool = True) -> None:
        """Evaluate the drift alarm of the fleets the batches changed whose evaluation is due (see the
        module docstring; ``due_only=False``: all of them, as the monitor stops)."""
        self._unevaluated |= self._touched
        self._touched = set()
        now = time.monotonic()
        for fleet in sorted(self._unevaluated):
            if due_only and now - self._evaluated_at.get(fleet, -math.inf) < self.evaluate_every_s:
                continue
            self._evaluated_at[fleet] = now
            try:
                self._evaluate(fleet)
            except (DatabaseLost, *self.store.errors, ToolchainError) as exc:  # evaluated again after the next batch
                self.stats["store_errors"] += 1
                log.error("cannot evaluate fleet %s's drift alarm: %s", fleet, exc)
                continue
            self._unevaluated.discard(fleet)

    def _store_one(self, topic: str, payload: bytes, retained: bool) -> bool | tuple[TelemetryRecord, float]:
        """Handle one message inside the batch; False if it must not be acknowledged (the store failed), a
        valid telemetry window (and when it arrived) to be stored with the batch's others (`_store_windows`).
        A conflict with another writer is raised (the whole batch is tried again), and so is a lost database
        (the whole batch waits for it, `_store_batch`)."""
        try:
            stored = self._handle(topic, payload, retained)
        except (DatabaseLost, *self.store.retryable):
            raise
        except Malformed as exc:
            self.stats["malformed"] += 1
            log.warning("malformed message on %s: %s", topic, exc)
            try:
                self.store.record_rejected(topic, str(exc), payload)
            except self.store.retryable:
                raise
            except (*self.store.errors, ToolchainError):
                log.exception("cannot record the malformed message")
        except (*self.store.errors, ToolchainError) as exc:
            # Not acknowledged: the broker re-sends it after the next reconnect (the session keeps it).
            self.stats["store_errors"] += 1
            log.error("cannot store the message on %s: %s", topic, exc)
            return False
        except Exception:  # a bug must not take the monitor down; acknowledge so it cannot loop
            self.stats["errors"] += 1
            log.exception("failed to handle the message on %s", topic)
        else:
            if isinstance(stored, tuple):
                return stored
            if stored is not None and self.on_stored is not None:
                self._later(self.on_stored, stored)
        return True

    def _store_windows(self, windows: list[tuple[TelemetryRecord, float, tuple[int, int]]]) -> list[tuple[int, int]]:
        """Store the batch's telemetry windows in one statement (one round trip to PostgreSQL, not one per
        window); if that fails, one by one, so a window the database refuses fails alone. Returns the
        acknowledgements of the windows stored or found duplicate."""
        if not windows:
            return []
        try:
            epochs = self.store.insert_telemetry_many([(record, at) for record, at, _ in windows])
        except self.store.retryable:
            raise
        except (*self.store.errors, ToolchainError):
            epochs = []
            for record, at, _ in windows:
                try:
                    epochs.append(self.store.insert_telemetry(record, at))
                except self.store.retryable:
                    raise
                except (*self.store.errors, ToolchainError) as exc:  # not acknowledged: re-sent after a reconnect
                    self.stats["store_errors"] += 1
                    log.error("cannot store %s/%s's window %s: %s", record.fleet, record.device, record.seq, exc)
                    epochs.append(False)
        acks = []
        for (record, at, ack), epoch in zip(windows, epochs):
            if epoch is False:
                continue
            acks.append(ack)
            if epoch is None:
                self.stats["duplicates"] += 1
                continue
            self.stats["telemetry"] += 1
            if self.on_telemetry is not None:
                self._later(self.on_telemetry, record)
            if self.on_stored is not None:
                self._later(self.on_stored, "telemetry")
            self._touched.add(record.fleet)
            self._maybe_prune(at)
        return acks

    # -- handling ------------------------------------------------------------------------------------
    def _handle(self, topic: str, payload: bytes, retained: bool) -> str | tuple[TelemetryRecord, float] | None:
        """Validate and store one message; returns its kind if something was stored, None if not; a
        telemetry window is only validated and returned (with its arrival time) to be stored with its batch."""
        fleet, device, kind = parse_topic(topic)
        if self.fleet != "+" and fleet != self.fleet:
            return None  # a subscription left in the persistent session by an earlier run with another --fleet
        now = time.time()
        if kind == STATUS:
            if not payload:  # a cleared retained status (device decommissioned): nothing to record
                return None
            self._status(fleet, device, parse_status(payload, device), None if retained else now)
        elif kind != EVENTS:
            report = parse_telemetry(payload, device, decode)
            alarm = window_alarm(report.drift, report.n, self.min_samples)
            return TelemetryRecord(fleet=fleet, device=device, alarm=alarm, **vars(report)), now
        else:
            event = parse_event(payload, device)
            event_type, body = event.type, event.payload
            if not self.store.insert_event(fleet, device, event.seq, event_type, body, event.ts, now, event.stream):
                self.stats["duplicates"] += 1
                return None
            self.stats["events"] += 1
            if event_type in ("drift_alarm", "prediction_drift", "rollback", "rejected", "error"):
                crossed = "; ".join(f"{c.get('statistic')} {c.get('value')} >= {c.get('threshold')}"
                                    for c in body.get("crossings") or [] if isinstance(c, dict))
                log.info("%s/%s event %s: %s", fleet, device, event_type,
                         body.get("reason") or crossed or {k: body.get(k) for k in ("psi_max", "ph_alarm") if k in body})
        return kind

    def _status(self, fleet: str, device: str, status: dict[str, Any], seen_at: float | None) -> None:
        state = status.pop("state")
        previous, previous_version = self.store.update_status(fleet, device, state, seen_at=seen_at, **status)
        self.stats["status"] += 1
        if previous != state:
            self._touched.add(fleet)
        version_changed = state == ONLINE and previous is not None and previous_version != status.get("model_version")
        if previous != state or version_changed:
            info = {"fleet": fleet, "device": device, "state": state, "previous": previous, **status}
            log.info("%s/%s is %s%s", fleet, device, state,
                     f" (model v{status['model_version']})" if status.get("model_version") is not None else "")
            self._notify("status", info)

    def _evaluate(self, fleet: str) -> None:
        """Re-evaluate the fleet's drift alarm from the database; log and tell a move."""
        share, change = self.store.evaluate_fleet_alarm(fleet, self.alarm_threshold)
        if change is None:
            return
        raised = change == FLEET_ALARM
        (log.warning if raised else log.info)(
            "fleet %s: %s: %d of %d reporting devices in drift alarm (%.0f%%, threshold %.0f%%)", fleet,
            "DRIFT ALARM" if raised else "drift alarm cleared", share.in_alarm, share.reporting, 100 * share.share,
            100 * self.alarm_threshold)
        self._notify(change, {"fleet": fleet, **share.event(self.alarm_threshold)})

    def _notify(self, kind: str, info: dict[str, Any]) -> None:
        if self.on_notice is not None:
            self._later(self.on_notice, kind, info)

    def _later(self, function: Callable[..., None], *args: Any) -> None:
        """Run a caller's hook after the batch commits (so it sees what it is told about); now outside one."""
        if self._deferred is not None:
            self._deferred.append((function, args))
        else:
            self._callback(function, *args)

    @staticmethod
    def _callback(function: Callable[..., None], *args: Any) -> None:
        """A caller's hook must not take the monitor down."""
        try:
            function(*args)
        except Exception:
            log.exception("%s failed", getattr(function, "__name__", "a monitor callback"))

    def _maybe_prune(self, now: float) -> None:
        if self.retention_s is None or now - self._last_prune < 3600:
            return
        self._last_prune = now
        deleted = self.store.prune(now - self.retention_s)
        if deleted:
            log.info("pruned %d telemetry windows older than %.0f days", deleted, self.retention_s / 86400)

    # -- reading -------------------------------------------------------------------------------------
    def fleet_share(self, fleet: str) -> tuple[int, int]:
        """(devices in alarm, reporting devices) in the database now, as the fleet alarm counts them."""
        share = self.store.drift_share(fleet)
        return share.in_alarm, share.reporting
