"""Pulling the plug at every step of an install and of a rollback (runtime_agent.faults), with a real agent
process and a real mosquitto: after a restart the device serves the old or the new model, never none;
`current` and `previous` name two different slots; the refused versions and the probation record agree
with what is served; and the push can be retried. And a full disk during staging (a real tmpfs)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from runtime_agent.config import load_agent_config
from tests.agent_helpers import http, infer_body, start_agent
from tests.conftest import Build, Recorder, provision_device
from tests.deploy.bundle_variants import collapse, variant
from tests.deploy.test_push_device import RawPusher, SteadyClient, final_ack, pusher  # noqa: F401 (fixture)
from toolchain.deploy.broker import ManagedBroker

pytestmark = pytest.mark.slow

PROBATION = "[probation]\nrequests = {requests}\nseconds = 600\n"


class Device:
    """One provisioned device folder and its agent process, restartable."""

    def __init__(self, tmp_path: Path, build: Build, broker: ManagedBroker, probation_requests: int) -> None:
        self.dir = provision_device(tmp_path / "dev", build, broker.url, extra=PROBATION.format(requests=probation_requests))
        self.base = f"http://127.0.0.1:{load_agent_config(self.dir).serve_port}"
        self.log = tmp_path / "agent.log"
        self.process: subprocess.Popen | None = None

    def start(self, crash_at: str = "") -> None:
        self.process = start_agent(self.dir, self.log, crash_at)

    def crashed_at(self, step: str) -> None:
        assert self.process.wait(timeout=60) == 137, self.log.read_text()
        assert f"fault injection: crashing at {step}" in self.log.read_text()

    def infer(self, x, times: int = 1) -> set[str]:
        """REST inferences; every one must succeed. The versions that answered."""
        versions = set()
        for i in range(times):
            status, answer = http("POST", f"{self.base}/v2/models/digits/infer", infer_body(x[i % len(x): i % len(x) + 1]))
            assert status == 200, answer
            versions.add(answer["model_version"])
        return versions

    def link(self, name: str) -> str | None:
        path = self.dir / name
        return path.resolve().name if path.is_symlink() else None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def online(recorder: Recorder) -> dict:
    """The newest birth (status) of the restarted agent."""
    return recorder.wait_for(lambda r: [s for s in r.payloads("/status") if s.get("state") == "online"],
                             timeout=60, what="the agent's birth")[-1]


def events(recorder: Recorder, kind: str) -> list[dict]:
    return [e for e in recorder.payloads("/events") if e["type"] == kind]


INSTALL_STEPS = {"install:staged": "1", "install:verified": "1", "install:slot_written": "1",
                 "install:between_switches": "2", "install:switched": "2", "probation (kill -9)": "2"}


@pytest.mark.parametrize("step, serves", INSTALL_STEPS.items())
def test_a_crash_during_an_install_leaves_a_working_model_and_the_push_retries(
        step: str, serves: str, default_build: Build, broker: ManagedBroker, pusher: RawPusher, tmp_path: Path, digits) -> None:
    recorder = Recorder(broker)
    device = Device(tmp_path, default_build, broker, probation_requests=60)
    data = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v2", version=2).read_bytes()
    try:
        device.start("" if step.startswith("probation") else step)
        online(recorder)
        transfer = pusher.push(data)
        if step.startswith("probation"):  # installed, probation running: the plug is pulled from outside
            assert final_ack(recorder, transfer)["state"] == "installed"
            device.stop()
        else:
            device.crashed_at(step)
        recorder.messages.clear()
        device.start()
        birth = online(recorder)
        assert device.infer(digits.x_test) == {serves} and birth["model_version"] == int(serves)
        assert not (device.dir / "switch.json").exists()
        linked = {device.link("current.bundle"), device.link("previous.bundle")} - {None}
        assert {slot.name for slot in (device.dir / "slots").glob("*")} == linked  # a slot the crash left is gone
        if serves == "2":
            assert (device.link("current.bundle"), device.link("previous.bundle")) == ("digits-2.bundle", "digits-1.bundle")
            assert birth["probation"] == {"version": 2, "state": "running"}  # started again after the restart
        else:
            assert device.link("previous.bundle") is None and device.link("current.bundle") in (None, "digits-1.bundle")
        pusher.push(data, only=range(0), offer_id="retry")  # every chunk is on disk: the re-offer finishes it
        assert final_ack(recorder, transfer)["state"] == "installed"
        assert device.infer(digits.x_test, times=80) == {"2"}
        passed = recorder.wait_for(lambda r: events(r, "probation_passed"), timeout=30, what="probation verdict")
        assert passed[0]["version"] == 2 and (device.dir / "current.bundle").resolve().name == "digits-2.bundle"
        assert not list((device.dir / "staging").glob("*.part"))
    finally:
        device.stop()
        recorder.close()


@pytest.mark.parametrize("step", ["rollback:recorded", "rollback:between_switches", "rollback:switched"])
def test_a_crash_during_a_probation_rollback_finishes_it_after_the_restart(
        step: str, default_build: Build, broker: ManagedBroker, pusher: RawPusher, tmp_path: Path, digits) -> None:
    recorder = Recorder(broker)
    device = Device(tmp_path, default_build, broker, probation_requests=120)
    keys = default_build.pubkey.parent
    worse = variant(default_build.bundle, keys, tmp_path / "v2", version=2, transform=collapse(3)).read_bytes()
    try:
        device.start(step)
        online(recorder)
        device.infer(digits.x_test, times=150)  # the previous model's baseline
        assert final_ack(recorder, pusher.push(worse))["state"] == "installed"
        for i in range(130):  # probation ends within these and rolls back: the process dies mid-rollback
            if device.process.poll() is not None:
                break
            try:
                http("POST", f"{device.base}/v2/models/digits/infer", infer_body(digits.x_test[i: i + 1]))
            except OSError:  # the request that ended the probation dies with the process
                break
        device.crashed_at(step)
        recorder.messages.clear()
        device.start()
        birth = online(recorder)
        assert device.infer(digits.x_test) == {"1"} and birth["model_version"] == 1
        assert (device.link("current.bundle"), device.link("previous.bundle")) == ("digits-1.bundle", "digits-2.bundle")
        assert json.loads((device.dir / "refused-versions.json").read_text()) == [2]
        assert birth["probation"] == {"version": 2, "state": "rolled_back"}
        v3 = variant(default_build.bundle, keys, tmp_path / "v3", version=3).read_bytes()
        assert final_ack(recorder, pusher.push(v3))["state"] == "installed"
        assert device.infer(digits.x_test) == {"3"}
        assert device.link("previous.bundle") == "digits-1.bundle"
    finally:
        device.stop()
        recorder.close()


def test_a_full_disk_during_staging_rejects_the_push_and_serving_goes_on(
        default_build: Build, broker: ManagedBroker, pusher: RawPusher, tmp_path: Path, digits) -> None:
    recorder = Recorder(broker)
    device = Device(tmp_path, default_build, broker, probation_requests=500)
    staging = device.dir / "staging"
    staging.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    big = variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "v2", version=2, padding_bytes=2 << 20)
    try:
        device.start()
        online(recorder)
        client = SteadyClient(device.base, digits.x_test[:2])
        transfer = pusher.push(big.read_bytes())
        ack = final_ack(recorder, transfer)
        statuses = client.stop()
        assert ack["state"] == "rejected" and "No space left on device" in ack["reason"], ack
        assert f"cannot stage {len(big.read_bytes())} bytes in {staging}" in ack["reason"]
        assert statuses and set(statuses) == {200} and client.versions == {"1"}
        assert not list(staging.iterdir())  # nothing left behind on the small disk
    finally:
        device.stop()
        recorder.close()
        subprocess.run(["umount", str(staging)], check=True)
