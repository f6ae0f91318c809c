"""The gate ships the least precise candidate that keeps the task's metric and is really faster, else falls back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.metrics import BUILTIN
from toolchain.passes.shipping.gate import GatePass


def candidate(name: str, precision: str, drop: float, host_ms: float, predicted_ms: float, fmt: str = "onnx",
              reference_value: float = 0.9) -> Candidate:
    """A candidate `drop` worse than the reference (whose metric value is `reference_value`)."""
    metric_value = reference_value - drop  # accuracy: higher is better
    return Candidate(name=name, precision=precision, path=Path(f"/nonexistent/{name}.{fmt}"), format=fmt,
                     metrics={"metric_value": metric_value, "metric_drop": drop, "latency_ms_p50_host": host_ms,
                              "latency_ms_predicted": predicted_ms})


def gate(*candidates: Candidate, max_drop: float = 0.01, min_speedup: float = 1.05,
         formats: tuple[str, ...] = ("onnx", "tflite"), metric: str = "accuracy", eval_max_drop: float | None = None,
         reference_name: str | None = None) -> Artifact:
    config = SimpleNamespace(compress=SimpleNamespace(max_accuracy_drop=max_drop, min_speedup=min_speedup),
                             eval=SimpleNamespace(max_drop=eval_max_drop))
    ctx = SimpleNamespace(config=config, metric=BUILTIN[metric], profile=SimpleNamespace(id="board", formats=formats),
                          console=SimpleNamespace(print=lambda *a, **k: None))
    return GatePass().run(Artifact(candidates=list(candidates), reference_name=reference_name), ctx)


def test_int8_ships_when_accurate_and_faster() -> None:
    result = gate(candidate("fp32", "fp32", 0, 1.0, 1.0), candidate("fp16", "fp16", 0, 0.8, 0.5),
                  candidate("int8", "int8", 0.004, 0.5, 0.25))
    assert result.shipped.name == "int8"
    assert "2.00x predicted on target vs fp16" in result.candidate("int8").verdict
    assert result.candidate("fp16").accepted and "superseded by int8" in result.candidate("fp16").verdict


def test_accuracy_drop_over_the_limit_falls_back_to_fp16() -> None:
    result = gate(candidate("fp32", "fp32", 0, 1.0, 1.0), candidate("fp16", "fp16", 0, 0.8, 0.5),
                  candidate("int8", "int8", 0.02, 0.4, 0.2))
    assert result.shipped.name == "fp16"
    assert not result.candidate("int8").accepted
    assert result.candidate("int8").verdict == "accuracy drop 2.00 pp > allowed 1.00 pp"


def test_not_really_faster_is_rejected_on_either_measure() -> None:
    on_host = gate(candidate("fp32", "fp32", 0, 1.0, 1.0), candidate("int8", "int8", 0, 0.97, 0.3))
    on_target = gate(candidate("fp32", "fp32", 0, 1.0, 1.0), candidate("int8", "int8", 0, 0.3, 0.99))
    assert on_host.shipped.name == on_target.shipped.name == "fp32"
    assert "not faster enough (1.03x on host" in on_host.candidate("int8").verdict
    assert "1.01x predicted on target" in on_target.candidate("int8").verdict


def test_int8_is_compared_with_fp32_when_fp16_was_rejected() -> None:
    result = gate(candidate("fp32", "fp32", 0, 1.0, 1.0), candidate("fp16", "fp16", 0, 1.2, 1.1),
                  candidate("int8", "int8", 0, 0.6, 0.5))
    assert result.shipped.name == "int8"
    assert "vs fp32" in result.candidate("int8").verdict
    assert result.candidate("fp32").verdict.startswith("reference")


def test_a_tflite_only_board_never_ships_onnx_and_falls_back_to_fp32_tflite() -> None:
    result = gate(candidate("onnx-fp32", "fp32", 0, 1.0, 1.0), candidate("onnx-int8", "int8", 0, 0.2, 0.2),
                  candidate("tflite-fp32", "fp32", 0, 1.1, 1.0, "tflite"),
                  candidate("tflite-int8", "int8", 0.03, 0.4, 0.4, "tflite"), formats=("tflite",))
    assert result.shipped.name == "tflite-fp32"
    assert result.candidate("tflite-fp32").verdict.startswith("fallback: board runs tflite only")
    assert not result.candidate("onnx-int8").accepted and "does not run onnx" in result.candidate("onnx-int8").verdict
    assert "accuracy drop 3.00 pp" in result.candidate("tflite-int8").verdict


def test_the_same_precision_in_another_format_is_judged_on_the_host_measurement_alone() -> None:
    # The predictor prices one graph's two translations alike; what differs is the runtime's kernels.
    fp32 = lambda: candidate("onnx-fp32", "fp32", 0, 2.0, 2.0)  # noqa: E731
    result = gate(fp32(), candidate("onnx-int8", "int8", 0, 1.0, 1.0), candidate("tflite-int8", "int8", 0, 0.8, 1.02, "tflite"))
    assert result.shipped.name == "tflite-int8"
    assert "same precision, other format: compared on host" in result.candidate("tflite-int8").verdict
    slower = gate(fp32(), candidate("onnx-int8", "int8", 0, 1.0, 1.0), candidate("tflite-int8", "int8", 0, 1.01, 0.5, "tflite"))
    assert slower.shipped.name == "onnx-int8"


def test_an_error_metric_is_gated_in_its_own_units_relative_to_the_reference_by_default() -> None:
    def regression(name: str, precision: str, rmse: float, ms: float) -> Candidate:
        return Candidate(name=name, precision=precision, path=Path(f"/nonexistent/{name}.onnx"),
                         metrics={"metric_value": rmse, "metric_drop": rmse - 50.0, "latency_ms_p50_host": ms,
                                  "latency_ms_predicted": ms})

    # RMSE 50 for FP32: 2% of it (1.0) may be lost; 50.9 passes, 51.2 does not.
    kept = gate(regression("fp32", "fp32", 50.0, 1.0), regression("int8", "int8", 50.9, 0.4), metric="rmse")
    lost = gate(regression("fp32", "fp32", 50.0, 1.0), regression("int8", "int8", 51.2, 0.4), metric="rmse")
    assert kept.shipped.name == "int8" and "rmse drop 0.9 within 1" in kept.candidate("int8").verdict
    assert lost.shipped.name == "fp32" and lost.candidate("int8").verdict == "rmse drop 1.2 > allowed 1"
    assert kept.metrics["gate"]["max_drop_from"] == "2% of the reference rmse"
    explicit = gate(regression("fp32", "fp32", 50.0, 1.0), regression("int8", "int8", 51.2, 0.4), metric="rmse", eval_max_drop=1.5)
    assert explicit.shipped.name == "int8" and explicit.metrics["gate"]["max_drop_from"] == "[eval] max_drop"


def test_an_imported_tflite_file_is_the_only_candidate_and_ships_as_it_is() -> None:
    result = gate(candidate("tflite-int8", "int8", 0, 1.0, 1.0, "tflite"), formats=("tflite",), reference_name="tflite-int8")
    assert result.shipped.name == "tflite-int8"
    assert result.candidate("tflite-int8").verdict == "imported as it is: the only candidate, nothing to compare it against"


def test_drops_add_up_against_the_trained_model_and_it_ships_when_compression_lost_too_much() -> None:
    # The distilled FP32 lost 0.8 pp against the model as trained, its INT8 another 0.4: 1.2 pp in all.
    trained = candidate("onnx-fp32-trained", "fp32", 0, 2.0, 2.0)
    result = gate(trained, candidate("onnx-fp32", "fp32", 0.008, 1.0, 1.0), candidate("onnx-int8-qdq", "int8", 0.012, 0.4, 0.4),
                  reference_name="onnx-fp32-trained")
    assert result.shipped.name == "onnx-fp32"
    assert result.candidate("onnx-int8-qdq").verdict == "accuracy drop 1.20 pp > allowed 1.00 pp"
    assert "superseded by onnx-fp32" in result.candidate("onnx-fp32-trained").verdict
    lost = gate(candidate("onnx-fp32-trained", "fp32", 0, 2.0, 2.0), candidate("onnx-fp32", "fp32", 0.015, 1.0, 1.0),
                reference_name="onnx-fp32-trained")
    assert lost.shipped.name == "onnx-fp32-trained"
