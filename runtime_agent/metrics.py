"""Prometheus metrics of the agent, served as text at `GET /metrics` on the REST port.

Written by hand in Prometheus' text exposition format (version 0.0.4): the device takes no
prometheus-client dependency for a few counters. Two kinds of numbers:

- kept here, since the agent started: requests by protocol, endpoint and status, failed requests, and a
  latency histogram of inference requests (REST and gRPC alike, measured around the whole handler);
- read from the agent when scraped: the served model's name and version, the drift statistics of the last
  closed telemetry window, the outbox's depth and dropped telemetry, transfers by state, the probation's
  state, resident memory.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from typing import Any, Iterable, Protocol

from runtime_agent.model import LoadedModel

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "edge_agent_"
# Seconds; an edge model's request takes from a fraction of a millisecond to seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Observed(Protocol):
    """What the exposition reads from the agent at scrape time."""

    @property
    def model(self) -> LoadedModel | None: ...

    def metrics_state(self) -> dict[str, Any]: ...


def _escape(value: Any) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Exposition:
    """Metric families in the text format: a HELP and TYPE line, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[str, dict[str, Any], float]]) -> None:
        """`samples`: (suffix, labels, value); the suffix is appended to the name (`_bucket`, `_sum`, ...)."""
        self.lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
        for suffix, labels, value in samples:
            rendered = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
            self.lines.append(f"{PREFIX}{name}{suffix}{{{rendered}}} {_number(value)}" if rendered
                              else f"{PREFIX}{name}{suffix} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class ServingMetrics:
    """Request counters and the inference latency histogram, shared by the REST and gRPC servers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()  # (protocol, endpoint, status)
        self._errors: Counter[tuple[str, str]] = Counter()
        self._buckets: dict[str, list[int]] = {}  # protocol -> counts per LATENCY_BUCKETS bound, then +Inf
        self._sums: Counter[str] = Counter()

    def observe(self, protocol: str, endpoint: str, status: str, ok: bool, seconds: float | None = None) -> None:
        """One answered request; `seconds` (inference requests only) goes into the latency histogram."""
        with self._lock:
            self._requests[protocol, endpoint, status] += 1
            if not ok:
                self._errors[protocol, endpoint] += 1
            if seconds is not None:
                counts = self._buckets.setdefault(protocol, [0] * (len(LATENCY_BUCKETS) + 1))
                counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self._sums[protocol] += seconds

    def exposition(self, observed: Observed) -> str:
        with self._lock:
            requests, errors = dict(self._requests), dict(self._errors)
            buckets, sums = {k: list(v) for k, v in self._buckets.items()}, dict(self._sums)
        out = _Exposition()
        out.family("requests_total", "counter", "Requests answered, by protocol, endpoint and status.",
                   [("", {"protocol": p, "endpoint": e, "status": s}, n) for (p, e, s), n in sorted(requests.items())])
        out.family("request_errors_total", "counter", "Requests answered with an error (bad input, unknown model, no model).",
                   [("", {"protocol": p, "endpoint": e}, n) for (p, e), n in sorted(errors.items())])
        out.family("inference_duration_seconds", "histogram", "Inference request latency, from request to answer.",
                   _histogram(buckets, sums))
        _agent_families(out, observed)
        return out.text()


def _histogram(buckets: dict[str, list[int]], sums: dict[str, float]) -> list[tuple[str, dict[str, Any], float]]:
    samples = []
    for protocol, counts in sorted(buckets.items()):
        cumulative = 0
        for bound, count in zip((*LATENCY_BUCKETS, math.inf), counts):
            cumulative += count
            samples.append(("_bucket", {"protocol": protocol, "le": _number(bound)}, cumulative))
        samples += [("_count", {"protocol": protocol}, cumulative), ("_sum", {"protocol": protocol}, sums[protocol])]
    return samples


def _agent_families(out: _Exposition, observed: Observed) -> None:
    model = observed.model
    state = observed.metrics_state()
    manifest = model.bundle.manifest if model else {}
    out.family("model_info", "gauge", "The served model: 1 for its name, version and target.",
               [("", {"name": manifest["name"], "version": manifest["version"], "target": manifest.get("target", "")}, 1)]
               if model else [])
    out.family("model_version", "gauge", "Version of the served model (0: none loaded).", [("", {}, manifest.get("version", 0))])
    drift = state.get("drift") or {}
    scalars = {key: float(value) for key, value in drift.items() if isinstance(value, (int, float))}
    out.family("drift", "gauge", "Drift statistics of the last closed telemetry window (PSI, alarms as 0/1, samples).",
               [("", {"statistic": key}, value) for key, value in sorted(scalars.items())])
    per_feature = drift.get("psi") if isinstance(drift.get("psi"), dict) else {}
    out.family("drift_feature_psi", "gauge", "PSI of each input feature vs the bundle's reference, last closed window.",
               [("", {"feature": feature}, float(value)) for feature, value in per_feature.items()])
    out.family("outbox_pending", "gauge", "Messages in the durable outbox waiting for the broker.", [("", {}, state["outbox_pending"])])
    out.family("outbox_dropped_telemetry_total", "counter", "Telemetry messages dropped because the outbox was full.",
               [("", {}, state["outbox_dropped_telemetry"])])
    out.family("push_transfers", "gauge", "Bundle transfers known to the agent, by state.",
               [("", {"state": s}, n) for s, n in sorted(state["transfers"].items())])
    probation = state.get("probation") or {}
    out.family("probation", "gauge", "1 for the probation state of the last installed version (running, passed, rolled_back).",
               [("", {"version": probation["version"], "state": probation["state"]}, 1)] if probation else [])
    out.family("resident_memory_bytes", "gauge", "Resident memory of the agent process.", [("", {}, state["rss_bytes"])])
