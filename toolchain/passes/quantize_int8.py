"""Static INT8 quantization (QDQ format, per-channel weights) calibrated on training samples.

QDQ keeps the graph portable (TensorRT, onnxruntime CPU/GPU and others fuse the Q/DQ pairs into
integer kernels); per-channel weight scales keep the accuracy drop of small convolutions low. The
calibration set is a seeded, class-balanced-by-chance subset of the training split, never test data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from toolchain.artifact import Artifact, Candidate
from toolchain.workflow import BuildContext


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime's calibrator."""

    def __init__(self, input_name: str, samples: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter([{input_name: samples[i:i + batch_size]} for i in range(0, len(samples), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_samples(x_train: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return x_train[rng.permutation(len(x_train))[:count]]


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


class QuantizeInt8Pass:
    name: ClassVar[str] = "quantize-int8"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        reference = artifact.reference
        prepared = ctx.work_path("model-fp32-prepared.onnx")
        output = ctx.work_path("model-int8.onnx")
        samples = calibration_samples(ctx.dataset.x_train, ctx.config.compress.calibration_samples, ctx.seed)
        activations = activation_scheme(ctx.profile.providers)
        logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime.quantization logs through the root logger
        with ctx.console.status(f"  calibrating on {len(samples)} training samples"):
            quant_pre_process(str(reference.path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(output), ArrayCalibrationReader("input", samples),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=activations.type,
                            extra_options={"ActivationSymmetric": activations.symmetric, "WeightSymmetric": True})
        candidate = Candidate(name="onnx-int8-qdq", precision="int8", path=output,
                              metrics={"calibration_samples": len(samples), "method": f"static QDQ per-channel, {activations.label} activations, minmax"})
        artifact.candidates.append(candidate)
        ctx.console.print(f"  {output.name}: {candidate.bytes:,} bytes ({candidate.bytes / reference.bytes:.2f}x FP32)")
        return artifact
