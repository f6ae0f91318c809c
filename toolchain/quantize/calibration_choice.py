"""Which calibration method, and whether the model's final activation stays in float, chosen by the
build's metric on the validation split.

No calibration method is best for every model: min/max keeps every value but spends the 256 steps on
rare outliers; entropy and percentile clip the outliers and give the common values finer steps, which
wins on wide-tailed activations and loses where the tail carries the signal. A final Softmax/Sigmoid
quantized to 8 bits rounds every probability to a multiple of about 1/256, which costs nothing for
top-1 accuracy and a lot for metrics that read the scores (agreement, calibrated probabilities). So
each option is built and its validation drop (`[eval] metric` vs FP32) measured; the smallest drop
wins, ties going to the simplest (the earliest tried: min/max, then percentile, then entropy; final
activation quantized before kept in float).

Cost: the histogram methods keep every activation of every sample in memory and are several times
slower than min/max (MobileNetV2 at 224x224 on two idle cores: 6 s for 32 samples each, min/max 3 s), so
they see fewer samples (`HISTOGRAM_SAMPLES`, by budget); on a small model every option takes well
under a second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from toolchain.core.artifact import Artifact
from toolchain.core.contract import BuildContext
from toolchain.core.tensors import count
from toolchain.quantize.int8 import (Calibration, prepared_reference, quantize_int8, representative_samples,
                                     validation_metric)

FINAL_ACTIVATIONS = ("Softmax", "Sigmoid", "LogSoftmax")
HISTOGRAM_SAMPLES = {"quick": 16, "standard": 64, "thorough": 128}  # at most, for entropy and percentile
PERCENTILES = {"quick": (99.999,), "standard": (99.999,), "thorough": (99.99, 99.999)}


@dataclass(frozen=True)
class Trial:
    """One way to quantize: a calibration method, the samples it sees, the final activations kept in float."""

    calibration: Calibration
    samples: int
    float_nodes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        kept = f", {'+'.join(self.float_nodes)} in float" if self.float_nodes else ""
        return f"{self.calibration.label} ({self.samples} samples){kept}"

    def cache_name(self) -> str:
        """The file of its calibrated ranges: one per method and sample count (float nodes do not change them)."""
        return f"calibration-{self.calibration.label.replace(' ', '-')}-{self.samples}.json"

    def record(self) -> dict[str, Any]:
        percentile = self.calibration.percentile if self.calibration.method == "percentile" else None
        return {"label": self.label, "method": self.calibration.method, "percentile": percentile,
                "samples": self.samples, "float_nodes": list(self.float_nodes)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Trial:
        calibration = Calibration(record["method"], record["percentile"] or Calibration().percentile)
        return cls(calibration, record["samples"], tuple(record["float_nodes"]))

    def quantize(self, prepared: Path, output: Path, ctx: BuildContext, exclude: Sequence[str] = ()) -> None:
        """Quantize `prepared` this way into `output`, `exclude` in float too; the calibrated ranges are
        computed once per build and reused (`cache_name` in the work directory)."""
        samples = representative_samples(ctx.dataset.x_train, self.samples, ctx.seed)
        quantize_int8(prepared, output, samples, ctx.profile.providers, exclude=[*self.float_nodes, *exclude],
                      calibration=self.calibration, cache=ctx.work_path(self.cache_name()))


def final_activations(path: Path) -> list[str]:
    """Softmax / Sigmoid / LogSoftmax nodes whose output is a graph output (the model emits probabilities)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if n.op_type in FINAL_ACTIVATIONS and n.output[0] in outputs]


def method_trials(budget: str, calibration_samples: int, available: int) -> list[Trial]:
    """The calibration methods a budget tries, simplest first, each with its sample count."""
    minmax = min(calibration_samples, available)
    histogram = min(HISTOGRAM_SAMPLES[budget], minmax)
    return [Trial(Calibration("minmax"), minmax),
            *(Trial(Calibration("percentile", p), histogram) for p in PERCENTILES[budget]),
            Trial(Calibration("entropy"), histogram)]


@dataclass
class CalibrationChoice:
    trial: Trial
    path: Path  # the chosen INT8 file
    value: float  # its validation metric
    report: dict[str, Any]


def choose_calibration(prepared: Path, reference: Path, ctx: BuildContext, reference_value: float) -> CalibrationChoice:
    """Quantize `prepared` every way the budget tries, measure each file's validation metric, keep the
    file with the smallest drop vs `reference_value` (the FP32 model's) and delete the others.

    Quick and standard budgets try the final activations in float with the best method only; thorough
    crosses them with every method."""
    metric = ctx.metric
    tried: list[tuple[Trial, Path, float]] = []
    rows: list[dict[str, Any]] = []

    def run(trial: Trial) -> None:
        started = time.perf_counter()
        path = ctx.work_path(f"model-int8-trial-{len(tried)}.onnx")
        trial.quantize(prepared, path, ctx)
        value = validation_metric(path, ctx, reference)
        tried.append((trial, path, value))
        rows.append({**trial.record(), "validation_value": value, "validation_drop": metric.drop(reference_value, value),
                     "seconds": round(time.perf_counter() - started, 3)})

    def best() -> tuple[Trial, Path, float]:  # smallest drop; min() keeps the earliest of equal ones
        return min(tried, key=lambda t: round(metric.drop(reference_value, t[2]), 9))

    methods = method_trials(ctx.budget, ctx.config.compress.calibration_samples, count(ctx.dataset.x_train))
    for trial in methods:
        run(trial)
    finals = tuple(final_activations(prepared))
    if finals:
        for trial in methods if ctx.budget == "thorough" else [best()[0]]:
            run(Trial(trial.calibration, trial.samples, finals))
    chosen, path, value = best()
    for _, other, _ in tried:
        if other != path:
            other.unlink(missing_ok=True)
    drop = metric.drop(reference_value, value)
    report = {"metric": metric.name, "validation_fp32": reference_value, "final_activations": list(finals),
              "trials": rows, "chosen": chosen.label, "chosen_trial": chosen.record(),
              "decision": (f"{chosen.label}: {metric.name} drop {metric.format_drop(drop)} on validation, the smallest of "
                           f"{len(tried)} tried (ties go to the simplest)")}
    return CalibrationChoice(chosen, path, value, report)


def quantize_as_chosen(artifact: Artifact, ctx: BuildContext, output: Path, exclude: Sequence[str]) -> None:
    """The prepared reference quantized the way the quantize-int8 pass chose (method, samples, final
    activations in float), with `exclude` in float too: what mixed precision and the latency-aware
    variants vary, so they differ from `onnx-int8-qdq` only in the layers they name."""
    trial = Trial.from_record(artifact.metrics["int8_calibration"]["chosen_trial"])
    trial.quantize(prepared_reference(artifact, ctx), output, ctx, exclude)
