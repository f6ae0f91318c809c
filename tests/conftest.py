"""Fixtures shared across test folders: an isolated key folder and host-probe cache, one real quick build
per session, real brokers, and helpers that run the CLI and provision devices. A fixture that only one
folder uses lives in that folder's conftest.py.

`pytest -m "not slow"` is the fast loop (CI runs everything): a test is `slow` when it trains or builds a
model, runs a fleet or a browser, or takes more than a few seconds; its module says so with
`pytestmark = pytest.mark.slow`, or the test with `@pytest.mark.slow`. A test that uses `default_build`
(a real build, minutes on a small machine) is marked here, wherever it lives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys and caches of the tests never touch the user's real ones, and what the CLI prints does not
    depend on the terminal the suite runs in: rich takes its width from COLUMNS, else from any of
    stdin/stdout/stderr that is a terminal, else 80; the tests of tables pin a narrower one themselves."""
    home = tmp_path_factory.mktemp("home")
    os.environ["EDGE_TOOLCHAIN_KEYS"] = str(home / "keys")
    os.environ["EDGE_TOOLCHAIN_CACHE"] = str(home / "cache")
    os.environ["COLUMNS"] = "80"
    return home


@pytest.fixture()
def narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 60-column terminal, for tests of what the CLI prints: ids, paths and messages must come out whole."""
    monkeypatch.setenv("COLUMNS", "60")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "default_build" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def run_cli(*args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (`toolchain ...` or `edge-agent ...`) as a user would."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ), cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@dataclass(frozen=True)
class Build:
    out: Path
    bundle: Path
    pubkey: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def default_build(tmp_path_factory: pytest.TempPathFactory, isolated_home: Path) -> Build:
    """`toolchain build --target jetson --budget quick` on the embedded example, exactly as the README runs it."""
    out = tmp_path_factory.mktemp("dist")
    result = run_cli("toolchain", "build", "--target", "jetson", "--budget", "quick", "--out", str(out), check=True)
    bundle = Path(result.stdout.strip().splitlines()[-1])
    return Build(out=out, bundle=bundle, pubkey=isolated_home / "keys" / "signing.pub",
                 stdout=result.stdout, stderr=result.stderr)


@pytest.fixture(scope="session")
def digits():
    """The embedded example's data set (scikit-learn digits), split as a build splits it (seed 0)."""
    from toolchain.core.config import load_config
    from toolchain.core.data import load_dataset

    return load_dataset(load_config(None), seed=0)


# --- MQTT: a real mosquitto per test, and a recording subscriber -------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from runtime_agent.agent import Agent  # noqa: E402
from runtime_agent.push_receiver import Transfer  # noqa: E402
from toolchain.deploy.broker import OPERATOR, ManagedBroker, free_port  # noqa: E402

from tests.postgres import postgres_server, postgres_url  # noqa: E402,F401  (a real PostgreSQL: tests/postgres.py)


@pytest.fixture()
def broker(tmp_path: Path):
    """A real mosquitto on a free loopback port, anonymous access, persistence on; stopped after the test."""
    managed = ManagedBroker(tmp_path / "broker", port=free_port(), authenticated=False).start()
    yield managed
    managed.stop()


@pytest.fixture()
def secure_broker(tmp_path: Path):
    """Mosquitto with a password file and the generated ACL; users: the operator, dev-1 and dev-2."""
    managed = ManagedBroker(tmp_path / "secure-broker", port=free_port(), authenticated=True)
    managed.write_config()
    for user in (OPERATOR, "dev-1", "dev-2"):
        managed.add_user(user, f"{user}-secret")
    managed.start()
    yield managed
    managed.stop()


class Recorder:
    """Subscribes to a topic filter with a persistent session and keeps every message, even across
    broker restarts (the broker queues for the session while the recorder reconnects)."""

    def __init__(self, managed: ManagedBroker, topic: str = "edge/v1/#", client_id: str = "recorder",
                 username: str | None = None, password: str | None = None, ca_file: Path | None = None,
                 client_cert: Path | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:  # mqtts://: verify the broker against this CA, host name included (and present `client_cert`)
            self.client.tls_set(ca_certs=str(ca_file), certfile=str(client_cert) if client_cert else None)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(topic, qos=1), None)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect(managed.host, managed.port, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self.subscribed.wait(10), "recorder could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def payloads(self, suffix: str) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p in self.messages if t.endswith(suffix) and p]

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "messages"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate(self)
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {len(self.messages)} messages")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def provision_device(device_dir: Path, build: Build, broker_url: str, device_id: str = "dev-1", fleet: str = "lab",
                     window_s: float = 0.5, extra: str = "") -> Path:
    """A device folder as `toolchain flash` will write it: agent.toml, the bundle, the trusted key."""
    device_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(build.bundle, device_dir / "current.bundle")
    shutil.copyfile(build.pubkey, device_dir / "trusted.pub")
    (device_dir / "agent.toml").write_text(
        f'device_id = "{device_id}"\nfleet = "{fleet}"\nbroker = "{broker_url}"\n{extra}\n'
        f'[serve]\nhost = "127.0.0.1"\nport = {free_port()}\n[telemetry]\nwindow_s = {window_s}\n')
    return device_dir


def install_push(agent: Agent, bundle: Path, version: int) -> None:
    """Install `bundle` as the push receiver hands it over once every chunk is staged (no broker needed)."""
    data = bundle.read_bytes()
    transfer = Transfer(transfer=f"{version:016x}", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        chunk_bytes=len(data), chunks=1, offer={"id": f"offer-{version}", "version": version})
    staged = agent.receiver.dir / f"{transfer.transfer}.part"
    shutil.copyfile(bundle, staged)
    agent.install(transfer, staged)
