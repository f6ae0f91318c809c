"""The MQTT doorway between the two houses: topic names, message kinds, size limits, the ack cadence, and
the validators of what devices report (DESIGN.md "MQTT topic schema", docs/push-protocol.md).

The device side owns the schema (DESIGN.md), so it lives here and the host imports it: the agent that
writes a topic and the push sender or monitor that reads it build it from the same constant, and a limit
the device enforces (chunk sizes, the ack cadence) is the one the sender checks. Standard library and
numpy only (through `runtime_agent.sketch`), like every device module.

Topics are ``edge/v1/{fleet}/{device}/{kind}``; ``fleet`` or ``device`` may be ``+`` to build a
subscription filter. Up (device -> operator): ``status`` (retained birth and LWT), ``telemetry``,
``events``, ``push/{transfer}/ack``; down: ``cmd``, ``push/{transfer}/{index}`` (one raw chunk).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from runtime_agent.drift import COVARIATE, PREDICTION
from runtime_agent.sketch import LatencySketch

TOPIC_ROOT = "edge/v1"
STATUS, TELEMETRY, EVENTS, CMD, PUSH, ACK = "status", "telemetry", "events", "cmd", "push", "ack"
REPORT_KINDS = (STATUS, TELEMETRY, EVENTS)  # what a device reports and the monitor reads
SCHEMAS = {STATUS: "status/1", TELEMETRY: "telemetry/1", EVENTS: "events/1", CMD: "cmd/1", ACK: "push-ack/1"}
ONLINE, OFFLINE = "online", "offline"
STATUS_OFFLINE = {"schema": SCHEMAS[STATUS], "state": OFFLINE}  # the LWT and a stopping agent's last word
COMMAND_TYPES = ("push_offer", "rollback", "config", "rotate_keys")
FINAL_STATES = ("installed", "rejected", "done")  # a transfer's last ack state (`done`: a benchmark job answered)

# Size limits: a push offer's chunk size (its bundle is at most `bundle.MAX_BUNDLE_BYTES`), a command, a report.
MIN_CHUNK_BYTES = 1 << 10
MAX_CHUNK_BYTES = 16 << 20
MAX_COMMAND_BYTES = 64 << 10
MAX_REPORT_BYTES = 1 << 20
# The device acks a transfer every ACK_EVERY chunks (and on every offer and state change): a sender with
# fewer chunks in flight stalls until its ack timeout.
ACK_EVERY = 16

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TEXT_MAX = 256
MAX_INT = (1 << 63) - 1  # a report's counters and sequence numbers: what a 64-bit store column holds


# -- topics --------------------------------------------------------------------------------------
def device_prefix(fleet: str, device: str) -> str:
    """``edge/v1/{fleet}/{device}/``: everything one device sends or receives is under it."""
    return f"{TOPIC_ROOT}/{fleet}/{device}/"


def device_topic(fleet: str, device: str, kind: str) -> str:
    return device_prefix(fleet, device) + kind


def chunk_topic(fleet: str, device: str, transfer: str, index: int | str) -> str:
    return device_prefix(fleet, device) + f"{PUSH}/{transfer}/{index}"


def ack_topic(fleet: str, device: str, transfer: str) -> str:
    return chunk_topic(fleet, device, transfer, ACK)


def valid_id(name: str) -> bool:
    """A fleet or device name: 1-64 letters, digits, '-' or '_' (a topic level, a username, a file name)."""
    return bool(_ID.match(name))


class Malformed(ValueError):
    """A message that does not follow the topic schema; the text says why."""


def parse_topic(name: str) -> tuple[str, str, str]:
    """``edge/v1/{fleet}/{device}/{kind}`` of a report -> (fleet, device, kind); Malformed for anything else."""
    head, _, rest = name.partition(TOPIC_ROOT + "/")
    parts = rest.split("/")
    if head or len(parts) != 3 or parts[2] not in REPORT_KINDS:
        raise Malformed(f"unexpected topic {name!r:.120}")
    fleet, device, kind = parts
    if not valid_id(fleet) or not valid_id(device):
        raise Malformed(f"fleet and device in {name!r:.120} must be 1-64 letters, digits, '-' or '_'")
    return fleet, device, kind


# -- validation of reports -----------------------------------------------------------------------
@dataclass(frozen=True)
class TelemetryReport:
    """One validated telemetry window (the sketch re-serialised after validation)."""

    seq: int
    window_start: float
    window_end: float
    model_version: int | None
    n: int
    requests: int | None
    errors: int
    rss_mb: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    sketch: dict[str, Any]
    drift: dict[str, Any]
    stream: str = ""  # the agent's outbox stream ('' from agents older than the stream id)


@dataclass(frozen=True)
class EventReport:
    seq: int
    type: str
    ts: float | None
    stream: str
    payload: dict[str, Any]


def _reject_constant(name: str) -> float:
    raise Malformed(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_json(raw: bytes) -> Any:
    """The standard library's decoder, refusing NaN and Infinity (not JSON, and not a number a report can
    carry). The host may hand the parsers a faster one that refuses the same (`toolchain.fleet.store.codec`)."""
    return _DECODER.decode(raw.decode("utf-8"))


def _json_object(raw: bytes, kind: str, decode: Callable[[bytes], Any] = decode_json) -> dict[str, Any]:
    if len(raw) > MAX_REPORT_BYTES:
        raise Malformed(f"{len(raw)} bytes, over the {MAX_REPORT_BYTES}-byte limit")
    try:
        payload = decode(raw)
    except UnicodeDecodeError:
        raise Malformed("not UTF-8") from None
    except RecursionError:
        raise Malformed("JSON nested too deeply") from None
    except ValueError as exc:
        raise Malformed(f"not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise Malformed(f"expected a JSON object, got {type(payload).__name__}")
    schema = payload.get("schema")
    if not isinstance(schema, str) or schema.split("/")[0] != kind:
        raise Malformed(f"'schema' must be '{SCHEMAS[kind]}', got {schema!r}")
    if schema != SCHEMAS[kind]:
        raise Malformed(f"unsupported schema {schema!r} (this version reads {SCHEMAS[kind]})")
    return payload


def _int(payload: Mapping[str, Any], key: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    value = payload.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Malformed(f"'{key}' must be an integer >= {minimum}, got {value!r:.80}")
    if value > MAX_INT:
        raise Malformed(f"'{key}' is over {MAX_INT}, the largest integer a report may carry")
    return value


def _number(value: Any, what: str, *, optional: bool = False, minimum: float | None = None) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise Malformed(f"'{what}' must be a finite number{bound}, got {value!r}")
    return float(value)


def _text(payload: Mapping[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > _TEXT_MAX):
        raise Malformed(f"'{key}' must be a string of at most {_TEXT_MAX} characters, got {value!r:.80}")
    return value


def _stream(payload: Mapping[str, Any]) -> str:
    """The outbox stream id next to ``seq``; ``''`` when absent (an agent older than the field)."""
    stream = payload.get("stream", "")
    if not isinstance(stream, str) or (stream and not valid_id(stream)):
        raise Malformed(f"'stream' must be 1-64 letters, digits, '-' or '_', got {stream!r:.80}")
    return stream


def _check_device(payload: Mapping[str, Any], device: str) -> None:
    if "device_id" in payload and payload["device_id"] != device:
        raise Malformed(f"'device_id' {payload['device_id']!r:.80} is not the topic's device {device!r}")


def parse_status(raw: bytes, device: str) -> dict[str, Any]:
    """A birth or an LWT -> ``{state, ...birth fields}``."""
    payload = _json_object(raw, STATUS)
    _check_device(payload, device)
    state = payload.get("state")
    if state not in (ONLINE, OFFLINE):
        raise Malformed(f"'state' must be '{ONLINE}' or '{OFFLINE}', got {state!r:.80}")
    if state == OFFLINE:
        return {"state": OFFLINE}
    return {"state": ONLINE, "model_version": _int(payload, "model_version", optional=True),
            "model_name": _text(payload, "model_name"), "agent_version": _text(payload, "agent_version"),
            "profile": _text(payload, "profile"), **_certificates(payload.get("certificates"))}


def _certificates(value: Any) -> dict[str, float | None]:
    """The birth's optional ``certificates`` (`runtime_agent.certificates`): when the device's client
    certificate and its CA expire, Unix seconds -> ``cert_not_after``, ``ca_not_after`` (None: not reported)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise Malformed(f"'certificates' must be an object, got {value!r:.80}")
    return {"cert_not_after": _number(value.get("client_not_after"), "certificates.client_not_after", optional=True, minimum=0),
            "ca_not_after": _number(value.get("ca_not_after"), "certificates.ca_not_after", optional=True, minimum=0)}


def _drift(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Malformed(f"'drift' must be an object, got {type(value).__name__}")
    if not value:
        return {}  # the agent had no model loaded
    psi = value.get("psi", {})
    if not isinstance(psi, dict):
        raise Malformed(f"'drift.psi' must be an object {{feature: value}}, got {type(psi).__name__}")
    _psi_values(psi)
    drift = dict(value)
    drift["psi_max"] = _number(value.get("psi_max", max(psi.values(), default=0.0)), "drift.psi_max", minimum=0.0)
    drift["prediction_psi"] = _number(value.get("prediction_psi", 0.0), "drift.prediction_psi", minimum=0.0)
    for flag in ("ph_alarm", "alarm", "prediction_drift"):
        if not isinstance(value.get(flag, False), bool):
            raise Malformed(f"'drift.{flag}' must be true or false, got {value.get(flag)!r:.80}")
    if "n" in value:
        _int(value, "n")
    for key in ("psi_threshold", "prediction_psi_threshold"):
        drift[key] = _number(value.get(key), f"drift.{key}", optional=True, minimum=0.0)
    accuracy = _number(value.get("estimated_accuracy"), "drift.estimated_accuracy", optional=True, minimum=0.0)
    if accuracy is not None and accuracy > 1.0:
        raise Malformed(f"'drift.estimated_accuracy' must be a share in [0, 1], got {accuracy!r}")
    drift["estimated_accuracy"] = accuracy
    if "crossings" in value:
        drift["crossings"] = _crossings(value["crossings"])
    for key in ("psi_over", "psi_sustained"):
        names = value.get(key, [])
        if not isinstance(names, list) or not set(map(type, names)) <= {str} or not psi.keys() >= set(names):
            raise Malformed(f"'drift.{key}' must be a list of feature names of 'drift.psi', got {names!r:.80}")
    return drift


def _psi_values(psi: dict[str, Any]) -> None:
    """Every ``drift.psi`` value a finite number >= 0 under a name of at most _TEXT_MAX characters.

    Why two ways: a window carries one PSI per input feature (64 and more), and checking each value on
    its own was a quarter of the monitor's cost per message. What an agent sends (floats, all finite
    and >= 0) passes the checks on the whole set at once: all floats, none below 0, and a finite sum
    (a NaN or an infinity makes it NaN or infinite; a sum that overflows only sends a valid set the slow
    way); anything else is checked value by value, which names the first bad one."""
    values = psi.values()
    if set(map(type, values)) <= {float} and min(values, default=0.0) >= 0.0 \
            and math.isfinite(sum(values)) and max(map(len, psi), default=0) <= _TEXT_MAX:
        return
    for feature, number in psi.items():
        if len(feature) > _TEXT_MAX:
            raise Malformed(f"'drift.psi' feature name is over {_TEXT_MAX} characters")
        _number(number, f"drift.psi.{feature}", minimum=0.0)


def _crossings(value: Any) -> list[dict[str, Any]]:
    """`drift.crossings`: what crossed which threshold (`runtime_agent.drift.crossings`)."""
    if not isinstance(value, list) or len(value) > 8:
        raise Malformed(f"'drift.crossings' must be a list of at most 8 objects, got {value!r:.80}")
    checked = []
    for i, crossing in enumerate(value):
        if not isinstance(crossing, dict) or crossing.get("kind") not in (COVARIATE, PREDICTION):
            raise Malformed(f"'drift.crossings[{i}]' must be an object with kind {COVARIATE!r} or {PREDICTION!r}, "
                            f"got {crossing!r:.80}")
        checked.append({"kind": crossing["kind"], "statistic": _text(crossing, "statistic") or "",
                        "value": _number(crossing.get("value"), f"drift.crossings[{i}].value"),
                        "threshold": _number(crossing.get("threshold"), f"drift.crossings[{i}].threshold")})
    return checked


def parse_telemetry(raw: bytes, device: str, decode: Callable[[bytes], Any] = decode_json) -> TelemetryReport:
    """A telemetry window, every field checked (the latency sketch must add up). ``decode``: bytes -> the
    JSON value, raising ValueError (or UnicodeDecodeError) for what is not JSON, NaN and Infinity included."""
    payload = _json_object(raw, TELEMETRY, decode)
    _check_device(payload, device)
    seq = _int(payload, "seq", minimum=1)
    window = payload.get("window")
    if not isinstance(window, list) or len(window) != 2:
        raise Malformed(f"'window' must be [start, end], got {window!r:.80}")
    start, end = _number(window[0], "window[0]"), _number(window[1], "window[1]")
    if end < start:
        raise Malformed(f"'window' ends before it starts ({start} > {end})")
    latency = payload.get("latency")
    if not isinstance(latency, dict):
        raise Malformed(f"'latency' must be an object (the sketch), got {type(latency).__name__}")
    try:
        sketch = LatencySketch.from_dict(latency)
    except (ValueError, TypeError) as exc:
        raise Malformed(f"'latency': {exc}") from None
    for key in ("sum", "min", "max"):
        _number(latency.get(key), f"latency.{key}", optional=True)
    summary = sketch.summary()
    quantiles = {key: _number(latency.get(key, summary[key]), f"latency.{key}", optional=True, minimum=0.0)
                 for key in ("p50", "p90", "p99")}
    drift = _drift(payload.get("drift"))
    n = _int(payload, "n")
    return TelemetryReport(
        seq=seq, window_start=start, window_end=end, model_version=_int(payload, "model_version", optional=True),
        n=n, requests=_int(payload, "requests", optional=True), errors=_int(payload, "errors"),
        rss_mb=_number(payload.get("rss_mb"), "rss_mb", optional=True, minimum=0.0), **quantiles,
        sketch=sketch.to_dict(), drift=drift, stream=_stream(payload))


def parse_event(raw: bytes, device: str) -> EventReport:
    """An event: ``seq``, a ``type`` name, an optional ``ts``, its stream, and the whole payload."""
    payload = _json_object(raw, EVENTS)
    _check_device(payload, device)
    seq = _int(payload, "seq", minimum=1)
    stream = _stream(payload)
    kind = payload.get("type")
    if not isinstance(kind, str) or not _EVENT_TYPE.match(kind):
        raise Malformed(f"'type' must be a name of 1-64 letters, digits, '_', '-' or '.', got {kind!r:.80}")
    return EventReport(seq=seq, type=kind, ts=_number(payload.get("ts"), "ts", optional=True), stream=stream,
                       payload=payload)
