"""The monitor through a PostgreSQL outage: a real mosquitto, a real PostgreSQL (tests/postgres.py) stopped
with pg_ctl while windows stream in and started again. The monitor holds what it could not store,
unacknowledged, and reconnects; or, stopped during the outage, leaves it to its broker session, which
hands it to the next monitor. Either way every window ends up in the database exactly once. Under it,
the store: a read or write through a dropped connection raises `DatabaseLost` (one line) until the
server is back."""

from __future__ import annotations

import logging
import threading

import pytest

from tests.fleet_helpers import Injector, started_monitor, telemetry, wait_until
from toolchain.deploy.broker import ManagedBroker
from toolchain.fleet.store import DatabaseLost, FleetStore
from toolchain.fleet.store.local_server import PostgresServer, run_server, stop_server

DEVICES, WINDOWS = 4, 12  # per device: the first third before the stop, the rest during and after it
DEVICE_NAMES = [f"dev-{i}" for i in range(DEVICES)]


def send(injector: Injector, template: dict, seqs: range) -> None:
    for seq in seqs:
        for device in DEVICE_NAMES:
            injector.publish(f"edge/v1/lab/{device}/telemetry", telemetry(template, device, seq))


def stop_after_the_first_windows(monitor, injector: Injector, template: dict, server: PostgresServer) -> bool:
    """Stream the first third of the windows, wait until they are stored, then stop the database (True)."""
    send(injector, template, range(1, 5))
    wait_until(lambda: monitor.stats["telemetry"] == 4 * DEVICES, what="the first windows stored")
    stop_server(server)
    return True


def stored_once(url: str) -> bool:
    """Every window of every device in the database, each exactly once."""
    with FleetStore(url, create=False) as store:
        rows = store._rows("SELECT device, seq, COUNT(*) AS copies FROM telemetry GROUP BY device, seq")
    return sorted((row["device"], row["seq"], row["copies"]) for row in rows) == [
        (device, seq, 1) for device in DEVICE_NAMES for seq in range(1, WINDOWS + 1)]


def test_monitor_holds_and_stores_every_window_once_through_a_database_restart(
        broker: ManagedBroker, postgres_server: PostgresServer, postgres_url: str, real_payloads: dict[str, dict],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="toolchain.fleet.monitor")
    template, monitor, injector = real_payloads["telemetry"], started_monitor(broker, postgres_url), Injector(broker)
    stopped = False
    try:
        stopped = stop_after_the_first_windows(monitor, injector, template, postgres_server)
        sender = threading.Thread(target=send, args=(injector, template, range(5, WINDOWS + 1)))
        sender.start()  # the broker takes them all while the monitor holds what it cannot store
        wait_until(lambda: monitor.stats["database_outages"] == 1, what="the monitor to notice the outage")
        sender.join(60)
        run_server(postgres_server)
        stopped = False
        send(injector, template, range(WINDOWS, WINDOWS + 1))  # a window sent twice (at-least-once delivery)
        wait_until(lambda: monitor.stats["processed"] == (WINDOWS + 1) * DEVICES, timeout=60,
                   what="every message stored and acknowledged")
    finally:
        if stopped:
            run_server(postgres_server)
        injector.close()
        monitor.stop()
    assert stored_once(postgres_url)
    assert (monitor.stats["telemetry"], monitor.stats["duplicates"]) == (WINDOWS * DEVICES, DEVICES)
    assert monitor.stats["database_outages"] == 1 and monitor.stats["store_errors"] == 0
    lines = [record.getMessage() for record in caplog.records]
    assert sum("lost the fleet database" in line for line in lines) == 1, lines
    assert sum(" is back after " in line for line in lines) == 1, lines


def test_a_monitor_stopped_during_the_outage_leaves_the_rest_to_the_next(
        broker: ManagedBroker, postgres_server: PostgresServer, postgres_url: str, real_payloads: dict[str, dict]) -> None:
    template, monitor, injector = real_payloads["telemetry"], started_monitor(broker, postgres_url), Injector(broker)
    stopped = False
    try:
        stopped = stop_after_the_first_windows(monitor, injector, template, postgres_server)
        send(injector, template, range(5, WINDOWS + 1))
        wait_until(lambda: monitor.stats["database_outages"] == 1, what="the monitor to notice the outage")
        monitor.stop()  # holding unacknowledged windows: its session keeps them for the next monitor
        run_server(postgres_server)
        stopped = False
        monitor = started_monitor(broker, postgres_url)  # the same database: the same client id and session
        wait_until(lambda: stored_once(postgres_url), timeout=60, what="every window in the database once")
    finally:
        if stopped:
            run_server(postgres_server)
        injector.close()
        monitor.stop()


def test_the_store_raises_database_lost_until_the_server_is_back(postgres_server: PostgresServer, postgres_url: str) -> None:
    with FleetStore(postgres_url) as store:
        store.update_status("lab", "dev-0", "online", seen_at=1.0)
        stop_server(postgres_server)
        try:
            with pytest.raises(DatabaseLost, match="^lost the fleet database") as dropped:
                store.devices("lab")  # the read that finds the connection dropped
            with pytest.raises(DatabaseLost, match="^lost the fleet database") as unreachable:
                store.update_status("lab", "dev-0", "offline", seen_at=2.0)  # the reconnect that fails
            assert "\n" not in str(dropped.value) + str(unreachable.value)
        finally:
            run_server(postgres_server)
        store.update_status("lab", "dev-0", "offline", seen_at=2.0)
        assert [row["state"] for row in store.devices("lab")] == ["offline"]
