"""Operator commands against real agents (`edge-agent run` processes) and a real mosquitto:
`toolchain fleet rollback|config`, flash's own REST port per device folder, the port-clash error, and
the agent's log lines (connect, lost broker, refused connection, reconnect, rollback)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path


from runtime_agent.config import load_agent_config
from runtime_agent.slots import Slots
from tests.agent_helpers import start_agent
from tests.conftest import Build, run_cli
from tests.deploy.bundle_variants import variant
from toolchain.deploy.broker import ManagedBroker, free_port


def flash(build: Build, broker: ManagedBroker, device_dir: Path, *extra: str) -> None:
    run_cli("toolchain", "flash", "--device-dir", str(device_dir), "--device-id", device_dir.name, "--bundle",
            str(build.bundle), "--broker", broker.url, "--fleet", "plant", "--pubkey", str(build.pubkey),
            "--window", "0.5", *extra, check=True)


def wait_for_log(log: Path, pattern: str, timeout: float = 60.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {log}:\n{log.read_text()}")


def fleet_cli(command: str, broker: ManagedBroker, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("toolchain", "fleet", command, "--broker", broker.url, *args, timeout=120)


def test_rollback_and_config_commands_are_answered_per_device(default_build: Build, broker: ManagedBroker,
                                                              tmp_path: Path) -> None:
    devices = tmp_path / "devices"
    for name in ("cam-1", "cam-2"):
        flash(default_build, broker, devices / name)  # no --port: each folder gets its own
    ports = {name: load_agent_config(devices / name).serve_port for name in ("cam-1", "cam-2")}
    assert len(set(ports.values())) == 2, ports
    # cam-1 runs version 2 with version 1 as its previous model; cam-2 has only version 1.
    v2 = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v2", version=2)
    slots = Slots(devices / "cam-1", devices / "cam-1" / "current.bundle")
    slots.activate(slots.store(v2, "digits", 2), "digits-1.bundle")
    logs = {name: tmp_path / f"{name}.log" for name in ports}
    agents = {name: start_agent(devices / name, logs[name]) for name in ports}  # both serve: no port clash
    try:
        for name in ports:
            wait_for_log(logs[name], rf"connected to the broker at 127\.0\.0\.1:{broker.port}")

        one = fleet_cli("rollback", broker, "--device", "cam-1")
        assert one.returncode == 0, one.stderr
        line = re.fullmatch(r"plant/cam-1: done: rolled back v2 -> v1 \(cmd (rollback-\w+)\)", one.stdout.strip())
        assert line, one.stdout
        wait_for_log(logs["cam-1"], rf"rolled back v2 -> v1: manual rollback \(cmd {line.group(1)}\)")

        every = fleet_cli("rollback", broker, "--fleet", "plant")
        assert every.returncode == 1
        lines = every.stdout.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("plant/cam-1: done: rolled back v1 -> v2 (cmd rollback-"), lines
        assert re.fullmatch(r"plant/cam-2: failed: rejected cmd: cmd rollback-\w+: no previous model to roll back to "
                            r"\(cmd rollback-\w+\)", lines[1]), lines
        assert "rollback failed on 1 of 2 device(s): cam-2" in every.stderr

        config = fleet_cli("config", broker, "--device", "cam-2", "--window-s", "2")
        assert config.returncode == 0, config.stderr
        assert re.fullmatch(r"plant/cam-2: done: telemetry window now 2\.0 s \(cmd config-\w+\)", config.stdout.strip())
        wait_for_log(logs["cam-2"], r"telemetry window set to 2 s \(cmd config-\w+\)")
        refused = fleet_cli("config", broker, "--device", "cam-2", "--window-s", "0")
        assert refused.returncode == 1
        assert "failed: rejected cmd: cmd config-" in refused.stdout
        assert "config needs telemetry.window_s between 0.05 and 86400" in refused.stdout

        ghost = fleet_cli("rollback", broker, "--device", "ghost", "--fleet", "plant", "--timeout", "1")
        assert ghost.returncode == 1 and ghost.stdout.startswith("plant/ghost: timeout: no answer within 1 s")

        agents["cam-2"].send_signal(signal.SIGTERM)
        agents["cam-2"].wait(timeout=20)
        offline = fleet_cli("rollback", broker, "--fleet", "plant")
        assert offline.returncode == 1
        assert offline.stdout.strip().splitlines() == [
            offline.stdout.strip().splitlines()[0], "plant/cam-2: offline: not sent"]
        assert offline.stdout.startswith("plant/cam-1: done: rolled back v2 -> v1")
    finally:
        for agent in agents.values():
            agent.kill()
            agent.wait(timeout=20)


def test_a_taken_port_is_one_clear_line(default_build: Build, broker: ManagedBroker, tmp_path: Path) -> None:
    first, second = tmp_path / "devices" / "cam-1", tmp_path / "devices" / "cam-2"
    port = free_port()
    flash(default_build, broker, first, "--port", str(port))
    flash(default_build, broker, second, "--port", str(port))
    running = start_agent(first, tmp_path / "cam-1.log")
    try:
        clash = run_cli("edge-agent", "run", "--device-dir", str(second), timeout=120)
    finally:
        running.kill()
        running.wait(timeout=20)
    assert clash.returncode == 2
    assert "Traceback" not in clash.stderr
    assert clash.stderr.strip().splitlines()[-1] == (
        f"error: port {port} on 127.0.0.1 is already in use (another agent?); "
        f"set another in [serve] port of {second / 'agent.toml'}")


def test_the_agent_logs_a_stopped_broker_as_refused_and_its_reconnect(default_build: Build, broker: ManagedBroker,
                                                                     tmp_path: Path) -> None:
    device = tmp_path / "devices" / "cam-1"
    flash(default_build, broker, device)
    log = tmp_path / "cam-1.log"
    agent = start_agent(device, log)
    try:
        address = f"127.0.0.1:{broker.port}"
        wait_for_log(log, rf"INFO runtime_agent\.mqtt_link: connected to the broker at {address}")
        broker.stop()
        wait_for_log(log, rf"lost the broker at {address}")
        wait_for_log(log, rf"cannot reach the broker at {address}: connection refused "
                          r"\(is the broker running on that port\?\); retrying with backoff")
        broker.start()
        wait_for_log(log, rf"INFO runtime_agent\.mqtt_link: reconnected to the broker at {address}")
    finally:
        agent.kill()
        agent.wait(timeout=20)
    assert "TLS or network" not in log.read_text()
