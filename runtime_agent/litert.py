"""Run `.tflite` models with the LiteRT interpreter (`ai-edge-litert`) behind onnxruntime's session API.

Why an onnxruntime-shaped facade: the agent, the host's evaluation and the latency measurements all
drive models through `session.run(None, {name: batch})[0]` and `session.get_inputs()`. Giving LiteRT
the same two calls lets every one of them run a `.tflite` file unchanged, so the accuracy the build
gates on and the latency it measures come from the very code the device serves with.

Full-integer models take int8 input and give int8 output. Clients still send float32 features (the
bundle's input contract is the same for every format): the input is quantized with the model's own
scale and zero point, and the output dequantized, inside `run`, so that cost is in every number.

`ai-edge-litert` is optional on a device: importing this module without it is fine, opening a model
raises `LiteRtUnavailable` with the install line.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = "install the LiteRT interpreter with `pip install ai-edge-litert` (or `pip install .[litert]`)"


class LiteRtUnavailable(RuntimeError):
    """The `ai-edge-litert` package is not installed."""


def litert_available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class TensorInfo:
    """What onnxruntime's `NodeArg` tells about an input: the fields callers here read."""

    name: str
    type: str
    shape: list[int | str]


class LiteRtSession:
    """One LiteRT interpreter, answering `run(None, {name: x})` like an onnxruntime session.

    The interpreter is not thread-safe and has fixed tensor shapes; a lock serialises calls and the
    input is resized (and tensors re-allocated) only when the batch size changes.
    """

    def __init__(self, model: bytes | str | Path, threads: int = 0) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise LiteRtUnavailable(f"this model is a .tflite file; {INSTALL_HINT}") from None
        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        # threads 0 = one per core, as onnxruntime's 0 means.
        self._interpreter = Interpreter(model_content=content, num_threads=threads or (os.cpu_count() or 1))
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected a model with one input and one output, it has {len(inputs)} and {len(outputs)}")
        self._input, self._output = inputs[0], outputs[0]
        self._lock = threading.Lock()
        self._batch = -1
        self._in_scale, self._in_zero = self._quantization(self._input)
        self._out_scale, self._out_zero = self._quantization(self._output)

    @staticmethod
    def _quantization(detail: dict[str, Any]) -> tuple[float, int]:
        scale, zero = detail["quantization"]
        return (float(scale), int(zero)) if np.issubdtype(detail["dtype"], np.integer) and scale else (0.0, 0)

    @property
    def input_dtype(self) -> np.dtype:
        """The dtype inside the model (int8 for full-integer models); `run` takes float32 regardless."""
        return np.dtype(self._input["dtype"])

    def get_inputs(self) -> list[TensorInfo]:
        signature = self._input.get("shape_signature", self._input["shape"])
        shape: list[int | str] = ["batch" if d < 0 else int(d) for d in signature]
        return [TensorInfo(name=self._input["name"], type="tensor(float)", shape=shape)]

    def _to_model_input(self, x: np.ndarray) -> np.ndarray:
        if not self._in_scale:
            return np.ascontiguousarray(x, dtype=self._input["dtype"])
        info = np.iinfo(self._input["dtype"])
        q = np.rint(x / np.float32(self._in_scale)) + self._in_zero
        return np.clip(q, info.min, info.max).astype(self._input["dtype"])

    def run(self, output_names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Logits for the batch in `feeds` (its only value), as a one-element list like onnxruntime."""
        (x,) = feeds.values()
        model_input = self._to_model_input(x)
        with self._lock:
            if x.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input["index"], list(x.shape), strict=False)
                self._interpreter.allocate_tensors()
                self._batch = x.shape[0]
            self._interpreter.set_tensor(self._input["index"], model_input)
            self._interpreter.invoke()
            out = self._interpreter.get_tensor(self._output["index"])
        if self._out_scale:
            return [(out.astype(np.float32) - self._out_zero) * np.float32(self._out_scale)]
        return [out.astype(np.float32, copy=True)]
