"""The fleet monitor against a real mosquitto: real agents (subprocesses), the monitor in a thread, the
`toolchain fleet status` command as a user runs it. Messages the tests inject have the exact shape of a
real agent's (taken from `Agent.close_window()` on the built bundle)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from runtime_agent.sketch import LatencySketch
from tests.conftest import Build, provision_device, run_cli
from tests.agent_helpers import start_agent
from tests.fleet_helpers import Injector, start_fleet_command, started_monitor, telemetry, wait_until
from toolchain.deploy.broker import OPERATOR, ManagedBroker, free_port
from toolchain.errors import ToolchainError
from toolchain.fleet.monitor import FleetMonitor
from toolchain.fleet.store import FLEET_DEVICE

FAST_LWT = "[mqtt]\nkeepalive_s = 5\n"  # a silent link (no FIN, e.g. power cut) is declared dead after 7.5 s


def fleet_status(db: Path) -> dict:
    result = run_cli("toolchain", "fleet", "status", "--db", str(db), "--json", "--since", "0", check=True)
    return json.loads(result.stdout)


def infer(device: Path, count: int, rng: np.random.Generator) -> None:
    port = tomllib.loads((device / "agent.toml").read_text())["serve"]["port"]
    for _ in range(count):
        x = rng.uniform(0, 16, (2, 1, 8, 8)).astype(np.float32)
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


def test_live_fleet_online_latency_merge_and_lwt(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    notices: list[tuple[str, dict]] = []
    monitor = started_monitor(broker, db, on_notice=lambda kind, info: notices.append((kind, info)))
    names = ["dev-1", "dev-2", "dev-3"]
    devices = {name: provision_device(tmp_path / name, default_build, broker.url, name, "lab", window_s=0.3,
                                      extra=FAST_LWT) for name in names}
    agents: dict[str, subprocess.Popen] = {}
    try:
        for name, device in devices.items():
            agents[name] = start_agent(device, tmp_path / f"{name}.log")
        store = monitor.store

        def states() -> dict[str, str]:
            return {row["device"]: row["state"] for row in store.devices("lab")}

        wait_until(lambda: states() == dict.fromkeys(names, "online"), what="three devices online")
        wait_until(lambda: all(row["latest"] for row in store.devices("lab")), what="a window from every device")
        row = store.device("lab", "dev-1")
        assert row["model_version"] == 1 and row["profile"] == "jetson-orin-nano" and row["last_seq"] >= 1

        status = fleet_status(db)  # another process reads while the monitor writes (WAL)
        assert {(d["fleet"], d["device"], d["state"]) for d in status["devices"]} == {("lab", n, "online") for n in names}
        assert status["fleets"][0]["fleet"] == "lab" and status["fleets"][0]["reporting"] == 3
        table = run_cli("toolchain", "fleet", "status", "--db", str(db), check=True).stdout
        assert "dev-3" in table and "online" in table

        # Real requests: every latency lands in exactly one window, and the fleet sketch is their exact merge.
        rng = np.random.default_rng(0)
        for device in devices.values():
            infer(device, 20, rng)

        def windows() -> list[dict]:
            return store.telemetry("lab")

        wait_until(lambda: sum(w["sketch"]["count"] for w in windows()) == 60, what="all 60 requests in telemetry")
        rows = windows()
        assert {w["device"] for w in rows if w["sketch"]["count"]} == set(names)
        expected = LatencySketch.merged(LatencySketch.from_dict(w["sketch"]) for w in rows)
        merged = store.merged_sketch(fleet="lab")
        assert merged.count == expected.count == 60
        assert merged.buckets == expected.buckets and merged.min == expected.min and merged.max == expected.max
        assert merged.quantiles([0.5, 0.9, 0.99]) == expected.quantiles([0.5, 0.9, 0.99])
        assert merged.to_dict() == store.merged_sketch(model_version=1).to_dict()
        per_device = LatencySketch.merged(store.merged_sketch(fleet="lab", device=n) for n in names)
        assert per_device.to_dict() == merged.to_dict()
        by_model = store.latency_by_model("lab")
        assert [(m["model_version"], m["count"], m["p99"]) for m in by_model] == [(1, 60, merged.quantile(0.99))]
        assert store.merged_sketch(fleet="lab", since=time.time() + 3600).count == 0  # time range applies

        # kill -9: no goodbye; the broker publishes the LWT once the keepalive expires.
        agents["dev-3"].send_signal(signal.SIGKILL)
        agents["dev-3"].wait()
        wait_until(lambda: states()["dev-3"] == "offline", timeout=30, what="dev-3 offline by LWT")
        assert states() == {"dev-1": "online", "dev-2": "online", "dev-3": "offline"}
        # The notice follows the commit (the monitor calls back after storing): wait for it, don't race it.
        wait_until(lambda: ("status", "dev-3", "offline") in [(k, i.get("device"), i.get("state")) for k, i in notices],
                   timeout=10, what="the offline notice")
        status = fleet_status(db)
        assert {d["device"]: d["state"] for d in status["devices"]} == {"dev-1": "online", "dev-2": "online", "dev-3": "offline"}
        assert status["models"][0]["count"] == 60 and status["fleets"][0]["reporting"] == 2  # offline: stale, not counted
        assert monitor.stats["malformed"] == 0 and monitor.stats["errors"] == 0
    finally:
        for process in agents.values():
            process.send_signal(signal.SIGTERM)
        for process in agents.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        monitor.stop()


def test_duplicates_malformed_and_a_persistent_session(real_payloads: dict, broker: ManagedBroker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    template = real_payloads["telemetry"]
    topic = "edge/v1/side/sim-1/telemetry"
    injector = Injector(broker)
    monitor = started_monitor(broker, db)
    try:
        first = telemetry(template, "sim-1", 7)
        injector.publish(topic, first)
        injector.publish(topic, first)  # at-least-once delivery: the same seq again
        injector.publish(topic, telemetry(template, "sim-1", 8))
        bad_sketch = telemetry(template, "sim-1", 20)
        bad_sketch["latency"]["count"] = 5  # does not add up to its buckets
        malformed: list[tuple[str, bytes | dict]] = [
            (topic, b"not json"), (topic, b"[1, 2]"), (topic, b"\xff\xfe"), (topic, b'{"schema": "telemetry/1", "seq": NaN}'),
            (topic, {**telemetry(template, "sim-1", 21), "schema": "telemetry/9"}),
            (topic, {**telemetry(template, "sim-1", 22), "seq": "22"}), (topic, bad_sketch),
            (topic, {**telemetry(template, "sim-1", 23), "device_id": "someone-else"}),
            (topic, {**telemetry(template, "sim-1", 24), "window": [5.0, 1.0]}),
            ("edge/v1/side/sim 1/telemetry", telemetry(template, "sim 1", 25)),
            ("edge/v1/side/sim-1/status", {"schema": "status/1", "state": "sleeping"}),
            ("edge/v1/side/sim-1/events", {"schema": "events/1", "seq": 26}),
        ]
        for bad_topic, payload in malformed:
            injector.publish(bad_topic, payload)
        injector.publish(topic, telemetry(template, "sim-1", 9))  # the monitor is still there after all that
        wait_until(lambda: monitor.stats["processed"] >= injector.sent, what="every message handled")
        assert [w["seq"] for w in monitor.store.telemetry("side", "sim-1")] == [7, 8, 9]
        assert monitor.stats["duplicates"] == 1 and monitor.stats["malformed"] == len(malformed)
        assert monitor.store.rejected_count() == len(malformed) and monitor.stats["errors"] == 0
        assert "not JSON" in monitor.store.rejected(len(malformed))[-1]["reason"]
        monitor.stop()

        # While the monitor is down the broker queues for its session; a restart picks it all up.
        injector.publish(topic, telemetry(template, "sim-1", 10))
        injector.publish(topic, telemetry(template, "sim-1", 8))  # a late duplicate of a stored window
        injector.publish("edge/v1/side/sim-1/events", {"schema": "events/1", "type": "error", "device_id": "sim-1",
                                                        "model_version": 1, "ts": time.time(), "seq": 11,
                                                        "reason": "rejected cmd: test"})
        monitor = started_monitor(broker, db)
        wait_until(lambda: monitor.stats["processed"] >= 3, what="the queued messages")
        assert [w["seq"] for w in monitor.store.telemetry("side", "sim-1")] == [7, 8, 9, 10]
        assert monitor.stats["duplicates"] == 1
        events = monitor.store.recent_events(fleet="side")
        assert [(e["device"], e["seq"], e["type"]) for e in events] == [("sim-1", 11, "error")]
        assert monitor.store.device("side", "sim-1")["last_seq"] == 11
    finally:
        injector.close()
        monitor.stop()


def test_a_reflashed_device_is_a_new_stream_not_a_duplicate(default_build: Build, real_payloads: dict,
                                                             broker: ManagedBroker, tmp_path: Path) -> None:
    """`toolchain flash --force` gives the device a fresh outbox whose seq restarts at 1; the monitor keys on
    (device, stream, seq), so it stores the new windows, while a real duplicate of a stream is still dropped."""
    monitor = started_monitor(broker, tmp_path / "fleet.sqlite")
    device = tmp_path / "cam-1"
    injector = Injector(broker)

    def flash(*extra: str) -> None:
        run_cli("toolchain", "flash", "--device-dir", str(device), "--device-id", "cam-1", "--bundle",
                str(default_build.bundle), "--broker", broker.url, "--fleet", "lab", "--pubkey", str(default_build.pubkey),
                "--port", str(free_port()), "--window", "0.3", *extra, check=True)

    def windows() -> list[tuple[str, int]]:
        return [(w["stream"], w["seq"]) for w in monitor.store.telemetry("lab", "cam-1")]

    def run_agent(log: Path, until: Callable[[], Any]) -> None:
        agent = start_agent(device, log)
        try:
            wait_until(until, what="windows from the agent")
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=20)
        # The agent drains its outbox before its goodbye: once the monitor has the goodbye, it has everything.
        wait_until(lambda: monitor.store.device("lab", "cam-1")["state"] == "offline", what="the agent's goodbye")

    try:
        flash()
        run_agent(tmp_path / "first.log", lambda: len(windows()) >= 3)
        first = windows()
        old_stream = first[0][0]
        assert len(old_stream) == 16 and {stream for stream, _ in first} == {old_stream} and first[0][1] == 1
        flash("--force")  # a new device folder: a new outbox
        run_agent(tmp_path / "second.log", lambda: sum(stream != old_stream for stream, _ in windows()) >= 3)
        new = [seq for stream, seq in windows() if stream != old_stream]
        assert new[:3] == [1, 2, 3]  # seq restarted, and none of it was taken for a duplicate
        assert [(stream, seq) for stream, seq in windows() if stream == old_stream] == first  # the old stream is kept
        row = monitor.store.device("lab", "cam-1")
        assert row["stream"] not in ("", old_stream) and row["latest"]["stream"] == row["stream"]
        assert row["latest"]["seq"] == new[-1] and row["last_seq"] >= new[-1]
        # A real duplicate (same stream, same seq) is still dropped; the old stream's too.
        duplicates = monitor.stats["duplicates"]
        before = monitor.store.telemetry("lab", "cam-1")
        for stream, seq in ((row["stream"], 2), (old_stream, 1)):
            injector.publish("edge/v1/lab/cam-1/telemetry", telemetry(real_payloads["telemetry"], "cam-1", seq, stream=stream))
        wait_until(lambda: monitor.stats["duplicates"] == duplicates + 2, what="both duplicates handled")
        assert monitor.store.telemetry("lab", "cam-1") == before  # not replaced by the duplicates' content either
    finally:
        injector.close()
        monitor.stop()


def test_fleet_drift_alarm_fires_at_two_of_three_and_clears(real_payloads: dict, broker: ManagedBroker, tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    template, birth = real_payloads["telemetry"], real_payloads["birth"]
    notices: list[tuple[str, dict]] = []
    injector = Injector(broker)
    # evaluate_every_s=0: the alarm evaluated after every message, before it is acknowledged (each step is checked)
    monitor = started_monitor(broker, db, alarm_threshold=0.5, on_notice=lambda k, i: notices.append((k, i)),
                              evaluate_every_s=0)
    names = ["p-1", "p-2", "p-3"]

    def send(device: str, payload: dict, kind: str = "telemetry", retain: bool = False) -> None:
        injector.publish(f"edge/v1/plant/{device}/{kind}", payload, retain=retain)
        wait_until(lambda: monitor.stats["processed"] >= injector.sent, what="the monitor to handle it")

    def fleet_events() -> list[str]:
        return [e["type"] for e in reversed(monitor.store.recent_events(fleet="plant", device=FLEET_DEVICE))]

    try:
        for name in names:
            send(name, {**birth, "device_id": name}, "status", retain=True)
            send(name, telemetry(template, name, 1))
        assert monitor.fleet_share("plant") == (0, 3) and fleet_events() == []
        send("p-1", telemetry(template, "p-1", 5, psi=0.4))  # 1 of 3: below the 50% threshold
        send("p-3", telemetry(template, "p-3", 2, psi=0.7, n=50))  # a 50-sample window needs PSI >= 0.82
        assert monitor.fleet_share("plant") == (1, 3) and fleet_events() == []
        send("p-2", telemetry(template, "p-2", 2, psi=0.3))  # 2 of 3: the fleet alarm fires
        assert fleet_events() == ["fleet_drift_alarm"]
        alarm = monitor.store.recent_events(fleet="plant", kind="fleet_drift_alarm")[0]["payload"]
        assert alarm["devices"] == ["p-1", "p-2"] and alarm["in_alarm"] == 2 and alarm["reporting"] == 3
        drift = monitor.store.fleet_drift("plant")
        assert drift["share"] == pytest.approx(2 / 3) and drift["devices_in_alarm"] == ["p-1", "p-2"] and drift["alarm_active"]
        heat = drift["psi"]["x5"]  # p-3's 50-sample window is left out of the heat too
        assert heat["devices"] == 2 and heat["mean"] == pytest.approx(0.35) and heat["max"] == pytest.approx(0.4)
        assert next(iter(drift["psi"])) == "x5" and drift["psi"]["x0"]["mean"] == pytest.approx(0.01)
        send("p-3", telemetry(template, "p-3", 3, psi=0.01, ph_alarm=True))  # Page-Hinkley alone is an alarm
        send("p-1", telemetry(template, "p-1", 3, psi=0.01))  # a late older window is stored, but is not the latest
        assert monitor.fleet_share("plant") == (3, 3) and fleet_events() == ["fleet_drift_alarm"]  # fired once
        send("p-1", telemetry(template, "p-1", 6))
        send("p-2", telemetry(template, "p-2", 3))
        assert monitor.fleet_share("plant") == (1, 3) and fleet_events() == ["fleet_drift_alarm", "fleet_drift_cleared"]
        assert [k for k, _ in notices if k.startswith("fleet")] == ["fleet_drift_alarm", "fleet_drift_cleared"]
        status = fleet_status(db)
        plant = next(f for f in status["fleets"] if f["fleet"] == "plant")
        assert plant["alarm_active"] is False and plant["in_alarm"] == 1 and plant["threshold"] == 0.5
        assert [e["type"] for e in status["events"] if e["device"] == FLEET_DEVICE] == ["fleet_drift_cleared", "fleet_drift_alarm"]
        assert {d["device"]: (d["state"], d["latest"]["alarm"]) for d in status["devices"]} == {
            "p-1": ("online", False), "p-2": ("online", False), "p-3": ("online", True)}
        # An alarmed device going offline leaves the count; a restarted monitor remembers the alarm state.
        send("p-3", {"schema": "status/1", "state": "offline"}, "status", retain=True)
        assert monitor.fleet_share("plant") == (0, 2)
        send("p-1", telemetry(template, "p-1", 7, psi=0.5))
        send("p-2", telemetry(template, "p-2", 4, psi=0.5))
        assert fleet_events()[-1] == "fleet_drift_alarm"
        monitor.stop()
        monitor = started_monitor(broker, db, alarm_threshold=0.5)
        assert monitor.fleet_share("plant") == (2, 2) and len(fleet_events()) == 3  # not raised again
    finally:
        injector.close()
        monitor.stop()


def test_operator_account_on_the_secure_broker(real_payloads: dict, secure_broker: ManagedBroker, tmp_path: Path) -> None:
    device = Injector(secure_broker, "dev-1", "dev-1", "dev-1-secret")
    monitor = started_monitor(secure_broker, tmp_path / "fleet.sqlite", username=OPERATOR, password=f"{OPERATOR}-secret")
    try:
        device.publish("edge/v1/lab/dev-1/status", {**real_payloads["birth"], "device_id": "dev-1"}, retain=True)
        device.publish("edge/v1/lab/dev-1/telemetry", telemetry(real_payloads["telemetry"], "dev-1", 1))
        wait_until(lambda: monitor.store.device("lab", "dev-1") and monitor.store.device("lab", "dev-1")["latest"],
                   what="dev-1's window through the ACL")
        assert monitor.store.device("lab", "dev-1")["state"] == "online"
    finally:
        device.close()
        monitor.stop()
    intruder = FleetMonitor(secure_broker.url, tmp_path / "other.sqlite", OPERATOR, "guess").start()
    try:
        with pytest.raises(ToolchainError, match="refused the monitor"):
            intruder.wait_connected(10)
    finally:
        intruder.stop()


def test_a_second_monitor_on_the_same_file_is_refused_until_the_first_stops(tmp_path: Path) -> None:
    """`fleet dashboard` beside `fleet monitor` on one file: both were the MQTT client of its session, and the
    broker let them take it over from each other every second, for ever, in silence."""
    db = tmp_path / "fleet.sqlite"
    first = FleetMonitor("mqtt://127.0.0.1:1", db)
    try:
        with pytest.raises(ToolchainError) as refused:
            FleetMonitor("mqtt://127.0.0.1:1", db)
        FleetMonitor("mqtt://127.0.0.1:1", db, group="ingest", worker="w1").stop()  # a worker has its own session
    finally:
        first.stop()
    assert str(refused.value) == (f"another monitor is running on {db} (MQTT session {first.client_id}); run one per "
                                  "database (`fleet dashboard` is the monitor with its page, or add --dashboard-port to "
                                  "`fleet monitor`)")
    FleetMonitor("mqtt://127.0.0.1:1", db).stop()  # the first one's stop released it


def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "none.sqlite"
    result = run_cli("toolchain", "fleet", "status", "--db", str(missing))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: no fleet database at {missing}; start `toolchain fleet monitor --db {missing}` first")
    assert not missing.exists()
    result = run_cli("toolchain", "fleet", "monitor", "--broker", "http://127.0.0.1:1883", "--db", str(missing))
    assert result.returncode == 2 and "error: the broker must look like mqtt://HOST:PORT" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not missing.exists()
    result = run_cli("toolchain", "fleet", "monitor", "--broker", "mqtt://127.0.0.1:1", "--db", str(missing),
                     "--password-file", str(tmp_path / "pw"))
    assert result.returncode == 2 and "--password-file needs --username" in result.stderr and not missing.exists()


def test_monitor_command_prints_a_line_per_change_and_stops_on_sigterm(real_payloads: dict, broker: ManagedBroker,
                                                                        tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    process, lines, reader = start_fleet_command("monitor", "--broker", broker.url, "--db", str(db))
    injector = Injector(broker)
    try:
        wait_until(lambda: any(" monitoring every fleet on " in line for line in lines), what="the monitor to start")
        injector.publish("edge/v1/lab/cam-1/status", {**real_payloads["birth"], "device_id": "cam-1"}, retain=True)
        wait_until(lambda: any("lab/cam-1 online model v1 (jetson-orin-nano)" in line for line in lines), what="online")
        injector.publish("edge/v1/lab/cam-1/status", {"schema": "status/1", "state": "offline"}, retain=True)
        wait_until(lambda: any("lab/cam-1 offline (was online)" in line for line in lines), what="offline")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, process.stderr.read()
        reader.join(timeout=5)
        assert lines[-1].rstrip().endswith("stopped; processed 2 messages (0 duplicates, 0 malformed)")
        assert [d["state"] for d in fleet_status(db)["devices"]] == ["offline"]
    finally:
        injector.close()
        process.kill()
