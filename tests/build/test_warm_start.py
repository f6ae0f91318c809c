"""Warm start: every build leaves its trained weights beside the bundle, and a later build can continue them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.conftest import REPO, Build, run_cli


def project(root: Path, **kwargs: str) -> Path:
    """The embedded example copied out, with some keys replaced."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.py").write_text((REPO / "examples" / "digits" / "model.py").read_text())
    text = (REPO / "examples" / "digits" / "toolchain.toml").read_text()
    for old, new in kwargs.items():
        assert old in text
        text = text.replace(old, new)
    (root / "toolchain.toml").write_text(text)
    return root / "toolchain.toml"


def test_a_build_writes_a_checkpoint_that_a_later_build_continues(default_build: Build, tmp_path: Path) -> None:
    checkpoint = default_build.bundle.with_suffix(".pt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["format"] == 1 and saved["project"] == "digits" and saved["model_kwargs"] == {}
    assert any(key.endswith("mean") for key in saved["state_dict"])  # the normalisation comes along
    out = tmp_path / "dist"
    shutil.copytree(default_build.out, out)  # the second build of the same project into the same folder
    result = run_cli("toolchain", "build", "--target", "jetson", "--out", str(out), "--warm-start", str(checkpoint), check=True)
    report = json.loads((out / "report.json").read_text())
    # each bundle keeps its own report: the first build's is still there, untouched; report.json is the latest
    first_report, second_report = (out / f"digits-{v}-jetson-orin-nano.report.json" for v in (1, 2))
    assert first_report.read_bytes() == (default_build.out / "digits-1-jetson-orin-nano.report.json").read_bytes()
    assert json.loads(second_report.read_text()) == report and report["version"] == 2
    assert (out / "digits-2-jetson-orin-nano.report.html").read_text() == (out / "report.html").read_text()
    assert result.stdout.strip().splitlines()[-2] == f"report: {out / 'digits-2-jetson-orin-nano.report.html'}"
    train = report["train"]
    assert train["warm_start"] == str(checkpoint)
    # Continued, not restarted: the first fine-tune epoch is already as good as the finished model was.
    first = train["history"][0]["val_accuracy"]
    original = json.loads((default_build.out / "report.json").read_text())
    original_train = original["train"]
    assert first >= original_train["val_accuracy"] - 0.02, (first, original_train["val_accuracy"])
    assert original_train["history"][0]["val_accuracy"] < first  # a fresh start's first epoch is worse
    assert train["epochs_run"] <= train["max_epochs"] < original_train["max_epochs"]  # a fine-tune, not a full training
    assert Path(result.stdout.strip().splitlines()[-1]).with_suffix(".pt").exists()


def test_a_checkpoint_of_another_architecture_or_file_is_one_clear_line(default_build: Build, tmp_path: Path) -> None:
    checkpoint = default_build.bundle.with_suffix(".pt")
    narrow = project(tmp_path / "narrow", **{"kwargs = { width = 32 }": "kwargs = { width = 8 }"})
    result = run_cli("toolchain", "build", "--target", "jetson", "--config", str(narrow), "--out", str(tmp_path / "o1"),
                     "--warm-start", str(checkpoint))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: warm-start checkpoint {checkpoint} does not fit the config's model"), result.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    result = run_cli("toolchain", "build", "--target", "jetson", "--out", str(tmp_path / "o2"), "--warm-start", str(junk))
    assert result.returncode == 2 and "cannot be read" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing written
