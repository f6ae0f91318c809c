"""Several monitor workers on one fleet: two `toolchain fleet monitor --workers-group` processes share the
fleet's messages through an MQTT v5 shared subscription on a real mosquitto and write one real
PostgreSQL (tests/postgres.py); a simulated fleet (the real agent code) reports into them, and one
worker is killed (SIGKILL) under load and restarted. Every window arrives exactly once in the database."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Build
from tests.fleet.test_fleet_simulate import settings, stored_seqs
from tests.fleet_helpers import start_fleet_command, wait_until
from toolchain.deploy.broker import ManagedBroker
from toolchain.fleet.sim.simulate import SimulationResult, simulate
from toolchain.fleet.store import FleetStore

pytestmark = pytest.mark.slow  # a simulated fleet and three monitor processes

DEVICES = 50


def start_worker(broker: ManagedBroker, db: str, name: str) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    worker = start_fleet_command("monitor", "--broker", broker.url, "--db", db, "--workers-group", "ingest",
                                 "--worker", name)
    wait_until(lambda: any(" monitoring every fleet " in line for line in worker[1]), timeout=60,
               what=f"worker {name} to subscribe")
    return worker


def stop_worker(worker: tuple[subprocess.Popen, list[str], threading.Thread]) -> str:
    process, lines, reader = worker
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    reader.join(10)
    return lines[-1]


def test_two_workers_store_every_window_once_through_a_kill(default_build: Build, broker: ManagedBroker,
                                                           postgres_url: str, tmp_path: Path) -> None:
    first, second = start_worker(broker, postgres_url, "w1"), start_worker(broker, postgres_url, "w2")
    assert "(session fleet-monitor-" in first[1][-1] and first[1][-1].rstrip().endswith("-ingest-w1)")
    outcome: list[SimulationResult] = []
    fleet = threading.Thread(target=lambda: outcome.append(simulate(settings(
        default_build, broker, devices=DEVICES, duration_s=8.0, rate=40, window_s=0.5))))
    restarted = None
    try:
        fleet.start()
        with FleetStore(postgres_url, create=False) as store:
            # Under load: both workers storing, then one dies without a goodbye and comes back as itself.
            wait_until(lambda: len(store.telemetry("simlab")) >= 4 * DEVICES, timeout=60, what="a few windows stored")
            first[0].kill()
            first[0].wait(10)
            time.sleep(1.5)
            restarted = start_worker(broker, postgres_url, "w1")
            fleet.join(120)
            result = outcome[0]
            assert result.messages["pending"] == 0 and result.messages["dropped_telemetry"] == 0
            wait_until(lambda: sum(len(stored_seqs(store, "simlab", d["device"])) for d in result.devices)
                       >= result.messages["sent"], timeout=60, what="every message in the database")
            for device in result.devices:
                # 0 lost: every seq the device's outbox committed (windows and events) is stored ...
                assert stored_seqs(store, "simlab", device["device"]) == list(range(device["first_seq"], device["last_seq"] + 1))
                assert len(store.telemetry("simlab", device["device"])) == device["windows"]
            # ... 0 double-counted: one row per (device, stream, seq), so the merged sketch counts each request once.
            doubles = store._rows("SELECT device, stream, seq FROM telemetry GROUP BY device, stream, seq HAVING COUNT(*) > 1")
            assert doubles == [] and len(result.devices) == DEVICES
            assert store.merged_latency("simlab").sketch.count == sum(d["requests"] for d in result.devices)
            # Statuses go through the group too: every device's birth (sent as it connected) is stored.
            assert {d["device"]: d["model_version"] for d in store.devices("simlab")} == {
                d["device"]: 1 for d in result.devices}
        for worker in (second, restarted):  # each worker took a share, the restarted one too
            last = stop_worker(worker)
            assert " stopped; processed " in last and int(last.split(" processed ")[1].split()[0]) > 0
    finally:
        fleet.join(120)
        for worker in (first, second, restarted):
            if worker is not None and worker[0].poll() is None:
                worker[0].kill()
