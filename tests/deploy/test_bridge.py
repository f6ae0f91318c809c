"""Bridged brokers (`toolchain broker start --bridge-to`): two real mosquittos, a site one next to the devices
and a central one where the monitor and `toolchain push` run.

The end-to-end test puts real agents (`edge-agent run`) on the site broker and cuts the site's link for
~15 s mid-stream, stopping the site broker for 10 s of it while a push is on its way: every telemetry
window reaches the central database exactly once and the push installs on both devices."""

from __future__ import annotations

import contextlib
import json
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from runtime_agent.outbox import Outbox
from tests.agent_helpers import start_agent
from tests.conftest import BIN, Build, Recorder, provision_device, run_cli
from tests.deploy.bundle_variants import variant
from tests.deploy.link import CuttableLink
from tests.fleet_helpers import Injector, scrape, start_fleet_command, wait_until
from toolchain.deploy.bridge import BRIDGE_USER, BridgeSettings
from toolchain.deploy.broker import OPERATOR, ManagedBroker, free_port
from toolchain.fleet.store import FleetStore


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("toolchain", "broker", *args, timeout=60)


@pytest.mark.slow  # four CLI runs and a TLS handshake each way: ~10 s
def test_broker_start_bridges_a_site_to_a_central_broker_over_tls(tmp_path: Path) -> None:
    central_dir, site_dir = tmp_path / "central", tmp_path / "site"
    central_port, site_port = free_port(), free_port()
    started = broker_cli("start", "--dir", str(central_dir), "--port", str(central_port), "--tls", "--accept-bridges")
    assert started.returncode == 0, started.stderr
    assert (f"site bridges: user {BRIDGE_USER}, password in {central_dir / 'bridge.password'}, client certificate "
            f"{central_dir / 'bridge.pem'}") in started.stdout
    try:
        site = broker_cli("start", "--dir", str(site_dir), "--port", str(site_port), "--anonymous", "--insecure",
                          "--bridge-to", f"mqtts://127.0.0.1:{central_port}", "--bridge-user", BRIDGE_USER,
                          "--bridge-password-file", str(central_dir / "bridge.password"),
                          "--bridge-ca-file", str(central_dir / "ca.pem"),
                          "--bridge-client-cert", str(central_dir / "bridge.pem"))
        assert site.returncode == 0, site.stderr
        client_id = ManagedBroker.load(site_dir).bridge.client_id
        assert f"bridged to mqtts://127.0.0.1:{central_port} as {client_id}" in site.stdout
        # The config holds the central broker's password: the owner's alone.
        assert stat.S_IMODE((site_dir / "mosquitto.conf").stat().st_mode) == 0o600
        central, site_broker = ManagedBroker.load(central_dir), ManagedBroker.load(site_dir)
        password = (central_dir / "operator.password").read_text().strip()
        operator_cert = central_dir / "operator.pem"
        operator = Recorder(central, "#", "operator", OPERATOR, password, central.ca_file, operator_cert)
        device = Recorder(site_broker, "edge/v1/plant/cam-1/cmd", "cam-1-listener")
        try:
            operator.wait_for(lambda r: (f"edge/bridges/{client_id}/state", b"1") in r.messages, what="the bridge's state")
            publisher = Injector(site_broker, "cam-1")
            publisher.publish("edge/v1/plant/cam-1/status", {"state": "online"}, retain=True)
            publisher.publish("edge/v1/plant/cam-1/telemetry", {"seq": 1})
            publisher.close()
            operator.wait_for(lambda r: r.payloads("/telemetry") == [{"seq": 1}], what="telemetry at the central broker")
            operator.client.publish("edge/v1/plant/cam-1/cmd", b'{"id": "c1"}', qos=1).wait_for_publish(10)
            device.wait_for(lambda r: r.payloads("/cmd") == [{"id": "c1"}], what="the command at the site")
            # The retained birth is retained at the central broker too (push discovers devices there).
            late = Recorder(central, "edge/v1/+/+/status", "late", OPERATOR, password, central.ca_file, operator_cert)
            late.wait_for(lambda r: r.payloads("/status") == [{"state": "online"}], what="the retained status")
            late.close()
        finally:
            operator.close()
            device.close()
    finally:
        for folder in (site_dir, central_dir):
            broker_cli("stop", "--dir", str(folder))


@pytest.mark.parametrize("args, error", [
    (["--bridge-user", BRIDGE_USER], "--bridge-user, --bridge-password-file, --bridge-ca-file and --bridge-client-cert "
                                     "need --bridge-to URL"),
    (["--bridge-to", "mqtts://127.0.0.1:8883"], "--bridge-to mqtts://... needs --bridge-ca-file"),
    (["--bridge-to", "tcp://central"], "--bridge-to must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got 'tcp://central'"),
    (["--bridge-to", "mqtt://127.0.0.1:1883", "--bridge-user", BRIDGE_USER, "--bridge-password-file", "missing"],
     "cannot read --bridge-password-file"),
])
def test_bad_bridge_options_are_one_line(args: list[str], error: str, tmp_path: Path) -> None:
    result = broker_cli("start", "--dir", str(tmp_path / "site"), "--port", str(free_port()), *args)
    assert result.returncode == 2
    assert error in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "site" / "mosquitto.pid").exists()


@pytest.mark.slow
def test_a_site_keeps_its_telemetry_and_gets_its_push_through_an_outage(default_build: Build, tmp_path: Path) -> None:
    with contextlib.ExitStack() as cleanup:
        central = ManagedBroker(tmp_path / "central", port=free_port())
        central.write_config()
        central.add_users({OPERATOR: "operator-secret", BRIDGE_USER: "bridge-secret"})
        cleanup.callback(central.stop)
        central.start()
        (tmp_path / "operator.password").write_text("operator-secret\n")
        (tmp_path / "bridge.password").write_text("bridge-secret\n")
        link = CuttableLink(central.port)  # the site's uplink
        cleanup.callback(link.close)
        site = ManagedBroker(tmp_path / "site", port=free_port(), authenticated=False,
                             bridge=BridgeSettings(link.url, BRIDGE_USER, str(tmp_path / "bridge.password")))
        cleanup.callback(site.stop)
        site.start()
        login = ["--broker", central.url, "--username", OPERATOR, "--password-file", str(tmp_path / "operator.password")]
        db, metrics_port = tmp_path / "fleet.sqlite", free_port()
        monitor, lines, reader = start_fleet_command("monitor", *login, "--db", str(db), "--metrics-port", str(metrics_port))
        cleanup.callback(_end, monitor)
        # Subscribed before any device reports: a first session holds nothing sent before it existed.
        wait_until(lambda: any(" monitoring every fleet on " in line for line in lines), 60, "the monitor to subscribe")
        # What the site broker accepted from its devices (a persistent session: it survives the site's restart).
        at_site = Recorder(site, "edge/v1/+/+/telemetry", "site-recorder")
        cleanup.callback(at_site.close)
        names = ("cam-1", "cam-2")
        devices = {name: provision_device(tmp_path / name, default_build, site.url, name, "plant", window_s=0.5)
                   for name in names}
        agents = []
        for name in names:
            agents.append(start_agent(devices[name], tmp_path / f"{name}.log"))
            cleanup.callback(_end, agents[-1])
        v2 = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v2", version=2, padding_bytes=1 << 20)
        wait_until(lambda: db.exists() and all(len(_stored(db, name)) >= 3 for name in names), 60, "telemetry centrally")

        link.cut()
        cut_at = time.time()
        push = subprocess.Popen([str(BIN / "toolchain"), "push", str(v2), "--device", "cam-1", "--device", "cam-2",
                                 "--fleet", "plant", *login, "--pubkey", str(default_build.pubkey), "--timeout", "180",
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cleanup.callback(_end, push)
        time.sleep(3)  # the site works on: its devices' windows queue in the site broker for the bridge
        site.stop()
        time.sleep(10)  # ... and in the agents' outboxes while the site broker is down
        site.start()
        time.sleep(2)
        link.restore()
        restored_at = time.time()

        out, err = push.communicate(timeout=240)
        assert push.returncode == 0, err
        results = json.loads(out)["results"]
        assert {name: result["state"] for name, result in results.items()} == {"cam-1": "installed", "cam-2": "installed"}
        print("push through the outage:", json.dumps(results))
        for name in names:
            wait_until(lambda: _stored(db, name)[-1]["model_version"] == 2, 60, f"{name}'s windows of v2")
        for agent in agents:
            _end(agent)
        for name, folder in devices.items():
            with Outbox(folder / "outbox.sqlite") as outbox:
                assert len(outbox) == 0 and outbox.dropped_telemetry == 0, name  # the site broker took everything
        sent = {(p["device_id"], p["stream"], p["seq"]) for p in at_site.payloads("/telemetry")}
        stored = wait_until(lambda: _arrived(db, names, sent), 60, "every window the site took, in the central database")
        assert stored == sent, (f"missing centrally: {sorted(sent - stored)}", f"not seen at the site: {sorted(stored - sent)}")
        for name in names:
            rows = _stored(db, name)
            assert len(rows) == len({(r["stream"], r["seq"]) for r in rows})  # each once
            # Windows closed during the outage are there too (they waited in the site broker or the outbox).
            during = sum(cut_at + 1 < r["window_end"] < restored_at - 1 for r in rows)
            print(f"{name}: {len(rows)} windows stored, {during} closed during the outage")
            assert during >= 10, name
        # The monitor's ingest lag shows the outage: the windows of its first seconds waited over 10 s.
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        lag = {le: samples[("edge_fleet_ingest_lag_seconds_bucket", (("le", le),))] for le in ("1.0", "10.0", "+Inf")}
        print("ingest lag, windows within 1 s / 10 s / all:", lag)
        assert lag["+Inf"] == len(sent) and lag["10.0"] < lag["+Inf"]
        _end(monitor)
        reader.join(timeout=10)
    assert any("stopped; processed" in line for line in lines), lines


def _end(process: subprocess.Popen) -> None:
    """SIGTERM and wait (a process that already exited is left as it is)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _arrived(db: Path, names: tuple[str, ...], sent: set) -> set | None:
    """The (device, stream, seq) of every stored window once they include all of `sent`."""
    stored = {(row["device"], row["stream"], row["seq"]) for name in names for row in _stored(db, name)}
    return stored if stored >= sent else None


def _stored(db: Path, device: str) -> list[dict]:
    with FleetStore(db, create=False) as store:
        return store.telemetry("plant", device)
