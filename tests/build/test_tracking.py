"""MLflow tracking of a build against a real `mlflow server` (SQLite backend, local artifact folder):
the run, its params and per-epoch metrics, nested trial and fold runs, every candidate's numbers, the
artifacts, and the shipped model registered as a version with its tags, all read back with MlflowClient."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.build.projects import digits_project
from tests.conftest import BIN, run_cli
from toolchain.build.tracking import open_tracking
from toolchain.core.config import parse_config
from toolchain.deploy.broker import free_port
from toolchain.errors import ToolchainError
from toolchain.targets.profiles import resolve_target

PROJECT = """
[project]
name = "tracked_digits"

[model]
entry = "model.py:build_model"
input_shape = [1, 8, 8]
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
kwargs = { width = 8 }

[data]
source = "sklearn:digits"

[train]
epochs = 4

[compress]
quantize = ["int8"]

[search]
sampler = "grid"
cv_folds = 2
width = [4, 8]

[tracking]
uri = "URI"
"""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free loopback port: SQLite backend store, artifacts served from a local folder."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "artifacts")],
                              stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()}") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and the workers it started
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_build_is_one_mlflow_run_with_trials_candidates_artifacts_and_a_model_version(
        tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "dist"
    result = run_cli("toolchain", "build", "--target", "jetson", "--config", str(digits_project(tmp_path, PROJECT.replace("URI", mlflow_server))),
                     "--out", str(out), check=True)
    bundle = Path(result.stdout.strip().splitlines()[-1])
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("tracked_digits").experiment_id])
    (build,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert build.info.status == "FINISHED"
    params = build.data.params
    assert params["profile"] == "jetson-orin-nano" and params["seed"] == "0" and params["budget"] == "quick"
    assert params["config.train.epochs"] == "4" and params["config.search.width"] == "[4, 8]"
    assert params["packages.torch"].startswith("2.13.0") and "config.tracking.uri" not in params
    history = client.get_metric_history(build.info.run_id, "train.val_accuracy")
    assert [m.step for m in history] == list(range(1, len(history) + 1)) and len(history) >= 1

    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == build.info.run_id]
    assert sorted(r.info.run_name for r in trials) == ["trial 0", "trial 1"]
    assert sorted(r.data.params["width"] for r in trials) == ["4", "8"]
    for trial in trials:
        folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert len(folds) == 2 and all("val_accuracy" in f.data.metrics for f in folds)
        assert trial.data.metrics["cv_mean"] == pytest.approx(sum(f.data.metrics["val_accuracy"] for f in folds) / 2, abs=1e-4)

    metrics, tags = build.data.metrics, build.data.tags
    for name in ("onnx-fp32", "onnx-int8-qdq"):
        for key in ("metric_value", "metric_drop", "latency_ms_p50_host", "latency_ms_predicted", "bytes", "accepted"):
            assert f"{name}.{key}" in metrics
        assert tags[f"{name}.verdict"]
    shipped = tags["shipped"]
    assert metrics[f"{shipped}.accepted"] == 1.0

    artifacts = {a.path for folder in ("build", "models") for a in client.list_artifacts(build.info.run_id, folder)}
    assert f"build/{bundle.name}" in artifacts and any(p.startswith("build/") and p.endswith(".html") for p in artifacts)
    assert {"models/model-fp32.onnx", "models/model-int8.onnx"} <= artifacts

    (version,) = client.search_model_versions("name='tracked_digits'")
    assert version.run_id == build.info.run_id
    assert version.tags["target"] == "jetson-orin-nano"
    assert version.tags["precision"] in {"fp32", "int8"}
    assert version.tags["bundle_sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()


def test_a_tracking_server_that_is_down_fails_the_build_before_training(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    down = f"http://127.0.0.1:{free_port()}"
    result = run_cli("toolchain", "build", "--target", "jetson", "--out", str(out), "--track", down)
    assert result.returncode == 2
    assert f"error: [tracking] the MLflow server {down} does not answer" in result.stderr
    assert "train" not in result.stderr.split("error:")[0] and not out.exists()


def test_without_mlflow_tracking_is_one_line_with_the_install_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(PROJECT.replace("URI", "sqlite:///mlflow.db"), tmp_path / "toolchain.toml")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` finds when the extra is not installed
    with pytest.raises(ToolchainError, match=r"needs MLflow, which is not installed: pip install 'edge-toolchain\[mlflow\]'"):
        open_tracking(config, None, resolve_target("jetson"), seed=0, budget="quick")
