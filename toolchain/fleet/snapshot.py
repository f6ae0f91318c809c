"""What the fleet dashboard shows: one JSON-ready dict, built from the fleet store in one go.

Why one object: the page renders everything from it, identically for the first load (embedded in the
HTML), `/api/snapshot` and every server-sent event, so the browser never joins tables itself and a
test (or a script) can read exactly what the page shows.

Sizes are bounded for large fleets: the drift heat map keeps the devices most worth looking at (in
alarm first, then by highest PSI) and the features with the highest PSI; the lists keep the newest
events. The device table is complete.
"""

from __future__ import annotations

import re
import time
from typing import Any, Mapping

from toolchain.fleet.store import FleetStore

ROLLOUT_EVENTS = ("installed", "rejected", "rollback", "probation_passed")
"""Device events that tell how a push went (runtime_agent.agent emits them)."""
MAX_HEAT_DEVICES = 60
MAX_HEAT_FEATURES = 96
SERIES_BUCKETS = 60


def _natural(name: str) -> list[Any]:
    """Sort key that puts x2 before x10 (feature names are usually a prefix and an index)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _device_rows(store: FleetStore) -> list[dict[str, Any]]:
    rows = []
    for row in store.devices():
        latest = row["latest"] or {}
        rows.append({"fleet": row["fleet"], "device": row["device"], "state": row["state"],
                     "model_version": row["model_version"], "profile": row["profile"], "last_seen": row["last_seen"],
                     "p50": latest.get("p50"), "p90": latest.get("p90"), "p99": latest.get("p99"),
                     "psi_max": latest.get("psi_max"), "alarm": bool(latest.get("alarm")),
                     "window_end": (latest.get("window") or [None, None])[1]})
    return rows


def _heat(store: FleetStore) -> dict[str, Any]:
    """Devices x features PSI from each device's latest window (offline devices too, marked)."""
    windows = [w for w in store.latest_windows(include_offline=True) if (w["drift"] or {}).get("psi")]
    windows.sort(key=lambda w: (not w["alarm"], -(w["psi_max"] or 0.0), w["fleet"], w["device"]))
    shown = windows[:MAX_HEAT_DEVICES]
    peak: dict[str, float] = {}
    for window in shown:
        for feature, value in window["drift"]["psi"].items():
            peak[feature] = max(peak.get(feature, 0.0), float(value))
    features = sorted(sorted(peak, key=lambda f: -peak[f])[:MAX_HEAT_FEATURES], key=_natural)
    return {"features": features, "omitted_devices": len(windows) - len(shown),
            "omitted_features": len(peak) - len(features),
            "rows": [{"fleet": w["fleet"], "device": w["device"], "state": w["state"], "alarm": w["alarm"],
                      "psi": {f: w["drift"]["psi"][f] for f in features if f in w["drift"]["psi"]}} for w in shown]}


def build_snapshot(store: FleetStore, since_s: float = 3600.0, events: int = 30, now: float | None = None,
                   stats: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Everything the dashboard shows. Latency merges cover the last ``since_s`` seconds of windows."""
    now = time.time() if now is None else now
    since = now - since_s
    fleets = []
    for name in store.fleets():
        drift = store.fleet_drift(name)
        top = list(drift["psi"].items())[:3]
        fleets.append({key: drift[key] for key in ("fleet", "reporting", "in_alarm", "share", "devices_in_alarm",
                                                   "alarm_active", "threshold")} |
                      {"top_psi": [{"feature": feature, **heat} for feature, heat in top]})
    return {
        "generated": now, "since": since, "db": str(store.path),
        "devices": _device_rows(store),
        "models": store.latency_by_model(since=since),
        "latency": store.latency_series(since, now, SERIES_BUCKETS),
        "heat": _heat(store),
        "fleets": fleets,
        "events": store.recent_events(events),
        "rollouts": store.recent_events(events, kinds=ROLLOUT_EVENTS),
        "stats": dict(stats or {}),
    }
