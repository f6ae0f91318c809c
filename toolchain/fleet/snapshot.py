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

from runtime_agent.drift import MIN_PSI_SAMPLES, PSI_SIGNIFICANT
from toolchain.fleet.cert_expiry import certificate_expiry
from toolchain.fleet.store import FleetStore

ROLLOUT_EVENTS = ("installed", "rejected", "rollback", "probation_passed")
"""Device events that tell how a push went (runtime_agent.agent emits them)."""
TRUTH_EVENT = "accuracy"
"""The ground-truth accuracy event a labelled source sends (the fleet simulator: ``{n, correct, accuracy}``)."""
MAX_HEAT_DEVICES = 60
MAX_HEAT_FEATURES = 96
SERIES_BUCKETS = 60


def _natural(name: str) -> list[Any]:
    """Sort key that puts x2 before x10 (feature names are usually a prefix and an index)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def psi_threshold(drift: Mapping[str, Any], n: int) -> float | None:
    """The PSI threshold the agent judged the window by (``runtime_agent.drift.psi_threshold``), or, for
    an older agent's window, the old rule's (0.25 from ``MIN_PSI_SAMPLES`` samples, none below)."""
    if drift.get("psi_threshold") is not None:
        return float(drift["psi_threshold"])
    return PSI_SIGNIFICANT if int(drift.get("n", n) or 0) >= MIN_PSI_SAMPLES else None


def alarm_features(drift: Mapping[str, Any], n: int) -> list[str]:
    """The features whose heat-map cells are red: exactly those the window's covariate alarm rests on
    (``psi_sustained``: over the threshold in this window and the one before), or, for an older agent's
    window, those at the old rule's threshold. A cell is red if and only if the device's alarm says so."""
    if "psi_sustained" in drift:
        return list(drift["psi_sustained"])
    threshold = psi_threshold(drift, n)
    return [] if threshold is None else [f for f, v in (drift.get("psi") or {}).items() if v >= threshold]


def _truth(store: FleetStore, devices: int) -> dict[tuple[str, str], dict[str, Any]]:
    """Each device's latest ground-truth accuracy event (only a labelled source sends them)."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for event in store.recent_events(limit=4 * max(devices, 1), kinds=(TRUTH_EVENT,)):
        payload = event["payload"]
        if isinstance(payload.get("accuracy"), (int, float)) and isinstance(payload.get("n"), int):
            latest.setdefault((event["fleet"], event["device"]), payload)
    return latest


def device_rows(store: FleetStore, fleet: str | None = None, now: float | None = None,
                devices: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every device with its latest window's numbers, drift verdict (what crossed), accuracy (the
    label-free estimate and, when a labelled source reports it, the truth) and certificate expiry at `now`,
    in the order of `devices` (the store's rows of `fleet`, read here unless the caller already has them)."""
    now = time.time() if now is None else now
    devices = store.devices(fleet) if devices is None else devices
    drift = {(w["fleet"], w["device"]): w["drift"] for w in store.latest_windows(fleet, include_offline=True)}
    truth = _truth(store, len(devices))
    rows = []
    for row in devices:
        latest = row["latest"] or {}
        window = drift.get((row["fleet"], row["device"])) or {}
        true = truth.get((row["fleet"], row["device"]), {})
        rows.append({"fleet": row["fleet"], "device": row["device"], "state": row["state"],
                     "model_version": row["model_version"], "profile": row["profile"], "last_seen": row["last_seen"],
                     "p50": latest.get("p50"), "p90": latest.get("p90"), "p99": latest.get("p99"),
                     "psi_max": latest.get("psi_max"), "alarm": bool(latest.get("alarm")),
                     "prediction_drift": bool(window.get("prediction_drift")), "crossings": window.get("crossings") or [],
                     "n": latest.get("n"), "window_model_version": latest.get("model_version"),
                     "estimated_accuracy": window.get("estimated_accuracy"),
                     "true_accuracy": true.get("accuracy"), "true_n": true.get("n"),
                     "window_end": (latest.get("window") or [None, None])[1],
                     "certificate": certificate_expiry(row, now)})
    return rows


def accuracy_by_model(devices: list[dict[str, Any]]) -> dict[tuple[str, Any], dict[str, Any]]:
    """Per (fleet, model version), over its devices' latest windows: the label-free estimate weighted by
    each window's samples, and the ground truth weighted by each accuracy event's samples."""
    sums: dict[tuple[str, Any], list[float]] = {}
    for d in devices:
        entry = sums.setdefault((d["fleet"], d["window_model_version"]), [0.0, 0, 0.0, 0])
        if d["estimated_accuracy"] is not None and d["n"]:
            entry[0] += d["estimated_accuracy"] * d["n"]
            entry[1] += d["n"]
        if d["true_accuracy"] is not None and d["true_n"]:
            entry[2] += d["true_accuracy"] * d["true_n"]
            entry[3] += d["true_n"]
    return {key: {"estimated_accuracy": est / n if n else None, "true_accuracy": true / m if m else None}
            for key, (est, n, true, m) in sums.items()}


def with_accuracy(models: list[dict[str, Any]], devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows per (fleet, model version) with that version's estimated and true accuracy added."""
    accuracy = accuracy_by_model(devices)
    unknown = {"estimated_accuracy": None, "true_accuracy": None}
    return [{**m, **accuracy.get((m["fleet"], m["model_version"]), unknown)} for m in models]


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
                      "psi_threshold": psi_threshold(w["drift"], w["n"]), "alarm_features": alarm_features(w["drift"], w["n"]),
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
    devices = device_rows(store, now=now)
    models = with_accuracy(store.latency_by_model(since=since), devices)
    return {
        "generated": now, "since": since, "db": str(store.path),
        "devices": devices,
        "models": models,
        "latency": store.latency_series(since, now, SERIES_BUCKETS),
        "heat": _heat(store),
        "fleets": fleets,
        "events": store.recent_events(events),
        "rollouts": store.recent_events(events, kinds=ROLLOUT_EVENTS),
        "stats": dict(stats or {}),
    }
