"""The TFLite/LiteRT path: onnx2tf + the TFLite converter make FP32/FP16/full-integer INT8 `.tflite`
candidates, LiteRT measures their accuracy, the gate picks among them, and the agent serves the bundle."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from runtime_agent.bundle import read_bundle
from runtime_agent.errors import BundleError
from runtime_agent.litert import LiteRtSession
from runtime_agent.model import LoadedModel
from runtime_agent.signing import load_public_key
from tests.agent_helpers import http, infer_body, running_agent
from tests.conftest import Build, provision_device, run_cli
from toolchain.core.config import load_config
from toolchain.perf.graph_cost import analyze
from toolchain.core.data import load_dataset
from toolchain.errors import ToolchainError
from toolchain.export.tflite import INSTALL_HINT, tflite_extra_missing
from toolchain.passes.onnx import export_tflite
from toolchain.passes.shipping.evaluate import EvaluatePass
from toolchain.runtime.sessions import model_logits
from toolchain.passes.torch.export_onnx import ExportOnnxPass
from toolchain.passes.onnx.export_tflite import ExportTflitePass
from toolchain.passes.torch.train import TrainPass
from toolchain.targets.profiles import resolve_target
from toolchain.core.contract import BuildContext
from toolchain.build.workflow import plan_passes, run_passes

pytestmark = [pytest.mark.slow,  # trains, converts with onnx2tf and builds
              pytest.mark.skipif(tflite_extra_missing() is not None,
                                 reason=f"the tflite extra is not installed ({tflite_extra_missing()}); {INSTALL_HINT}")]


def litert_accuracy(model: Path | bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy with the bare ai-edge-litert interpreter and hand-written int8 I/O: an independent check
    of the agent's facade and of the numbers the build reports."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model if isinstance(model, bytes) else model.read_bytes(), num_threads=1)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    feed = x
    if inp["dtype"] == np.int8:
        scale, zero = inp["quantization"]
        feed = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    interpreter.set_tensor(inp["index"], feed)
    interpreter.invoke()
    return float((interpreter.get_tensor(out["index"]).argmax(axis=1) == y).mean())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """The embedded digits example trained, exported to ONNX and to .tflite for a Raspberry Pi 5."""
    work = tmp_path_factory.mktemp("tflite")
    config = load_config(None)
    ctx = BuildContext(config=config, profile=resolve_target("rpi5"), dataset=load_dataset(config, 0),
                       out_dir=work / "out", work_dir=work)
    ctx.console.quiet = True
    artifact = run_passes([TrainPass(), ExportOnnxPass(), ExportTflitePass(), EvaluatePass()], ctx)
    return artifact, ctx


def test_full_integer_int8_tflite_keeps_accuracy_in_litert(exported) -> None:
    artifact, ctx = exported
    names = [c.name for c in artifact.candidates]
    assert names == ["onnx-fp32", "tflite-fp32", "tflite-fp16", "tflite-int8"]
    int8 = artifact.candidate("tflite-int8")
    assert int8.format == "tflite" and int8.runtime == "litert"
    x, y = ctx.dataset.x_test, ctx.dataset.y_test
    # The number the gate reads is what the bare interpreter measures, and within 1 pp of FP32.
    assert int8.metrics["accuracy"] == pytest.approx(litert_accuracy(int8.path, x, y), abs=1e-9)
    assert int8.metrics["accuracy_drop"] <= 0.01
    assert artifact.candidate("tflite-fp32").metrics["max_abs_difference_vs_onnx"] < 1e-3
    # Full integer: int8 in, int8 out, and about a quarter of the FP32 file.
    session = LiteRtSession(int8.path)
    assert session.input_dtype == np.int8 and session.get_inputs()[0].shape == ["batch", 1, 8, 8]
    assert int8.bytes < 0.35 * artifact.candidate("tflite-fp32").bytes
    assert artifact.candidate("tflite-fp16").bytes < 0.6 * artifact.candidate("tflite-fp32").bytes


def test_litert_session_batches_and_matches_single_calls(exported) -> None:
    artifact, ctx = exported
    path = artifact.candidate("tflite-int8").path
    session = LiteRtSession(path, threads=1)
    x = ctx.dataset.x_test[:5]
    batch = session.run(None, {"input": x})[0]
    one_by_one = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_array_equal(batch, one_by_one)
    assert batch.dtype == np.float32 and batch.shape == (5, 10)
    np.testing.assert_array_equal(model_logits(path, x), batch)


def test_tflite_cost_analysis_matches_the_onnx_source(exported) -> None:
    artifact, _ = exported
    onnx_cost = analyze(artifact.reference.path)
    fp32, int8 = analyze(artifact.candidate("tflite-fp32").path), analyze(artifact.candidate("tflite-int8").path)
    assert fp32.flops == pytest.approx(onnx_cost.flops, rel=0.02)  # ONNX counts the bias adds too
    assert fp32.param_count == onnx_cost.param_count
    assert set(int8.flops_by_precision) == {"int8"} and set(fp32.flops_by_precision) == {"fp32"}
    convs = [op for op in fp32.ops if op.op_type == "Conv"]
    assert [op.kind for op in convs] == [op.kind for op in onnx_cost.ops if op.op_type == "Conv"]
    assert int8.weights_bytes < 0.3 * fp32.weights_bytes


def test_planning_follows_the_profile_formats() -> None:
    config = load_config(None)
    names = lambda target: [p.name for p in plan_passes(config, resolve_target(target))]  # noqa: E731
    assert "export-tflite" in names("rpi4") and "quantize-int8" in names("rpi4")
    assert "export-tflite" not in names("jetson")
    mcu = names("stm32h7")  # .tflite only: no ONNX quantizers, the FP32 ONNX export is the source
    assert "export-tflite" in mcu and "export-onnx" in mcu and not any(n.startswith("quantize") for n in mcu)


def test_without_the_extra_a_tflite_only_board_is_a_clear_error(exported, monkeypatch) -> None:
    artifact, ctx = exported
    monkeypatch.setattr(export_tflite, "tflite_extra_missing", lambda: "onnx2tf")
    before = list(artifact.candidates)
    ctx_mcu = BuildContext(config=ctx.config, profile=resolve_target("stm32h7"), dataset=ctx.dataset,
                           out_dir=ctx.out_dir, work_dir=ctx.work_dir)
    with pytest.raises(ToolchainError, match=r"runs only \.tflite models and the 'onnx2tf' package is missing; install"):
        ExportTflitePass().run(artifact, ctx_mcu)
    ctx.console.quiet = True
    ExportTflitePass().run(artifact, ctx)  # a board that also runs ONNX builds ONNX only, and says so
    assert artifact.candidates == before and any("no .tflite candidates" in note for note in ctx.notes)


@pytest.fixture(scope="module")
def mcu_build(tmp_path_factory: pytest.TempPathFactory, isolated_home: Path) -> Build:
    out = tmp_path_factory.mktemp("mcu")
    result = run_cli("toolchain", "build", "--target", "stm32h7", "--budget", "quick", "--out", str(out), check=True)
    return Build(out=out, bundle=Path(result.stdout.strip().splitlines()[-1]), pubkey=isolated_home / "keys" / "signing.pub",
                 stdout=result.stdout, stderr=result.stderr)


def test_microcontroller_build_ships_tflite_and_reports_every_candidate(mcu_build: Build) -> None:
    bundle = read_bundle(mcu_build.bundle, load_public_key(mcu_build.pubkey))
    model = bundle.model_artifact
    assert (model["path"], model["format"], model["runtime"]) == ("model.tflite", "tflite", "litert")
    candidates = {c["name"]: c for c in bundle.manifest["metrics"]["candidates"]}
    assert set(candidates) == {"onnx-fp32", "tflite-fp32", "tflite-int8"}
    assert candidates["onnx-fp32"]["verdict"] == "stm32h7 does not run onnx models"
    shipped = bundle.manifest["metrics"]["shipped"]
    assert shipped["name"] in ("tflite-fp32", "tflite-int8") and candidates[shipped["name"]]["accepted"]
    assert candidates["tflite-int8"]["accuracy_drop"] <= 0.01 and candidates["tflite-int8"]["verdict"]
    dataset = load_dataset(load_config(None), 0)
    assert shipped["accuracy"] == pytest.approx(litert_accuracy(bundle.model_bytes, dataset.x_test, dataset.y_test), abs=1e-9)
    report = json.loads((mcu_build.out / "report.json").read_text())
    budget = report["shipped"]["budget"]  # RAM is the tensor arena on a microcontroller, weights stay in flash
    assert budget["ram_mb"]["value"] < 0.1 and budget["ram_mb"]["met"] and budget["model_mb"]["met"]


def test_the_report_says_a_tflite_model_does_not_run_on_onnx_only_boards(mcu_build: Build) -> None:
    rows = {row["target"]: row for row in json.loads((mcu_build.out / "report.json").read_text())["targets"]}
    for board in ("jetson-orin-nano", "jetson-agx-orin"):
        assert not rows[board]["fits"] and "runs only onnx models, not .tflite" in rows[board]["not_supported"]
    assert rows["stm32h7"]["not_supported"] == [] and rows["raspberry-pi-5"]["not_supported"] == []
    assert "no; runs only onnx models, not .tflite" in (mcu_build.out / "report.html").read_text()


def test_the_agent_serves_a_tflite_bundle_over_rest(mcu_build: Build, tmp_path: Path, broker) -> None:
    device = provision_device(tmp_path / "dev", mcu_build, broker.url)
    bundle = read_bundle(mcu_build.bundle, load_public_key(mcu_build.pubkey))
    samples = np.load(io.BytesIO(bundle.files["samples.npz"]))
    with running_agent(device) as (agent, url):
        assert agent.model.bundle.model_artifact["format"] == "tflite"
        status, body = http("POST", f"{url}/v2/models/digits/infer", infer_body(samples["x"]))
        assert status == 200, body
        outputs = {o["name"]: o["data"] for o in body["outputs"]}
        np.testing.assert_array_equal(outputs["class"], samples["logits"].argmax(axis=1))
        assert agent.model.predict(samples["x"]).logits == pytest.approx(samples["logits"], abs=1e-5)
        status, body = http("POST", f"{url}/v2/models/digits/infer", infer_body(samples["x"][:, :, :4]))
        assert status == 400 and "the model expects [1, 8, 8]" in body["error"]


def test_a_corrupt_tflite_file_is_refused_with_a_reason(mcu_build: Build, tmp_path: Path) -> None:
    bundle = read_bundle(mcu_build.bundle, load_public_key(mcu_build.pubkey))
    bundle.files[bundle.model_artifact["path"]] = b"TFL3" + b"\x00" * 64
    with pytest.raises(BundleError, match="cannot be loaded by LiteRT"):
        LoadedModel.from_bundle(bundle)


def test_bench_measures_and_predicts_a_tflite_file(exported, tmp_path: Path) -> None:
    artifact, _ = exported
    result = run_cli("toolchain", "bench", str(artifact.candidate("tflite-int8").path), "--target", "rpi5", "--json",
                     "--seconds", "0.5", check=True)
    row = json.loads(result.stdout)
    assert row["latency_ms_p50_host"] > 0 and row["runs_host"] >= 100 and row["model_rss_mb"] >= 0
    assert row["latency_ms_predicted"] > 0 and 0 < row["roofline_fraction_host"] <= 1.5
    assert row["flops"] == analyze(artifact.candidate("tflite-int8").path).flops
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer")
    bad = run_cli("toolchain", "bench", str(broken), "--target", "rpi5")
    assert bad.returncode != 0 and "cannot be loaded by LiteRT" in bad.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad.stderr


def test_litert_has_its_own_calibration_which_predicts_tflite_files(exported, tmp_path: Path, monkeypatch) -> None:
    from toolchain.perf.calibrate_host import CalibrationSettings, calibrate_host
    from toolchain.perf.calibration import default_path, find_calibration, write_calibration
    from toolchain.perf.estimate import estimate

    artifact, _ = exported
    monkeypatch.setenv("EDGE_TOOLCHAIN_CALIBRATION", str(tmp_path / "calibration"))
    host = resolve_target("host")
    result = calibrate_host(host, CalibrationSettings(variants=48, seconds=3.0, memory_variants=4, runtime="litert"))
    calibration = result.calibration
    assert calibration.runtime == "litert" and {r.path.suffix for r in result.results} == {".tflite"}
    assert {r.spec.precision for r in result.results} == {"fp32", "int8"}
    held = [r for r in result.results if r.held_out]
    assert held and len(calibration.validation["latency"]["errors"]) == len(held)  # judged on models never fitted
    assert any(key.startswith("Conv") and key.endswith("/int8") for key in calibration.latency.efficiency)
    path = write_calibration(calibration, default_path("host", "litert"))
    assert path.name == "host-litert.json"
    tflite = estimate(analyze(artifact.candidate("tflite-int8").path), host)
    onnx = estimate(analyze(artifact.reference.path), host)
    assert tflite.calibrated and "calibrated (variants" in tflite.basis
    assert not onnx.calibrated and "no calibration for host" in onnx.basis  # an ORT model is not predicted by LiteRT's fit
    assert find_calibration(host, "litert")[0] is not None and find_calibration(host)[0] is None
