"""`toolchain broker` + `toolchain flash`: provisioned devices come online with their own credentials (over
mqtts:// with their own client certificates: TLS is `broker start`'s default)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Build, Recorder, run_cli
from tests.agent_helpers import start_agent
from toolchain.deploy.broker import OPERATOR, ManagedBroker, free_port


@pytest.fixture()
def managed(tmp_path: Path):
    folder = tmp_path / "broker"
    port = free_port()
    result = run_cli("toolchain", "broker", "start", "--dir", str(folder), "--port", str(port))
    assert result.returncode == 0, result.stderr
    yield ManagedBroker.load(folder)
    stopped = run_cli("toolchain", "broker", "stop", "--dir", str(folder))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout


def flash(tmp_path: Path, build: Build, broker: ManagedBroker, device: str, *extra: str):
    return run_cli("toolchain", "flash", "--device-dir", str(tmp_path / device), "--device-id", device,
                   "--bundle", str(build.bundle), "--broker", broker.url, "--fleet", "plant", "--pubkey", str(build.pubkey),
                   "--broker-dir", str(broker.directory), "--port", str(free_port()), "--window", "0.5", *extra)


def test_three_flashed_devices_come_online_with_their_own_credentials(default_build: Build, managed: ManagedBroker,
                                                                      tmp_path: Path) -> None:
    password = (managed.directory / "operator.password").read_text().strip()
    recorder = Recorder(managed, topic="edge/v1/plant/+/status", client_id="ops", username=OPERATOR, password=password,
                        ca_file=managed.ca_file, client_cert=managed.directory / "operator.pem")
    agents = []
    try:
        for device in ("cam-1", "cam-2", "cam-3"):
            result = flash(tmp_path, default_build, managed, device)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith(f"provisioned {device} (fleet plant)")
            agents.append(start_agent(tmp_path / device, tmp_path / f"{device}.log"))
        online = recorder.wait_for(lambda r: {s["device_id"] for s in r.payloads("/status") if s["state"] == "online"} >= {"cam-1", "cam-2", "cam-3"},
                                   what="three devices online")
        assert online
    finally:
        for agent in agents:
            agent.kill()
        recorder.close()
    secrets = {(tmp_path / d / "mqtt.password").read_text() for d in ("cam-1", "cam-2", "cam-3")}
    assert len(secrets) == 3
    modes = {"mqtt.password": "0o600", "client.pem": "0o600", "agent.toml": "0o644", "install.sh": "0o755",
             "edge-agent.service": "0o644"}
    assert {name: oct((tmp_path / "cam-1" / name).stat().st_mode & 0o777) for name in modes} == modes
    assert not list((tmp_path / "cam-1").glob(".*.tmp"))  # every file written whole, through a renamed temp file
    assert (tmp_path / "cam-1" / "current.bundle").resolve() == (tmp_path / "cam-1" / "slots" / "digits-1.bundle").resolve()


def test_reflash_needs_force_and_replaces_the_credentials(default_build: Build, managed: ManagedBroker, tmp_path: Path) -> None:
    assert flash(tmp_path, default_build, managed, "cam-9").returncode == 0
    before = (tmp_path / "cam-9" / "mqtt.password").read_text()
    again = flash(tmp_path, default_build, managed, "cam-9")
    assert again.returncode == 2 and "is already provisioned" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "cam-9" / "mqtt.password").read_text() == before
    forced = flash(tmp_path, default_build, managed, "cam-9", "--force")
    assert forced.returncode == 0 and (tmp_path / "cam-9" / "mqtt.password").read_text() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cam-9")]


def test_reflashing_a_running_device_is_refused(default_build: Build, managed: ManagedBroker, tmp_path: Path) -> None:
    """A forced re-flash under a running agent left it serving from the deleted folder (its outbox with it),
    refused by the broker for its old password at every reconnect."""
    assert flash(tmp_path, default_build, managed, "cam-8").returncode == 0
    before = (tmp_path / "cam-8" / "mqtt.password").read_text()
    agent = start_agent(tmp_path / "cam-8", tmp_path / "cam-8.log")
    try:
        refused = flash(tmp_path, default_build, managed, "cam-8", "--force")
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: the agent of {tmp_path / 'cam-8'} seems to be running")
    assert (tmp_path / "cam-8" / "mqtt.password").read_text() == before
    assert flash(tmp_path, default_build, managed, "cam-8", "--force").returncode == 0  # stopped: re-flashed


def test_an_unverified_bundle_is_not_flashed(default_build: Build, managed: ManagedBroker, tmp_path: Path) -> None:
    from runtime_agent.signing import write_keypair

    _, other = write_keypair(tmp_path / "other")
    result = run_cli("toolchain", "flash", "--device-dir", str(tmp_path / "cam-x"), "--device-id", "cam-x",
                     "--bundle", str(default_build.bundle), "--broker", managed.url, "--pubkey", str(other))
    assert result.returncode == 2 and "signature check failed" in result.stderr
    assert not (tmp_path / "cam-x").exists() and not [p for p in tmp_path.iterdir() if ".flash-" in p.name]


def test_the_device_folder_runs_without_the_host_packages(default_build: Build, managed: ManagedBroker, tmp_path: Path) -> None:
    assert flash(tmp_path, default_build, managed, "cam-5").returncode == 0
    folder = tmp_path / "cam-5"
    assert subprocess.run(["sh", "-n", str(folder / "install.sh")]).returncode == 0
    script = (folder / "install.sh").read_text()
    assert "onnxruntime==" in script and "torch" not in script
    assert "ExecStart=@DEST@/venv/bin/python -m runtime_agent.cli run --device-dir @DEST@" in (folder / "edge-agent.service").read_text()
    code = ("import sys, runtime_agent.agent, runtime_agent.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'toolchain', 'tensorflow')]; "
            "assert runtime_agent.__file__.startswith(sys.argv[1]), runtime_agent.__file__; print(bad)")
    env = dict(os.environ, PYTHONPATH=str(folder))
    result = subprocess.run([sys.executable, "-P", "-c", code, str(folder)], capture_output=True, text=True, env=env, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # the copied package is its own command (`python -m runtime_agent` said "cannot be directly executed")
    usage = subprocess.run([sys.executable, "-P", "-m", "runtime_agent", "run", "--help"], capture_output=True, text=True,
                           env=env, cwd=folder)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: edge-agent run "), usage.stderr
