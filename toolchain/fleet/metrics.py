"""Prometheus metrics of the fleet monitor, in the Prometheus text format (`prometheus-client`, the ``metrics`` extra).

Served at ``/metrics`` on the dashboard's port and, with ``toolchain fleet monitor --metrics-port P``, on a
port of their own. Two sources, named ``edge_fleet_*``:

- **The fleet, from the database**, read on every scrape with the same queries as ``toolchain fleet status``
  (so the numbers are the ones it prints, and every monitor worker sharing a database serves the same ones):
  devices per ``state``, each fleet's drift alarm (reporting devices, devices in alarm, share, whether the
  fleet alarm is active), and per ``(fleet, model_version)`` the latency quantiles of the exactly merged
  sketches of the windows that ended in the last ``since_s`` (0: all stored) (as gauges with a ``quantile`` label, in
  seconds; the request and window counts beside them).
- **This process's ingest**: messages stored per ``kind`` (status, telemetry, events), duplicates dropped,
  malformed messages, store errors (counters from the monitor's ``stats``), and the ingest lag: a histogram
  of the time from a telemetry window's end on the device to its commit here, which is what a broker
  backlog, a cut bridge or a slow database all show up as. With several monitor workers, sum their counters.

Why a collector that reads the database on each scrape rather than gauges kept up to date: the database is
the truth the whole fleet tooling shares (status, dashboard, autopilot, other workers), and a scrape every
15-60 s costs one read of it, while updating gauges would cost every message something.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from toolchain.errors import ToolchainError
from toolchain.fleet.listener import GuardedHandler, GuardedServer
from toolchain.fleet.store import OFFLINE, ONLINE, FleetStore, TelemetryRecord

try:
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError:  # the metrics extra is not installed: FleetMetrics says how to get it
    prometheus_client = None

MISSING = ("Prometheus metrics need prometheus-client: pip install 'edge-toolchain[metrics]' "
           "(or pip install -r requirements-ops.lock)")
DEFAULT_SINCE_S = 3600.0  # as `toolchain fleet status --since`
QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, float("inf"))
INGEST_KINDS = ("status", "telemetry", "events")


class PrometheusMissing(ToolchainError):
    """prometheus-client is not installed."""


class FleetMetrics:
    """The monitor's metrics registry over the fleet database ``db`` (it must exist: the monitor creates it).

    ``stats()`` returns the monitor's message counters (`FleetMonitor.stats`); `observe_ingest` is the
    monitor's ``on_telemetry`` hook. `exposition()` renders the text format; `serve()` starts a server of
    its own. Scrapes may come from any thread (one database connection, used under a lock)."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes

    def __init__(self, db: Path | str, *, stats: Callable[[], Mapping[str, int]] | None = None,
                 fleet: str | None = None, since_s: float = DEFAULT_SINCE_S) -> None:
        if prometheus_client is None:
            raise PrometheusMissing(MISSING)
        self.db, self.stats, self.fleet, self.since_s = db, stats, fleet, float(since_s)
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.ingest_lag = prometheus_client.Histogram(
            "edge_fleet_ingest_lag_seconds", "From a telemetry window's end on the device to its commit by this monitor",
            buckets=LAG_BUCKETS, registry=self.registry)
        prometheus_client.ProcessCollector(registry=self.registry)
        self.registry.register(self)
        self._lock = threading.Lock()
        self._store: FleetStore | None = None
        self._server: Any = None

    def observe_ingest(self, record: TelemetryRecord) -> None:
        """A telemetry window was committed (the monitor's ``on_telemetry``): record its lag (device clocks
        running ahead count as 0)."""
        self.ingest_lag.observe(max(0.0, time.time() - record.window_end))

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    def serve(self, host: str, port: int, token: str | None = None) -> str:
        """Serve ``/metrics`` on host:port in the background, with the fleet listeners' limits and, off
        loopback, `token` (`toolchain.fleet.listener`); returns its URL."""
        self._server = GuardedServer(host, port, _MetricsHandler, token, "metrics", "--metrics-port")
        self._server.metrics = self
        threading.Thread(target=self._server.serve_forever, name="fleet-metrics", daemon=True).start()
        bound = self._server.server_address[1]
        return f"http://{f'[{host}]' if ':' in host else host}:{bound}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- the collector (prometheus_client calls collect() on every scrape) ----------------------------
    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._store is None:
                self._store = FleetStore(self.db, create=False)
            store = self._store
            devices = store.devices(self.fleet)
            drift = [store.fleet_drift(name) for name in ([self.fleet] if self.fleet else store.fleets())]
            models = store.latency_by_model(self.fleet, since=time.time() - self.since_s if self.since_s > 0 else None)
        yield from _device_metrics(devices)
        yield from _drift_metrics(drift)
        yield from _latency_metrics(models, self.since_s)
        if self.stats is not None:
            yield from _ingest_metrics(self.stats())


def _device_metrics(devices: list[dict[str, Any]]) -> Iterator[Metric]:
    counts = Counter((row["fleet"], row["state"]) for row in devices)
    for fleet in {row["fleet"] for row in devices}:  # online and offline always present, 0 or not
        for state in (ONLINE, OFFLINE):
            counts.setdefault((fleet, state), 0)
    family = GaugeMetricFamily("edge_fleet_devices", "Devices by their last status", labels=["fleet", "state"])
    for (fleet, state), count in sorted(counts.items()):
        family.add_metric([fleet, state], count)
    yield family


def _drift_metrics(fleets: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each fleet's drift from its reporting devices' latest windows (`FleetStore.fleet_drift`)."""
    gauges = {"reporting": ("edge_fleet_drift_reporting_devices", "Devices with a telemetry window, not offline"),
              "in_alarm": ("edge_fleet_drift_devices_in_alarm", "Reporting devices whose latest window is in drift alarm"),
              "share": ("edge_fleet_drift_alarm_share", "Devices in drift alarm / reporting devices"),
              "alarm_active": ("edge_fleet_drift_alarm_active", "1 while the fleet drift alarm is raised")}
    for key, (name, doc) in gauges.items():
        family = GaugeMetricFamily(name, doc, labels=["fleet"])
        for row in fleets:
            family.add_metric([row["fleet"]], float(row[key]))
        yield family


def _latency_metrics(models: list[dict[str, Any]], since_s: float) -> Iterator[Metric]:
    """Per (fleet, model version): quantiles of the merged sketch, requests and windows merged."""
    span = f"windows that ended in the last {since_s:g} s"
    quantiles = GaugeMetricFamily("edge_fleet_model_latency_seconds", f"Inference latency quantiles, merged sketches of the {span}",
                                  labels=["fleet", "model_version", "quantile"])
    requests = GaugeMetricFamily("edge_fleet_model_requests", f"Requests measured in the {span}", labels=["fleet", "model_version"])
    windows = GaugeMetricFamily("edge_fleet_model_windows", f"Telemetry {span}", labels=["fleet", "model_version"])
    for row in models:
        version = "none" if row["model_version"] is None else str(row["model_version"])
        for quantile, key in QUANTILES:
            if row[key] is not None:
                quantiles.add_metric([row["fleet"], version, quantile], row[key] / 1000.0)
        requests.add_metric([row["fleet"], version], row["count"])
        windows.add_metric([row["fleet"], version], row["windows"])
    yield from (quantiles, requests, windows)


def _ingest_metrics(stats: Mapping[str, int]) -> Iterator[Metric]:
    ingested = CounterMetricFamily("edge_fleet_messages_ingested", "Messages this monitor stored, by kind", labels=["kind"])
    for kind in INGEST_KINDS:
        ingested.add_metric([kind], stats.get(kind, 0))
    yield ingested
    for key, name, doc in (("duplicates", "edge_fleet_duplicates_dropped", "Messages dropped as already stored (device, stream, seq)"),
                           ("malformed", "edge_fleet_malformed_messages", "Messages refused by the topic schema's validators"),
                           ("store_errors", "edge_fleet_store_errors", "Messages not stored because the database failed (redelivered)")):
        yield CounterMetricFamily(name, doc, value=stats.get(key, 0))



class _MetricsHandler(GuardedHandler):
    """``GET /metrics`` only (`FleetMetrics.serve`)."""

    server: GuardedServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        return

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self.authorized():
            return
        metrics: FleetMetrics = self.server.metrics
        found = self.path.split("?", 1)[0] == "/metrics"
        body = metrics.exposition() if found else b"not found: scrape /metrics\n"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", metrics.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
