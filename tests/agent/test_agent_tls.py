"""`mqtts://` for real: a TLS-only mosquitto with a private CA and mutual TLS, devices that verify it and
present their own certificate, and what happens when they cannot (wrong CA), when a client has no
certificate or one from another CA, or does not speak TLS at all."""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import stat
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from runtime_agent.config import load_agent_config
from runtime_agent.outbox import Outbox
from tests.conftest import Build, Recorder, provision_device
from tests.agent_helpers import http, running_agent
from toolchain.deploy.broker import OPERATOR, ManagedBroker, free_port
from toolchain.deploy.tls import make_ca, make_server_cert, server_cert_usable

OPERATOR_PASSWORD = f"{OPERATOR}-secret"


@pytest.fixture()
def tls_broker(tmp_path: Path):
    """A TLS-only mosquitto (private CA in its folder, client certificates required) with passwords and the
    ACL: users operator (certificate in operator.pem), dev-1."""
    managed = ManagedBroker(tmp_path / "tls-broker", port=free_port(), authenticated=True, tls=True)
    managed.write_config()
    managed.issue_client_cert(managed.directory / "operator.pem", OPERATOR)
    for user in (OPERATOR, "dev-1"):
        managed.add_user(user, f"{user}-secret")
    managed.start()
    yield managed
    managed.stop()


def provision_tls_device(device_dir: Path, build: Build, broker: ManagedBroker, ca_file: Path) -> Path:
    """A device that reaches the broker over mqtts://, trusting `ca_file` (copied in as ca.pem) and presenting
    its own certificate from the broker's CA (client.pem)."""
    device_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_file, device_dir / "ca.pem")
    broker.issue_client_cert(device_dir / "client.pem", "dev-1")
    (device_dir / "mqtt.password").write_text("dev-1-secret\n")
    extra = '[mqtt]\nusername = "dev-1"\npassword_file = "mqtt.password"\nca_file = "ca.pem"\nclient_cert = "client.pem"\n'
    return provision_device(device_dir, build, broker.url, window_s=0.5, extra=extra)


def operator_recorder(broker: ManagedBroker, client_id: str = "recorder") -> Recorder:
    return Recorder(broker, client_id=client_id, username=OPERATOR, password=OPERATOR_PASSWORD, ca_file=broker.ca_file,
                    client_cert=broker.directory / "operator.pem")


def seqs(recorder: Recorder) -> set[int]:
    return {p["seq"] for p in recorder.payloads("/telemetry") + recorder.payloads("/events")}


def flush(recorder: Recorder, name: str = "barrier") -> None:
    """Publish a marker through the broker and wait until the recorder gets it back: anything the broker
    had routed to the recorder before has then arrived, so 'nothing arrived' is a settled fact."""
    topic = f"edge/v1/lab/{name}/cmd"  # the operator may write commands, and reads edge/v1/#
    recorder.client.publish(topic, json.dumps({"barrier": name}), qos=1)
    recorder.wait_for(lambda r: any(t == topic for t, _ in r.messages), what=f"the {name} marker")


def test_broker_tls_material_is_generated_once_and_private(tls_broker: ManagedBroker) -> None:
    folder = tls_broker.directory
    assert tls_broker.url == f"mqtts://127.0.0.1:{tls_broker.port}" and tls_broker.ca_file == folder / "ca.pem"
    for key in ("ca.key", "server.key", "operator.pem"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600
    config = (folder / "mosquitto.conf").read_text()
    assert f"certfile {folder / 'server.pem'}" in config and "tls_version tlsv1.2" in config
    assert "require_certificate true" in config
    before = {name: (folder / name).read_bytes() for name in ("ca.pem", "server.pem", "server.key")}
    tls_broker.write_config()  # a restart reuses the CA (devices keep trusting it) and the still-valid cert
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert server_cert_usable((folder / "server.pem", folder / "server.key"), folder / "ca.pem", ["127.0.0.1", "localhost"])
    assert not server_cert_usable((folder / "server.pem", folder / "server.key"), folder / "ca.pem", ["broker.example"])


def test_certificates_pass_strict_openssl_verification_with_host_names(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    cert, key = make_server_cert(tmp_path / "srv", ca, ["edge-broker.lan", "10.1.2.3"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(ca[0]))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    for name in ("edge-broker.lan", "10.1.2.3", "127.0.0.1", "localhost"):
        assert _handshake(server, client, name) is None, name
    assert "Hostname mismatch" in _handshake(server, client, "other.lan")
    stranger = ssl.create_default_context(cafile=str(make_ca(tmp_path / "other-ca")[0]))
    assert "certificate verify failed" in _handshake(server, stranger, "127.0.0.1")


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str | None:
    """One in-memory TLS handshake (no sockets): None on success, else the client's error."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        try:
            if not client_done:
                c.do_handshake()
                client_done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as error:
            return str(error)
        s_in.write(c_out.read())
        try:
            if not server_done:
                s.do_handshake()
                server_done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass  # the client's alert; the client's own error is the one that matters
        c_in.write(s_out.read())
        if client_done and server_done:
            return None
    return None if client_done else "handshake did not finish"


def test_agent_delivers_telemetry_and_retained_birth_over_tls(default_build: Build, tls_broker: ManagedBroker,
                                                               tmp_path: Path) -> None:
    recorder = operator_recorder(tls_broker)
    device = provision_tls_device(tmp_path / "dev", default_build, tls_broker, tls_broker.ca_file)
    config = load_agent_config(device)
    assert config.tls and config.ca_file == device / "ca.pem" and config.broker_port == tls_broker.port
    try:
        with running_agent(device) as (agent, base):
            recorder.wait_for(lambda r: {1, 2, 3} <= seqs(r), what="telemetry over TLS")
            late = operator_recorder(tls_broker, client_id="late")  # joins after the birth: gets it retained
            try:
                birth = late.wait_for(lambda r: r.payloads("/status"), what="the retained birth")[-1]
            finally:
                late.close()
            assert http("GET", f"{base}/v2/health/ready") == (200, {"ready": True})
    finally:
        recorder.close()
    assert birth["state"] == "online" and birth["model_version"] == 1
    # The birth says when the device's credentials expire: its client certificate in a year, the CA in ten.
    days = {key: (when - time.time()) / 86400 for key, when in birth["certificates"].items()}
    assert 364 < days["client_not_after"] <= 365 and 3649 < days["ca_not_after"] <= 3650
    assert recorder.payloads("/status")[0]["state"] == "online"
    telemetry = recorder.payloads("/telemetry")
    assert all(t["model_version"] == 1 for t in telemetry) and sorted(seqs(recorder))[:3] == [1, 2, 3]


def test_agent_with_the_wrong_ca_delivers_nothing_keeps_serving_and_keeps_its_outbox(
        default_build: Build, tls_broker: ManagedBroker, tmp_path: Path) -> None:
    impostor_ca, _ = make_ca(tmp_path / "impostor-ca")  # a CA that did not sign the broker's certificate
    recorder = operator_recorder(tls_broker)
    device = provision_tls_device(tmp_path / "dev", default_build, tls_broker, impostor_ca)
    try:
        with running_agent(device) as (agent, base):
            # Several windows (and so several connection attempts: paho retries after 1 s, 2 s, ...).
            recorder.wait_for(lambda r: agent.outbox.last_seq >= 4, what="windows queued in the outbox")
            assert http("GET", f"{base}/v2/health/ready") == (200, {"ready": True})
            flush(recorder)
            assert [t for t, _ in recorder.messages] == ["edge/v1/lab/barrier/cmd"], "nothing from the device"
        outbox = Outbox(device / "outbox.sqlite")
        try:
            kept = outbox.last_seq
            assert kept >= 4 and len(outbox) == kept  # every message still queued, none acknowledged
        finally:
            outbox.close()
        assert not recorder.payloads("/status")  # not even a birth: the broker never had an MQTT session from it

        # With the right CA the same device delivers everything it kept, from seq 1.
        shutil.copyfile(tls_broker.ca_file, device / "ca.pem")
        with running_agent(device):
            recorder.wait_for(lambda r: set(range(1, kept + 1)) <= seqs(r), what="the kept backlog")
    finally:
        recorder.close()


def test_a_plain_mqtt_client_cannot_talk_to_the_tls_listener(tls_broker: ManagedBroker) -> None:
    recorder = operator_recorder(tls_broker)
    connected, disconnected = threading.Event(), threading.Event()
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5)
    plain.username_pw_set(OPERATOR, OPERATOR_PASSWORD)  # valid credentials: only the missing TLS stops it
    plain.on_connect = lambda c, u, f, rc, p: connected.set()  # any CONNACK, even a refusal
    plain.on_disconnect = lambda c, u, f, rc, p: disconnected.set()
    plain.reconnect_delay_set(min_delay=1, max_delay=1)
    try:
        plain.connect(tls_broker.host, tls_broker.port)  # TCP connects and CONNECT is sent in clear text...
        plain.publish("edge/v1/lab/plain/cmd", b'{"from": "plain"}', qos=1)
        plain.loop_start()
        assert disconnected.wait(10), "the TLS listener should drop a client that does not speak TLS"
        plain.loop_stop()
        assert not connected.is_set()  # ...but the broker never answers it with a CONNACK
        flush(recorder)
        assert not [t for t, _ in recorder.messages if t == "edge/v1/lab/plain/cmd"]
    finally:
        plain.loop_stop()
        recorder.close()


@pytest.mark.parametrize("credential", ["no certificate", "another CA's certificate"])
def test_a_client_without_a_certificate_of_the_brokers_ca_is_refused(credential: str, tls_broker: ManagedBroker,
                                                                    tmp_path: Path) -> None:
    """Mutual TLS: the right CA, a valid password, but no certificate (or one the broker's CA did not sign):
    the broker ends the handshake, so the client never gets a CONNACK and nothing it sends arrives."""
    certificate = None
    if credential != "no certificate":
        stranger = ManagedBroker(tmp_path / "stranger", tls=True)  # its own CA, never started
        certificate = stranger.issue_client_cert(tmp_path / "stranger.pem", OPERATOR)
    recorder = operator_recorder(tls_broker)
    connected, disconnected = threading.Event(), threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv5)
    client.username_pw_set(OPERATOR, OPERATOR_PASSWORD)
    client.tls_set(ca_certs=str(tls_broker.ca_file), certfile=None if certificate is None else str(certificate))
    client.on_connect = lambda c, u, f, rc, p: connected.set()  # any CONNACK, even a refusal
    client.on_disconnect = lambda c, u, f, rc, p: disconnected.set()
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    try:
        try:  # TLS 1.3: the client may finish its side of the handshake before the server checks its certificate
            client.connect(tls_broker.host, tls_broker.port)
            client.publish("edge/v1/lab/intruder/cmd", b'{"from": "intruder"}', qos=1)
            client.loop_start()
            assert disconnected.wait(10), "the broker should drop a client without a certificate of its CA"
        except ssl.SSLError:
            pass  # ...or refuse it within the handshake (TLS 1.2)
        client.loop_stop()
        assert not connected.is_set()
        flush(recorder)
        assert not [t for t, _ in recorder.messages if t == "edge/v1/lab/intruder/cmd"]
    finally:
        client.loop_stop()
        recorder.close()


@pytest.mark.parametrize("credential", ["no certificate", "another CA's certificate"])
def test_an_agent_the_broker_refuses_for_its_certificate_says_so(credential: str, default_build: Build,
                                                                 tls_broker: ManagedBroker, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Over TLS 1.3 the broker checks the client's certificate after the client's side of the handshake, so paho
    sees only a closed socket ("Unspecified error"): the agent used to retry forever without a line."""
    caplog.set_level(logging.INFO, logger="runtime_agent")
    device = provision_tls_device(tmp_path / "dev", default_build, tls_broker, tls_broker.ca_file)
    if credential == "no certificate":
        config = device / "agent.toml"
        config.write_text("\n".join(line for line in config.read_text().splitlines() if not line.startswith("client_cert")))
    else:
        ManagedBroker(tmp_path / "stranger", tls=True).issue_client_cert(device / "client.pem", "dev-1")
    prefix = f"cannot connect to the broker at {tls_broker.host}:{tls_broker.port}: "
    with running_agent(device):
        deadline = time.monotonic() + 30
        while not (lines := [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]):
            assert time.monotonic() < deadline, "no line said why the agent cannot connect"
            time.sleep(0.05)
    assert "[mqtt] client_cert in agent.toml" in lines[0] and lines[0].endswith("; retrying with backoff"), lines[0]
