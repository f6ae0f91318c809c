"""Local REST endpoint speaking the KServe v2 / Open Inference Protocol (JSON tensors).

Standard clients of that protocol (Triton's and KServe's HTTP clients) work unchanged:
`GET /v2/health/live|ready`, `GET /v2`, `GET /v2/models/{name}[/versions/{v}]`,
`GET /v2/models/{name}/ready`, `POST /v2/models/{name}[/versions/{v}]/infer`.
Bad requests get a 400 with `{"error": reason}` and the server keeps serving. The standard library's
threading HTTP server is enough for a board's local clients and adds no dependency.

Every model input is sent by name (all of them, once each); the answer holds every model output by
name, and for a classifier also `class` and `label` (a client may ask for a subset with `outputs`).
"""

from __future__ import annotations

import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import numpy as np

from runtime_agent import __version__
from runtime_agent.errors import AgentError
from runtime_agent.model import CLASSIFICATION, LoadedModel, Prediction
from runtime_agent.reference import Features

MAX_BODY_BYTES = 32 << 20
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
             "INT16": np.int16, "INT8": np.int8, "UINT64": np.uint64, "UINT32": np.uint32, "UINT16": np.uint16,
             "UINT8": np.uint8, "BOOL": np.bool_}  # every numeric datatype of the protocol: a model may output any
DATATYPE_OF = {np.dtype(v): k for k, v in DATATYPES.items()}
_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$")


class Servable(Protocol):
    """What the server needs from the agent: the current model and a recorded inference."""

    @property
    def model(self) -> LoadedModel | None: ...

    def infer(self, batch: Features) -> Prediction: ...


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


def _decode_tensor(tensor: dict[str, Any]) -> np.ndarray:
    """One request tensor as a numpy array of its declared datatype and shape."""
    if tensor["datatype"] not in DATATYPES:
        raise RequestError(f"unsupported datatype {tensor['datatype']!r}; use one of {', '.join(DATATYPES)}")
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"'shape' must be a list of non-negative integers, got {shape!r}")
    try:
        array = np.asarray(tensor["data"], dtype=DATATYPES[tensor["datatype"]])
    except (TypeError, ValueError) as exc:
        raise RequestError(f"'data' does not hold {tensor['datatype']} values ({exc})") from None
    if array.size != int(np.prod(shape)):
        raise RequestError(f"'data' has {array.size} values but 'shape' {shape} needs {int(np.prod(shape))}")
    return array.reshape(shape)


def decode_inputs(request: Any, model: LoadedModel) -> Features:
    """The request's tensors: an array for a one-input model, a dict by input name for several.
    Every input of the model must be there exactly once; dtypes and shapes are `LoadedModel.validate`'s."""
    names = [spec.name for spec in model.inputs]
    expected = f"the model's input is {names[0]!r}" if len(names) == 1 else \
        f"the model's inputs are {', '.join(map(repr, names))}"
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise RequestError(f"request must be a JSON object with 'inputs': a list of tensors, one per model input ({expected})")
    arrays: dict[str, np.ndarray] = {}
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict) or not {"name", "shape", "datatype", "data"} <= set(tensor):
            raise RequestError("each input needs 'name', 'shape', 'datatype' and 'data'")
        name = tensor["name"]
        if name not in names:
            raise RequestError(f"unknown input {name!r}; {expected}")
        if name in arrays:
            raise RequestError(f"input {name!r} is sent twice; send each input once")
        arrays[name] = _decode_tensor(tensor)
    if missing := [name for name in names if name not in arrays]:
        raise RequestError(f"missing input(s) {', '.join(map(repr, missing))}; {expected}")
    return arrays[names[0]] if len(names) == 1 else {name: arrays[name] for name in names}


def _tensor(array: np.ndarray) -> dict[str, Any]:
    return {"datatype": DATATYPE_OF[array.dtype], "shape": list(array.shape), "data": array.ravel().tolist()}


def encode_outputs(prediction: Prediction, requested: Any) -> list[dict[str, Any]]:
    """Every model output by name (a classifier's also `class` and `label`), or the subset `requested`."""
    available = {name: _tensor(array) for name, array in prediction.outputs.items()}
    if prediction.classes is not None and prediction.labels is not None:
        available["class"] = {"datatype": "INT64", "shape": [len(prediction.classes)], "data": prediction.classes.tolist()}
        available["label"] = {"datatype": "BYTES", "shape": [len(prediction.labels)], "data": prediction.labels}
    names = list(available)
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
            raise RequestError("'outputs' must be a list of {\"name\": ...} objects")
        names = [o["name"] for o in requested]
        if unknown := [n for n in names if n not in available]:
            raise RequestError(f"unknown output(s) {unknown}; available: {', '.join(available)}")
    return [{"name": name, **available[name]} for name in names]


class _Handler(BaseHTTPRequestHandler):
    server: "InferenceServer"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, a keep-alive client's delayed ACK stalls
    # the second one for ~40 ms. KServe/Triton clients keep connections alive.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence per-request logs
        return

    def _send(self, status: HTTPStatus, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if method == "GET" and path == "/v2/health/live":
                return self._send(HTTPStatus.OK, {"live": True})
            if method == "GET" and path == "/v2/health/ready":
                ready = self.server.servable.model is not None
                return self._send(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {"ready": ready})
            if method == "GET" and path == "/v2":
                return self._send(HTTPStatus.OK, {"name": "edge-agent", "version": __version__, "extensions": []})
            match = _MODEL_PATH.match(path)
            if not match:
                raise RequestError(f"no route for {method} {path}", HTTPStatus.NOT_FOUND)
            model = self._model(match["name"], match["version"])
            rest = match["rest"]
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

    def _infer(self, model: LoadedModel) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY_BYTES:
            raise RequestError(f"request body must be 1..{MAX_BODY_BYTES} bytes of JSON, got {length}")
        try:
            request = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"request body is not valid JSON ({exc})") from None
        prediction = self.server.servable.infer(decode_inputs(request, model))
        outputs = encode_outputs(prediction, request.get("outputs"))
        manifest = model.bundle.manifest
        body = {"model_name": manifest["name"], "model_version": str(manifest["version"]), "outputs": outputs}
        if "id" in request:
            body["id"] = request["id"]
        self._send(HTTPStatus.OK, body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")


class InferenceServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, servable: Servable, host: str, port: int) -> None:
        self.servable = servable
        super().__init__((host, port), _Handler)
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
