"""Serve a verified bundle's model (onnxruntime, or LiteRT for `.tflite`), refusing bad input with a reason.

Only a `Bundle` (which exists only after verification) can become a `LoadedModel`, so an unverified
file can never be run by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from runtime_agent.bundle import Bundle
from runtime_agent.errors import BundleError, InputError
from runtime_agent.litert import LiteRtSession, LiteRtUnavailable


def _providers(preferred: Sequence[str]) -> list[str]:
    """The profile's providers this onnxruntime build has, CPU always last as the fallback."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


class Prediction:
    """One request's answer. Softmax scores are computed only when asked for (serving rarely needs them)."""

    def __init__(self, logits: np.ndarray, label_names: list[str]) -> None:
        self.logits = logits  # the model's raw outputs
        self.classes = logits.argmax(axis=1)
        self._label_names = label_names

    @cached_property
    def labels(self) -> list[str]:
        """The class names of the predictions."""
        return [self._label_names[i] for i in self.classes]

    @cached_property
    def scores(self) -> np.ndarray:
        """Softmax probabilities, one row per sample."""
        logits = self.logits.astype(np.float64)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass
class LoadedModel:
    bundle: Bundle
    session: ort.InferenceSession | LiteRtSession  # both answer run(None, {name: batch})[0]
    input_name: str
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    dtype: np.dtype
    labels: list[str] = field(default_factory=list)

    @classmethod
    def from_bundle(cls, bundle: Bundle, providers: Sequence[str] = (), threads: int = 0) -> "LoadedModel":
        artifact = bundle.model_artifact
        session: ort.InferenceSession | LiteRtSession
        if artifact["format"] == "tflite":
            try:
                session = LiteRtSession(bundle.model_bytes, threads=threads)
            except LiteRtUnavailable as exc:
                raise BundleError(str(exc)) from None
            except Exception as exc:  # the interpreter raises ValueError/RuntimeError for bad flatbuffers
                raise BundleError(f"model {artifact['path']} cannot be loaded by LiteRT: {exc}") from None
        elif artifact["format"] == "onnx":
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            try:
                session = ort.InferenceSession(bundle.model_bytes, options,
                                               providers=_providers(providers or bundle.manifest.get("providers", [])))
            except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
                raise BundleError(f"model {artifact['path']} cannot be loaded by onnxruntime: {exc}") from None
        else:
            raise BundleError(f"model format {artifact['format']!r} needs a runtime this agent does not have "
                              f"(it runs 'onnx' and, with ai-edge-litert, 'tflite')")
        spec = bundle.manifest["input"]
        return cls(bundle=bundle, session=session, input_name=session.get_inputs()[0].name,
                   input_shape=tuple(int(d) for d in spec["shape"]), dtype=np.dtype(spec["dtype"]),
                   labels=[str(label) for label in bundle.manifest["labels"]])

    def validate(self, x: Any) -> np.ndarray:
        """Return a batch `(n, *input_shape)`; a single sample gets a batch axis. Raise on anything else."""
        if not isinstance(x, np.ndarray):
            raise InputError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise InputError(f"input dtype is {x.dtype}, the model expects {self.dtype}; convert it with .astype('{self.dtype}')")
        if x.shape == self.input_shape:
            x = x[np.newaxis]
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape or x.shape[0] == 0:
            raise InputError(f"input shape is {list(x.shape)}, the model expects {list(self.input_shape)} "
                             f"or a batch [n, {', '.join(map(str, self.input_shape))}]")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            bad = int(np.size(x) - np.isfinite(x).sum())
            raise InputError(f"input has {bad} NaN or infinite value(s); clean the data before sending it")
        return x

    def logits(self, x: Any) -> np.ndarray:
        return self.session.run(None, {self.input_name: self.validate(x)})[0]

    def predict(self, x: Any) -> Prediction:
        return self.predict_batch(self.validate(x))

    def predict_batch(self, batch: np.ndarray) -> Prediction:
        """Predict on a batch that `validate` already returned."""
        return Prediction(self.session.run(None, {self.input_name: batch})[0], self.labels)
