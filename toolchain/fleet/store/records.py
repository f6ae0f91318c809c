"""What the fleet database stores and returns, independent of SQL: a validated telemetry window
(`TelemetryRecord`), a window's alarm by the agent's own rule, merged latency sketches, and the device
states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from runtime_agent.drift import MIN_PSI_SAMPLES, alarm
from runtime_agent.protocol import TelemetryReport
from runtime_agent.sketch import LatencySketch

FLEET_DEVICE = "*"
"""Device column of fleet-level events (a device id is [A-Za-z0-9_-], so it can never collide)."""
ONLINE, OFFLINE, UNKNOWN = "online", "offline", "unknown"
REJECTED_KEPT = 1000


def window_alarm(drift: Mapping[str, Any], n: int, min_samples: int = MIN_PSI_SAMPLES) -> bool:
    """Whether one window's drift report is in alarm: the agent's rule (`runtime_agent.drift.alarm`).

    ``n`` (the window's samples) is used when the drift report does not carry its own ``n``.
    """
    if not drift:
        return False
    return alarm({**drift, "n": drift.get("n", n)}, min_samples=min_samples)


@dataclass(frozen=True, kw_only=True)
class TelemetryRecord(TelemetryReport):
    """One validated telemetry window (the device's report, `runtime_agent.protocol`), as stored: with the
    fleet and device of its topic and its alarm by the fleet's rule."""

    fleet: str
    device: str
    alarm: bool

    @property
    def psi_max(self) -> float | None:
        value = self.drift.get("psi_max")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class MergedLatency:
    """A merged latency sketch with what went into it."""

    sketch: LatencySketch
    windows: int  # telemetry windows merged
    skipped: int  # windows whose sketch has another bucket layout (cannot merge exactly): left out

    def summary(self) -> dict[str, Any]:
        return {"windows": self.windows, "count": self.sketch.count, **self.sketch.summary(),
                **({"skipped": self.skipped} if self.skipped else {})}


def merge_sketches(sketch_dicts: Iterable[Mapping[str, Any]]) -> MergedLatency:
    """Exact merge (`LatencySketch.merge`) of stored sketches in the default layout; others are skipped."""
    merged, windows, skipped = LatencySketch(), 0, 0
    for data in sketch_dicts:
        sketch = LatencySketch.from_dict(data)
        if sketch.relative_accuracy != merged.relative_accuracy or sketch.min_value != merged.min_value:
            skipped += 1
            continue
        merged.merge(sketch)
        windows += 1
    return MergedLatency(merged, windows, skipped)
