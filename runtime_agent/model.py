"""Serve a verified bundle's model (onnxruntime, or LiteRT for `.tflite`), refusing bad input with a reason.

Only a `Bundle` (which exists only after verification) can become a `LoadedModel`, so an unverified
file can never be run by accident.

A model takes one input (fed a plain array, as every bundle before `inputs` existed) or several (fed a
dict of arrays by input name), and gives one or more outputs, all of which a `Prediction` carries. The
manifest's `task` says what the first output means: a classifier's scores (then classes, labels and
softmax scores are derived from it), a regressor's values, or anything else (`unlabelled`). A manifest
without `task`, `inputs` or `outputs` describes a one-input classifier whose first output is its logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from runtime_agent.bundle import Bundle
from runtime_agent.config import SPIN_US
from runtime_agent.errors import BundleError, InputError
from runtime_agent.litert import LiteRtSession, LiteRtUnavailable
from runtime_agent.reference import TASKS, Features, prediction_values

CLASSIFICATION = "classification"


def _providers(preferred: Sequence[str]) -> list[str]:
    """The profile's providers this onnxruntime build has, CPU always last as the fallback."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the manifest declares it: one sample's shape (no batch axis; -1 where an
    output's dim varies) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def from_manifest(cls, entry: Any, field: str) -> "TensorSpec":
        try:
            return cls(name=str(entry["name"]), shape=tuple(int(d) for d in entry["shape"]), dtype=np.dtype(entry["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest field '{field}': {entry!r} is not a {{name, shape, dtype}} tensor ({exc})") from None

    def describe(self) -> str:
        return f"{self.name!r} ({self.dtype} {list(self.shape)})"


def _specs(manifest: dict[str, Any]) -> tuple[str, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The manifest's task, inputs and outputs, with the defaults of a bundle that predates them."""
    task = manifest.get("task", CLASSIFICATION)
    if task not in TASKS:
        raise BundleError(f"manifest task {task!r} is not one this agent serves ({', '.join(TASKS)}); upgrade the agent")
    inputs = tuple(TensorSpec.from_manifest(entry, "inputs") for entry in manifest.get("inputs") or [manifest["input"]])
    default_output = [{"name": "logits", "shape": [len(manifest["labels"])], "dtype": "float32"}]
    outputs = tuple(TensorSpec.from_manifest(entry, "outputs") for entry in manifest.get("outputs") or default_output)
    return task, inputs, outputs


def _feed_names(session: ort.InferenceSession | LiteRtSession, inputs: Sequence[TensorSpec]) -> tuple[str, ...]:
    """The session input each manifest input feeds: by name when the manifest names the graph's inputs,
    else by position (a one-input bundle calls its input "input" whatever the graph calls it)."""
    names = tuple(i.name for i in session.get_inputs())
    if len(names) != len(inputs):
        raise BundleError(f"the model has {len(names)} input(s) ({', '.join(names)}) but the manifest lists {len(inputs)}")
    declared = tuple(spec.name for spec in inputs)
    return declared if set(declared) == set(names) else names


def _output_count(session: ort.InferenceSession | LiteRtSession) -> int:
    return len(session.get_outputs()) if isinstance(session, ort.InferenceSession) else 1  # LiteRT: one output


class Prediction:
    """One request's answer: every output by name (`outputs`, in the manifest's order; `logits` is the
    first). A classifier's answer also has `classes`, `labels` and (computed only when asked for: serving
    rarely needs them) softmax `scores`; for other tasks they are None."""

    def __init__(self, outputs: dict[str, np.ndarray], task: str, label_names: list[str]) -> None:
        self.outputs = outputs
        self.logits = next(iter(outputs.values()))  # the first output
        self.task = task
        self.classes = self.logits.argmax(axis=-1) if task == CLASSIFICATION else None
        self._label_names = label_names

    @cached_property
    def labels(self) -> list[str] | None:
        """The class names of the predictions."""
        return None if self.classes is None else [self._label_names[i] for i in self.classes]

    @cached_property
    def scores(self) -> np.ndarray | None:
        """Softmax probabilities, one row per sample."""
        if self.classes is None:
            return None
        logits = self.logits.astype(np.float64)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    @property
    def drift_values(self) -> np.ndarray:
        """What prediction drift and probation count per sample (`reference.prediction_values`)."""
        return self.classes if self.classes is not None else prediction_values(self.logits, self.task)


def _check(spec: TensorSpec, x: Any, what: str) -> np.ndarray:
    """`x` as a batch `(n, *spec.shape)` (a single sample gets a batch axis); `what` names it in the reason."""
    if not isinstance(x, np.ndarray):
        raise InputError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype != spec.dtype:
        raise InputError(f"{what} dtype is {x.dtype}, the model expects {spec.dtype}; convert it with .astype('{spec.dtype}')")
    if x.shape == spec.shape:
        x = x[np.newaxis]
    if x.ndim != len(spec.shape) + 1 or x.shape[1:] != spec.shape or x.shape[0] == 0:
        raise InputError(f"{what} shape is {list(x.shape)}, the model expects {list(spec.shape)} "
                         f"or a batch [n, {', '.join(map(str, spec.shape))}]")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise InputError(f"{what} has {bad} NaN or infinite value(s); clean the data before sending it")
    return x


def open_session(model_format: str, data: bytes, path: str, providers: Sequence[str] = (),
                 threads: int = 0, spin_us: int = SPIN_US) -> ort.InferenceSession | LiteRtSession:
    """The device's runtime for a model file: onnxruntime (with the profile's providers) or LiteRT; the
    one place sessions are made, so a served model and a benchmark job's model run with the same settings.

    `threads`: intra-op threads (0: one per core). `spin_us`: how long onnxruntime's pool threads spin for
    more work before sleeping (0: never, -1: onnxruntime's own policy); LiteRT has no such setting."""
    if model_format == "tflite":
        try:
            return LiteRtSession(data, threads=threads)
        except LiteRtUnavailable as exc:
            raise BundleError(str(exc)) from None
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError for bad flatbuffers
            raise BundleError(f"model {path} cannot be loaded by LiteRT: {exc}") from None
    if model_format == "onnx":
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if spin_us >= 0:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us else "0")
            if spin_us:
                options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        try:
            return ort.InferenceSession(data, options, providers=_providers(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise BundleError(f"model {path} cannot be loaded by onnxruntime: {exc}") from None
    raise BundleError(f"model format {model_format!r} needs a runtime this agent does not have "
                      f"(it runs 'onnx' and, with ai-edge-litert, 'tflite')")


@dataclass
class LoadedModel:
    bundle: Bundle
    session: ort.InferenceSession | LiteRtSession  # both answer run(None, {name: batch}) and get_inputs()
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    feed_names: tuple[str, ...]  # the session's name for each input, in the manifest's order
    labels: list[str]

    @classmethod
    def from_bundle(cls, bundle: Bundle, providers: Sequence[str] = (), threads: int = 0,
                    spin_us: int = SPIN_US) -> "LoadedModel":
        artifact = bundle.model_artifact
        session = open_session(artifact["format"], bundle.model_bytes, artifact["path"],
                               providers or bundle.manifest.get("providers", []), threads, spin_us)
        task, inputs, outputs = _specs(bundle.manifest)
        if "outputs" in bundle.manifest and len(outputs) != _output_count(session):
            raise BundleError(f"the model has {_output_count(session)} output(s) but the manifest lists {len(outputs)}")
        return cls(bundle=bundle, session=session, task=task, inputs=inputs, outputs=outputs,
                   feed_names=_feed_names(session, inputs), labels=[str(label) for label in bundle.manifest["labels"]])

    @property
    def input_name(self) -> str:
        """The session's name of the first input."""
        return self.feed_names[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample of the first input, without the batch dimension."""
        return self.inputs[0].shape

    @property
    def dtype(self) -> np.dtype:
        return self.inputs[0].dtype

    @property
    def input_shapes(self) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        """One sample's shape, or one per input name for several inputs (what `validate` returns is shaped so)."""
        return self.input_shape if len(self.inputs) == 1 else {spec.name: spec.shape for spec in self.inputs}

    def _expected(self) -> str:
        return ", ".join(spec.describe() for spec in self.inputs)

    def validate(self, x: Any) -> Features:
        """Every input as a batch `(n, *shape)`: an array for a one-input model (given as an array, or as
        a dict holding it by name), a dict by input name (the manifest's order) for several inputs. Raise
        `InputError` with the reason, naming the input, on anything else."""
        if isinstance(x, Mapping):
            names = [spec.name for spec in self.inputs]
            if unknown := [name for name in x if name not in names]:
                raise InputError(f"unknown input(s) {unknown}; the model's inputs are {self._expected()}")
            if missing := [name for name in names if name not in x]:
                raise InputError(f"missing input(s) {missing}; the model's inputs are {self._expected()}")
            if len(names) == 1:
                x = x[names[0]]
        if len(self.inputs) == 1:
            return _check(self.inputs[0], x, "input")
        if not isinstance(x, Mapping):
            raise InputError(f"the model takes {len(self.inputs)} inputs ({self._expected()}); "
                             f"pass a dict of arrays by input name, got {type(x).__name__}")
        batches = {spec.name: _check(spec, x[spec.name], f"input {spec.name!r}") for spec in self.inputs}
        sizes = {name: len(batch) for name, batch in batches.items()}
        if len(set(sizes.values())) > 1:
            raise InputError(f"the inputs hold different numbers of samples ({', '.join(f'{k}: {v}' for k, v in sizes.items())}); "
                             f"send the same number for every input")
        return batches

    def _run(self, batch: Features) -> list[np.ndarray]:
        feeds = dict(zip(self.feed_names, batch.values())) if isinstance(batch, dict) else {self.feed_names[0]: batch}
        return self.session.run(None, feeds)[:len(self.outputs)]

    def logits(self, x: Any) -> np.ndarray:
        """The first output on `x` (validated)."""
        return self._run(self.validate(x))[0]

    def predict(self, x: Any) -> Prediction:
        return self.predict_batch(self.validate(x))

    def predict_batch(self, batch: Features) -> Prediction:
        """Predict on a batch that `validate` already returned."""
        names = (spec.name for spec in self.outputs)
        return Prediction(dict(zip(names, self._run(batch))), self.task, self.labels)
