"""Local REST endpoint speaking the KServe v2 / Open Inference Protocol, and the protocol's tensor
encoding that the gRPC endpoint (runtime_agent.grpc_server) shares.

Standard clients of that protocol (Triton's and KServe's HTTP clients) work unchanged:
`GET /v2/health/live|ready`, `GET /v2`, `GET /v2/models/{name}[/versions/{v}]`,
`GET /v2/models/{name}/ready`, `POST /v2/models/{name}[/versions/{v}]/infer`, and `GET /metrics`
(Prometheus text, runtime_agent.metrics). Tensors travel as JSON `data` or, with the binary tensor
extension (Triton's HTTP client's default), as raw bytes after the JSON header, whose size the
`Inference-Header-Content-Length` header gives; an output asked for with `binary_data` (or all of them
with the request's `binary_data_output`) comes back the same way. A body may come gzip- or
deflate-compressed (`Content-Encoding`); answers are not compressed. Bad requests get a 400 with
`{"error": reason}` and the server keeps serving. The standard library's threading HTTP server is
enough for a board's local clients and adds no dependency.

Every model input is sent by name (all of them, once each); the answer holds every model output by
name, and for a classifier also `class` and `label` (a client may ask for a subset with `outputs`).
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
import time
import zlib
from functools import partial
from http import HTTPStatus
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from runtime_agent import __version__
from runtime_agent.errors import AgentError
from runtime_agent.http_limits import Limits, LimitedHandler, LimitedServer
from runtime_agent.metrics import CONTENT_TYPE, ServingMetrics
from runtime_agent.model import CLASSIFICATION, LoadedModel, Prediction
from runtime_agent.reference import Features

MAX_BODY_BYTES = Limits.max_body_bytes
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension: the JSON header's size
BODY_ERRORS = (ValueError, RecursionError)  # what json.loads raises for a body that is not JSON: a 400
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
             "INT16": np.int16, "INT8": np.int8, "UINT64": np.uint64, "UINT32": np.uint32, "UINT16": np.uint16,
             "UINT8": np.uint8, "BOOL": np.bool_}  # every numeric datatype of the protocol: a model may output any
DATATYPE_OF = {np.dtype(v): k for k, v in DATATYPES.items()}
_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$")


class Servable(Protocol):
    """What the servers need from the agent: the current model, a recorded inference, and (for
    `/metrics`) the agent's state."""

    @property
    def model(self) -> LoadedModel | None: ...

    def infer(self, batch: Features) -> Prediction: ...

    def metrics_state(self) -> dict[str, Any]: ...


class RequestError(AgentError):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    manifest = model.bundle.manifest
    classifier = [{"name": "class", "datatype": "INT64", "shape": [-1]}, {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    return {
        "name": manifest["name"], "versions": [str(manifest["version"])], "platform": "onnxruntime_onnx",
        "inputs": [{"name": spec.name, "datatype": DATATYPE_OF[spec.dtype], "shape": [-1, *spec.shape]} for spec in model.inputs],
        "outputs": [{"name": spec.name, "datatype": DATATYPE_OF[spec.dtype], "shape": [-1, *spec.shape]} for spec in model.outputs]
        + (classifier if model.task == CLASSIFICATION else []),
    }


def _datatype(datatype: Any) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(f"unsupported datatype {datatype!r:.80}; use one of {', '.join(DATATYPES)}")
    return np.dtype(DATATYPES[datatype])


def _shape(shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"'shape' must be a list of non-negative integers, got {shape!r:.80}")
    if math.prod(d for d in shape if d) > MAX_BODY_BYTES:  # no request carries more values (numpy would overflow)
        raise RequestError(f"'shape' {shape!r:.80} holds more values than a request can carry")
    return shape


def array_from_values(datatype: Any, shape: Any, values: Any, field: str = "'data'") -> np.ndarray:
    """A tensor sent as a flat list of values (JSON `data`, gRPC `contents`), as an array of its datatype and shape."""
    dtype, shape = _datatype(datatype), _shape(shape)
    try:
        with np.errstate(over="ignore"):  # 1e39 as FP32 is inf, refused by validation: no RuntimeWarning in the log
            array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RequestError(f"{field} does not hold {datatype} values ({exc})") from None
    if array.size != int(np.prod(shape)):
        raise RequestError(f"{field} has {array.size} values but 'shape' {shape} needs {int(np.prod(shape))}")
    return array.reshape(shape)


def array_from_bytes(datatype: Any, shape: Any, raw: bytes, field: str) -> np.ndarray:
    """A tensor sent as raw little-endian row-major bytes (REST binary data, gRPC `raw_input_contents`)."""
    dtype, shape = _datatype(datatype), _shape(shape)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise RequestError(f"{field} is {len(raw)} bytes but {datatype} 'shape' {shape} needs {expected}")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return array if array.flags.aligned else array.copy()  # a slice of a request body may start anywhere


def collect_inputs(tensors: Iterable[tuple[Any, Callable[[], np.ndarray]]], model: LoadedModel) -> Features:
    """The request's tensors, given as (name, decode) in request order: an array for a one-input model, a
    dict by input name for several. Every input of the model must be there exactly once (a name is checked
    before its tensor is decoded); dtypes and shapes are `LoadedModel.validate`'s."""
    names = [spec.name for spec in model.inputs]
    expected = _expected_inputs(names)
    arrays: dict[str, np.ndarray] = {}
    for name, decode in tensors:
        if name not in names:
            raise RequestError(f"unknown input {name!r}; {expected}")
        if name in arrays:
            raise RequestError(f"input {name!r} is sent twice; send each input once")
        arrays[name] = decode()
    if missing := [name for name in names if name not in arrays]:
        raise RequestError(f"missing input(s) {', '.join(map(repr, missing))}; {expected}")
    return arrays[names[0]] if len(names) == 1 else {name: arrays[name] for name in names}


def _expected_inputs(names: list[str]) -> str:
    return f"the model's input is {names[0]!r}" if len(names) == 1 else f"the model's inputs are {', '.join(map(repr, names))}"


def _binary_size(tensor: dict[str, Any]) -> int | None:
    """The tensor's `parameters.binary_data_size` (the binary tensor extension), None when it has none."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(f"input {tensor['name']!r}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise RequestError(f"input {tensor['name']!r}: binary_data_size must be a non-negative integer, got {size!r}")
    return size


def decode_inputs(request: Any, model: LoadedModel, binary: bytes = b"") -> Features:
    """The tensors of a JSON request (see `collect_inputs`). An input is either `data` in the JSON or, with
    the binary tensor extension, `parameters.binary_data_size` bytes of `binary` (what follows the JSON
    header in the body), taken in the order of the inputs; every byte of `binary` must belong to one."""
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise RequestError(f"request must be a JSON object with 'inputs': a list of tensors, one per model input "
                           f"({_expected_inputs([spec.name for spec in model.inputs])})")
    tensors, offset = [], 0
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict) or not {"name", "shape", "datatype"} <= set(tensor):
            raise RequestError("each input needs 'name', 'shape', 'datatype' and 'data' (or binary data)")
        size = _binary_size(tensor)
        if size is None and "data" not in tensor:
            raise RequestError(f"input {tensor['name']!r} has no 'data' and no parameters.binary_data_size")
        if size is not None and "data" in tensor:
            raise RequestError(f"input {tensor['name']!r} has both 'data' and parameters.binary_data_size; send one")
        if size is None:
            decode = partial(array_from_values, tensor["datatype"], tensor["shape"], tensor["data"])
        else:
            field = f"binary data of input {tensor['name']!r}"
            decode = partial(array_from_bytes, tensor["datatype"], tensor["shape"], binary[offset:offset + size], field)
            offset += size
        tensors.append((tensor["name"], decode))
    if offset != len(binary):
        raise RequestError(f"the body has {len(binary)} bytes of binary data after the JSON header but the inputs' "
                           f"binary_data_size add up to {offset}")
    return collect_inputs(tensors, model)


def output_arrays(prediction: Prediction, names: list[str] | None = None) -> list[tuple[str, str, np.ndarray]]:
    """(name, datatype, values) of every model output (a classifier's also `class` and `label`, BYTES), or
    of the outputs `names`, in that order."""
    available = {name: (DATATYPE_OF[array.dtype], array) for name, array in prediction.outputs.items()}
    if prediction.classes is not None and prediction.labels is not None:
        available["class"] = ("INT64", prediction.classes.astype(np.int64))
        available["label"] = ("BYTES", np.asarray(prediction.labels, dtype=object))
    if names is None:
        names = list(available)
    elif unknown := [n for n in names if n not in available]:
        raise RequestError(f"unknown output(s) {unknown}; available: {', '.join(available)}")
    return [(name, *available[name]) for name in names]


def tensor_bytes(datatype: str, array: np.ndarray) -> bytes:
    """Raw little-endian row-major bytes of a tensor; BYTES elements each as a 4-byte length and UTF-8."""
    if datatype != "BYTES":
        return np.ascontiguousarray(array).tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in (str(v).encode() for v in array.ravel()))


def encode_outputs(prediction: Prediction, requested: Any, binary_output: bool = False,
                   chunks: list[bytes] | None = None) -> list[dict[str, Any]]:
    """The answer's output tensors: every output, or the subset `requested` (`[{"name": ..., "parameters":
    {"binary_data": bool}}]`). With `chunks` given (the binary tensor extension), an output goes out as
    binary data appended to `chunks` when it asks for it, else when `binary_output` (the request's
    `binary_data_output`) is set; its JSON then carries `parameters.binary_data_size` instead of `data`."""
    entries: list[dict[str, Any]] = []
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
            raise RequestError("'outputs' must be a list of {\"name\": ...} objects")
        entries = requested
    answer = []
    for k, (name, datatype, array) in enumerate(output_arrays(prediction, [o["name"] for o in entries] if requested is not None else None)):
        parameters = (entries[k].get("parameters") or {}) if requested is not None else {}
        if not isinstance(parameters, dict):
            raise RequestError(f"output {name!r}: 'parameters' must be an object")
        binary = parameters.get("binary_data", binary_output)
        if not isinstance(binary, bool):
            raise RequestError(f"output {name!r}: parameters.binary_data must be true or false, got {binary!r}")
        tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary and chunks is not None:
            chunks.append(tensor_bytes(datatype, array))
            answer.append({**tensor, "parameters": {"binary_data_size": len(chunks[-1])}})
        else:
            answer.append({**tensor, "data": array.ravel().tolist()})
    return answer


ZLIB_WBITS = {"gzip": 31, "deflate": 15}  # HTTP's "deflate" is the zlib format


def inflate(body: bytes, encoding: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """A gzip or deflate request body (Triton's client's `request_compression_algorithm`), inflated to at
    most `limit` bytes (more is a 413)."""
    decoder = zlib.decompressobj(ZLIB_WBITS[encoding])
    try:
        data = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(f"the request body is not valid {encoding} ({exc})") from None
    if len(data) > limit:
        raise RequestError(f"the {encoding} request body inflates to more than {limit} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    if not decoder.eof:
        raise RequestError(f"the {encoding} request body is cut short")
    return data


class _Handler(LimitedHandler):
    server: "InferenceServer"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, a keep-alive client's delayed ACK stalls
    # the second one for ~40 ms. KServe/Triton clients keep connections alive.
    disable_nagle_algorithm = True
    endpoint, started = "other", 0.0  # of the request being answered, for the metrics
    body_pending = False  # a POST answered before its body was read: the connection cannot be reused

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence per-request logs
        return

    def _send(self, status: HTTPStatus, body: dict[str, Any] | None = None, binary: bytes = b"",
              text: str | None = None) -> None:
        """A JSON answer; with `binary`, the JSON header followed by binary data (its length in
        `Inference-Header-Content-Length`); or plain `text` (the metrics)."""
        data = text.encode() if text is not None else json.dumps(body).encode() if body is not None else b""
        # counted before the answer leaves, so a client that scrapes right after its answer sees its request
        self.server.metrics.observe("rest", self.endpoint, str(int(status)), status < 400,
                                    time.perf_counter() - self.started if self.endpoint == "infer" else None)
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE if text is not None else
                         "application/octet-stream" if binary else "application/json")
        if self.body_pending:  # the unread body would be taken for the next request: close instead
            self.send_header("Connection", "close")
            self.close_connection = True
        if binary:
            self.send_header(HEADER_LENGTH, str(len(data)))
        self.send_header("Content-Length", str(len(data) + len(binary)))
        self.end_headers()
        self.wfile.write(data + binary)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a method with no handler: HEAD, PUT, OPTIONS...; a request line too long
        or malformed) as the JSON `{"error": ...}` of every other answer, not its HTML page; then close."""
        self.endpoint, self.body_pending = "other", True  # what follows is unread: the connection closes
        body = {"error": message or HTTPStatus(code).phrase}
        self._send(HTTPStatus(code), None if getattr(self, "command", None) == "HEAD" else body)

    def _model(self, name: str, version: str | None) -> LoadedModel:
        model = self.server.servable.model
        if model is None:
            raise RequestError("no model is loaded yet", HTTPStatus.SERVICE_UNAVAILABLE)
        manifest = model.bundle.manifest
        if name != manifest["name"] or (version is not None and version != str(manifest["version"])):
            raise RequestError(f"model {name!r} version {version or 'any'} is not served here; "
                               f"this device serves {manifest['name']!r} version {manifest['version']}", HTTPStatus.NOT_FOUND)
        return model

    def _route(self, method: str) -> None:
        self.started, self.endpoint, self.body_pending = time.perf_counter(), "other", method == "POST"
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if method == "GET" and path == "/metrics":
                self.endpoint = "metrics"
                return self._send(HTTPStatus.OK, text=self.server.metrics.exposition(self.server.servable))
            if method == "GET" and path == "/v2/health/live":
                self.endpoint = "live"
                return self._send(HTTPStatus.OK, {"live": True})
            if method == "GET" and path == "/v2/health/ready":
                self.endpoint = "ready"
                ready = self.server.servable.model is not None
                return self._send(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {"ready": ready})
            if method == "GET" and path == "/v2":
                self.endpoint = "server_metadata"
                return self._send(HTTPStatus.OK, {"name": "edge-agent", "version": __version__, "extensions": ["binary_tensor_data"]})
            match = _MODEL_PATH.match(path)
            if not match:
                raise RequestError(f"no route for {method} {path}", HTTPStatus.NOT_FOUND)
            rest = match["rest"]
            self.endpoint = {None: "model_metadata", "/ready": "model_ready", "/infer": "infer"}[rest]
            model = self._model(match["name"], match["version"])
            if method == "GET" and rest is None:
                return self._send(HTTPStatus.OK, model_metadata(model))
            if method == "GET" and rest == "/ready":
                return self._send(HTTPStatus.OK, {"name": match["name"], "ready": True})
            if method == "POST" and rest == "/infer":
                return self._infer(model)
            raise RequestError(f"no route for {method} {path}", HTTPStatus.NOT_FOUND)
        except RequestError as exc:
            self._send(exc.status, {"error": str(exc)})
        except AgentError as exc:  # input validation: wrong shape, dtype, NaN
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})

    def _body(self) -> tuple[Any, bytes]:
        """The request's JSON and the binary data after it (the binary tensor extension: the JSON is the
        first `Inference-Header-Content-Length` bytes of the body, once inflated when it came compressed)."""
        declared = self.headers.get("Content-Length") or "0"
        length = int(declared) if declared.isdigit() else 0
        limit = self.server.limits.max_body_bytes  # a larger declared body was refused before this (413)
        if length <= 0:
            raise RequestError(f"request body must be 1..{limit} bytes of JSON, got {declared}")
        encoding = self.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", *ZLIB_WBITS):
            raise RequestError(f"Content-Encoding {encoding!r} is not supported; send the body as identity, gzip or deflate")
        body = self.rfile.read(length)
        self.body_pending = False
        if encoding != "identity":
            body = inflate(body, encoding, limit)
            length = len(body)
        header = self.headers.get(HEADER_LENGTH)
        if header is None:
            json_length = length
        elif not header.isdigit() or not 0 < int(header) <= length:
            raise RequestError(f"{HEADER_LENGTH} must be the JSON header's size in bytes, 1..{length} (the body's), got {header!r}")
        else:
            json_length = int(header)
        try:
            request = json.loads(body[:json_length])
        except BODY_ERRORS as exc:
            raise RequestError(f"request body is not valid JSON ({exc})" if header is None else
                               f"the first {json_length} bytes of the body ({HEADER_LENGTH}) are not valid JSON ({exc})") from None
        return request, body[json_length:]

    def _infer(self, model: LoadedModel) -> None:
        request, binary = self._body()
        prediction = self.server.servable.infer(decode_inputs(request, model, binary))
        parameters = request.get("parameters") or {}
        binary_output = parameters.get("binary_data_output", False) if isinstance(parameters, dict) else None
        if not isinstance(binary_output, bool):
            raise RequestError("'parameters' must be an object whose binary_data_output, if given, is true or false")
        chunks: list[bytes] = []
        outputs = encode_outputs(prediction, request.get("outputs"), binary_output, chunks)
        manifest = model.bundle.manifest
        body = {"model_name": manifest["name"], "model_version": str(manifest["version"]), "outputs": outputs}
        if "id" in request:
            body["id"] = request["id"]
        self._send(HTTPStatus.OK, body, b"".join(chunks))

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")


class InferenceServer(LimitedServer):
    def __init__(self, servable: Servable, host: str, port: int, metrics: ServingMetrics | None = None,
                 limits: Limits = Limits()) -> None:
        self.servable = servable
        self.metrics = metrics or ServingMetrics()
        super().__init__((host, port), _Handler, limits)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> "InferenceServer":
        self._thread = threading.Thread(target=self.serve_forever, name="kserve-v2", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
