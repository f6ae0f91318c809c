"""The fleet dashboard against a real mosquitto and a real monitor: the page loaded in headless Chromium
(DOM, live updates over server-sent events, a screenshot), the event stream read directly, and the
`toolchain fleet dashboard` command with its errors. Devices publish the real agent's payloads."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.browser import Browser, chromium
from tests.conftest import run_cli
from tests.fleet_helpers import Injector, start_fleet_command, started_monitor, telemetry, wait_until
from toolchain.deploy.broker import ManagedBroker
from toolchain.fleet.dashboard import FleetDashboard
from toolchain.fleet.monitor import FleetMonitor

pytestmark = pytest.mark.slow  # starts Chromium

HOSTILE = '<img src=x onerror="document.title=1"></script><b>bold</b>'


@contextlib.contextmanager
def dashboard_and_monitor(broker: ManagedBroker, db: Path) -> Iterator[tuple[FleetDashboard, FleetMonitor]]:
    """What `toolchain fleet dashboard` runs, in this process: the page on a free port, fed by the monitor."""
    page = FleetDashboard(db, "127.0.0.1", 0, min_interval_s=0.05)
    monitor = started_monitor(broker, db, on_stored=page.notify)
    page.stats = lambda: dict(monitor.stats)
    page.start()
    try:
        yield page, monitor
    finally:
        monitor.stop()
        page.stop()


class Device:
    """Publishes as one device: its birth, telemetry windows (rising seq, one stream) and events."""

    def __init__(self, injector: Injector, payloads: dict, name: str, fleet: str = "lab") -> None:
        self.injector, self.payloads, self.name, self.fleet, self.seq = injector, payloads, name, fleet, 0

    def _send(self, kind: str, payload: dict, retain: bool = False) -> None:
        self.injector.publish(f"edge/v1/{self.fleet}/{self.name}/{kind}", payload, retain=retain)

    def birth(self, **fields: Any) -> None:
        self._send("status", {**self.payloads["birth"], "device_id": self.name, **fields}, retain=True)

    def window(self, psi: float = 0.02, **drift: Any) -> None:
        self.seq += 1
        self._send("telemetry", telemetry(self.payloads["telemetry"], self.name, self.seq, psi=psi, stream=f"s-{self.name}",
                                          **drift))

    def event(self, kind: str, **fields: Any) -> None:
        self.seq += 1
        self._send("events", {"schema": "events/1", "type": kind, "device_id": self.name, "seq": self.seq,
                              "stream": f"s-{self.name}", "model_version": 1, **fields})


def snapshot_has(page: FleetDashboard, predicate: Any) -> Any:
    return wait_until(lambda: predicate(json.loads(page.latest()[1])), what="the dashboard's snapshot")


def test_page_shows_the_fleet_updates_live_and_escapes_device_text(real_payloads: dict, broker: ManagedBroker,
                                                                    tmp_path: Path) -> None:
    injector = Injector(broker)
    with dashboard_and_monitor(broker, tmp_path / "fleet.sqlite") as (page, monitor):
        devices = {name: Device(injector, real_payloads, name) for name in ("cam-1", "cam-2")}
        for device in devices.values():
            device.birth()
            device.window()
        devices["cam-1"].event("installed", version=2, previous_version=1, transfer="t1")
        devices["cam-2"].event("rollback", from_version=2, to_version=1, reason=HOSTILE)
        snapshot_has(page, lambda s: len(s["devices"]) == 2 and len(s["rollouts"]) == 2
                     and all(d["p50"] is not None for d in s["devices"]))

        # The page as served, rendered by Chromium (its first render comes from the embedded snapshot).
        with urllib.request.urlopen(page.url, timeout=10) as response:
            html = response.read().decode()
            policy = response.headers["Content-Security-Policy"]
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing from elsewhere
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        assert "</script><b>" not in html  # the hostile reason cannot close the data element
        dom = chromium("--dump-dom", page.url, profile=tmp_path / "profile-dump").stdout
        rows = re.findall(r'<tr data-key="([^"]+)" data-state="([^"]+)"', dom)
        assert rows == [("lab/cam-1", "online"), ("lab/cam-2", "online")]
        assert re.findall(r'<tr data-type="([a-z_]+)" data-key="([^"]+)"', dom) == [("rollback", "lab/cam-2"),
                                                                                   ("installed", "lab/cam-1")]
        assert '<tr data-model="lab/1">' in dom
        heat = dom.split('id="heat"')[1].split("</svg>")[0]
        assert heat.count('data-band="') == 2 * 64  # two devices x the model's 64 features
        latency = dom.split('id="latency-chart"')[1].split("</svg>")[0]
        assert latency.count("<polyline") == 2 and 'data-series="lab/1"' in latency  # p50 and p99 of v1
        assert "&lt;img src=x" in dom and "<img" not in dom and "<b>bold" not in dom  # text, not markup

        # Live: the open page changes when new telemetry arrives, without reloading.
        with Browser(tmp_path / "profile-live") as browser:
            tab = browser.open(page.url)
            tab.wait_for("document.querySelectorAll('#devices tr[data-key]').length === 2", what="the first render")
            tab.wait_for("document.getElementById('conn').textContent.includes('live')", what="the event stream")
            tab.evaluate("window.marker = 'same page'; 0")
            seen = int(tab.evaluate("document.body.dataset.snapshots"))
            fresh, small = Device(injector, real_payloads, "cam-3"), Device(injector, real_payloads, "cam-4")
            fresh.birth(certificates={"client_not_after": time.time() + 12 * 86400})  # expiring: under 30 days
            small.birth()
            fresh.event("accuracy", n=200, correct=181, accuracy=0.905)  # ground truth, as the simulator sends it
            small.window(psi=0.6, n=50)  # the same PSI on 50 samples: below that window's threshold (0.82)
            fresh.window(psi=0.6, estimated_accuracy=0.8875)  # feature x5 drifts hard on the new device
            tab.wait_for("document.querySelector('#devices tr[data-key=\"lab/cam-3\"].in-alarm')",
                         what="cam-3's row with its drifting window")
            row = tab.evaluate("Array.from(document.querySelectorAll('#devices tr[data-key=\"lab/cam-3\"] td'))"
                               ".map((td) => td.textContent)")
            assert row[:4] == ["lab", "cam-3", "online", "v1"] and row[7] == "0.60" and row[8] == "COVARIATE"
            assert row[9:] == ["88.8%", "90.5%", "12 d ! (client)"]  # the label-free estimate next to the ground truth
            assert "psi:x5 0.6 ≥ 0.25" in tab.evaluate(
                "document.querySelector('#devices tr[data-key=\"lab/cam-3\"] td.drift').title")
            band = "document.querySelector('#heat rect[data-device=\"lab/{}\"][data-feature=\"x5\"]').getAttribute('data-band')"
            assert tab.evaluate(band.format("cam-3")) == "alarm"
            # one rule: the small window's cell is not red, and its device is not in alarm
            tab.wait_for("document.querySelector('#heat rect[data-device=\"lab/cam-4\"]')", what="cam-4's heat row")
            assert tab.evaluate(band.format("cam-4")) == "warn"
            assert tab.evaluate("document.querySelector('#devices tr[data-key=\"lab/cam-4\"]').className") == ""
            assert tab.evaluate("window.marker") == "same page"  # updated in place, by the event stream
            assert int(tab.evaluate("document.body.dataset.snapshots")) > seen
            assert tab.evaluate("document.querySelectorAll('#devices img, #events img, #rollouts img').length") == 0
            live_shot = tab.screenshot(tmp_path / "dashboard-live.png")
        shot = tmp_path / "dashboard.png"
        chromium(f"--screenshot={shot}", "--window-size=1400,1800", page.url, profile=tmp_path / "profile-shot")
    injector.close()
    from PIL import Image

    for path in (shot, live_shot):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50, f"{path} looks blank"


def read_event(stream: Any) -> dict[str, str]:
    """The next complete server-sent event (its fields), skipping comments and the retry hint."""
    fields: dict[str, str] = {}
    while True:
        line = stream.readline().decode()
        assert line, "the event stream ended"
        line = line.rstrip("\n")
        if not line:
            if "data" in fields:
                return fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def test_event_stream_and_snapshot_endpoints(real_payloads: dict, broker: ManagedBroker, tmp_path: Path) -> None:
    injector = Injector(broker)
    with dashboard_and_monitor(broker, tmp_path / "fleet.sqlite") as (page, monitor):
        device = Device(injector, real_payloads, "edge-7", fleet="yard")
        device.birth()
        device.window()
        snapshot_has(page, lambda s: s["devices"] and s["devices"][0]["p50"] is not None)
        with urllib.request.urlopen(page.url + "events", timeout=30) as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            first = read_event(stream)
            assert first["event"] == "snapshot"
            assert [d["device"] for d in json.loads(first["data"])["devices"]] == ["edge-7"]
            device.window(psi=0.4)
            while True:  # every new snapshot is pushed; the one with the new window must come
                update = read_event(stream)
                assert int(update["id"]) > int(first["id"])
                data = json.loads(update["data"])
                if data["devices"][0]["psi_max"] == pytest.approx(0.4):
                    break
        assert data["devices"][0]["alarm"] is True and data["fleets"][0]["in_alarm"] == 1
        assert data["stats"]["telemetry"] == 2 and data["models"][0]["windows"] == 2
        with urllib.request.urlopen(page.url + "api/snapshot", timeout=10) as response:
            assert response.headers["Content-Type"] == "application/json"
            assert json.loads(response.read())["devices"][0]["device"] == "edge-7"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(page.url + "nothing-here", timeout=10)
        assert missing.value.code == 404
        rebound = urllib.request.Request(page.url, headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # a DNS-rebinding page cannot read it
            urllib.request.urlopen(rebound, timeout=10)
        assert refused.value.code == 403
    injector.close()


@pytest.mark.parametrize("command", [["dashboard", "--port", "0"], ["monitor", "--dashboard-port", "0"]])
def test_dashboard_command_serves_until_sigterm(command: list[str], real_payloads: dict, broker: ManagedBroker,
                                                tmp_path: Path) -> None:
    process, lines, _ = start_fleet_command(*command, "--broker", broker.url, "--db", str(tmp_path / "fleet.sqlite"))
    injector = Injector(broker)
    try:
        url = wait_until(lambda: next((m.group(1) for m in map(re.compile(r"dashboard at (http://\S+)").search, lines)
                                       if m), None), what="the dashboard's address")
        wait_until(lambda: any(" monitoring every fleet on " in line for line in lines), what="the monitor to start")
        Device(injector, real_payloads, "cam-9").birth()

        def devices() -> list[str]:
            with urllib.request.urlopen(url + "api/snapshot", timeout=10) as response:
                return [d["device"] for d in json.loads(response.read())["devices"]]

        wait_until(lambda: devices() == ["cam-9"], what="cam-9 on the dashboard")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, process.stderr.read()
    finally:
        injector.close()
        process.kill()


def test_bad_options_are_one_line_and_create_nothing(tmp_path: Path) -> None:
    assert "--dashboard-port" in run_cli("toolchain", "fleet", "dashboard", "--help", check=True).stdout
    db = tmp_path / "fleet.sqlite"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("toolchain", "fleet", "dashboard", "--broker", "mqtt://127.0.0.1:1", "--db", str(db),
                         "--port", str(port))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: cannot serve the dashboard on 127.0.0.1:{port}: the port is in use (choose another with --port)")
    assert not db.exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for args, message in ((["--port", "70000"], "error: --port must be 0-65535 (0: any free port), got 70000"),
                          (["--port", "0", "--db", str(junk)], f"error: {junk} is not a usable fleet database"),
                          (["--port", "0", "--db", str(folder)], f"error: {folder} is a folder, not a fleet database file")):
        result = run_cli("toolchain", "fleet", "dashboard", "--broker", "mqtt://127.0.0.1:1", "--db", str(db), *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(message)
    assert not db.exists() and junk.read_bytes() == b"not a database" * 100
