"""JSON on the monitor's hot path: orjson when it is installed (the ``postgres`` extra brings it), else
the standard library.

Why: decoding a telemetry window (~3 KB: a latency sketch and one PSI per input feature) and encoding its
sketch and drift report for the store were two thirds of a monitor worker's CPU per message with the
standard library (38 + 46 us); orjson does both in ~11 us. Both refuse what is not JSON, NaN and
Infinity included (`runtime_agent.protocol.decode_json`), so a report is accepted or refused alike
(tests/fleet/test_fleet_codec.py); a refusal's wording differs (orjson's "not JSON (...)" for invalid
UTF-8, nesting or a number past a double's range), and orjson also refuses a lone UTF-16 surrogate
escape (``"\ud800"``: not text), which the standard library lets through. Encoded text is compact JSON
either way, and the store's readers decode it as any JSON.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from runtime_agent.protocol import decode_json

try:
    import orjson
except ImportError:  # the standard library's, ~5x slower per window
    orjson = None

_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _orjson_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


decode: Callable[[bytes], Any] = orjson.loads if orjson is not None else decode_json
"""bytes -> the JSON value; ValueError (UnicodeDecodeError included) for what is not JSON."""
encode: Callable[[Any], str] = _orjson_dumps if orjson is not None else _ENCODER.encode
"""A JSON value -> compact JSON text."""
