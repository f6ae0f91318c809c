"""Load user-supplied ONNX (and `.tflite`) files defensively: a bad file is a one-line error, not a
protobuf or flatbuffer traceback."""

from __future__ import annotations

from pathlib import Path

import onnx

from toolchain.errors import ToolchainError, first_line


def check_onnx_file(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ToolchainError(f"model {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError, ...
        raise ToolchainError(f"model {path} is not a valid ONNX model ({first_line(exc)}); re-export it") from None
    if len(model.graph.input) == 0 or not model.graph.node:
        raise ToolchainError(f"model {path} has no inputs or no operators; re-export it")
    return model


def tflite_input_shape(path: Path) -> tuple[int, ...]:
    """Shape of one sample of a `.tflite` model's input, loading it with LiteRT (the check)."""
    from runtime_agent.litert import LiteRtSession

    if not path.is_file():
        raise ToolchainError(f"model {path} does not exist")
    try:
        shape = LiteRtSession(path).get_inputs()[0].shape[1:]
    except Exception as exc:  # LiteRtUnavailable, or the interpreter's ValueError for a bad flatbuffer
        raise ToolchainError(f"model {path} cannot be loaded by LiteRT ({first_line(exc)})") from None
    return tuple(int(d) for d in shape)


def sample_input_shape(path: Path) -> tuple[int, ...]:
    """Shape of one sample of the first input (the leading batch axis dropped)."""
    if path.suffix == ".tflite":
        return tflite_input_shape(path)
    model = check_onnx_file(path)
    initializers = {i.name for i in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if not dims or any(d is None or d <= 0 for d in shape):
        raise ToolchainError(f"model {path}: input {graph_input.name!r} needs fixed sizes after the batch axis, "
                             f"got {[d.dim_param or d.dim_value for d in dims]}")
    return tuple(shape)


def model_file(model_or_bundle: Path, pubkey: Path, scratch: Path) -> tuple[Path, str]:
    """An ONNX or `.tflite` file to measure or predict: the path itself (checked), or the verified model
    extracted from a `.bundle` into `scratch`; and its precision when the bundle says ('?' if not)."""
    if model_or_bundle.suffix == ".bundle":
        from runtime_agent.bundle import read_bundle
        from runtime_agent.signing import load_public_key

        verified = read_bundle(model_or_bundle, load_public_key(pubkey))
        path = scratch / verified.model_artifact["path"]
        path.write_bytes(verified.model_bytes)
        return path, verified.model_artifact.get("precision") or "?"
    if model_or_bundle.suffix == ".tflite":
        tflite_input_shape(model_or_bundle)
    else:
        check_onnx_file(model_or_bundle)
    return model_or_bundle, "?"
