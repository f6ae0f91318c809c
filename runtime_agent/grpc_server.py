"""KServe v2 / Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), on `[serve] grpc_port`.

The same model, validation and metrics as the REST endpoint (runtime_agent.server, whose tensor
encoding this shares): `ServerLive`, `ServerReady`, `ServerMetadata`, `ModelReady`, `ModelMetadata`,
`ModelInfer`. Inputs come as typed `contents` or as `raw_input_contents` (Triton's client sends raw);
the answer uses the same form (raw also whenever an output is FP16, which has no `contents` field). A bad
request is answered INVALID_ARGUMENT with the same reason REST gives; an unknown model NOT_FOUND; no
model UNAVAILABLE. Methods the agent does not declare answer UNIMPLEMENTED.

Optional: this module needs grpcio and protobuf (the `agent-grpc` extra) and is imported only when
`grpc_port` is set. The stubs are generated from runtime_agent/kserve_grpc/grpc_predict_v2.proto.
"""

from __future__ import annotations

import errno
import socket
import time
from concurrent import futures
from functools import partial
from http import HTTPStatus
from typing import Any, Callable

import grpc

from runtime_agent import __version__
from runtime_agent.errors import AgentError
from runtime_agent.kserve_grpc import grpc_predict_v2_pb2 as pb
from runtime_agent.kserve_grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from runtime_agent.metrics import ServingMetrics
from runtime_agent.model import LoadedModel
from runtime_agent.reference import Features
from runtime_agent.server import (MAX_BODY_BYTES, RequestError, Servable, array_from_bytes, array_from_values,
                                  collect_inputs, model_metadata, output_arrays, tensor_bytes)

# The `InferTensorContents` field of each datatype (FP16 has none: raw only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_CODES = {HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
          HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE}


def decode_request(request: Any, model: LoadedModel) -> Features:
    """A `ModelInferRequest`'s tensors, from `raw_input_contents` (one entry per input, in order) or from
    each input's `contents`; checked as REST checks JSON tensors."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} inputs; "
                           f"send one per input, in the order of 'inputs'")
    tensors: list[tuple[str, Callable[[], Any]]] = []
    for k, tensor in enumerate(request.inputs):
        name = tensor.name
        if raw:
            if tensor.HasField("contents"):
                raise RequestError(f"input {name!r} has 'contents' but the request uses raw_input_contents; send one form")
            decode = partial(array_from_bytes, tensor.datatype, list(tensor.shape), raw[k], f"raw_input_contents[{k}] (input {name!r})")
        elif tensor.datatype == "FP16":
            raise RequestError(f"input {name!r} is FP16, which has no 'contents' field; send it in raw_input_contents")
        else:
            field = CONTENTS.get(tensor.datatype, "fp32_contents")  # an unsupported datatype is refused on decoding
            decode = partial(array_from_values, tensor.datatype, list(tensor.shape), getattr(tensor.contents, field),
                             f"contents.{field} of input {name!r}")
        tensors.append((name, decode))
    return collect_inputs(tensors, model)


def encode_response(prediction: Any, request: Any, model: LoadedModel) -> Any:
    """A `ModelInferResponse` with the requested outputs (all when none is named), raw when the request was."""
    manifest = model.bundle.manifest
    response = pb.ModelInferResponse(model_name=manifest["name"], model_version=str(manifest["version"]), id=request.id)
    arrays = output_arrays(prediction, [o.name for o in request.outputs] or None)
    raw = bool(request.raw_input_contents) or any(datatype == "FP16" for _, datatype, _ in arrays)
    for name, datatype, array in arrays:
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(tensor_bytes(datatype, array))
        else:
            values = array.ravel().tolist()
            getattr(tensor.contents, CONTENTS[datatype]).extend([str(v).encode() for v in values] if datatype == "BYTES" else values)
    return response


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's handlers; callable without a server (`benchmarks/agent.py` times ModelInfer in process
    to tell the agent's share of a call from grpcio's)."""

    def __init__(self, servable: Servable, metrics: ServingMetrics) -> None:
        self.servable, self.metrics = servable, metrics

    def _answer(self, endpoint: str, context: grpc.ServicerContext, respond: Callable[[], Any]) -> Any:
        """`respond()`, counted in the metrics; a refused request aborts the call with its code and reason."""
        started = time.perf_counter()
        seconds = (lambda: time.perf_counter() - started) if endpoint == "infer" else (lambda: None)
        try:
            answer = respond()
        except RequestError as exc:
            code, reason = _CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc)
        except AgentError as exc:  # input validation: wrong shape, dtype, NaN
            code, reason = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        else:
            self.metrics.observe("grpc", endpoint, grpc.StatusCode.OK.name, True, seconds())
            return answer
        self.metrics.observe("grpc", endpoint, code.name, False, seconds())
        context.abort(code, reason)

    def _model(self, name: str, version: str) -> LoadedModel:
        model = self.servable.model
        if model is None:
            raise RequestError("no model is loaded yet", HTTPStatus.SERVICE_UNAVAILABLE)
        manifest = model.bundle.manifest
        if name != manifest["name"] or version not in ("", str(manifest["version"])):
            raise RequestError(f"model {name!r} version {version or 'any'} is not served here; "
                               f"this device serves {manifest['name']!r} version {manifest['version']}", HTTPStatus.NOT_FOUND)
        return model

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - the protocol's names
        return self._answer("live", context, lambda: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("ready", context, lambda: pb.ServerReadyResponse(ready=self.servable.model is not None))

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("server_metadata", context,
                            lambda: pb.ServerMetadataResponse(name="edge-agent", version=__version__, extensions=[]))

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def respond() -> Any:
            self._model(request.name, request.version)  # NOT_FOUND or UNAVAILABLE when it is not served
            return pb.ModelReadyResponse(ready=True)
        return self._answer("model_ready", context, respond)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def respond() -> Any:
            meta = model_metadata(self._model(request.name, request.version))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])
        return self._answer("model_metadata", context, respond)

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def respond() -> Any:
            model = self._model(request.model_name, request.model_version)
            return encode_response(self.servable.infer(decode_request(request, model)), request, model)
        return self._answer("infer", context, respond)


def _check_free(host: str, port: int) -> None:
    """EADDRINUSE for a port another socket listens on, found by binding it ourselves first: grpcio's own
    failed bind also prints a line of its C core's log ("E... add_port.cc ... Failed to add port") on stderr,
    ahead of the agent's one-line error."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpcio binds: TIME_WAIT is no obstacle
        probe.bind(address)


class GrpcServer:
    """The gRPC endpoint: bound on construction (a port in use is an OSError EADDRINUSE, as for REST),
    served by a small thread pool from `start()`."""

    def __init__(self, servable: Servable, host: str, port: int, metrics: ServingMetrics, workers: int = 4) -> None:
        limits = [("grpc.max_receive_message_length", MAX_BODY_BYTES), ("grpc.max_send_message_length", MAX_BODY_BYTES),
                  ("grpc.so_reuseport", 0)]  # else a second agent could bind the same port and take half the calls
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kserve-grpc"),
                                   options=limits)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(servable, metrics), self._server)
        if port:
            _check_free(host, port)
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpcio's "Failed to bind"
            self.port = 0
        if not self.port:
            raise OSError(errno.EADDRINUSE, f"cannot bind {host}:{port}")

    def start(self) -> "GrpcServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait()
