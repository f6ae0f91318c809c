"""Benchmark jobs through a real agent and a real mosquitto (toolchain.deploy.device_bench, runtime_agent.bench_job):
the device times every model of a signed job beside serving and answers per model; an unsigned, tampered or
mislabelled job is refused with the reason and nothing is timed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime_agent.bench_job import JobLedger, read_job
from runtime_agent.errors import AgentError
from runtime_agent.keyring import Keyring
from runtime_agent.signing import load_private_key, write_keypair
from tests.agent.test_multi_io import classifier_model, old_style_bundle, regression_model
from tests.agent_helpers import http, infer_body, running_agent
from tests.conftest import provision_device, run_cli
from toolchain.deploy.broker import ManagedBroker
from toolchain.deploy.device_bench import JobSettings, bench_on_device, device_errors, send_job, write_job
from toolchain.deploy.mqtt import BrokerLogin
from toolchain.deploy.push import PushClient
from toolchain.errors import ToolchainError

SETTINGS = JobSettings(runs=30, warmup=3, threads=1, duty=0.5)


@pytest.fixture()
def device(broker: ManagedBroker, tmp_path: Path):
    """A running agent serving a tiny classifier (profile raspberry-pi-5), and the key its bundle was signed with."""
    build = old_style_bundle(tmp_path / "build")
    folder = provision_device(tmp_path / "dev", build, broker.url)
    with running_agent(folder) as (agent, base):
        yield agent, base, build.out / "keys" / "signing.key"


def models(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classifier.onnx").write_bytes(classifier_model())
    (folder / "regressor.onnx").write_bytes(regression_model())
    (folder / "broken.onnx").write_bytes(b"not an onnx graph")
    return {name: folder / f"{name}.onnx" for name in ("classifier", "regressor", "broken")}


def test_a_job_times_every_model_on_the_device_while_it_serves(broker: ManagedBroker, device, tmp_path: Path) -> None:
    agent, base, key = device
    statuses: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            statuses.append(http("POST", f"{base}/v2/models/m/infer", infer_body(np.ones((1, 6), np.float32)))[0])

    client = threading.Thread(target=serve, daemon=True)
    client.start()
    try:
        result = bench_on_device(models(tmp_path / "models"), "dev-1", broker.url, key=key, settings=SETTINGS,
                                 results_dir=tmp_path / "results")
    finally:
        stop.set()
        client.join(10)
    assert result["profile"] == "raspberry-pi-5" and result["fleet"] == "lab"
    for name in ("classifier", "regressor"):
        row = result["models"][name]
        assert row["runs"] == 30 and row["threads"] == 1 and "error" not in row
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["rss_mb"] > 0
    assert "cannot be loaded by onnxruntime" in device_errors(result)["broken"]
    stored = Path(result["stored"])
    assert stored.parent == tmp_path / "results" / "raspberry-pi-5" and stored.name.startswith("dev-1-")
    assert json.loads(stored.read_text())["models"]["classifier"]["p50_ms"] == result["models"]["classifier"]["p50_ms"]
    assert statuses and set(statuses) == {200}  # serving went on, nothing failed
    assert agent.model.bundle.version == 1  # nothing was installed


@pytest.mark.parametrize("case, reason", [
    ("model file altered", "sha256 does not match the manifest; it was modified"),
    ("manifest altered", "signature check failed: the manifest was altered after signing"),
    ("unknown key", "signature check failed: signed by key"),
    ("a bundle, not a job", "the signed manifest is not a benchmark job"),
    ("for another device", "made for device 'dev-2', this is 'dev-1'"),
    ("expired", "expired at"),
])
def test_a_job_that_does_not_verify_is_refused_with_the_reason(case: str, reason: str, broker: ManagedBroker, device,
                                                               tmp_path: Path) -> None:
    agent, _, key = device
    files = {"classifier": tmp_path / "classifier.onnx"}
    files["classifier"].write_bytes(classifier_model())
    if case == "unknown key":
        key = write_keypair(tmp_path / "stranger")[0]
    job = write_job(files, SETTINGS, load_private_key(key), tmp_path / "job.bench",
                    "dev-2" if case == "for another device" else "dev-1", valid_s=-3600 if case == "expired" else 600)
    if case == "model file altered":
        data = bytearray(job.read_bytes())
        data[data.index(classifier_model()) + 40] ^= 0x01
        job.write_bytes(bytes(data))
    elif case == "manifest altered":
        job.write_bytes(job.read_bytes().replace(b'"runs": 30', b'"runs": 31'))
    elif case == "a bundle, not a job":
        job = agent.config.bundle_path
    with PushClient(BrokerLogin(broker.url)) as client, pytest.raises(ToolchainError) as refused:
        send_job(job, "dev-1", client, timeout_s=60)
    assert "refused the benchmark job" in str(refused.value) and reason in str(refused.value)


def test_cli_bench_device_prints_the_device_numbers(broker: ManagedBroker, device, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, key = device
    model = tmp_path / "classifier.onnx"
    model.write_bytes(classifier_model())
    monkeypatch.setenv("EDGE_TOOLCHAIN_DEVICE_BENCH", str(tmp_path / "results"))
    result = run_cli("toolchain", "bench", str(model), "--device", "dev-1", "--broker", broker.url, "--key", str(key),
                     "--runs", "20", "--json", check=True)
    answer = json.loads(result.stdout)
    assert answer["profile"] == "raspberry-pi-5" and answer["models"]["classifier"]["runs"] == 20
    assert Path(answer["stored"]).is_file()


@pytest.mark.slow
def test_calibrate_from_device_fits_the_profile_to_variants_timed_there(broker: ManagedBroker, device, tmp_path: Path) -> None:
    _, _, key = device
    out = tmp_path / "raspberry-pi-5.json"
    run_cli("toolchain", "calibrate", "--target", "raspberry-pi-5", "--from-device", "dev-1", "--broker", broker.url,
            "--key", str(key), "--variants", "12", "--runs", "10", "--out", str(out), check=True)
    calibration = json.loads(out.read_text())
    assert calibration["profile"] == "raspberry-pi-5" and calibration["source"] == "device dev-1"
    assert calibration["fingerprint"] is None and calibration["threads"] == 0  # the agent's own [serve] threads
    assert len(calibration["fit"]["fitted"]) + len(calibration["validation"]["held_out"]) == 12
    assert set(calibration["validation"]["latency"]["errors"]) == set(calibration["validation"]["held_out"])


def test_a_job_runs_once_even_across_restarts(tmp_path: Path) -> None:
    """The ledger behind replay refusal: a job id is admitted once, remembered in its file (a restarted agent
    reads it back), forgotten only after its expiry, and the file keeps at most `size` ids."""
    files = {"classifier": tmp_path / "classifier.onnx"}
    files["classifier"].write_bytes(classifier_model())
    build = old_style_bundle(tmp_path / "build")
    key = build.out / "keys" / "signing.key"
    keyring = Keyring.of(load_private_key(key).public_key())
    ledger_file = tmp_path / "dev" / "bench-jobs.json"
    ledger_file.parent.mkdir()
    job = read_job(write_job(files, SETTINGS, load_private_key(key), tmp_path / "a.bench", "dev-1"), keyring, "dev-1")
    JobLedger(ledger_file).admit(job)
    with pytest.raises(AgentError, match=f"benchmark job {job.id} already ran on this device"):
        JobLedger(ledger_file).admit(job)  # a new ledger on the same file: what a restarted agent has
    later = job.expires + 3600
    other = read_job(write_job(files, SETTINGS, load_private_key(key), tmp_path / "b.bench", "dev-1"), keyring, "dev-1")
    JobLedger(ledger_file).admit(other, now=later)  # the first job's entry has expired and is dropped
    assert set(json.loads(ledger_file.read_text())) == {other.id}
    with pytest.raises(AgentError, match="expired at"):
        read_job(tmp_path / "a.bench", keyring, "dev-1", now=later)  # and the job itself is refused as expired
    small = JobLedger(tmp_path / "small.json", size=2)
    jobs = [read_job(write_job(files, SETTINGS, load_private_key(key), tmp_path / f"{n}.bench", "dev-1", valid_s=60 + n),
                     keyring, "dev-1") for n in range(3)]
    for each in jobs:
        small.admit(each)
    assert set(json.loads((tmp_path / "small.json").read_text())) == {jobs[1].id, jobs[2].id}
