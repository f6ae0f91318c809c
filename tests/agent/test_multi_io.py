"""Models with several inputs and outputs, and models that are not classifiers, served by the real agent.

Every model here is built in the test with `onnx.helper` and run by real onnxruntime; every bundle is
signed with `write_bundle` as a build would sign it; requests go over a real socket to the agent's REST
endpoint and telemetry over a real mosquitto.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime_agent.bundle import bundle_filename, read_bundle, write_bundle
from runtime_agent.drift import PSI_MODERATE, PSI_SIGNIFICANT, DriftMonitor
from runtime_agent.errors import AgentError, InputError
from runtime_agent.model import LoadedModel
from runtime_agent.reference import build_reference, prediction_values
from runtime_agent.signing import load_private_key, load_public_key, write_keypair
from runtime_agent.updates import self_test
from tests.agent_helpers import http, running_agent
from tests.conftest import Build, Recorder, provision_device, run_cli
from toolchain.deploy.broker import ManagedBroker

RNG_SEED = 14


def _model(nodes: list, inputs: list, outputs: list, weights: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(nodes, "m", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def two_input_model() -> bytes:
    """`features` float32 [4] and `ids` int64 [3] -> `score` float32 [2] (a linear map of both) and
    `total` int64 [1] (the sum of the ids)."""
    rng = np.random.default_rng(RNG_SEED)
    nodes = [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["features", "w_features"], ["from_features"]),
             helper.make_node("MatMul", ["ids_f", "w_ids"], ["from_ids"]),
             helper.make_node("Add", ["from_features", "from_ids"], ["score"]),
             helper.make_node("ReduceSum", ["ids", "axis_1"], ["total"], keepdims=1)]
    return _model(nodes,
                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 4]),
                   helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 3])],
                  [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 2]),
                   helper.make_tensor_value_info("total", TensorProto.INT64, ["n", 1])],
                  {"w_features": rng.standard_normal((4, 2)).astype(np.float32),
                   "w_ids": (rng.standard_normal((3, 2)) * 0.1).astype(np.float32), "axis_1": np.array([1], np.int64)})


def regression_model() -> bytes:
    """`x` float32 [5] -> `value` float32 [1]: a linear regressor."""
    rng = np.random.default_rng(RNG_SEED + 1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["value"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
                  [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["n", 1])],
                  {"w": rng.standard_normal((5, 1)).astype(np.float32), "b": np.array([0.5], np.float32)})


def classifier_model() -> bytes:
    """`input` float32 [6] -> `logits` float32 [3]: what every bundle before named inputs held."""
    rng = np.random.default_rng(RNG_SEED + 2)
    return _model([helper.make_node("MatMul", ["input", "w"], ["logits"])],
                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 6])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
                  {"w": rng.standard_normal((6, 3)).astype(np.float32)})


def bare_outputs(model: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)


def two_input_data(n: int, seed: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"features": (rng.standard_normal((n, 4)) + shift).astype(np.float32),
            "ids": rng.integers(0, 50, (n, 3)).astype(np.int64)}


def regression_data(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 5)) + shift).astype(np.float32)


def signed_bundle(directory: Path, model: bytes, fields: dict[str, Any], samples: dict[str, np.ndarray]) -> Build:
    """A bundle as a build signs it, with only the manifest fields given (plus the required ones)."""
    private, public = write_keypair(directory / "keys")
    manifest = {"name": "m", "version": 1, "target": "raspberry-pi-5", "created": "2026-12-05T00:00:00+00:00",
                "artifacts": [{"path": "model.onnx", "format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "role": "model"},
                              {"path": "samples.npz", "format": "npz", "precision": None, "runtime": None, "role": "samples"}],
                "metrics": {}, "provenance": {}, **fields}
    buffer = io.BytesIO()
    np.savez(buffer, **samples)
    path = write_bundle(directory / bundle_filename("m", 1, "raspberry-pi-5"), manifest,
                        {"model.onnx": model, "samples.npz": buffer.getvalue()}, load_private_key(private))
    return Build(out=directory, bundle=path, pubkey=public, stdout="", stderr="")


def two_input_bundle(directory: Path) -> Build:
    model, train = two_input_model(), two_input_data(2000, seed=1)
    train_outputs = bare_outputs(model, train)
    samples = two_input_data(8, seed=2)
    sample_outputs = bare_outputs(model, samples)
    return signed_bundle(directory, model, {
        "task": "classification", "labels": ["left", "right"],
        "input": {"name": "features", "shape": [4], "dtype": "float32", "preprocessing": {"normalize": "none"}},
        "inputs": [{"name": "features", "shape": [4], "dtype": "float32"}, {"name": "ids", "shape": [3], "dtype": "int64"}],
        "outputs": [{"name": "score", "shape": [2], "dtype": "float32"}, {"name": "total", "shape": [1], "dtype": "int64"}],
        "reference": build_reference(train, train_outputs[0], "classification", 2),
    }, {**{f"x__{name}": array for name, array in samples.items()}, "logits": sample_outputs[0],
        **{f"output__{k}": out for k, out in enumerate(sample_outputs)}})


def regression_bundle(directory: Path) -> Build:
    model, train = regression_model(), regression_data(2000, seed=3)
    samples = regression_data(8, seed=4)
    return signed_bundle(directory, model, {
        "task": "regression", "labels": [],
        "input": {"name": "x", "shape": [5], "dtype": "float32", "preprocessing": {"normalize": "none"}},
        "inputs": [{"name": "x", "shape": [5], "dtype": "float32"}],
        "outputs": [{"name": "value", "shape": [1], "dtype": "float32"}],
        "reference": build_reference(train, bare_outputs(model, {"x": train})[0], "regression", 0),
    }, {"x": samples, "logits": bare_outputs(model, {"x": samples})[0]})


def old_style_bundle(directory: Path) -> Build:
    """No `task`, `inputs` or `outputs`: a one-input classifier as every bundle before them."""
    model, train = classifier_model(), np.random.default_rng(5).standard_normal((2000, 6)).astype(np.float32)
    samples = train[:8]
    return signed_bundle(directory, model, {
        "labels": ["a", "b", "c"], "input": {"name": "input", "shape": [6], "dtype": "float32", "preprocessing": {}},
        "reference": build_reference(train, bare_outputs(model, {"input": train})[0], "classification", 3),
    }, {"x": samples, "y": np.zeros(8, np.int64), "logits": bare_outputs(model, {"input": samples})[0]})


def loaded(build: Build) -> LoadedModel:
    return LoadedModel.from_bundle(read_bundle(build.bundle, load_public_key(build.pubkey)))


def tensor(name: str, array: np.ndarray, datatype: str) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}


def infer(base: str, *tensors: dict[str, Any], **extra: Any) -> tuple[int, dict]:
    return http("POST", f"{base}/v2/models/m/infer", {"id": "r", "inputs": list(tensors), **extra})


# --- REST ------------------------------------------------------------------------------------------

def test_two_inputs_are_served_by_name_and_every_output_comes_back(broker: ManagedBroker, tmp_path: Path) -> None:
    build = two_input_bundle(tmp_path / "b")
    x = two_input_data(5, seed=9)
    expected = bare_outputs(two_input_model(), x)
    device = provision_device(tmp_path / "dev", build, broker.url, window_s=3600)
    with running_agent(device) as (agent, base):
        status, meta = http("GET", f"{base}/v2/models/m")
        assert status == 200
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]},
                                  {"name": "ids", "datatype": "INT64", "shape": [-1, 3]}]
        assert [o["name"] for o in meta["outputs"]] == ["score", "total", "class", "label"]
        assert meta["outputs"][1] == {"name": "total", "datatype": "INT64", "shape": [-1, 1]}

        # the order of the tensors in the request does not matter: they are matched by name
        status, answer = infer(base, tensor("ids", x["ids"], "INT64"), tensor("features", x["features"], "FP32"))
        assert status == 200, answer
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert list(outputs) == ["score", "total", "class", "label"]
        assert outputs["score"]["datatype"] == "FP32" and outputs["score"]["shape"] == [5, 2]
        assert outputs["total"]["datatype"] == "INT64" and outputs["total"]["shape"] == [5, 1]
        assert np.array_equal(np.array(outputs["score"]["data"], np.float32).reshape(5, 2), expected[0])
        assert np.array_equal(np.array(outputs["total"]["data"]).reshape(5, 1), expected[1])
        assert outputs["class"]["data"] == expected[0].argmax(axis=1).tolist()
        assert outputs["label"]["data"] == [["left", "right"][i] for i in expected[0].argmax(axis=1)]

        status, answer = infer(base, tensor("features", x["features"], "FP32"), tensor("ids", x["ids"], "INT64"),
                               outputs=[{"name": "total"}])
        assert status == 200 and [o["name"] for o in answer["outputs"]] == ["total"]


@pytest.mark.parametrize("tensors, message", [
    ([("features", np.zeros((2, 4), np.float32), "FP32")],
     "missing input(s) 'ids'; the model's inputs are 'features', 'ids'"),
    ([("features", np.zeros((2, 4), np.float32), "FP32"), ("ids", np.zeros((2, 3), np.float32), "FP32")],
     "input 'ids' dtype is float32, the model expects int64; convert it with .astype('int64')"),
    ([("features", np.zeros((2, 5), np.float32), "FP32"), ("ids", np.zeros((2, 3), np.int64), "INT64")],
     "input 'features' shape is [2, 5], the model expects [4] or a batch [n, 4]"),
    ([("features", np.zeros((2, 4), np.float32), "FP32"), ("ids", np.zeros((3, 3), np.int64), "INT64")],
     "the inputs hold different numbers of samples (features: 2, ids: 3); send the same number for every input"),
    ([("features", np.full((1, 4), np.inf, np.float32), "FP32"), ("ids", np.zeros((1, 3), np.int64), "INT64")],
     "input 'features' has 4 NaN or infinite value(s)"),
    ([("features", np.zeros((2, 4), np.float32), "FP32"), ("ids", np.zeros((2, 3), np.int64), "INT64"),
      ("mask", np.zeros((2, 3), np.int64), "INT64")],
     "unknown input 'mask'; the model's inputs are 'features', 'ids'"),
    ([("features", np.zeros((2, 4), np.float32), "FP32"), ("features", np.zeros((2, 4), np.float32), "FP32")],
     "input 'features' is sent twice; send each input once"),
])
def test_a_bad_input_is_refused_with_its_name_and_serving_continues(broker: ManagedBroker, tmp_path: Path,
                                                                    tensors: list, message: str) -> None:
    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    with running_agent(device) as (agent, base):
        status, answer = infer(base, *(tensor(*t) for t in tensors))
        assert status == 400 and message in answer["error"], answer
        x = two_input_data(1, seed=10)
        status, answer = infer(base, tensor("features", x["features"], "FP32"), tensor("ids", x["ids"], "INT64"))
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 2]


def test_a_regressor_answers_without_class_or_label_and_reports_drift_of_its_values(
        broker: ManagedBroker, tmp_path: Path) -> None:
    build = regression_bundle(tmp_path / "b")
    reference = read_bundle(build.bundle, load_public_key(build.pubkey)).manifest["reference"]
    recorder = Recorder(broker)
    device = provision_device(tmp_path / "dev", build, broker.url, window_s=3600)
    try:
        with running_agent(device) as (agent, base):
            status, meta = http("GET", f"{base}/v2/models/m")
            assert meta["outputs"] == [{"name": "value", "datatype": "FP32", "shape": [-1, 1]}]
            windows = []
            for shift in (0.0, 1.5):
                x = regression_data(400, seed=11, shift=shift)
                for start in range(0, 400, 50):
                    status, answer = infer(base, tensor("x", x[start:start + 50], "FP32"))
                    assert status == 200 and [o["name"] for o in answer["outputs"]] == ["value"]
                    assert answer["outputs"][0]["shape"] == [50, 1]
                windows.append(agent.close_window())
            published = recorder.wait_for(lambda r: len(r.payloads("/telemetry")) == 2 and r.payloads("/telemetry"),
                                          what="two telemetry windows")
    finally:
        recorder.close()
    assert [w["drift"] for w in published] == [w["drift"] for w in windows]
    calm, moved = (w["drift"] for w in windows)
    assert reference["predictions"]["name"] == "output_mean" and len(reference["predictions"]["edges"]) == 9
    assert set(calm["psi"]) == {f"x{i}" for i in range(5)} and calm["n"] == moved["n"] == 400
    assert calm["prediction_psi"] < PSI_MODERATE and calm["psi_max"] < PSI_MODERATE and not calm["alarm"]
    assert moved["prediction_psi"] > PSI_SIGNIFICANT and moved["alarm"]


def test_per_input_psi_names_each_input(broker: ManagedBroker, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    with running_agent(device) as (agent, base):
        x = two_input_data(300, seed=12, shift=1.0)  # only `features` moves
        status, _ = infer(base, tensor("features", x["features"], "FP32"), tensor("ids", x["ids"], "INT64"))
        assert status == 200
        drift = agent.close_window()["drift"]
    assert list(drift["psi"]) == [f"features.x{i}" for i in range(4)] + [f"ids.x{i}" for i in range(3)]
    assert min(drift["psi"][f"features.x{i}"] for i in range(4)) > PSI_SIGNIFICANT
    assert max(drift["psi"][f"ids.x{i}"] for i in range(3)) < PSI_MODERATE


def test_an_old_style_bundle_serves_as_before(broker: ManagedBroker, tmp_path: Path) -> None:
    build = old_style_bundle(tmp_path / "b")
    x = np.random.default_rng(13).standard_normal((4, 6)).astype(np.float32)
    [logits] = bare_outputs(classifier_model(), {"input": x})
    device = provision_device(tmp_path / "dev", build, broker.url, window_s=3600)
    with running_agent(device) as (agent, base):
        status, meta = http("GET", f"{base}/v2/models/m")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                                   {"name": "class", "datatype": "INT64", "shape": [-1]},
                                   {"name": "label", "datatype": "BYTES", "shape": [-1]}]
        status, answer = infer(base, tensor("input", x, "FP32"))
        assert status == 200 and [o["name"] for o in answer["outputs"]] == ["logits", "class", "label"]
        assert np.array_equal(np.array(answer["outputs"][0]["data"], np.float32).reshape(4, 3), logits)
        assert answer["outputs"][1]["data"] == logits.argmax(axis=1).tolist()
        assert answer["outputs"][2]["data"] == [["a", "b", "c"][i] for i in logits.argmax(axis=1)]
        status, answer = infer(base, tensor("pixels", x, "FP32"))
        assert status == 400 and answer["error"] == "unknown input 'pixels'; the model's input is 'input'"
        assert list(agent.close_window()["drift"]["psi"]) == [f"x{i}" for i in range(6)]


# --- the model in process ---------------------------------------------------------------------------

def test_validate_takes_an_array_for_one_input_and_a_dict_for_several(tmp_path: Path) -> None:
    one, two = loaded(old_style_bundle(tmp_path / "one")), loaded(two_input_bundle(tmp_path / "two"))
    x = np.zeros((2, 6), np.float32)
    assert one.validate(x) is x and one.validate({"input": x}) is x
    assert one.predict(x[0]).classes.shape == (1,)  # one sample gains the batch axis
    batch = two.validate({"ids": np.zeros(3, np.int64), "features": np.zeros(4, np.float32)})
    assert list(batch) == ["features", "ids"] and batch["features"].shape == (1, 4) and batch["ids"].shape == (1, 3)
    with pytest.raises(InputError, match=r"the model takes 2 inputs \('features' \(float32 \[4\]\), 'ids' \(int64 \[3\]\)\); "
                                         r"pass a dict of arrays by input name, got ndarray"):
        two.validate(np.zeros((1, 4), np.float32))
    prediction = two.predict(two_input_data(3, seed=14))
    assert list(prediction.outputs) == ["score", "total"] and prediction.logits is prediction.outputs["score"]


def test_a_regressor_prediction_has_no_classes(tmp_path: Path) -> None:
    model = loaded(regression_bundle(tmp_path / "b"))
    prediction = model.predict(regression_data(3, seed=15))
    assert model.task == "regression" and list(prediction.outputs) == ["value"]
    assert prediction.classes is None and prediction.labels is None and prediction.scores is None
    assert np.array_equal(prediction.drift_values, prediction.logits[:, 0].astype(np.float64))


def test_self_test_checks_every_output(tmp_path: Path) -> None:
    build = two_input_bundle(tmp_path / "b")
    self_test(loaded(build))
    self_test(loaded(regression_bundle(tmp_path / "r")))
    bundle = read_bundle(build.bundle, load_public_key(build.pubkey))
    samples = dict(np.load(io.BytesIO(bundle.files["samples.npz"])))
    fields = {k: v for k, v in bundle.manifest.items() if k not in ("format", "key_id", "artifacts")}
    samples["output__1"] = samples["output__1"] + 1  # the second output no longer matches
    broken = signed_bundle(tmp_path / "broken", two_input_model(), fields, samples)
    with pytest.raises(AgentError, match=r"self-test failed: output 'total' on the bundle's 8 sample inputs differ"):
        self_test(loaded(broken))
    del samples["x__ids"]
    missing = signed_bundle(tmp_path / "missing", two_input_model(), fields, samples)
    with pytest.raises(AgentError, match="self-test impossible: samples.npz lacks x__ids"):
        self_test(loaded(missing))


# --- the reference ----------------------------------------------------------------------------------

def test_build_reference_round_trips_for_several_inputs() -> None:
    model, train = two_input_model(), two_input_data(2000, seed=1)
    scores = bare_outputs(model, train)[0]
    reference = json.loads(json.dumps(build_reference(train, scores, "classification", 2)))  # as a manifest holds it
    assert [f["name"] for f in reference["features"]] == [f"features.x{i}" for i in range(4)] + [f"ids.x{i}" for i in range(3)]
    assert reference["n"] == 2000 and len(reference["predictions"]["fractions"]) == 2
    monitor = DriftMonitor(reference, {"features": (4,), "ids": (3,)})
    monitor.update(train, prediction_values(scores, "classification"))
    counts = monitor.counts()
    for spec in reference["features"]:
        assert np.allclose(counts[spec["name"]] / 2000, spec["fractions"], atol=1e-6)
    report = monitor.window_report()
    assert report["psi_max"] < 1e-6 and report["prediction_psi"] < 1e-6
    with pytest.raises(ValueError, match=r"inputs \['ids', 'features'\] do not match the model's \['features', 'ids'\]"):
        monitor.update({"ids": train["ids"], "features": train["features"]})


def test_build_reference_round_trips_for_a_regressor() -> None:
    model, train = regression_model(), regression_data(2000, seed=3)
    [values] = bare_outputs(model, {"x": train})
    reference = json.loads(json.dumps(build_reference(train, values, "regression", 0)))
    predictions = reference["predictions"]
    assert predictions["name"] == "output_mean" and len(predictions["fractions"]) == len(predictions["edges"]) + 1 == 10
    assert np.allclose(predictions["fractions"], 0.1)  # quantile bins of the predicted values
    assert [f["name"] for f in reference["features"]] == [f"x{i}" for i in range(5)]
    monitor = DriftMonitor(reference, (5,))
    assert monitor.prediction_edges == tuple(predictions["edges"]) and monitor.n_prediction_bins == 10
    monitor.update(train, prediction_values(values, "regression"))
    assert monitor.window_report()["prediction_psi"] < 1e-6
    monitor.update(train, prediction_values(values + 3, "regression"))  # every answer above the last edge
    assert monitor.window_report()["prediction_psi"] > PSI_SIGNIFICANT
    with pytest.raises(ValueError, match="task must be one of classification, regression, unlabelled, got 'ranking'"):
        build_reference(train, values, "ranking", 0)


def test_an_unlabelled_model_bins_the_mean_of_its_first_output() -> None:
    rng = np.random.default_rng(16)
    maps = rng.standard_normal((500, 2, 4, 4)).astype(np.float32)  # e.g. a dense output map per sample
    reference = build_reference(rng.standard_normal((500, 3)), maps, "unlabelled", 0)
    edges = np.asarray(reference["predictions"]["edges"])
    means = maps.reshape(500, -1).mean(axis=1, dtype=np.float64)
    assert np.array_equal(prediction_values(maps, "unlabelled"), means)
    assert reference["predictions"]["name"] == "output_mean" and np.allclose(reference["predictions"]["fractions"], 0.1)
    assert np.array_equal(edges, np.quantile(means, np.linspace(0, 1, 11)[1:-1]))


def test_predict_cli_takes_an_npz_by_input_name_and_prints_every_output(tmp_path: Path) -> None:
    build = two_input_bundle(tmp_path / "b")
    x = two_input_data(2, seed=17)
    np.savez(tmp_path / "x.npz", **x)
    result = run_cli("edge-agent", "predict", "--bundle", str(build.bundle), "--input", str(tmp_path / "x.npz"),
                     "--pubkey", str(build.pubkey), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["classes"] == bare_outputs(two_input_model(), x)[0].argmax(axis=1).tolist()

    regressor = regression_bundle(tmp_path / "r")
    samples = regression_data(2, seed=18)
    np.save(tmp_path / "r.npy", samples)
    [values] = bare_outputs(regression_model(), {"x": samples})
    result = run_cli("edge-agent", "predict", "--bundle", str(regressor.bundle), "--input", str(tmp_path / "r.npy"),
                     "--pubkey", str(regressor.pubkey), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"] == {"value": values.tolist()}
    table = run_cli("edge-agent", "predict", "--bundle", str(regressor.bundle), "--input", str(tmp_path / "r.npy"),
                    "--pubkey", str(regressor.pubkey))
    assert table.stdout.splitlines() == [f"{i}\tvalue\t{values[i, 0]:.6g}" for i in range(2)]
