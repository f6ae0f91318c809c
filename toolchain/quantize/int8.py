"""Static INT8 quantization of ONNX models with onnxruntime (QDQ, per-channel weights), and the
representative samples that fix its activation ranges.

"Representative samples" (TFLite's term) are the seeded training inputs a quantizer observes; this
project keeps "calibration" for fitting the latency predictor (`toolchain.perf.calibration`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.runtime.sessions import model_logits

FULL_INT8 = ("onnx-int8-qdq", "onnx-int8-qat")  # candidates with every layer quantized


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime's calibrator."""

    def __init__(self, input_name: str, samples: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter([{input_name: samples[i:i + batch_size]} for i in range(0, len(samples), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def representative_indices(n: int, count: int, seed: int) -> np.ndarray:
    """Which training samples calibrate (and, for QAT, choose ranges): seeded, the same for the same seed."""
    return np.random.default_rng(seed).permutation(n)[:count]


def representative_samples(x_train: np.ndarray, count: int, seed: int) -> np.ndarray:
    return x_train[representative_indices(len(x_train), count, seed)]


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


def quantize_int8(fp32: Path, output: Path, samples: np.ndarray, providers: tuple[str, ...],
                  exclude: list[str] | None = None, ranges: dict[str, tuple[float, float]] | None = None) -> ActivationScheme:
    """Static QDQ INT8 of `fp32` (already pre-processed) into `output`; `exclude` nodes stay float;
    `ranges` fixes the float range of named tensors instead of calibrating it (learned by QAT)."""
    activations = activation_scheme(providers)
    logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime.quantization logs through the root logger
    overrides = {name: [{"rmin": np.float32(low), "rmax": np.float32(high)}] for name, (low, high) in (ranges or {}).items()}
    quantize_static(str(fp32), str(output), ArrayCalibrationReader("input", samples),
                    quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=activations.type, nodes_to_exclude=list(exclude or []),
                    extra_options={"ActivationSymmetric": activations.symmetric, "WeightSymmetric": True,
                                   "TensorQuantOverrides": overrides})
    return activations


def prepared_reference(artifact: Artifact, ctx: BuildContext) -> Path:
    """The FP32 model after onnxruntime's quantization pre-processing (shape inference, fusions), made once."""
    prepared = ctx.work_path("model-fp32-prepared.onnx")
    if not prepared.exists():
        quant_pre_process(str(artifact.reference.path), str(prepared), skip_symbolic_shape=True)
    return prepared


def validation_accuracy(path, x: np.ndarray, y: np.ndarray) -> float:
    return float((model_logits(path, x).argmax(axis=1) == y).mean())


def int8_validation_drops(artifact: Artifact, ctx: BuildContext) -> dict[str, float]:
    """Validation accuracy lost vs FP32 by each full-INT8 candidate (static, QAT), by name; measured once
    per file (QAT and mixed precision both ask)."""
    cache = artifact.metrics.setdefault("validation_accuracy", {})
    x, y = ctx.dataset.x_val, ctx.dataset.y_val

    def accuracy(candidate: Candidate) -> float:
        if candidate.name not in cache:
            cache[candidate.name] = validation_accuracy(candidate.path, x, y)
        return cache[candidate.name]

    reference = accuracy(artifact.reference)
    return {c.name: reference - accuracy(c) for c in artifact.candidates if c.name in FULL_INT8}
