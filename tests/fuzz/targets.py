"""Fuzz targets: every parser that takes bytes from outside, each fed what the outside could send.

A target is a function of one byte string that runs the real parser on it and lets through only the
parser's documented clear error (`BundleError`, `AgentError`, `Malformed`, `ConfigError`,
`TargetError`, `RequestError`): any other exception is a crash. The same targets serve the atheris
driver (`tests/fuzz/run.py`, coverage-guided, run by `scripts/fuzz.sh`) and the suite, which replays
every seed and every crash input found so far (`tests/fuzz/regressions/TARGET/`) through them.

Seeds are valid messages (a signed bundle, a real telemetry window, a push offer, ...) so mutation
starts from inside the parsers. State that is expensive to build (a key, a loaded model, an agent on a
device folder) is built once per process by `setup`, deterministically (fixed keys and seeds).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
from contextlib import suppress
import struct
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtime_agent.errors import AgentError

if "EDGE_FUZZ_WORK" in os.environ:  # a fuzz run's scratch folder (tests/fuzz/run.py); libFuzzer exits past atexit
    WORK = Path(os.environ["EDGE_FUZZ_WORK"])
else:
    WORK = Path(tempfile.mkdtemp(prefix="edge-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    atexit.register(shutil.rmtree, WORK, True)
SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # a fixed key: seeds and crashes replay alike


@dataclass(frozen=True)
class Target:
    """`run(data)` parses `data`; `seeds()` are valid inputs; `modules` are instrumented for coverage."""

    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    modules: tuple[str, ...]


def _file(name: str, data: bytes) -> Path:
    path = WORK / name
    path.write_bytes(data)
    return path


# -- bundles and manifests ---------------------------------------------------------------------------
@cache
def _tiny_bundle() -> Path:
    """A real one-input classifier bundle (onnx.helper model, real reference; its own key)."""
    from tests.agent.test_multi_io import old_style_bundle

    return old_style_bundle(WORK / "bundle").bundle


def _signed_members(body: bytes) -> dict[str, bytes]:
    return {"manifest.json": body, "manifest.sig": SIGNER.sign(body)}


def _tar(members: dict[str, bytes]) -> bytes:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@cache
def _seed_bundle() -> tuple[bytes, dict[str, bytes]]:
    """The tiny bundle re-signed by SIGNER: its bytes and its members."""
    import tarfile

    with tarfile.open(_tiny_bundle()) as tar:
        members = {info.name: tar.extractfile(info).read() for info in tar.getmembers()}
    manifest = json.loads(members["manifest.json"])
    manifest["key_id"] = _signer_id()
    from runtime_agent.bundle import manifest_bytes

    body = manifest_bytes(manifest)
    members = {**members, **_signed_members(body)}
    return _tar(members), members


def _signer_id() -> str:
    from runtime_agent.signing import key_id

    return key_id(SIGNER.public_key())


def bundle_bytes(data: bytes) -> None:
    """A whole `.bundle` file as a device receives it, verified against the trusted key."""
    from runtime_agent.bundle import read_bundle
    from runtime_agent.errors import BundleError

    with suppress(BundleError):
        read_bundle(_file("fuzz.bundle", data), SIGNER.public_key())


def manifest(data: bytes) -> None:
    """A manifest body signed by a trusted key (a build with a bug, or a leaked key): the bundle reader
    and the model loader must still answer with a reason, never crash."""
    from runtime_agent.bundle import read_bundle
    from runtime_agent.errors import BundleError
    from runtime_agent.model import LoadedModel

    _, members = _seed_bundle()
    members = {**members, **_signed_members(data)}
    with suppress(BundleError):
        bundle = read_bundle(_file("manifest.bundle", _tar(members)), SIGNER.public_key())
        LoadedModel.from_bundle(bundle)


def _manifest_seeds() -> list[bytes]:
    return [_seed_bundle()[1]["manifest.json"]]


def public_key(data: bytes) -> None:
    """A device's trusted key file (PEM)."""
    from runtime_agent.errors import BundleError
    from runtime_agent.signing import load_public_key

    with suppress(BundleError):
        load_public_key(_file("trusted.pub", data))


def _public_key_seeds() -> list[bytes]:
    return [SIGNER.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)]


# -- push offers, chunks and acks ----------------------------------------------------------------------
def _offer(size: int = 3000, chunk: int = 1024, transfer: str = "00112233aabbccdd") -> dict[str, Any]:
    import hashlib

    return {"schema": "cmd/1", "id": "offer-1", "type": "push_offer", "transfer": transfer, "bytes": size,
            "sha256": hashlib.sha256(bytes(size)).hexdigest(), "chunk_bytes": chunk, "chunks": -(-size // chunk),
            "version": 2}


def push(data: bytes) -> None:
    """A device's push receiver fed a stream of messages: a JSON offer, then chunks (`index`, bytes),
    then the same transfer resumed by a new receiver on the same staging folder (an agent restart)."""
    from runtime_agent.push_receiver import PushReceiver

    offer, _, rest = data.partition(b"\n")
    staging = WORK / "staging"
    receiver = PushReceiver(staging, lambda transfer, ack: json.dumps(ack), lambda item, path: None, ack_every=2)
    try:
        command = json.loads(offer)
    except (ValueError, RecursionError):
        return
    if not isinstance(command, dict):
        return
    try:
        item = receiver.offer(command)
    except AgentError:
        return
    while len(rest) >= 4:
        (index,), rest = struct.unpack("<i", rest[:4]), rest[4:]
        size = rest[0] << 4 if rest else 0
        receiver.chunk(item.transfer, index, rest[1:1 + size])
        rest = rest[1 + size:]
    PushReceiver(staging, lambda transfer, ack: json.dumps(ack), lambda item, path: None).offer(command)


def _push_seeds() -> list[bytes]:
    chunk = struct.pack("<i", 1) + bytes([64]) + bytes(1024)
    last = struct.pack("<i", 2) + bytes([952 >> 4]) + bytes(952)
    return [json.dumps(_offer()).encode() + b"\n" + chunk + last]


@cache
def _sender():
    from toolchain.deploy.push.transfer import PushSender

    return PushSender(_file("sender.bundle", _seed_bundle()[0]), "dev-1", "lab", broker="mqtt://127.0.0.1:1",
                      pubkey=SIGNER.public_key(), chunk_kb=1)


def push_ack(data: bytes) -> None:
    """What the push sender reads from a device: acks, events and status (anyone on the broker may send)."""
    sender = _sender()
    topic = (sender.ack_topic, sender.filters[1], sender.filters[2])[data[0] % 3] if data else sender.ack_topic
    sender._reset_state()
    sender.on_message(topic, data[1:], False)


def _push_ack_seeds() -> list[bytes]:
    ack = {"schema": "push-ack/1", "transfer": _sender().transfer, "offer": "o", "received": [[0, 3], [5, 5]],
           "chunks": 9, "state": "receiving", "version": 2}
    event = {"type": "installed", "transfer": _sender().transfer, "ts": 1.0}
    return [b"\x00" + json.dumps(ack).encode(), b"\x01" + json.dumps(event).encode(),
            b"\x02" + json.dumps({"schema": "status/1", "state": "online", "model_version": 1}).encode()]


# -- commands --------------------------------------------------------------------------------------------
@cache
def _agent():
    """A real agent on a provisioned device folder (no network: commands are handed to it directly)."""
    from runtime_agent.agent import Agent
    from runtime_agent.config import load_agent_config

    device = WORK / "device"
    device.mkdir()
    bundle = Path(_file("device/current.bundle", _seed_bundle()[0]))
    _file("device/trusted.pub", _public_key_seeds()[0])
    (device / "agent.toml").write_text('device_id = "dev-1"\nfleet = "lab"\nbroker = "mqtt://127.0.0.1:1"\n'
                                       f'model = {{ bundle = "{bundle.name}", pubkey = "trusted.pub" }}\n')
    agent = Agent(load_agent_config(device))
    agent.load()
    return agent


def command(data: bytes) -> None:
    """An MQTT `cmd` message as the agent parses and applies it."""
    agent = _agent()
    with suppress(AgentError):
        agent._apply(agent._parse_command(data))


def _command_seeds() -> list[bytes]:
    from runtime_agent.keyring import sign_rotation

    second, third = (Ed25519PrivateKey.from_private_bytes(bytes(range(n, n + 32))) for n in (32, 64))
    chain = [sign_rotation(SIGNER, 1, [second.public_key()], {}, "2026-12-05T00:00:00+00:00"),
             sign_rotation(second, 2, [third.public_key()], {_signer_id(): "fuzz"}, "2026-12-05T00:00:00+00:00")]
    return [json.dumps(c).encode() for c in (
        {"schema": "cmd/1", "id": "c1", "type": "config", "telemetry": {"window_s": 5}},
        {"schema": "cmd/1", "id": "c2", "type": "rollback"},
        {"schema": "cmd/1", "id": "c3", "type": "rotate_keys", "rotations": chain},
        _offer())]


# -- KServe REST -----------------------------------------------------------------------------------------
@cache
def _two_input_model():
    from runtime_agent.bundle import read_bundle
    from runtime_agent.model import LoadedModel
    from tests.agent.test_multi_io import two_input_bundle
    from runtime_agent.signing import load_public_key

    build = two_input_bundle(WORK / "two-input")
    return LoadedModel.from_bundle(read_bundle(build.bundle, load_public_key(build.pubkey)), threads=1)


def rest_infer(data: bytes) -> None:
    """A `POST .../infer` body, decoded as the server does, then validated and run by the model: JSON, or
    with the binary tensor extension a JSON header and the raw tensors after it (here after two NULs)."""
    from runtime_agent.server import BODY_ERRORS, decode_inputs, encode_outputs

    model = _two_input_model()
    header, _, binary = data.partition(b"\0\0")
    try:
        request = json.loads(header)
    except BODY_ERRORS:  # the server's 400 "not valid JSON"
        return
    with suppress(AgentError):  # RequestError, or the model's input validation (InputError): dtype, shape, NaN
        prediction = model.predict(decode_inputs(request, model, binary))
        encode_outputs(prediction, request.get("outputs"), binary_output=bool(binary), chunks=[])


def _rest_seeds() -> list[bytes]:
    request = {"id": "r1", "inputs": [
        {"name": "features", "shape": [2, 4], "datatype": "FP32", "data": [0.5, 1, 2, 3, 4, 5, 6, 7]},
        {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": [1, 2, 3, 4, 5, 6]}],
        "outputs": [{"name": "score"}, {"name": "class"}]}
    binary = {"inputs": [
        {"name": "features", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
        {"name": "ids", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": 24}}],
        "outputs": [{"name": "total", "parameters": {"binary_data": True}}]}
    raw = np.arange(4, dtype=np.float32).tobytes() + np.arange(3, dtype=np.int64).tobytes()
    return [json.dumps(request).encode(), json.dumps(binary).encode() + b"\0\0" + raw]


# -- KServe gRPC -----------------------------------------------------------------------------------------
def grpc_infer(data: bytes) -> None:
    """A `ModelInfer` request's protobuf bytes, parsed as grpc does, decoded, run and answered as the agent does."""
    from google.protobuf.message import DecodeError

    from runtime_agent.grpc_server import decode_request, encode_response
    from runtime_agent.kserve_grpc import grpc_predict_v2_pb2 as pb

    model = _two_input_model()
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:  # grpc answers INTERNAL before the servicer runs
        return
    with suppress(AgentError):  # RequestError, or the model's input validation (InputError)
        encode_response(model.predict(decode_request(request, model)), request, model)


def _grpc_seeds() -> list[bytes]:
    from runtime_agent.kserve_grpc import grpc_predict_v2_pb2 as pb

    typed = pb.ModelInferRequest(model_name="m", id="r1")
    typed.inputs.add(name="features", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(range(8))
    typed.inputs.add(name="ids", datatype="INT64", shape=[2, 3]).contents.int64_contents.extend(range(6))
    typed.outputs.add(name="score")
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    raw.inputs.add(name="ids", datatype="INT64", shape=[1, 3])
    raw.raw_input_contents.extend([np.arange(4, dtype=np.float32).tobytes(), np.arange(3, dtype=np.int64).tobytes()])
    return [typed.SerializeToString(), raw.SerializeToString()]


# -- the fleet monitor -------------------------------------------------------------------------------------
@cache
def _monitor():
    from toolchain.fleet.monitor import FleetMonitor

    return FleetMonitor("mqtt://127.0.0.1:1", WORK / "fleet.sqlite")


def monitor(data: bytes) -> None:
    """A report as the monitor stores it: the topic up to the first NUL byte, then the payload."""
    from runtime_agent.protocol import Malformed

    topic, _, payload = data.partition(b"\x00")
    fleet_monitor = _monitor()
    with fleet_monitor.store.batch(), suppress(Malformed):
        fleet_monitor._handle(topic.decode("utf-8", "replace"), payload, bool(len(payload) % 2))


def _monitor_seeds() -> list[bytes]:
    from runtime_agent.sketch import LatencySketch

    sketch = LatencySketch()
    sketch.add_many([1.0, 2.5, 40.0])
    telemetry = {"schema": "telemetry/1", "device_id": "d1", "seq": 3, "stream": "s1", "window": [10.0, 20.0],
                 "model_version": 2, "n": 3, "requests": 3, "errors": 0, "rss_mb": 50.0,
                 "latency": {**sketch.to_dict(), **sketch.summary()},
                 "drift": {"psi": {"f0": 0.1}, "psi_max": 0.1, "prediction_psi": 0.02, "ph_alarm": False, "n": 3}}
    status = {"schema": "status/1", "state": "online", "device_id": "d1", "model_version": 2, "model_name": "m"}
    event = {"schema": "events/1", "seq": 4, "stream": "s1", "type": "rollback", "ts": 12.0, "reason": "r"}
    return [f"edge/v1/lab/d1/{kind}".encode() + b"\x00" + json.dumps(body).encode()
            for kind, body in (("telemetry", telemetry), ("status", status), ("events", event))]


# -- build config and profiles -----------------------------------------------------------------------------
def build_config(data: bytes) -> None:
    """A `toolchain.toml` as `toolchain build --config` reads it."""
    from toolchain.core.config import load_config
    from toolchain.errors import ConfigError

    with suppress(ConfigError):
        load_config(_file("toolchain.toml", data))


def _config_seeds() -> list[bytes]:
    from toolchain.core.config import DEFAULT_CONFIG

    return [DEFAULT_CONFIG.read_bytes()]


def profile(data: bytes) -> None:
    """A target profile TOML (`--target file.toml`); `measured = true` is left out: it times this host."""
    from toolchain.errors import TargetError
    from toolchain.targets.profiles import _read_toml, profile_from_dict

    path = _file("profile.toml", data)
    with suppress(TargetError):
        profile_from_dict(_read_toml(path), str(path), path)


def _profile_seeds() -> list[bytes]:
    from toolchain.targets.profiles import builtin_profile_paths

    return [path.read_bytes() for path in builtin_profile_paths().values()]


TARGETS: dict[str, Target] = {
    "bundle": Target(bundle_bytes, lambda: [_seed_bundle()[0]], ("runtime_agent.bundle", "runtime_agent.signing")),
    "manifest": Target(manifest, _manifest_seeds, ("runtime_agent.bundle", "runtime_agent.model")),
    "pubkey": Target(public_key, _public_key_seeds, ("runtime_agent.signing",)),
    "push": Target(push, _push_seeds, ("runtime_agent.push_receiver",)),
    "push_ack": Target(push_ack, _push_ack_seeds, ("toolchain.deploy.push.transfer",)),
    "command": Target(command, _command_seeds, ("runtime_agent.agent", "runtime_agent.push_receiver", "runtime_agent.keyring")),
    "rest": Target(rest_infer, _rest_seeds, ("runtime_agent.server", "runtime_agent.model")),
    "grpc": Target(grpc_infer, _grpc_seeds, ("runtime_agent.grpc_server", "runtime_agent.server", "runtime_agent.model")),
    "monitor": Target(monitor, _monitor_seeds, ("runtime_agent.protocol", "runtime_agent.sketch", "toolchain.fleet.monitor",
                                                "toolchain.fleet.store.writes")),
    "config": Target(build_config, _config_seeds, ("toolchain.core.config",)),
    "profile": Target(profile, _profile_seeds, ("toolchain.targets.profiles",)),
}
