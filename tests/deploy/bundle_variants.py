"""Re-signed variants of a built bundle for update tests: newer, older, other target, slower, collapsed.

Each variant is a real, correctly signed bundle whose self-test samples match its model, so a device
can only tell it apart by what the update rules and probation are about.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from runtime_agent.bundle import bundle_filename, read_bundle, write_bundle
from runtime_agent.signing import load_private_key, load_public_key

Transform = Callable[[onnx.ModelProto], onnx.ModelProto]


def _logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def variant(source: Path, key_dir: Path, out_dir: Path, *, version: int | None = None, target: str | None = None,
            transform: Transform | None = None, padding_bytes: int = 0, signing_key: Path | None = None) -> Path:
    """Read `source` (trusted key in `key_dir`), change it, sign it (with `signing_key` or the same key)."""
    bundle = read_bundle(source, load_public_key(key_dir / "signing.pub"))
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "key_id")}
    manifest["version"] = version if version is not None else bundle.version + 1
    manifest["target"] = target or manifest["target"]
    files = dict(bundle.files)
    if transform is not None:
        model = transform(onnx.load_from_string(files["model.onnx"]))
        files["model.onnx"] = model.SerializeToString()
        samples = dict(np.load(io.BytesIO(files["samples.npz"])))
        samples["logits"] = _logits(files["model.onnx"], samples["x"])
        buffer = io.BytesIO()
        np.savez(buffer, **samples)
        files["samples.npz"] = buffer.getvalue()
    artifacts = [dict(a) for a in manifest["artifacts"]]
    if padding_bytes:
        files["padding.bin"] = np.random.default_rng(0).bytes(padding_bytes)
        artifacts.append({"path": "padding.bin", "format": "bin", "precision": None, "runtime": None, "role": "padding"})
    manifest["artifacts"] = artifacts
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / bundle_filename(manifest["name"], manifest["version"], manifest["target"])
    return write_bundle(path, manifest, files, load_private_key(signing_key or key_dir / "signing.key"))


def slower(width: int = 1024, depth: int = 8) -> Transform:
    """Add a heavy branch (a chain of MatMuls) whose result is multiplied by zero into the logits:
    same answers, much more work (onnxruntime cannot fold it away, the input is dynamic)."""
    def apply(model: onnx.ModelProto) -> onnx.ModelProto:
        graph = model.graph
        rng = np.random.default_rng(1)
        source, logits = graph.input[0].name, graph.output[0].name
        nodes = [helper.make_node("Flatten", [source], ["heavy_0"], axis=1)]
        features = 64
        for i in range(depth):
            weight = numpy_helper.from_array((rng.standard_normal((features, width)) * 0.01).astype(np.float32), f"heavy_w{i}")
            graph.initializer.append(weight)
            nodes.append(helper.make_node("MatMul", [f"heavy_{i}", f"heavy_w{i}"], [f"heavy_{i + 1}"]))
            features = width
        graph.initializer.append(numpy_helper.from_array(np.zeros((1,), np.float32), "heavy_zero"))
        nodes += [helper.make_node("ReduceSum", [f"heavy_{depth}"], ["heavy_sum"], keepdims=1),
                  helper.make_node("Mul", ["heavy_sum", "heavy_zero"], ["heavy_nothing"])]
        _redirect_output(graph, logits, nodes, lambda inner: helper.make_node("Add", [inner, "heavy_nothing"], [logits]))
        return model
    return apply


def collapse(to_class: int = 0) -> Transform:
    """Answer `to_class` for everything (logits * 0 + one-hot * 10)."""
    def apply(model: onnx.ModelProto) -> onnx.ModelProto:
        graph = model.graph
        logits = graph.output[0].name
        n_classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
        graph.initializer.extend([numpy_helper.from_array(np.zeros((1,), np.float32), "collapse_zero"),
                                  numpy_helper.from_array((np.eye(n_classes, dtype=np.float32)[to_class] * 10)[None], "collapse_bias")])
        nodes = [helper.make_node("Mul", ["__inner__", "collapse_zero"], ["collapse_zeroed"])]
        _redirect_output(graph, logits, nodes, lambda inner: helper.make_node("Add", ["collapse_zeroed", "collapse_bias"], [logits]),
                         rename_in=nodes[0])
        return model
    return apply


def _redirect_output(graph: onnx.GraphProto, logits: str, extra: list, final, rename_in=None) -> None:
    """Rename the producer of the graph output to an inner name, append `extra`, then `final(inner)`."""
    inner = f"{logits}_inner"
    for node in graph.node:
        node.output[:] = [inner if o == logits else o for o in node.output]
    if rename_in is not None:
        rename_in.input[0] = inner
    graph.node.extend(extra + [final(inner)])
    graph.value_info.append(helper.make_tensor_value_info(inner, TensorProto.FLOAT, None))
