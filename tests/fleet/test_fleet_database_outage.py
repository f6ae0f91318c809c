"""The monitor through a PostgreSQL restart: a real mosquitto, a real PostgreSQL (tests/postgres.py) stopped
with pg_ctl while windows stream in and started again. The monitor holds what it could not store,
unacknowledged, reconnects, and every window ends up in the database exactly once."""

from __future__ import annotations

import logging
import threading

import pytest

from tests.fleet_helpers import Injector, started_monitor, telemetry, wait_until
from toolchain.deploy.broker import ManagedBroker
from toolchain.fleet.store import FleetStore
from toolchain.fleet.store.local_server import PostgresServer, run_server, stop_server

DEVICES, WINDOWS = 4, 12  # per device: the first third before the stop, the rest during and after it


def test_monitor_holds_and_stores_every_window_once_through_a_database_restart(
        broker: ManagedBroker, postgres_server: PostgresServer, postgres_url: str, real_payloads: dict[str, dict],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="toolchain.fleet.monitor")
    monitor = started_monitor(broker, postgres_url)
    injector = Injector(broker)
    devices = [f"dev-{i}" for i in range(DEVICES)]

    def send(seqs: range) -> None:
        for seq in seqs:
            for device in devices:
                injector.publish(f"edge/v1/lab/{device}/telemetry", telemetry(real_payloads["telemetry"], device, seq))

    stopped = False
    try:
        send(range(1, 5))
        wait_until(lambda: monitor.stats["telemetry"] == 4 * DEVICES, what="the first windows stored")
        stop_server(postgres_server)
        stopped = True
        sender = threading.Thread(target=send, args=(range(5, WINDOWS + 1),))
        sender.start()  # the broker takes them all while the monitor holds what it cannot store
        wait_until(lambda: monitor.stats["database_outages"] == 1, what="the monitor to notice the outage")
        sender.join(60)
        run_server(postgres_server)
        stopped = False
        send(range(WINDOWS, WINDOWS + 1))  # a window sent twice (the agent delivers at least once)
        wait_until(lambda: monitor.stats["processed"] == (WINDOWS + 1) * DEVICES, timeout=60,
                   what="every message stored and acknowledged")
    finally:
        if stopped:
            run_server(postgres_server)
        injector.close()
        monitor.stop()
    with FleetStore(postgres_url, create=False) as store:
        rows = store._rows("SELECT device, seq, COUNT(*) AS copies FROM telemetry GROUP BY device, seq")
    assert sorted((row["device"], row["seq"], row["copies"]) for row in rows) == [
        (device, seq, 1) for device in devices for seq in range(1, WINDOWS + 1)]
    assert (monitor.stats["telemetry"], monitor.stats["duplicates"]) == (WINDOWS * DEVICES, DEVICES)
    assert monitor.stats["database_outages"] == 1 and monitor.stats["store_errors"] == 0
    lines = [record.getMessage() for record in caplog.records]
    assert sum("lost the fleet database" in line for line in lines) == 1, lines
    assert sum(" is back after " in line for line in lines) == 1, lines
