"""The monitor's JSON (`toolchain.fleet.store.codec`: orjson when installed) accepts and refuses telemetry
as the device side's standard-library decoder does, and what it encodes reads back the same."""

from __future__ import annotations

import json

import numpy as np

from runtime_agent.protocol import Malformed, parse_telemetry
from runtime_agent.sketch import LatencySketch
from toolchain.fleet.store import codec


def window() -> dict:
    """A window as the agent shapes it: a latency sketch and one PSI per input feature (64)."""
    rng = np.random.default_rng(0)
    sketch = LatencySketch()
    sketch.add_many(rng.gamma(2.0, 4.0, 500))
    psi = {f"x{i}": float(value) for i, value in enumerate(rng.gamma(1.0, 0.05, 64))}
    return {"schema": "telemetry/1", "device_id": "cam-1", "seq": 7, "stream": "s1", "window": [10.0, 20.0],
            "model_version": 1, "n": 500, "requests": 500, "errors": 0, "rss_mb": 61.5,
            "latency": {**sketch.to_dict(), **sketch.summary()},
            "drift": {"psi": psi, "psi_max": max(psi.values()), "prediction_psi": 0.02, "ph_alarm": False, "n": 500,
                      "psi_over": ["x1"], "psi_sustained": [], "estimated_accuracy": 0.9}}


def variants() -> list[bytes]:
    """The window, and the ways a report's JSON can go wrong."""
    raw = json.dumps(window())
    return [raw.encode(), raw.replace('"errors": 0', '"errors": NaN').encode(),
            raw.replace('"errors": 0', '"errors": Infinity').encode(), raw.replace('"errors": 0', '"errors": 1e400').encode(),
            raw.replace('"n": 500', '"n": -1e400', 1).encode(), raw.replace('"errors": 0', f'"errors": {10 ** 30}').encode(),
            raw.replace('"errors": 0', '"errors": 0, "errors": 3').encode(), raw.encode()[:-1], b"\xff" + raw.encode(),
            b"[" * 5000 + b"]" * 5000, raw.replace('"x1"', '"x1", "x1"', 1).encode()]


def outcome(raw: bytes, decode: object) -> object:
    try:
        return parse_telemetry(raw, "cam-1", *([] if decode is None else [decode]))
    except Malformed:
        return "refused"


def test_reports_are_accepted_and_refused_alike() -> None:
    cases = variants()
    results = [(outcome(raw, codec.decode), outcome(raw, None)) for raw in cases]
    assert [fast == slow for fast, slow in results] == [True] * len(cases)
    assert results[0][0] != "refused" and [fast for fast, _ in results[1:]].count("refused") >= 7
    report = results[0][0]
    for value in (report.sketch, report.drift):
        assert json.loads(codec.encode(value)) == value
