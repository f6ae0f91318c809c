"""TLS by default (`toolchain broker start` without flags): the whole operator path over `mqtts://` with
mutual TLS, with real mosquitto, agents, monitor and push; `--insecure` says so loudly; a folder keeps the
mode it was made with; certificate expiry reaches `fleet status`."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.agent_helpers import start_agent
from tests.conftest import Build, run_cli
from tests.deploy.bundle_variants import variant
from tests.fleet_helpers import start_fleet_command, wait_until
from toolchain.commands.broker import INSECURE_WARNING
from toolchain.deploy.broker import OPERATOR, ManagedBroker, free_port


def _flash(tmp_path: Path, build: Build, broker: ManagedBroker, device: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("toolchain", "flash", "--device-dir", str(tmp_path / device), "--device-id", device,
                   "--bundle", str(build.bundle), "--broker", broker.url, "--fleet", "plant", "--pubkey", str(build.pubkey),
                   "--broker-dir", str(broker.directory), "--port", str(free_port()), "--window", "0.5", *extra)


def _status(db: Path) -> dict:
    return json.loads(run_cli("toolchain", "fleet", "status", "--db", str(db), "--json", check=True).stdout)


@pytest.mark.slow  # a broker, two agents, the monitor and a push, all over mutual TLS: ~30 s
def test_flash_agent_push_and_fleet_status_over_mutual_tls(default_build: Build, tmp_path: Path) -> None:
    folder, db = tmp_path / "broker", tmp_path / "fleet.sqlite"
    started = run_cli("toolchain", "broker", "start", "--dir", str(folder), "--port", str(free_port()))
    assert started.returncode == 0, started.stderr
    processes: list[subprocess.Popen] = []
    try:
        broker = ManagedBroker.load(folder)
        assert broker.tls and broker.client_certificates and broker.url.startswith("mqtts://")
        assert "WARNING" not in started.stderr and f"(--client-cert): {folder / 'operator.pem'}" in started.stdout
        assert stat.S_IMODE((folder / "operator.pem").stat().st_mode) == 0o600
        assert _flash(tmp_path, default_build, broker, "cam-1", "--cert-days", "10").returncode == 0
        assert _flash(tmp_path, default_build, broker, "cam-2").returncode == 0
        cert = x509.load_pem_x509_certificate((tmp_path / "cam-1" / "client.pem").read_bytes())
        assert cert.subject.rfc4514_string() == "CN=cam-1"
        assert (tmp_path / "cam-1" / "ca.pem").read_bytes() == broker.ca_file.read_bytes()

        login = ["--broker", broker.url, "--username", OPERATOR, "--password-file", str(folder / "operator.password"),
                 "--ca-file", str(broker.ca_file), "--client-cert", str(folder / "operator.pem")]
        monitor, lines, _ = start_fleet_command("monitor", *login, "--db", str(db))
        processes.append(monitor)
        wait_until(lambda: any(" monitoring every fleet on " in line for line in lines), 60, "the monitor to connect")
        for device in ("cam-1", "cam-2"):
            processes.append(start_agent(tmp_path / device, tmp_path / f"{device}.log"))
        v2 = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v2", version=2)
        pushed = run_cli("toolchain", "push", str(v2), "--device", "cam-1", "--device", "cam-2", "--fleet", "plant",
                         *login, "--pubkey", str(default_build.pubkey), "--timeout", "120", "--json", timeout=180)
        assert pushed.returncode == 0, pushed.stderr

        def upgraded() -> dict | None:
            if not db.exists():
                return None
            status = _status(db)
            rows = {row["device"]: row for row in status["devices"]}
            done = len(rows) == 2 and all(r["model_version"] == 2 and r["certificate"] for r in rows.values())
            return rows if done else None

        rows = wait_until(upgraded, 60, "both devices on v2 in fleet status")
        table = run_cli("toolchain", "fleet", "status", "--db", str(db), check=True).stdout
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        run_cli("toolchain", "broker", "stop", "--dir", str(folder))
    short, default = rows["cam-1"]["certificate"], rows["cam-2"]["certificate"]
    assert short["which"] == "client" and short["state"] == "expiring" and 9 < short["days_left"] <= 10
    assert default["which"] == "client" and default["state"] == "ok" and 364 < default["days_left"] <= 365
    assert rows["cam-2"]["ca_not_after"] > rows["cam-2"]["cert_not_after"]
    assert "10d! client" in table and "365d" in table


@pytest.mark.slow  # five CLI runs: ~8 s
def test_insecure_is_loud_recorded_and_kept(default_build: Build, tmp_path: Path) -> None:
    folder = tmp_path / "broker"
    port = str(free_port())
    try:
        first = run_cli("toolchain", "broker", "start", "--dir", str(folder), "--port", port, "--insecure")
        assert first.returncode == 0, first.stderr
        assert INSECURE_WARNING in first.stderr and f"broker mqtt://127.0.0.1:{port} running" in first.stdout
        assert json.loads((folder / "broker.json").read_text())["tls"] is False
        assert not (folder / "ca.pem").exists() and not (folder / "operator.pem").exists()
        assert run_cli("toolchain", "broker", "stop", "--dir", str(folder)).returncode == 0
        # A restart asking for TLS keeps the folder's mode (its devices know mqtt://) and says so, loudly again.
        again = run_cli("toolchain", "broker", "start", "--dir", str(folder), "--tls")
        assert again.returncode == 0, again.stderr
        assert f"note: {folder} was created with plain MQTT (--insecure) and keeps it" in again.stderr
        assert INSECURE_WARNING in again.stderr and f"broker mqtt://127.0.0.1:{port} running" in again.stdout
        plain = _flash(tmp_path, default_build, ManagedBroker.load(folder), "cam-1")  # its own scheme: provisioned
        assert plain.returncode == 0, plain.stderr
        mismatch = run_cli("toolchain", "flash", "--device-dir", str(tmp_path / "cam-2"), "--device-id", "cam-2",
                           "--bundle", str(default_build.bundle), "--broker", f"mqtts://127.0.0.1:{port}",
                           "--pubkey", str(default_build.pubkey), "--broker-dir", str(folder))
        assert mismatch.returncode == 2 and "runs mqtt://, but --broker is mqtts://" in mismatch.stderr
        assert not (tmp_path / "cam-1" / "client.pem").exists() and not (tmp_path / "cam-2").exists()
    finally:
        run_cli("toolchain", "broker", "stop", "--dir", str(folder))


def test_a_tls_folder_from_before_client_certificates_keeps_its_mode(tmp_path: Path) -> None:
    """Its devices were provisioned without certificates: requiring one now would lock them all out."""
    folder = tmp_path / "broker"
    folder.mkdir()
    (folder / "broker.json").write_text(json.dumps({"port": 8883, "host": "127.0.0.1", "authenticated": True,
                                                    "tls": True, "bridge": None}))
    old = ManagedBroker.load(folder)
    assert old.tls and not old.client_certificates
    assert "require_certificate" not in old.write_config().read_text()
    new = ManagedBroker(tmp_path / "new", tls=True)
    assert "require_certificate true" in new.write_config().read_text()


@pytest.mark.slow  # a short simulation of two devices and the monitor over mutual TLS: ~6 s
def test_a_simulated_fleet_on_a_tls_broker_folder_gets_its_certificates(default_build: Build, tmp_path: Path) -> None:
    from tests.fleet_helpers import started_monitor
    from toolchain.fleet.sim.simulate import SimulationSettings, simulate

    broker = ManagedBroker(tmp_path / "broker", port=free_port(), tls=True)  # as `broker start` makes it
    broker.save()
    broker.write_config()
    broker.add_user(OPERATOR, "operator-secret")
    operator = broker.issue_client_cert(broker.directory / "operator.pem", OPERATOR)
    broker.start()
    monitor = None
    try:
        monitor = started_monitor(broker, tmp_path / "fleet.sqlite", username=OPERATOR, password="operator-secret",
                                  ca_file=broker.ca_file, client_cert=operator)
        result = simulate(SimulationSettings(
            devices=2, broker=broker.url, bundle=default_build.bundle, pubkey=default_build.pubkey, fleet="simlab",
            window_s=0.5, rate=100, duration_s=1.5, seed=0, processes=1, broker_dir=broker.directory,
            work_dir=tmp_path / "work"))
        wait_until(lambda: len(monitor.store.telemetry("simlab")) >= sum(d["windows"] for d in result.devices), 30,
                   "every window at the monitor")
        assert {w["device"] for w in monitor.store.telemetry("simlab")} == {"sim-1", "sim-2"}
        for device in ("sim-1", "sim-2"):
            cert = x509.load_pem_x509_certificate((tmp_path / "work" / "devices" / device / "client.pem").read_bytes())
            assert cert.subject.rfc4514_string() == f"CN={device}"
    finally:
        if monitor is not None:
            monitor.stop()
        broker.stop()


def test_operator_commands_without_a_client_certificate_say_so(tmp_path: Path) -> None:
    """The broker checks a client's certificate after a TLS 1.3 handshake, so paho sees only a closed socket:
    push and `fleet rollback` waited 10 s for "did not answer", the monitor retried forever in silence."""
    broker = ManagedBroker(tmp_path / "broker", port=free_port(), authenticated=True, tls=True)
    broker.write_config()
    broker.add_user(OPERATOR, "operator-secret")
    (tmp_path / "operator.password").write_text("operator-secret\n")
    login = ["--broker", broker.url, "--username", OPERATOR, "--password-file", str(tmp_path / "operator.password"),
             "--ca-file", str(broker.ca_file)]
    broker.start()
    try:
        rollback = run_cli("toolchain", "fleet", "rollback", "--device", "cam-1", "--fleet", "plant", *login, timeout=60)
        monitor = run_cli("toolchain", "fleet", "monitor", "--db", str(tmp_path / "fleet.sqlite"), *login, timeout=60)
    finally:
        broker.stop()
    assert rollback.returncode == 2 and rollback.stderr.startswith(f"error: cannot connect to the MQTT broker at {broker.url}: ")
    assert "--client-cert" in rollback.stderr and "did not answer" not in rollback.stderr
    last = monitor.stderr.strip().splitlines()[-1]
    assert monitor.returncode == 2 and last.startswith(f"error: the broker at {broker.host}:{broker.port} refused the monitor: ")
    assert "--client-cert" in last
