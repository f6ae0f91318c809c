"""Load user-supplied ONNX (and `.tflite`) files defensively: a bad file is a one-line error, not a
protobuf or flatbuffer traceback. A model file given as a build's input is imported here: dynamic
dimensions fixed, an old opset raised, shapes inferred, external data inlined."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from toolchain.core.tensors import TensorSpec
from toolchain.errors import ConfigError, ToolchainError, first_line


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise ToolchainError(f"model {path} is a folder; pass the model file (.onnx or .tflite) or a .bundle")
    if not path.is_file():
        raise ToolchainError(f"model {path} does not exist")


def check_onnx_file(path: Path) -> onnx.ModelProto:
    _require_file(path)
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

    _require_file(path)
    try:
        shape = LiteRtSession(path).get_inputs()[0].shape[1:]
    except Exception as exc:  # LiteRtUnavailable, or the interpreter's ValueError for a bad flatbuffer
        raise ToolchainError(f"model {path} cannot be loaded by LiteRT ({first_line(exc)})") from None
    return tuple(int(d) for d in shape)


def tflite_inputs(path: Path) -> tuple[TensorSpec, ...]:
    """The one input a `.tflite` file takes, as the agent feeds it (float32; LiteRT quantizes int8 inputs)."""
    return (TensorSpec("input", tflite_input_shape(path), "float32"),)


def sample_input_shape(path: Path) -> tuple[int, ...]:
    """Shape of one sample of the first input (the leading batch axis dropped)."""
    if path.suffix == ".tflite":
        return tflite_input_shape(path)
    graph_input = _graph_inputs(check_onnx_file(path))[0]
    dims = graph_input.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if not dims or any(d is None or d <= 0 for d in shape):
        raise ToolchainError(f"model {path}: input {graph_input.name!r} needs fixed sizes after the batch axis, "
                             f"got {[d.dim_param or d.dim_value for d in dims]}; export it with fixed sizes, or build it "
                             "(`toolchain build --model FILE --input-shape ...` fixes them) and bench its bundle")
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


ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
               onnx.TensorProto.INT32: "int32", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8",
               onnx.TensorProto.BOOL: "bool"}
MIN_OPSET = 13  # per-channel QDQ quantization needs it; older files are converted on import
BATCH = "batch"


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The model's real inputs: graph inputs that are not initializers (old exporters list weights too)."""
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def graph_input_names(path: Path) -> list[str]:
    return [i.name for i in _graph_inputs(onnx.load(str(path), load_external_data=False))]


def graph_output_names(path: Path) -> list[str]:
    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Every dimension: its size, or its symbolic name ('?' when it has none)."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def tensor_specs(values, path: Path) -> tuple[TensorSpec, ...]:
    """One sample's spec of each value (the batch axis dropped; -1 where a size is not fixed)."""
    specs = []
    for value in values:
        dtype = ONNX_DTYPES.get(value.type.tensor_type.elem_type)
        if dtype is None:
            raise ToolchainError(f"model {path}: {value.name!r} has element type "
                                 f"{onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)}; "
                                 f"inputs and outputs must be one of {', '.join(ONNX_DTYPES.values())}")
        specs.append(TensorSpec(value.name, tuple(d if isinstance(d, int) and d > 0 else -1 for d in _dims(value)[1:]), dtype))
    return tuple(specs)


def _wanted_shapes(inputs: list[onnx.ValueInfoProto], input_shape: list[int] | dict[str, list[int]] | None,
                   path: Path) -> dict[str, list[int] | None]:
    names = [i.name for i in inputs]
    if isinstance(input_shape, dict):
        unknown = sorted(set(input_shape) - set(names))
        if unknown:
            raise ConfigError(f"[model] input_shape names {unknown}, which are not inputs of {path} (its inputs: {names})")
        return {name: input_shape.get(name) for name in names}
    return {name: (input_shape if i == 0 else None) for i, name in enumerate(names)}


def fix_input_dims(model: onnx.ModelProto, input_shape: list[int] | dict[str, list[int]] | None,
                   path: Path) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """The model with every input's batch axis named `batch` and every other axis fixed, from the file
    or from `input_shape` (one list for the first input, or lists by input name). Returns the model and
    each input's per-sample shape. An axis that stays unknown is one clear error naming the input."""
    inputs = _graph_inputs(model)
    wanted = _wanted_shapes(inputs, input_shape, path)
    fixed: dict[str, list[int]] = {}
    for value in inputs:
        dims = _dims(value)
        if not dims:
            raise ToolchainError(f"model {path}: input {value.name!r} is a scalar; a model input needs a batch axis")
        given = wanted[value.name]
        if given is not None and len(given) != len(dims) - 1:
            raise ConfigError(f"[model] input_shape {given} for input {value.name!r} of {path} must have {len(dims) - 1} "
                              f"dimension(s) (the input is {dims}, the first being the batch)")
        sample = []
        for axis, dim in enumerate(dims[1:]):
            if isinstance(dim, int) and dim > 0:
                if given is not None and given[axis] != dim:
                    raise ConfigError(f"[model] input_shape {given} for input {value.name!r} of {path} contradicts its fixed "
                                      f"size {dim} on axis {axis + 1} (the input is {dims})")
                sample.append(dim)
            elif given is not None:
                sample.append(given[axis])
            else:
                raise ConfigError(f"model {path}: input {value.name!r} has dims {dims} with sizes that are not fixed after the batch "
                                  f"axis; fix them with [model] input_shape (or --input-shape), e.g. "
                                  "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in dims[1:]) + "]")
        fixed[value.name] = sample
        shape = value.type.tensor_type.shape
        if isinstance(dims[0], int) and dims[0] > 1:
            raise ToolchainError(f"model {path}: input {value.name!r} has a fixed batch of {dims[0]}; re-export it with a "
                                 "dynamic (or size 1) batch axis")
        shape.dim[0].Clear()
        shape.dim[0].dim_param = BATCH
        for axis, size in enumerate(sample, start=1):
            shape.dim[axis].Clear()
            shape.dim[axis].dim_value = size
    del model.graph.value_info[:]  # shapes inferred for the old dims would contradict the fixed ones
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()  # symbolic names of the exporter's; inference fills what it can
    return model, fixed


def import_onnx(path: Path, input_shape: list[int] | dict[str, list[int]] | None, output: Path) -> dict[str, Any]:
    """Check a user's ONNX file, fix its input dims, raise an old opset to `MIN_OPSET`, infer shapes and
    save it self-contained (external data inlined) at `output`. Returns what was done, for the report."""
    model = check_onnx_file(path)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    model, fixed = fix_input_dims(model, input_shape, path)
    converted_from = None
    if opset is not None and opset < MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, MIN_OPSET)
            converted_from = opset
        except Exception as exc:
            raise ToolchainError(f"model {path}: converting opset {opset} to {MIN_OPSET} (which INT8 quantization needs) "
                                 f"failed ({first_line(exc)}); re-export it with opset >= {MIN_OPSET}") from None
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ToolchainError(f"model {path}: shape inference failed with the fixed input dims {fixed} ({first_line(exc)}); "
                             "check [model] input_shape") from None
    onnx.save_model(model, str(output))
    return {"file": str(path), "opset": opset, "opset_converted_from": converted_from, "external_data": external,
            "inputs": [s.to_dict() for s in tensor_specs(_graph_inputs(model), path)],
            "outputs": [s.to_dict() for s in tensor_specs(model.graph.output, path)], "fixed_input_dims": fixed}


def onnx_inputs(path: Path, input_shape: list[int] | dict[str, list[int]] | None) -> tuple[TensorSpec, ...]:
    """The inputs a user's ONNX file takes once its dims are fixed: what the data must supply."""
    model = check_onnx_file(path)
    model, fixed = fix_input_dims(model, input_shape, path)
    return tuple(TensorSpec(s.name, tuple(fixed[s.name]), s.dtype) for s in tensor_specs(_graph_inputs(model), path))
