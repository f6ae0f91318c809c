"""The spine end to end: quick build of the default example -> verify -> the agent reproduces its accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime_agent.bundle import read_bundle
from runtime_agent.model import LoadedModel
from runtime_agent.signing import load_public_key
from tests.conftest import Build, run_cli
from toolchain.core.config import load_config
from toolchain.core.data import load_dataset


def test_build_prints_report_then_bundle_path_last(default_build: Build) -> None:
    lines = default_build.stdout.strip().splitlines()
    assert default_build.bundle == default_build.out / "digits-1-jetson-orin-nano.bundle"
    assert default_build.bundle.is_file()
    assert lines[-2] == f"report: {default_build.out / 'digits-1-jetson-orin-nano.report.html'}"
    assert sorted(p.name for p in default_build.out.iterdir()) == [
        "digits-1-jetson-orin-nano.bundle", "digits-1-jetson-orin-nano.pt", "digits-1-jetson-orin-nano.report.html",
        "digits-1-jetson-orin-nano.report.json", "report.html", "report.json"]
    assert "created a new signing key" in default_build.stderr


def test_bundle_verifies_with_the_cli(default_build: Build) -> None:
    result = run_cli("toolchain", "verify", str(default_build.bundle), "--pubkey", str(default_build.pubkey))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK {default_build.bundle}: digits v1 for jetson-orin-nano")


def test_manifest_follows_the_contract(default_build: Build) -> None:
    manifest = read_bundle(default_build.bundle, load_public_key(default_build.pubkey)).manifest
    assert manifest["format"] == 1 and manifest["name"] == "digits" and manifest["target"] == "jetson-orin-nano"
    metrics = manifest["metrics"]
    assert metrics["reference"]["precision"] == "fp32"
    assert {c["precision"] for c in metrics["candidates"]} == {"fp32", "int8", "fp16"}
    shipped = metrics["shipped"]
    assert shipped["precision"] in {"fp32", "int8", "fp16"}
    assert metrics["reference"]["accuracy"] - shipped["accuracy"] <= 0.01
    assert all(c["verdict"] for c in metrics["candidates"])
    model = next(a for a in manifest["artifacts"] if a["role"] == "model")
    assert model["precision"] == shipped["precision"] and model["runtime"] == "onnxruntime"
    assert len(manifest["reference"]["features"]) == 64
    for feature in manifest["reference"]["features"]:
        assert abs(sum(feature["fractions"]) - 1) < 1e-4 and len(feature["fractions"]) == len(feature["edges"]) + 1
    assert abs(sum(manifest["reference"]["predictions"]["fractions"]) - 1) < 1e-4
    provenance = manifest["provenance"]
    assert provenance["seed"] == 0 and len(provenance["config_sha256"]) == 64 and len(provenance["data_sha256"]) == 64
    assert provenance["packages"]["torch"].startswith("2.13.0")


def test_agent_reproduces_the_reported_test_accuracy(default_build: Build) -> None:
    bundle = read_bundle(default_build.bundle, load_public_key(default_build.pubkey))
    dataset = load_dataset(load_config(None), seed=0)
    predicted = LoadedModel.from_bundle(bundle).predict(dataset.x_test).classes
    accuracy = float((predicted == dataset.y_test).mean())
    assert accuracy == bundle.manifest["metrics"]["shipped"]["accuracy"]
    assert accuracy >= 0.95


def test_edge_agent_predict_cli_matches_the_labels(default_build: Build, tmp_path: Path) -> None:
    dataset = load_dataset(load_config(None), seed=0)
    np.save(tmp_path / "x.npy", dataset.x_test[:20])
    result = run_cli("edge-agent", "predict", "--bundle", str(default_build.bundle), "--input", str(tmp_path / "x.npy"),
                     "--pubkey", str(default_build.pubkey), "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["version"] == 1 and len(answer["labels"]) == 20
    assert np.mean(np.array(answer["classes"]) == dataset.y_test[:20]) >= 0.9


def test_report_json_holds_every_decision(default_build: Build) -> None:
    report = json.loads((default_build.out / "report.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    assert names == ["onnx-fp32", "onnx-int8-qdq", "onnx-fp16"]
    assert report["shipped"]["name"] in names
    assert [s["name"] for s in report["stages"]] == ["train", "export-onnx", "quantize-int8", "quantize-fp16",
                                                     "quantize-qat", "quantize-mixed", "evaluate", "benchmark", "gate", "bundle"]
    for candidate in report["candidates"]:
        assert candidate["latency_ms_p50_host"] <= candidate["latency_ms_p90_host"] <= candidate["latency_ms_p99_host"]
        assert candidate["latency_ms_predicted"] > 0 and set(candidate["budget"]) == {"latency_ms", "model_mb", "ram_mb"}
    int8 = report["candidates"][1]
    assert int8["bytes"] <= 0.35 * report["candidates"][0]["bytes"]


def test_bench_a_bundle_reports_percentiles_and_verdicts(default_build: Build) -> None:
    result = run_cli("toolchain", "bench", str(default_build.bundle), "--target", "raspberry-pi-4", "--json",
                     "--seconds", "1", "--pubkey", str(default_build.pubkey))
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["target"] == "raspberry-pi-4"
    assert 0 < row["latency_ms_p50_host"] <= row["latency_ms_p90_host"] <= row["latency_ms_p99_host"]
    assert 0 < row["roofline_fraction_host"] < float("inf")  # >1 only if the cached host peaks were measured under load
    assert row["process_peak_rss_mb"] > row["model_rss_mb"] >= 0
    assert set(row["budget"]) == {"latency_ms", "model_mb", "ram_mb"}
