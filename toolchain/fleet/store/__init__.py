"""The fleet database: what every device reported, written by the monitor and read by status, the
dashboard, the autopilot and fleet calibration.

  schema    tables, the schema version and the migrations from older files
  database  the connection: WAL, one lock shared by threads, transactions and batches, create vs read-only
  writes    device states, telemetry windows, events, alarms, rejected messages, pruning
  queries   devices, telemetry, merged latency sketches, fleet drift, events
  records   what is stored and returned, without SQL (TelemetryRecord, window_alarm, merged sketches)

`FleetStore` is the one class callers use; these names are its public surface.
"""

from __future__ import annotations

from toolchain.fleet.store.queries import StoreQueries
from toolchain.fleet.store.records import (
    FLEET_DEVICE,
    OFFLINE,
    ONLINE,
    UNKNOWN,
    MergedLatency,
    TelemetryRecord,
    merge_sketches,
    window_alarm,
)
from toolchain.fleet.store.schema import SCHEMA_VERSION
from toolchain.fleet.store.writes import StoreWrites

__all__ = ["FLEET_DEVICE", "OFFLINE", "ONLINE", "SCHEMA_VERSION", "UNKNOWN", "FleetStore", "MergedLatency",
           "TelemetryRecord", "merge_sketches", "window_alarm"]


class FleetStore(StoreWrites, StoreQueries):
    """The fleet database. ``create=False`` refuses a missing file (readers must not create one)."""
