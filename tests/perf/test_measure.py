"""Host measurement with real onnxruntime sessions on small models built here (no timing asserts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.errors import ToolchainError
from toolchain.runtime.measure import LatencyStats, make_feeds, measure_latencies, measure_peak_rss
from toolchain.runtime.measure import make_session

SHAPE = (1, 8, 8)


def _mlp(path: Path, hidden: int, elem_type: int = TensorProto.FLOAT) -> Path:
    """input (N,1,8,8) -> Flatten -> MatMul -> Relu -> MatMul -> (N,10)."""
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, hidden)).astype(np_type), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np_type), "w2")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"])],
        "mlp",
        [helper.make_tensor_value_info("input", elem_type, ["batch", *SHAPE])],
        [helper.make_tensor_value_info("logits", elem_type, ["batch", 10])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("measure")
    return {"small": _mlp(root / "small.onnx", 16), "large": _mlp(root / "large.onnx", 512),
            "half": _mlp(root / "half.onnx", 16, TensorProto.FLOAT16)}


def _check(stats: LatencyStats) -> None:
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.mean_ms > 0
    assert len(stats.samples_ms) == stats.runs


def test_interleaved_latencies_are_ordered_and_respect_min_runs(models):
    pair = {"small": models["small"], "large": models["large"]}
    result = measure_latencies(pair, SHAPE, warmup=2, min_runs=40, max_seconds=0.0, runs_per_round=5)
    assert set(result) == {"small", "large"}
    for stats in result.values():
        _check(stats)
        assert stats.runs >= 40
    assert set(result["small"].to_dict()) == {"runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms"}


def test_max_runs_stops_early_and_rounds_are_even(models):
    pair = {"a": models["small"], "b": models["large"]}
    result = measure_latencies(pair, SHAPE, warmup=1, min_runs=10, max_seconds=60.0, runs_per_round=5, max_runs=15)
    assert result["a"].runs == result["b"].runs == 15


def test_float16_models_get_float16_inputs(models):
    session = make_session(models["half"])
    feeds = make_feeds(session, SHAPE, seed=3)
    assert feeds["input"].dtype == np.float16 and feeds["input"].shape == (1, *SHAPE)
    # Same seed, same values whatever the model's dtype: candidates see identical data.
    same = make_feeds(make_session(models["small"]), SHAPE, seed=3)["input"]
    np.testing.assert_array_equal(feeds["input"], same.astype(np.float16))
    _check(measure_latencies({"half": models["half"]}, SHAPE, warmup=1, min_runs=5, max_seconds=0.0)["half"])


def test_peak_rss_in_a_light_child_process(models):
    result = measure_peak_rss(models["large"], SHAPE, runs=5)
    assert result["model_rss_mb"] >= 0
    assert result["process_peak_rss_mb"] > result["baseline_rss_mb"] > 0
    # The child imports numpy and onnxruntime only: no torch, onnx or toolchain.
    assert not {"torch", "onnx", "toolchain"} & set(result["imported_packages"])


def test_bad_inputs_are_clear_errors(tmp_path: Path, models):
    with pytest.raises(ValueError, match="no models"):
        measure_latencies({}, SHAPE)
    with pytest.raises(ToolchainError, match="does not exist"):
        measure_latencies({"missing": tmp_path / "missing.onnx"}, SHAPE)
    junk = tmp_path / "junk.onnx"
    junk.write_text("junk")
    with pytest.raises(ToolchainError, match="cannot load"):
        measure_latencies({"junk": junk}, SHAPE)
    with pytest.raises(ToolchainError, match="peak RSS"):
        measure_peak_rss(junk, SHAPE)
