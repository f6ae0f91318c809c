"""The fleet database: what every device reported, written by the monitor and read by status, the
dashboard, the autopilot and fleet calibration. A SQLite file, or PostgreSQL (a ``postgresql://`` URL).

  schema    tables, the schema version and the migrations from older versions
  backend   SQLite or PostgreSQL: the connection, and what differs between the two
  database  one connection, one lock shared by threads, transactions and batches, create vs read-only,
            raises `DatabaseLost` (toolchain.errors) when the server dropped the connection
  writes    device states, telemetry windows, events, alarms, rejected messages, pruning
  queries   devices, telemetry, merged latency sketches, fleet drift, events
  share     the fleet drift share from the database, and when the fleet alarm moves
  local_server  a throwaway local PostgreSQL (Debian's binaries) for tests and benchmarks
  records   what is stored and returned, without SQL (TelemetryRecord, window_alarm, merged sketches)
  codec     JSON of the monitor's hot path: orjson when installed, else the standard library

`FleetStore` is the one class callers use; these names are its public surface.
"""

from __future__ import annotations

from toolchain.errors import DatabaseLost
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
from toolchain.fleet.store.share import FLEET_ALARM, FLEET_CLEARED, FleetShare
from toolchain.fleet.store.writes import StoreWrites

__all__ = ["FLEET_ALARM", "FLEET_CLEARED", "FLEET_DEVICE", "DatabaseLost", "FleetShare", "OFFLINE", "ONLINE", "SCHEMA_VERSION", "UNKNOWN", "FleetStore", "MergedLatency",
           "TelemetryRecord", "merge_sketches", "window_alarm"]


class FleetStore(StoreWrites, StoreQueries):
    """The fleet database (a SQLite file, or a ``postgresql://`` URL). ``create=False`` refuses a missing
    file or one without the fleet tables (readers must not create one)."""
