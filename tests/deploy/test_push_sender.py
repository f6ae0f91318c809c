"""The operator side of model pushes (toolchain.deploy.push, `toolchain push`) against real agents (`edge-agent run`
subprocesses), a real mosquitto and re-signed bundle variants: installs, every rejection the device reports,
resumption after a broker restart, an agent `kill -9` and a sender restart, and canary rollouts."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import tarfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from runtime_agent.bundle import read_bundle
from runtime_agent.signing import load_public_key, write_keypair
from tests.deploy.bundle_variants import collapse, variant
from tests.conftest import Build, Recorder, provision_device, run_cli
from tests.agent_helpers import start_agent
from tests.agent_helpers import http, infer_body
from toolchain.deploy.broker import OPERATOR, ManagedBroker
from toolchain.errors import ToolchainError
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push import PushSender, RolloutSettings, discover_devices, rollout

FLEET = "lab"
WINDOW = 32
QUICK_PROBATION = "[probation]\nrequests = 40\nseconds = 2\n"  # no traffic needed: passes when the time is up
JUDGED_PROBATION = "[probation]\nrequests = 40\nseconds = 120\n"  # judged on 40 requests of real traffic


def make_variant(build: Build, out: Path, *, version: int = 2, target: str | None = None, key: Path | None = None,
                 tamper: bool = False, padding_mb: float = 0, transform=None) -> Path:
    """A re-signed variant of the default build's bundle (tests/deploy/bundle_variants.py does the signing);
    `tamper` flips one byte of the model inside the written file, so its signature no longer covers it."""
    path = variant(build.bundle, build.pubkey.parent, out, version=version, target=target, signing_key=key,
                   padding_bytes=int(padding_mb * (1 << 20)), transform=transform)
    if tamper:
        with tarfile.open(path) as tar:
            offset = tar.getmember("model.onnx").offset_data + 100
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    return path


@dataclass
class Device:
    id: str
    dir: Path
    log: Path
    process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        port = tomllib.loads((self.dir / "agent.toml").read_text())["serve"]["port"]
        return f"http://127.0.0.1:{port}"

    def start(self) -> "Device":
        self.process = start_agent(self.dir, self.log)
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def version(self) -> list[str]:
        return http("GET", f"{self.base}/v2/models/digits")[1]["versions"]


@contextlib.contextmanager
def fleet(build: Build, broker: ManagedBroker, tmp_path: Path, ids: list[str], extra: str = "",
          passwords: bool = False) -> Iterator[dict[str, Device]]:
    devices = {}
    try:
        for device_id in ids:
            mqtt = f'[mqtt]\npassword = "{device_id}-secret"\n' if passwords else ""
            folder = provision_device(tmp_path / device_id, build, broker.url, device_id=device_id, fleet=FLEET,
                                      extra=mqtt + extra)
            devices[device_id] = Device(device_id, folder, tmp_path / f"{device_id}.log").start()
        yield devices
    finally:
        for device in devices.values():
            device.stop()


def logs(devices: dict[str, Device]) -> str:
    return "\n".join(f"--- {d.id}\n{d.log.read_text()[-3000:]}" for d in devices.values())


def max_unacknowledged(recorder: Recorder, device: str, transfer: str) -> int:
    """Chunk indexes published but not yet in any ack, at worst, in the order the broker delivered them."""
    prefix = f"edge/v1/{FLEET}/{device}/push/{transfer}/"
    sent: set[int] = set()
    acked: set[int] = set()
    worst = 0
    for topic, payload in list(recorder.messages):
        if not topic.startswith(prefix):
            continue
        tail = topic[len(prefix):]
        if tail == "ack":
            acked |= {i for a, b in json.loads(payload)["received"] for i in range(a, b + 1)}
        elif tail.isdigit():
            sent.add(int(tail))
        worst = max(worst, len(sent - acked))
    return worst


class Traffic:
    """REST inferences in a loop against one device (probation judges real requests); counts failures."""

    def __init__(self, device: Device, x: np.ndarray) -> None:
        self.url, self.x = f"{device.base}/v2/models/digits/infer", x
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            status, _ = http("POST", self.url, infer_body(self.x[i % len(self.x)][None]))
            self.statuses.append(status)
            i += 1

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(15)
        return self.statuses


def sample_inputs(build: Build) -> np.ndarray:
    bundle = read_bundle(build.bundle, load_public_key(build.pubkey))
    return np.load(io.BytesIO(bundle.files["samples.npz"]))["x"]


# --- single pushes ----------------------------------------------------------------------------------

def test_a_newer_bundle_is_installed_within_the_window(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    v2 = make_variant(default_build, tmp_path / "v2", version=2, padding_mb=3)
    recorder = Recorder(broker)
    seen: list[tuple[int, int, str]] = []
    with fleet(default_build, broker, tmp_path, ["dev-1"]) as devices:
        sender = PushSender(v2, "dev-1", FLEET, broker=broker.url, pubkey=default_build.pubkey,
                            progress=lambda device, acked, total, state: seen.append((acked, total, state)))
        result = sender.run(timeout_s=60)
        assert result.state == "installed", (result, logs(devices))
        assert devices["dev-1"].version() == ["2"]
        installed = recorder.wait_for(lambda r: [e for e in r.payloads("/events") if e["type"] == "installed"], what="event")
        status = recorder.wait_for(lambda r: [s for s in r.payloads("/status") if s.get("model_version") == 2], what="status")
    recorder.close()
    assert result.ok and result.version == 2 and result.reason == "" and result.probation is None
    assert result.chunks == -(-v2.stat().st_size // 65536) >= 48
    assert result.chunks_sent == result.chunks and result.resent == 0 and result.offers == 1
    assert result.bytes == v2.stat().st_size and result.transfer_seconds and result.mb_per_s > 0
    assert installed[0]["transfer"] == result.transfer and installed[0]["previous_version"] == 1 and status
    assert max_unacknowledged(recorder, "dev-1", result.transfer) <= WINDOW
    acked = [a for a, _, _ in seen]
    assert acked == sorted(acked) and acked[-1] == result.chunks and seen[-1][2] == "installed"
    assert (devices["dev-1"].dir / "current.bundle").resolve().name == "digits-2.bundle"


def test_pushing_an_installed_bundle_again_is_answered_at_once(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    v2 = make_variant(default_build, tmp_path / "v2", version=2)
    with fleet(default_build, broker, tmp_path, ["dev-1"]):
        first = PushSender(v2, "dev-1", FLEET, broker=broker.url, pubkey=default_build.pubkey).run(60)
        again = PushSender(v2, "dev-1", FLEET, broker=broker.url, pubkey=default_build.pubkey).run(60)
    assert first.state == again.state == "installed"
    assert again.chunks_sent == 0 and again.held_before == again.chunks  # same transfer id: nothing to send


@pytest.mark.parametrize("case, reason", [
    ("older version", "version 1 is not newer than the installed version 1"),
    ("wrong target", "bundle is built for target 'raspberry-pi-4', this device is 'jetson-orin-nano'"),
    ("another signing key", "signature check failed: signed by key"),
])
def test_the_device_rejects_and_the_sender_reports_why(case: str, reason: str, default_build: Build, broker: ManagedBroker,
                                                      tmp_path: Path) -> None:
    pubkey = default_build.pubkey
    if case == "older version":
        bundle = make_variant(default_build, tmp_path / "v", version=1)
    elif case == "wrong target":
        bundle = make_variant(default_build, tmp_path / "v", version=2, target="raspberry-pi-4")
    else:  # the operator trusts the other key, the device does not
        other, pubkey = write_keypair(tmp_path / "other-key")
        bundle = make_variant(default_build, tmp_path / "v", version=2, key=other)
    with fleet(default_build, broker, tmp_path, ["dev-1"]) as devices:
        result = PushSender(bundle, "dev-1", FLEET, broker=broker.url, pubkey=pubkey).run(timeout_s=60)
        assert devices["dev-1"].version() == ["1"], logs(devices)
    assert result.state == "rejected" and reason in result.reason and not result.ok
    assert result.resent == 0


@pytest.mark.parametrize("case", ["signed by another key", "tampered after signing"])
def test_the_sender_refuses_a_bundle_that_does_not_verify(case: str, default_build: Build, broker: ManagedBroker,
                                                         tmp_path: Path) -> None:
    recorder = Recorder(broker)
    if case == "signed by another key":
        other, _ = write_keypair(tmp_path / "other-key")
        bundle, expected = make_variant(default_build, tmp_path / "v", key=other), "signature check failed: signed by key"
    else:
        bundle, expected = make_variant(default_build, tmp_path / "v", tamper=True), "sha256 does not match"
    with pytest.raises(ToolchainError, match="refusing to push") as error:
        PushSender(bundle, "dev-1", FLEET, broker=broker.url, pubkey=default_build.pubkey).run(10)
    assert expected in str(error.value) and "\n" not in str(error.value)
    time.sleep(0.3)
    recorder.close()
    assert not [t for t, _ in recorder.messages if "/cmd" in t or "/push/" in t]  # nothing was offered


# --- resumption --------------------------------------------------------------------------------------

def test_a_broker_restart_mid_transfer_costs_at_most_the_window(default_build: Build, broker: ManagedBroker,
                                                               tmp_path: Path) -> None:
    big = make_variant(default_build, tmp_path / "v2", version=2, padding_mb=50)
    restarted = threading.Event()

    def outage(device: str, acked: int, total: int, state: str) -> None:
        if not restarted.is_set() and acked >= total // 3:  # runs on the sending thread: nothing is sent meanwhile
            restarted.set()
            broker.stop()
            time.sleep(1.0)
            broker.start()

    with fleet(default_build, broker, tmp_path, ["dev-1"]) as devices:
        result = PushSender(big, "dev-1", FLEET, broker=broker.url, pubkey=default_build.pubkey, progress=outage).run(180)
        assert result.state == "installed", (result, logs(devices))
        assert devices["dev-1"].version() == ["2"]
    assert restarted.is_set() and result.offers >= 2
    assert result.chunks >= 450 and result.resent <= WINDOW
    assert result.chunks_sent == result.chunks + result.resent


def test_an_agent_killed_mid_transfer_resumes_from_its_disk(default_build: Build, broker: ManagedBroker,
                                                           tmp_path: Path) -> None:
    big = make_variant(default_build, tmp_path / "v2", version=2, padding_mb=50)
    with fleet(default_build, broker, tmp_path, ["dev-1"]) as devices:
        device = devices["dev-1"]
        killed = threading.Event()

        def crash(name: str, acked: int, total: int, state: str) -> None:
            if not killed.is_set() and acked >= total // 2:
                killed.set()
                device.kill()
                device.start()

        result = PushSender(big, "dev-1", FLEET, broker=broker.url, pubkey=default_build.pubkey, progress=crash).run(180)
        assert result.state == "installed", (result, logs(devices))
        assert device.version() == ["2"]
    assert killed.is_set() and result.offers >= 2 and result.resent <= WINDOW


def test_a_restarted_sender_sends_only_what_the_device_lacks(default_build: Build, broker: ManagedBroker,
                                                            tmp_path: Path) -> None:
    big = make_variant(default_build, tmp_path / "v2", version=2, padding_mb=12)
    with fleet(default_build, broker, tmp_path, ["dev-1"]) as devices:
        holder: list[PushSender] = []
        reached: list[int] = []

        def stop_halfway(name: str, acked: int, total: int, state: str) -> None:
            if acked >= total // 2 and not reached:
                reached.append(acked)
                holder[0].cancel()

        holder.append(PushSender(big, "dev-1", FLEET, broker=broker.url, pubkey=default_build.pubkey, progress=stop_halfway))
        first = holder[0].run(60)
        second = PushSender(big, "dev-1", FLEET, broker=broker.url, pubkey=default_build.pubkey).run(60)
        assert second.state == "installed", (second, logs(devices))
    assert first.state == "timeout" and first.reason.startswith("cancelled")
    assert first.transfer == second.transfer and second.held_before >= reached[0]
    # only what the device lacked when it answered (chunks of the first sender still on their way may land after)
    assert 0 < second.chunks_sent <= second.chunks - second.held_before and second.resent == 0


# --- discovery and rollouts --------------------------------------------------------------------------

def test_discover_lists_the_online_devices_of_a_fleet(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    with fleet(default_build, broker, tmp_path, ["dev-1", "dev-2", "dev-3"]) as devices:
        assert discover_devices(broker.url, FLEET) == ["dev-1", "dev-2", "dev-3"]
        devices["dev-2"].stop()  # a clean stop publishes the retained 'offline' status
        assert discover_devices(broker.url, FLEET) == ["dev-1", "dev-3"]
        assert discover_devices(broker.url, "elsewhere") == []


def test_a_rollout_goes_canary_then_wave_by_wave(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    v2 = make_variant(default_build, tmp_path / "v2", version=2, padding_mb=1)
    decisions = []
    with fleet(default_build, broker, tmp_path, ["dev-1", "dev-2", "dev-3"], extra=QUICK_PROBATION) as devices:
        settings = RolloutSettings(canary=1, waves=1, broker=BrokerLogin(broker.url), pubkey=default_build.pubkey,
                                   probation_timeout_s=60)
        result = rollout(v2, FLEET, ["dev-1", "dev-2", "dev-3"], settings, on_decision=decisions.append)
        assert result.ok, (result.to_dict(), logs(devices))
        assert [d.version() for d in devices.values()] == [["2"]] * 3
    assert [(d["stage"], d["action"]) for d in result.decisions] == [
        ("canary", "push"), ("canary", "continue"), ("wave 1", "push"), ("wave 1", "continue"),
        ("wave 2", "push"), ("wave 2", "complete")]
    assert decisions == result.decisions and all(d["reason"] for d in decisions)
    assert all(r.probation == "passed" for r in result.results.values())
    one, two, three = (result.results[d].timeline for d in ("dev-1", "dev-2", "dev-3"))
    assert one["verdict"] <= two["offer"] and two["verdict"] <= three["offer"]  # each stage waited for the last


FIVE = ["dev-1", "dev-2", "dev-3", "dev-4", "dev-5"]


def test_a_failing_canary_stops_the_rollout(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    bad = make_variant(default_build, tmp_path / "bad", version=2, transform=collapse(3))  # answers 3 for everything
    recorder = Recorder(broker)
    with fleet(default_build, broker, tmp_path, FIVE, extra=JUDGED_PROBATION) as devices:
        traffic = Traffic(devices["dev-1"], sample_inputs(default_build))
        try:
            recorder.wait_for(lambda r: len(traffic.statuses) >= 60, what="baseline requests")
            result = rollout(bad, FLEET, FIVE, RolloutSettings(canary=1, broker=BrokerLogin(broker.url),
                                                               pubkey=default_build.pubkey, probation_timeout_s=90))
        finally:
            statuses = traffic.stop()
        assert [d.version() for d in devices.values()] == [["1"]] * 5, logs(devices)  # the other 4 never install it
    recorder.close()
    assert result.state == "stopped" and not result.ok
    canary = result.results["dev-1"]
    assert list(result.results) == ["dev-1"] and canary.state == "installed" and canary.probation == "rollback"
    assert "predictions shifted" in canary.probation_reason
    assert result.skipped == FIVE[1:]
    assert [(d["stage"], d["action"]) for d in result.decisions] == [("canary", "push"), ("canary", "stop"), ("canary", "skip")]
    assert "dev-1 installed, then rollback: probation failed: predictions shifted" in result.decisions[1]["reason"]
    for other in FIVE[1:]:
        assert not [t for t, _ in recorder.messages if f"/{other}/" in t and ("/cmd" in t or "/push/" in t)]
    assert statuses and set(statuses) == {200}


# --- the command line ----------------------------------------------------------------------------------

def test_cli_push_over_the_secured_broker(default_build: Build, secure_broker: ManagedBroker, tmp_path: Path) -> None:
    v2 = make_variant(default_build, tmp_path / "v2", version=2, padding_mb=1)
    password = tmp_path / "operator.password"
    password.write_text(f"{OPERATOR}-secret\n")
    auth = ["--broker", secure_broker.url, "--username", OPERATOR, "--password-file", str(password),
            "--pubkey", str(default_build.pubkey)]
    with fleet(default_build, secure_broker, tmp_path, ["dev-1", "dev-2"], extra=QUICK_PROBATION, passwords=True) as devices:
        done = run_cli("toolchain", "push", str(v2), "--fleet", FLEET, "--json", *auth, timeout=180)
        assert done.returncode == 0, (done.stdout, done.stderr, logs(devices))
        older = run_cli("toolchain", "push", str(make_variant(default_build, tmp_path / "v1", version=1)),
                        "--device", "dev-2", *auth, timeout=120)  # the fleet is looked up from the status
        wrong_password = run_cli("toolchain", "push", str(v2), "--device", "dev-1", "--fleet", FLEET, *auth[:2],
                                 "--username", OPERATOR, "--password-file", str(default_build.pubkey), timeout=60)
    report = json.loads(done.stdout)
    assert report["ok"] and report["state"] == "completed" and report["version"] == 2
    assert [(d["stage"], d["action"]) for d in report["decisions"]] == [
        ("canary", "push"), ("canary", "continue"), ("wave 1", "push"), ("wave 1", "complete")]
    assert {d: r["probation"] for d, r in report["results"].items()} == {"dev-1": "passed", "dev-2": "passed"}
    assert older.returncode == 1
    assert older.stderr.strip().splitlines()[-1].startswith("push failed: 1 of 1 device(s) did not succeed (dev-2 rejected: "
                                                             "version 1 is not newer than the installed version 2")
    assert "dev-2" in older.stdout and "rejected" in older.stdout  # the table
    assert wrong_password.returncode == 2
    assert wrong_password.stderr.strip() == (f"error: the MQTT broker at {secure_broker.url} refused the connection: "
                                             "Not authorized (check --username and --password-file)")


def test_cli_push_has_help() -> None:
    result = run_cli("toolchain", "push", "--help")
    assert result.returncode == 0 and "Usage" in result.stdout and "--canary" in result.stdout


def test_cli_bad_input_is_one_line(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    tampered = make_variant(default_build, tmp_path / "v", tamper=True)
    cases = [
        (["push", str(tampered), "--device", "dev-1", "--fleet", FLEET, "--broker", broker.url, "--pubkey", str(default_build.pubkey)],
         "error: refusing to push"),
        (["push", str(default_build.bundle), "--broker", broker.url, "--pubkey", str(default_build.pubkey)],
         "error: say where to push: --device ID (repeatable) or --fleet NAME"),
        (["push", str(default_build.bundle), "--fleet", "nobody", "--broker", broker.url, "--pubkey", str(default_build.pubkey)],
         "error: no online device in fleet 'nobody'"),
        (["push", str(default_build.bundle), "--device", "ghost", "--broker", broker.url, "--pubkey", str(default_build.pubkey)],
         "error: device 'ghost' has no status on the broker"),
        (["push", str(tmp_path / "missing.bundle"), "--fleet", FLEET, "--broker", broker.url], "error: bundle"),
        (["push", str(default_build.bundle), "--fleet", FLEET, "--window", "8", "--broker", broker.url],
         "error: --window must be at least 16: devices acknowledge every 16 chunks"),
        (["push", str(default_build.bundle), "--fleet", FLEET, "--broker", "http://x:1", "--pubkey", str(default_build.pubkey)],
         "error: --broker must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got 'http://x:1'"),
    ]
    for args, expected in cases:
        done = run_cli("toolchain", *args, timeout=60)
        assert done.returncode == 2 and done.stderr.startswith(expected), (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
