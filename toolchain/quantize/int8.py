"""Static INT8 quantization of ONNX models with onnxruntime (QDQ, per-channel weights), and the
representative samples that fix its activation ranges.

"Representative samples" (TFLite's term) are the seeded training inputs a quantizer observes; this
project keeps "calibration" alone for fitting the latency predictor (`toolchain.perf.calibration`), and
says "calibration method" for how onnxruntime turns the samples into activation ranges (`Calibration`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                      quantize_static)

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.core.tensors import Features, as_feeds, count, take
from toolchain.runtime.files import graph_input_names
from toolchain.runtime.sessions import model_outputs

FULL_INT8 = ("onnx-int8-qdq", "onnx-int8-qat")  # candidates with every layer quantized


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime's calibrator (an array for one input, a dict by name for several)."""

    def __init__(self, input_names: str | list[str], samples: Features, batch_size: int = 32) -> None:
        names = [input_names] if isinstance(input_names, str) else list(input_names)
        self._batches = iter([as_feeds(take(samples, slice(i, i + batch_size)), names)
                              for i in range(0, count(samples), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def representative_indices(n: int, count: int, seed: int) -> np.ndarray:
    """Which training samples calibrate (and, for QAT, choose ranges): seeded, the same for the same seed."""
    return np.random.default_rng(seed).permutation(n)[:count]


def representative_samples(x_train: Features, samples: int, seed: int) -> Features:
    return take(x_train, representative_indices(count(x_train), samples, seed))


@dataclass(frozen=True)
class ActivationScheme:
    type: QuantType
    symmetric: bool
    label: str


def activation_scheme(providers: tuple[str, ...]) -> ActivationScheme:
    """TensorRT only takes symmetric signed INT8; CPU kernels prefer asymmetric uint8 activations
    (U8S8, the VNNI / dot-product fast path, and a ReLU folds into the quantization range)."""
    if "TensorrtExecutionProvider" in providers:
        return ActivationScheme(QuantType.QInt8, True, "symmetric int8 (TensorRT)")
    return ActivationScheme(QuantType.QUInt8, False, "asymmetric uint8")


@dataclass(frozen=True)
class Calibration:
    """How onnxruntime turns the representative samples into activation ranges: min/max of what it saw,
    the range that keeps the histogram's entropy (KL divergence), or a percentile of the histogram (both
    clip rare outliers, which gives the common values finer steps)."""

    method: str = "minmax"  # minmax | entropy | percentile
    percentile: float = 99.999  # of |x|, for "percentile" only

    @property
    def label(self) -> str:
        return f"percentile {self.percentile:g}" if self.method == "percentile" else self.method

    def options(self) -> tuple[CalibrationMethod, dict[str, float]]:
        """onnxruntime's calibrate_method and the extra_options it reads."""
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.method]
        return method, ({"CalibPercentile": self.percentile} if self.method == "percentile" else {})


MINMAX = Calibration()


def quantize_int8(fp32: Path, output: Path, samples: Features, providers: tuple[str, ...],
                  exclude: list[str] | None = None, ranges: dict[str, tuple[float, float]] | None = None,
                  calibration: Calibration = MINMAX, cache: Path | None = None) -> ActivationScheme:
    """Static QDQ INT8 of `fp32` (already pre-processed) into `output`; `exclude` nodes stay float;
    `ranges` fixes the float range of named tensors instead of calibrating it (learned by QAT).
    `cache`: a JSON file of this model's calibrated ranges (for these samples and this calibration):
    written by the first call, read by the next ones, which then skip the calibration runs (the
    ranges do not depend on `exclude`, so variants of one model share them)."""
    activations = activation_scheme(providers)
    logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime.quantization logs through the root logger
    overrides = {name: [{"rmin": np.float32(low), "rmax": np.float32(high)}] for name, (low, high) in (ranges or {}).items()}
    method, options = calibration.options()
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
        quantize_static(str(fp32), str(output), ArrayCalibrationReader(graph_input_names(fp32), samples),
                        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=activations.type, nodes_to_exclude=list(exclude or []),
                        calibrate_method=method, calibration_cache_path=cache,
                        extra_options={"ActivationSymmetric": activations.symmetric, "WeightSymmetric": True,
                                       "TensorQuantOverrides": overrides, **options})
    return activations


def prepared_reference(artifact: Artifact, ctx: BuildContext) -> Path:
    """The FP32 model after onnxruntime's quantization pre-processing (shape inference, fusions), made once."""
    prepared = ctx.work_path("model-fp32-prepared.onnx")
    if not prepared.exists():
        quant_pre_process(str(artifact.source.path), str(prepared), skip_symbolic_shape=True)
    return prepared


def validation_accuracy(path, x: np.ndarray, y: np.ndarray) -> float:
    return float((model_outputs(path, x)[0].argmax(axis=1) == y).mean())


def validation_metric(path: Path, ctx: BuildContext, reference: Path) -> float:
    """The task's metric of a model file on the validation split (`reference`: the FP32 model whose
    outputs `agreement` compares with)."""
    x = ctx.dataset.x_val
    reference_outputs = model_outputs(reference, x) if not ctx.metric.needs_labels else None
    return ctx.metric.value(model_outputs(path, x), ctx.dataset.y_val, reference_outputs)


def int8_validation_drops(artifact: Artifact, ctx: BuildContext) -> dict[str, float]:
    """The metric lost on validation vs FP32 by each full-INT8 candidate (static, QAT), by name, in the
    metric's units; measured once per file (QAT and mixed precision both ask)."""
    cache = artifact.metrics.setdefault("validation_metric", {})

    def value(candidate: Candidate) -> float:
        if candidate.name not in cache:
            cache[candidate.name] = validation_metric(candidate.path, ctx, artifact.reference.path)
        return cache[candidate.name]

    reference = value(artifact.reference)
    return {c.name: ctx.metric.drop(reference, value(c)) for c in artifact.candidates if c.name in FULL_INT8}
