"""Regression end to end (examples/diabetes): `toolchain build` trains with MSE and gates every candidate
by rmse; the build's own checkpoint, given back as `[model] weights` with `[train] epochs = 0`, is
optimized as it is (no training) and its FP32 reference measures exactly what the first build's did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime_agent.bundle import read_bundle
from runtime_agent.signing import load_public_key, write_keypair
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow  # two builds

EXAMPLE = REPO / "examples" / "diabetes"


def build(config: Path, out: Path, key: Path) -> dict:
    run_cli("toolchain", "build", "--config", str(config), "--target", "rpi5", "--out", str(out), "--key", str(key), check=True)
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out")
    return out, build(EXAMPLE / "toolchain.toml", out, keys[0])


def test_every_candidate_is_gated_by_rmse_and_the_shipped_one_keeps_it(first: tuple[Path, dict], keys: tuple[Path, Path]) -> None:
    out, report = first
    assert report["train"]["metric"] == "rmse" and report["train"]["loss"] == "mse" and report["train"]["pretrained"] is None
    manifest = read_bundle(out / "diabetes-1-raspberry-pi-5.bundle", load_public_key(keys[1])).manifest
    metrics = manifest["metrics"]
    assert metrics["gate"]["metric"] == "rmse" and metrics["gate"]["higher_is_better"] is False
    assert len(metrics["candidates"]) >= 3 and all(c["metric"] == "rmse" for c in metrics["candidates"])
    assert any(c["precision"] == "int8" for c in metrics["candidates"])
    reference, shipped = metrics["reference"]["metric_value"], metrics["shipped"]["metric_value"]
    assert shipped <= 1.02 * reference, (shipped, reference)
    assert metrics["shipped"]["metric_drop"] == pytest.approx(shipped - reference)


def test_pretrained_weights_with_epochs_0_are_optimized_as_they_are(first: tuple[Path, dict], keys: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    out, report = first
    for name in ("data.py", "model.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    shutil.copy(out / "diabetes-1-raspberry-pi-5.pt", tmp_path / "ckpt.pt")
    config = (EXAMPLE / "toolchain.toml").read_text().replace('task = "regression"', 'task = "regression"\nweights = "ckpt.pt"')
    (tmp_path / "toolchain.toml").write_text(config.replace("[train]", "[train]\nepochs = 0"))
    again = build(tmp_path / "toolchain.toml", tmp_path / "out", keys[0])
    train = again["train"]
    assert train["epochs_run"] == 0 and train["pretrained"]["use"] == "kept as they are ([train] epochs = 0)"
    assert train["pretrained"]["loaded_into"].startswith("the whole model")  # a toolchain checkpoint: its constants too
    assert train["normalize"] == report["train"]["normalize"] and train["val_rmse"] == report["train"]["val_rmse"]
    manifest = read_bundle(tmp_path / "out" / "diabetes-1-raspberry-pi-5.bundle", load_public_key(keys[1])).manifest
    first_manifest = read_bundle(out / "diabetes-1-raspberry-pi-5.bundle", load_public_key(keys[1])).manifest
    assert manifest["metrics"]["reference"]["metric_value"] == pytest.approx(
        first_manifest["metrics"]["reference"]["metric_value"], rel=1e-6)
