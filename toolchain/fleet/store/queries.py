"""What readers ask the fleet database: devices, telemetry, merged latency, drift, events.

Which window is a device's *latest*: the highest seq of its newest stream (highest epoch); seqs rise
per stream and survive agent restarts, device clocks can be wrong. A window is *in alarm* by the agent's own rule
(`runtime_agent.drift.alarm`): Page-Hinkley fired, or ``psi_max`` / ``prediction_psi`` >= 0.25 on a window of
at least ``MIN_PSI_SAMPLES`` samples (a PSI of a few dozen samples is noise; see runtime_agent/drift.py).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

from runtime_agent.drift import MIN_PSI_SAMPLES
from runtime_agent.sketch import LatencySketch
from toolchain.fleet.store.database import Database
from toolchain.fleet.store.records import MergedLatency, merge_sketches
from toolchain.fleet.store.schema import latest_window
from toolchain.fleet.store.share import FleetShare, read_share


def _fleet_version_order(item: tuple[tuple[str, int | None], Any]) -> tuple[str, bool, int]:
    """Sort key of ``{(fleet, model_version): ...}`` items: by fleet, then version (unknown last)."""
    (fleet, version), _ = item
    return fleet, version is None, version or 0


class StoreQueries(Database):
    def fleets(self) -> list[str]:
        return [r["fleet"] for r in self._rows("SELECT DISTINCT fleet FROM devices ORDER BY fleet")]

    def device(self, fleet: str, device: str) -> dict[str, Any] | None:
        rows = [r for r in self.devices(fleet) if r["device"] == device]
        return rows[0] if rows else None

    def devices(self, fleet: str | None = None) -> list[dict[str, Any]]:
        """The device table, each row with its latest telemetry window (``latest``: None before the first)."""
        where, params = ("WHERE d.fleet = ?", (fleet,)) if fleet else ("", ())
        rows = self._rows(
            "SELECT d.fleet, d.device, d.state, d.model_version, d.model_name, d.agent_version, d.profile, d.last_seen, "
            "d.last_seq, d.stream, d.state_changed_at, d.cert_not_after, d.ca_not_after, t.seq AS w_seq, t.stream AS w_stream, t.epoch AS w_epoch, t.window_start AS w_start, t.window_end AS w_end, "
            "t.model_version AS w_model_version, t.n AS w_n, t.requests AS w_requests, t.errors AS w_errors, "
            "t.rss_mb AS w_rss_mb, t.p50 AS w_p50, t.p90 AS w_p90, t.p99 AS w_p99, t.psi_max AS w_psi_max, t.alarm AS w_alarm "
            "FROM devices d LEFT JOIN telemetry t ON t.fleet = d.fleet AND t.device = d.device AND "
            f"{latest_window('d')} "
            f"{where} ORDER BY d.fleet, d.device", params)
        result = []
        for row in rows:
            latest = {key[2:]: row.pop(key) for key in list(row) if key.startswith("w_")}
            if latest["seq"] is None:
                latest = None
            else:
                latest["window"] = [latest.pop("start"), latest.pop("end")]
                latest["alarm"] = bool(latest["alarm"])
            result.append({**row, "latest": latest})
        return result

    def telemetry(self, fleet: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        """Stored windows (sketch and drift decoded), per device oldest first (by stream epoch, then seq)."""
        clauses, params = [], []
        for column, value in (("fleet", fleet), ("device", device)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(f"SELECT * FROM telemetry {where} ORDER BY fleet, device, epoch, seq", params)
        for row in rows:
            row["sketch"], row["drift"], row["alarm"] = json.loads(row["sketch"]), json.loads(row["drift"]), bool(row["alarm"])
        return rows

    def _sketch_rows(self, fleet: str | None, model_version: int | None, device: str | None,
                     since: float | None, until: float | None, columns: str = "sketch") -> list[dict[str, Any]]:
        clauses, params = [], []
        for clause, value in (("fleet = ?", fleet), ("model_version = ?", model_version), ("device = ?", device),
                              ("window_end >= ?", since), ("window_end <= ?", until)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return self._rows(f"SELECT {columns} FROM telemetry {where}", params)

    def merged_latency(self, fleet: str | None = None, model_version: int | None = None, device: str | None = None,
                       since: float | None = None, until: float | None = None) -> MergedLatency:
        """Exact merge of every stored window's sketch matching the filters (window_end in [since, until])."""
        rows = self._sketch_rows(fleet, model_version, device, since, until)
        return merge_sketches(json.loads(row["sketch"]) for row in rows)

    def merged_sketch(self, fleet: str | None = None, model_version: int | None = None, device: str | None = None,
                      since: float | None = None, until: float | None = None) -> LatencySketch:
        """`merged_latency(...)`'s sketch: p50/p90/p99 of the union of the windows, exactly as one device would."""
        return self.merged_latency(fleet, model_version, device, since, until).sketch

    def latency_by_model(self, fleet: str | None = None, since: float | None = None,
                         until: float | None = None) -> list[dict[str, Any]]:
        """Per (fleet, model_version): windows, count and p50/p90/p99 of the merged sketch."""
        groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
        for row in self._sketch_rows(fleet, None, None, since, until, "fleet, model_version, sketch"):
            groups.setdefault((row["fleet"], row["model_version"]), []).append(json.loads(row["sketch"]))
        return [{"fleet": f, "model_version": v, **merge_sketches(s).summary()}
                for (f, v), s in sorted(groups.items(), key=_fleet_version_order)]

    def latency_by_fleet(self, since: float | None = None, until: float | None = None) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in self._sketch_rows(None, None, None, since, until, "fleet, sketch"):
            groups.setdefault(row["fleet"], []).append(json.loads(row["sketch"]))
        return {fleet: merge_sketches(sketches).summary() for fleet, sketches in sorted(groups.items())}

    def latency_series(self, since: float, until: float, buckets: int = 60,
                       fleet: str | None = None) -> dict[str, Any]:
        """Latency over time per (fleet, model_version), for a chart: the windows with window_end from
        ``since`` on, their span up to ``until`` (from the first of them, so a young fleet is not squeezed
        into one corner; past ``until`` if a device clock runs ahead, rather than losing its windows) cut
        into ``buckets`` equal slices; per slice with data, the exact merge of its windows' sketches (``t``:
        the slice's end), not an average of device percentiles.

        Returns ``{"start", "end", "series": [{fleet, model_version, points: [{t, windows, count, p50, p90,
        p99}]}]}``."""
        if not until > since or buckets < 1:
            raise ValueError(f"need until > since and buckets >= 1, got [{since}, {until}] and {buckets}")
        rows = self._sketch_rows(fleet, None, None, since, None, "fleet, model_version, window_end, sketch")
        until = max([until, *(row["window_end"] for row in rows)])
        start = min(min((row["window_end"] for row in rows), default=since), until - 1.0)  # at least 1 s wide
        width = (until - start) / buckets
        groups: dict[tuple[str, int | None], dict[int, list[dict[str, Any]]]] = {}
        for row in rows:
            index = min(buckets - 1, int((row["window_end"] - start) / width))
            slices = groups.setdefault((row["fleet"], row["model_version"]), {})
            slices.setdefault(index, []).append(json.loads(row["sketch"]))
        series = []
        for (name, version), slices in sorted(groups.items(), key=_fleet_version_order):
            points = [{"t": start + (index + 1) * width, **merge_sketches(sketches).summary()}
                      for index, sketches in sorted(slices.items())]
            series.append({"fleet": name, "model_version": version, "points": points})
        return {"start": start, "end": until, "series": series}

    def latest_windows(self, fleet: str | None = None, include_offline: bool = False) -> list[dict[str, Any]]:
        """Each device's latest window (newest stream, highest seq) with the device's state; offline devices left out
        unless asked (their last window is stale)."""
        where = ["1 = 1"]
        params: list[Any] = []
        if fleet:
            where.append("t.fleet = ?")
            params.append(fleet)
        if not include_offline:
            where.append("d.state != 'offline'")
        rows = self._rows(
            "SELECT t.fleet, t.device, t.stream, t.epoch, t.seq, t.n, t.alarm, t.psi_max, t.drift, d.state FROM telemetry t "
            "JOIN devices d ON d.fleet = t.fleet AND d.device = t.device "
            f"WHERE {latest_window('t')} "
            f"AND {' AND '.join(where)} ORDER BY t.fleet, t.device", params)
        for row in rows:
            row["drift"], row["alarm"] = json.loads(row["drift"]), bool(row["alarm"])
        return rows

    def fleet_drift(self, fleet: str, include_offline: bool = False, min_samples: int = MIN_PSI_SAMPLES) -> dict[str, Any]:
        """The fleet's drift now, from each reporting device's latest window.

        ``reporting``: devices with a window (and not offline, unless ``include_offline``); ``in_alarm``,
        ``share`` (= in_alarm / reporting, 0.0 with none) and ``devices_in_alarm`` use the stored per-window
        alarm. ``psi``: per feature, ``mean``/``max`` PSI across the devices whose latest window has at least
        ``min_samples`` samples (smaller windows' PSI is noise), and how many ``devices`` that is.
        ``alarm_active``/``threshold``: the monitor's fleet alarm state, if a monitor ran.
        """
        windows = self.latest_windows(fleet, include_offline)
        in_alarm = [w["device"] for w in windows if w["alarm"]]
        per_feature: dict[str, list[float]] = {}
        for window in windows:
            drift = window["drift"]
            if int(drift.get("n", window["n"]) or 0) < min_samples:
                continue
            for feature, value in (drift.get("psi") or {}).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    per_feature.setdefault(feature, []).append(float(value))
        heat = {feature: {"mean": sum(values) / len(values), "max": max(values), "devices": len(values)}
                for feature, values in per_feature.items()}
        state = self._rows("SELECT active, threshold FROM fleet_alarms WHERE fleet = ?", (fleet,))
        return {"fleet": fleet, "reporting": len(windows), "in_alarm": len(in_alarm),
                "share": len(in_alarm) / len(windows) if windows else 0.0, "devices_in_alarm": in_alarm,
                "psi": dict(sorted(heat.items(), key=lambda kv: -kv[1]["mean"])),
                "alarm_active": bool(state[0]["active"]) if state else False,
                "threshold": state[0]["threshold"] if state else None}

    def fleet_alarms(self) -> dict[str, dict[str, Any]]:
        return {row.pop("fleet"): {**row, "active": bool(row["active"])}
                for row in self._rows("SELECT * FROM fleet_alarms ORDER BY fleet")}

    def recent_events(self, limit: int = 20, fleet: str | None = None, device: str | None = None,
                      kind: str | None = None, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Newest first (by arrival); ``payload`` decoded. ``kinds``: any of these types (e.g. the rollout
        events a dashboard lists)."""
        clauses, params = [], []
        for clause, value in (("fleet = ?", fleet), ("device = ?", device), ("type = ?", kind)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if kinds is not None:
            kinds = list(kinds)
            clauses.append(f"type IN ({', '.join('?' * len(kinds))})" if kinds else "1 = 0")
            params.extend(kinds)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(f"SELECT * FROM events {where} ORDER BY received_at DESC, seq DESC LIMIT ?", [*params, int(limit)])
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        return rows

    def rejected(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._rows("SELECT received_at, topic, reason, head FROM rejected ORDER BY id DESC LIMIT ?", (int(limit),))

    def rejected_count(self) -> int:
        """Malformed messages recorded (all time: ids only grow, and the trimming keeps the newest)."""
        return int(self._rows("SELECT COALESCE(MAX(id), 0) AS n FROM rejected")[0]["n"])

    def drift_share(self, fleet: str) -> FleetShare:
        """The fleet's drift share now (reporting devices, those in alarm), as the fleet alarm counts it."""
        with self._lock, self._lost():
            return read_share(self._db(), fleet)
