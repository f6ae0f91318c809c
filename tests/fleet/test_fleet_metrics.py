"""Prometheus metrics of the fleet monitor (`toolchain.fleet.metrics`): scraped from a real `toolchain fleet
dashboard --metrics-port` process fed through a real mosquitto, parsed with prometheus_client's own text
parser, and compared with what `toolchain fleet status --json` says about the same database."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from dataclasses import replace
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.fleet.test_fleet_store import window
from tests.fleet.test_fleet_store_backends import target  # noqa: F401  (the fixture: SQLite and PostgreSQL)
from tests.fleet_helpers import Injector, parse_metrics, scrape, start_fleet_command, telemetry, wait_until
from toolchain.deploy.broker import ManagedBroker, free_port
from toolchain.fleet.dashboard import FleetDashboard
from toolchain.commands.fleet import collect_status
from toolchain.fleet.metrics import MISSING, FleetMetrics
from toolchain.fleet.store import FleetStore


def assert_matches_status(samples: dict, fleet_status: dict) -> None:
    """Every fleet-level number of a /metrics page is the one `fleet status --json` gives for the same database."""
    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    for fleet in {row["fleet"] for row in fleet_status["devices"]}:
        for state in ("online", "offline"):
            expected = sum(row["state"] == state and row["fleet"] == fleet for row in fleet_status["devices"])
            assert value("edge_fleet_devices", fleet=fleet, state=state) == expected
    for drift in fleet_status["fleets"]:
        for name, key in (("reporting_devices", "reporting"), ("devices_in_alarm", "in_alarm"), ("alarm_share", "share"),
                          ("alarm_active", "alarm_active")):
            assert value(f"edge_fleet_drift_{name}", fleet=drift["fleet"]) == float(drift[key]), name
    assert fleet_status["models"], "no latency to compare"
    for row in fleet_status["models"]:
        labels = {"fleet": row["fleet"], "model_version": str(row["model_version"])}
        for quantile, key in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
            assert value("edge_fleet_model_latency_seconds", **labels, quantile=quantile) * 1000 == pytest.approx(row[key], rel=1e-12)
        assert value("edge_fleet_model_requests", **labels) == row["count"]
        assert value("edge_fleet_model_windows", **labels) == row["windows"]
    assert sum(value for (name, _), value in samples.items() if name == "edge_fleet_model_windows") == sum(
        row["windows"] for row in fleet_status["models"])


def test_metrics_match_fleet_status(real_payloads: dict, broker: ManagedBroker, tmp_path: Path) -> None:
    db, metrics_port = tmp_path / "fleet.sqlite", free_port()
    process, lines, reader = start_fleet_command("dashboard", "--broker", broker.url, "--db", str(db), "--port", "0",
                                                 "--metrics-port", str(metrics_port))
    injector = Injector(broker)
    template, birth = real_payloads["telemetry"], real_payloads["birth"]
    try:
        page = wait_until(lambda: next((m.group(1) for m in map(re.compile(r"dashboard at (http://\S+)").search, lines)
                                        if m), None), what="the dashboard's address")
        assert f"metrics at http://127.0.0.1:{metrics_port}/metrics" in "".join(lines)
        wait_until(lambda: any(" monitoring every fleet on " in line for line in lines), what="the monitor to start")
        for device in ("cam-1", "cam-2", "cam-3"):
            injector.publish(f"edge/v1/plant/{device}/status", {**birth, "device_id": device}, retain=True)
        windows = [("cam-1", 1, 0.02, 1), ("cam-1", 2, 0.02, 1), ("cam-2", 1, 0.6, 2), ("cam-3", 1, 0.02, 1)]
        for device, seq, psi, version in windows:
            injector.publish(f"edge/v1/plant/{device}/telemetry",
                             {**telemetry(template, device, seq, psi=psi, stream="00000000000000a1"), "model_version": version})
        injector.publish("edge/v1/plant/cam-1/telemetry", telemetry(template, "cam-1", 2, stream="00000000000000a1"))  # again
        injector.publish("edge/v1/plant/cam-3/status", {"schema": "status/1", "state": "offline"}, retain=True)
        injector.publish("edge/v1/plant/cam-2/telemetry", b"not json")
        status_messages = 4

        def settled() -> bool:
            """Every message stored, and the fleet alarm evaluated after the last of them (the monitor evaluates
            at most every 0.5 s: its row then counts cam-1 and cam-2 reporting, cam-3 offline)."""
            with FleetStore(db, create=False) as store:
                return len(store.telemetry()) == len(windows) and store.device("plant", "cam-3")["state"] == "offline" \
                    and store.rejected_count() == 1 and store.fleet_alarms().get("plant", {}).get("reporting") == 2
        wait_until(settled, what="every message stored")
        status = run_cli("toolchain", "fleet", "status", "--db", str(db), "--json", check=True)
        fleet_status = json.loads(status.stdout)

        for url in (f"http://127.0.0.1:{metrics_port}/metrics", page + "metrics"):
            samples = scrape(url)
            assert_matches_status(samples, fleet_status)
            assert [(row["model_version"], row["windows"]) for row in fleet_status["models"]] == [(1, 3), (2, 1)]
            (drift,) = fleet_status["fleets"]
            assert (drift["reporting"], sum(row["state"] == "offline" for row in fleet_status["devices"])) == (2, 1)
            assert drift["in_alarm"] >= 1  # cam-2 at least
            for kind, count in (("telemetry", len(windows)), ("status", status_messages), ("events", 0)):
                assert samples[("edge_fleet_messages_ingested_total", (("kind", kind),))] == count
            for name, count in (("edge_fleet_duplicates_dropped_total", 1), ("edge_fleet_malformed_messages_total", 1),
                                ("edge_fleet_ingest_lag_seconds_count", len(windows))):
                assert samples[(name, ())] == count, name
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, process.stderr.read()
    finally:
        injector.close()
        process.kill()
        reader.join(timeout=10)


def test_metrics_read_what_status_reads_on_both_databases(target: str) -> None:
    """In process, on a SQLite file and on a real PostgreSQL: the exposition parsed by prometheus_client's parser
    against `collect_status` (what `fleet status --json` prints), everything stored (``since_s=0``)."""
    with FleetStore(target) as store:
        for record in (window(1, "s1", "dev-1", 2.0), window(2, "s1", "dev-1", 3.0), window(1, "s2", "dev-2", 40.0, psi=0.4),
                       replace(window(1, "s3", "dev-3", 5.0), model_version=2)):
            store.insert_telemetry(record)
        for device, state in (("dev-1", "online"), ("dev-2", "online"), ("dev-3", "offline")):
            store.update_status("lab", device, state, seen_at=1.0)
    metrics = FleetMetrics(target, since_s=0)
    try:
        samples = parse_metrics(metrics.exposition().decode())
    finally:
        metrics.close()
    fleet_status = collect_status(target, since_s=0)
    assert_matches_status(samples, fleet_status)
    assert [(row["model_version"], row["windows"]) for row in fleet_status["models"]] == [(1, 3), (2, 1)]
    assert "edge_fleet_messages_ingested_total" not in {name for name, _ in samples}  # no monitor in this process


def test_without_prometheus_client_metrics_are_one_clear_line(tmp_path: Path) -> None:
    """--metrics-port without the metrics extra: one line saying what to install; nothing created. The dashboard's
    /metrics says the same (a 404), the rest of the dashboard works."""
    db = tmp_path / "fleet.sqlite"
    blocked = ("import sys; sys.modules['prometheus_client'] = None; from toolchain.cli import main; "
               "sys.argv = ['toolchain'] + sys.argv[1:]; main()")
    result = subprocess.run([sys.executable, "-c", blocked, "fleet", "monitor", "--broker", "mqtt://127.0.0.1:1", "--db",
                             str(db), "--metrics-port", "0"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {MISSING}"
    assert not db.exists()

    FleetStore(db).close()
    with FleetDashboard(db, port=0) as page:
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(page.url + "metrics", timeout=10)
        assert missing.value.code == 404 and missing.value.read().decode().strip() == MISSING


def test_a_taken_metrics_port_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        taken = run_cli("toolchain", "fleet", "monitor", "--broker", "mqtt://127.0.0.1:1", "--db", str(db), "--metrics-port", str(port))
    out_of_range = run_cli("toolchain", "fleet", "monitor", "--broker", "mqtt://127.0.0.1:1", "--db", str(db), "--metrics-port", "70000")
    assert (taken.returncode, taken.stderr.strip()) == (
        2, f"error: cannot serve metrics on 127.0.0.1:{port}: the port is in use (choose another with --metrics-port)")
    assert (out_of_range.returncode, out_of_range.stderr.strip()) == (
        2, "error: --metrics-port must be 0-65535 (0: any free port), got 70000")
    assert not db.exists()
