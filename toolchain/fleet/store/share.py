"""The fleet drift share, read from the database: which reporting devices' latest windows are in alarm,
and when the fleet alarm moves. Every monitor worker evaluates it from the shared database (what all
workers stored), never from what it alone has seen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLEET_ALARM, FLEET_CLEARED = "fleet_drift_alarm", "fleet_drift_cleared"
MAX_LISTED_DEVICES = 50  # devices named in a fleet alarm event (the counts are always exact)


@dataclass(frozen=True)
class FleetShare:
    """A fleet's reporting devices (a telemetry window, not offline) and those whose latest window is in alarm."""

    fleet: str
    reporting: int
    devices_in_alarm: tuple[str, ...]  # sorted

    @property
    def in_alarm(self) -> int:
        return len(self.devices_in_alarm)

    @property
    def share(self) -> float:
        return self.in_alarm / self.reporting if self.reporting else 0.0

    def change(self, threshold: float, active: bool) -> str | None:
        """The alarm's move from ``active`` at this threshold: FLEET_ALARM, FLEET_CLEARED or None."""
        if not active and self.reporting > 0 and self.share >= threshold:
            return FLEET_ALARM
        if active and self.share < threshold:
            return FLEET_CLEARED
        return None

    def event(self, threshold: float) -> dict[str, Any]:
        """The body of a fleet alarm event."""
        return {"share": round(self.share, 6), "in_alarm": self.in_alarm, "reporting": self.reporting,
                "threshold": threshold, "devices": list(self.devices_in_alarm[:MAX_LISTED_DEVICES])}


def read_share(db: Any, fleet: str) -> FleetShare:
    """The share now, from each reporting device's latest window (``db``: a backend, inside or outside a
    transaction). One index lookup per device (its newest (epoch, seq) on ``telemetry_order``), not a
    pass over the fleet's stored windows: every monitor worker runs this after its commits, and its cost
    must not grow with the history kept."""
    rows = db.execute(
        "SELECT device, alarm FROM (SELECT d.device, (SELECT t.alarm FROM telemetry t WHERE t.fleet = d.fleet AND "
        "t.device = d.device ORDER BY t.epoch DESC, t.seq DESC LIMIT 1) AS alarm FROM devices d "
        "WHERE d.fleet = ? AND d.state != 'offline') latest WHERE alarm IS NOT NULL ORDER BY device", (fleet,)).fetchall()
    return FleetShare(fleet, len(rows), tuple(device for device, alarm in rows if alarm))
