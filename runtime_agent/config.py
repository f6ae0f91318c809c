"""`DIR/agent.toml`: what one device is, where it reports, and how it serves.

Validated with the standard library only (the device has no pydantic). Every error names the key and
what was expected; paths are relative to the device folder so a provisioned folder can be moved.

```toml
device_id = "cam-17"                # [A-Za-z0-9_-], also the MQTT client id and username by default
fleet = "factory-a"
broker = "mqtt://127.0.0.1:1883"     # or mqtts://host:8883 (TLS)
mqtt = { username = "cam-17", password_file = "mqtt.password", ca_file = "ca.pem", keepalive_s = 30 }
# mqtt.client_cert = "client.pem": certificate + key (one PEM) the agent presents to a broker that requires one
serve = { host = "127.0.0.1", port = 8080, threads = 0 }   # threads: onnxruntime intra-op, 0 = one per core
# serve.spin_us = 1000: how long onnxruntime's threads spin for more work before sleeping (0: never; -1: its
#                       own policy, ~40 ms after every run: a busy core at low request rates)
# serve.grpc_port = 8081: also KServe v2 over gRPC on that port (needs grpcio and protobuf: the agent-grpc extra)
# serve: max_body_bytes = 33554432, header_timeout_s = 10, body_timeout_s = 60, idle_timeout_s = 30,
#        max_connections = 64: the REST listener's limits (runtime_agent.http_limits)
telemetry = { window_s = 10 }
model = { bundle = "current.bundle", pubkey = "trusted.pub", keyring = "trusted" }  # keys that may sign bundles
queue = { path = "outbox.sqlite", max_messages = 10000 }
probation = { requests = 500, seconds = 60, max_latency_ratio = 2.0, max_error_rate_increase = 0.05, max_prediction_psi = 0.25 }
```
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from runtime_agent.errors import AgentError
from runtime_agent.http_limits import Limits
from runtime_agent.probation import ProbationLimits
from runtime_agent.protocol import device_prefix

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# How long (microseconds) onnxruntime's intra-op threads look for more work before they sleep: `[serve] spin_us`
# unless set (runtime_agent.model.open_session applies it). onnxruntime's own policy spins ~40 ms after every
# run, so at 20 paced requests/s one pool thread burns ~80% of a core doing nothing (benchmarks/serving_cpu.py).
# 1 ms still covers the gaps between the ops of one run and between back-to-back requests, and lets the
# threads sleep between paced ones.
SPIN_US = 1000
_SECTIONS = {"mqtt": {"username", "password", "password_file", "ca_file", "client_cert", "keepalive_s"},
             "serve": {"host", "port", "grpc_port", "threads", "spin_us", "max_body_bytes", "header_timeout_s", "body_timeout_s",
                       "idle_timeout_s", "max_connections"}, "telemetry": {"window_s"}, "model": {"bundle", "pubkey", "keyring"},
             "queue": {"path", "max_messages"},
             "probation": {"requests", "seconds", "max_latency_ratio", "max_error_rate_increase", "max_prediction_psi"}}
_TOP = {"device_id", "fleet", "broker", *_SECTIONS}


@dataclass(frozen=True)
class AgentConfig:
    device_dir: Path
    device_id: str
    fleet: str
    broker_host: str
    broker_port: int
    tls: bool
    username: str | None
    password: str | None
    ca_file: Path | None
    client_cert: Path | None  # mutual TLS: the device's certificate and key in one PEM
    keepalive_s: int
    serve_host: str
    serve_port: int
    grpc_port: int | None
    serve_threads: int
    serve_spin_us: int  # runtime_agent.model.open_session's spin_us
    serve_limits: Limits
    window_s: float
    bundle_path: Path
    pubkey_path: Path  # the single trusted key of older device folders: read as part of the keyring
    keyring_path: Path  # trusted/: one KEYID.pub per key and the rotation state (runtime_agent.keyring)
    queue_path: Path
    queue_max_messages: int
    probation: ProbationLimits

    @property
    def topic_prefix(self) -> str:
        return device_prefix(self.fleet, self.device_id)

    def topic(self, name: str) -> str:
        return self.topic_prefix + name


class _Reader:
    """Typed access to one TOML table, with errors that name the file and key."""

    def __init__(self, table: dict[str, Any], where: str) -> None:
        self.table, self.where = table, where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., check=None, expected: str = "") -> Any:
        if key not in self.table:
            if default is ...:
                raise AgentError(f"{self.where}: required key '{key}' is missing")
            return default
        value = self.table[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or (check and not check(value)):
            name = expected or (kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind))
            raise AgentError(f"{self.where}: '{key}' must be {name}, got {value!r}")
        return value


def _table(raw: dict[str, Any], name: str, path: Path) -> _Reader:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise AgentError(f"{path}: [{name}] must be a table")
    if unknown := sorted(set(table) - _SECTIONS[name]):
        raise AgentError(f"{path}: [{name}] unknown key(s) {unknown} (known: {', '.join(sorted(_SECTIONS[name]))})")
    return _Reader(table, f"{path} [{name}]")


def parse_broker(url: str, where: str) -> tuple[str, int, bool]:
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise AgentError(f"{where}: 'broker' must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


def load_agent_config(device_dir: Path) -> AgentConfig:
    device_dir = Path(device_dir).resolve()
    path = device_dir / "agent.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise AgentError(f"{path} does not exist; provision the device with `toolchain flash` or write agent.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise AgentError(f"{path}: not valid TOML ({exc})") from None
    if unknown := sorted(set(raw) - _TOP):
        raise AgentError(f"{path}: unknown key(s) {unknown} (known: {', '.join(sorted(_TOP))})")
    top = _Reader(raw, str(path))
    ident = top.get("device_id", str, check=_ID.match, expected="1-64 letters, digits, '-' or '_'")
    fleet = top.get("fleet", str, "default", check=_ID.match, expected="1-64 letters, digits, '-' or '_'")
    host, port, tls = parse_broker(top.get("broker", str), str(path))
    mqtt, serve, telemetry = _table(raw, "mqtt", path), _table(raw, "serve", path), _table(raw, "telemetry", path)
    model, queue, probation = _table(raw, "model", path), _table(raw, "queue", path), _table(raw, "probation", path)
    password = mqtt.get("password", str, None)
    if (password_file := mqtt.get("password_file", str, None)) is not None:
        try:
            password = (device_dir / password_file).read_text().strip()
        except OSError as exc:
            raise AgentError(f"{path} [mqtt] password_file: cannot read {device_dir / password_file} ({exc.strerror})") from None
    ca_file = mqtt.get("ca_file", str, None)
    if ca_file is not None and not (device_dir / ca_file).is_file():
        raise AgentError(f"{path} [mqtt] ca_file: {device_dir / ca_file} does not exist (the broker's CA certificate, PEM)")
    client_cert = mqtt.get("client_cert", str, None)
    if client_cert is not None and not (device_dir / client_cert).is_file():
        raise AgentError(f"{path} [mqtt] client_cert: {device_dir / client_cert} does not exist (the device's "
                         "certificate and key, PEM; `toolchain flash --broker-dir` writes client.pem)")
    if client_cert is not None and not tls:
        raise AgentError(f"{path} [mqtt] client_cert needs an mqtts:// broker")
    serve_port = serve.get("port", int, 8080, check=lambda v: 0 <= v <= 65535, expected="a port 0..65535")
    grpc_port = serve.get("grpc_port", int, None, check=lambda v: 1 <= v <= 65535, expected="a port 1..65535")
    if grpc_port == serve_port:
        raise AgentError(f"{path} [serve] grpc_port {grpc_port} is also the REST port; give gRPC a port of its own")
    return AgentConfig(
        device_dir=device_dir, device_id=ident, fleet=fleet, broker_host=host, broker_port=port, tls=tls,
        username=mqtt.get("username", str, ident if password else None), password=password,
        ca_file=device_dir / ca_file if ca_file else None,
        client_cert=device_dir / client_cert if client_cert else None,
        keepalive_s=mqtt.get("keepalive_s", int, 30, check=lambda v: 5 <= v <= 3600, expected="an integer 5..3600"),
        serve_host=serve.get("host", str, "127.0.0.1"),
        serve_port=serve_port, grpc_port=grpc_port,
        serve_threads=serve.get("threads", int, 0, check=lambda v: 0 <= v <= 256,
                                expected="an integer 0..256 (0: onnxruntime's choice, one per core)"),
        serve_spin_us=serve.get("spin_us", int, SPIN_US, check=lambda v: -1 <= v <= 1_000_000,
                                expected="microseconds 0..1000000, or -1 for onnxruntime's own policy"),
        serve_limits=Limits(
            max_body_bytes=serve.get("max_body_bytes", int, Limits.max_body_bytes, check=lambda v: v >= 1024, expected="bytes >= 1024"),
            **{key: float(serve.get(key, (int, float), getattr(Limits, key), check=lambda v: v > 0, expected="seconds > 0"))
               for key in ("header_timeout_s", "body_timeout_s", "idle_timeout_s")},
            max_connections=serve.get("max_connections", int, Limits.max_connections, check=lambda v: v >= 1,
                                      expected="an integer >= 1"),
        ),
        window_s=float(telemetry.get("window_s", (int, float), 10, check=lambda v: 0.05 <= v <= 86400,
                                     expected="seconds between 0.05 and 86400")),
        bundle_path=device_dir / model.get("bundle", str, "current.bundle"),
        pubkey_path=device_dir / model.get("pubkey", str, "trusted.pub"),
        keyring_path=device_dir / model.get("keyring", str, "trusted"),
        queue_path=device_dir / queue.get("path", str, "outbox.sqlite"),
        queue_max_messages=queue.get("max_messages", int, 10_000, check=lambda v: v >= 10, expected="an integer >= 10"),
        probation=ProbationLimits(
            requests=probation.get("requests", int, 500, check=lambda v: v >= 1, expected="an integer >= 1"),
            seconds=float(probation.get("seconds", (int, float), 60, check=lambda v: v > 0, expected="seconds > 0")),
            max_latency_ratio=float(probation.get("max_latency_ratio", (int, float), 2.0, check=lambda v: v >= 1, expected="a ratio >= 1")),
            max_error_rate_increase=float(probation.get("max_error_rate_increase", (int, float), 0.05,
                                                        check=lambda v: 0 <= v <= 1, expected="a fraction 0..1")),
            max_prediction_psi=float(probation.get("max_prediction_psi", (int, float), 0.25, check=lambda v: v > 0, expected="a PSI > 0")),
        ),
    )
