"""Static INT8 quantization (QDQ format, per-channel weights) calibrated on training samples.

QDQ keeps the graph portable (TensorRT, onnxruntime CPU/GPU and others fuse the Q/DQ pairs into
integer kernels); per-channel weight scales keep the accuracy drop of small convolutions low. The
calibration set is a seeded, class-balanced-by-chance subset of the training split, never test data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
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


class QuantizeInt8Pass:
    name: ClassVar[str] = "quantize-int8"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        reference = artifact.reference
        output = ctx.work_path("model-int8.onnx")
        samples = calibration_samples(ctx.dataset.x_train, ctx.config.compress.calibration_samples, ctx.seed)
        with ctx.console.status(f"  calibrating on {len(samples)} training samples"):
            activations = quantize_int8(prepared_reference(artifact, ctx), output, samples, ctx.profile.providers)
        candidate = Candidate(name="onnx-int8-qdq", precision="int8", path=output,
                              metrics={"calibration_samples": len(samples),
                                       "method": f"static QDQ per-channel, {activations.label} activations, minmax"})
        artifact.candidates.append(candidate)
        ctx.console.print(f"  {output.name}: {candidate.bytes:,} bytes ({candidate.bytes / reference.bytes:.2f}x FP32)")
        return artifact
