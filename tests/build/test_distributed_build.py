"""Data-parallel training: `toolchain build --nproc 2` runs two ranks (torchrun, gloo on this CPU) that
train the default example together under DistributedDataParallel; rank 0 alone ships."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import Build, run_cli
from toolchain.resources import default_config

pytestmark = pytest.mark.slow

WEIGHTS_LINE = re.compile(r"^rank (\d)/2: train: best epoch (\d+) of (\d+), weights sha256 ([0-9a-f]{64})$", re.M)


def test_two_ranks_train_one_model_and_rank0_ships_it(tmp_path: Path, default_build: Build) -> None:
    out = tmp_path / "dist"
    result = run_cli("toolchain", "build", "--target", "jetson", "--budget", "quick", "--seed", "0", "--out", str(out),
                     "--nproc", "2", check=True)
    ranks = {int(rank): (best, run, digest) for rank, best, run, digest in WEIGHTS_LINE.findall(result.stderr)}
    assert sorted(ranks) == [0, 1], result.stderr
    assert ranks[0] == ranks[1]  # the same best epoch restored, bit-identical weights on both ranks
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in default_build.out.iterdir())  # one bundle, one report
    assert result.stdout.strip().splitlines()[-1] == str(out / "digits-1-jetson-orin-nano.bundle")
    spread = json.loads((out / "report.json").read_text())
    alone = json.loads((default_build.out / "report.json").read_text())  # one process, the same seed
    assert spread["train"]["best_epoch"] == int(ranks[0][0])
    assert abs(spread["reference"]["accuracy"] - alone["reference"]["accuracy"]) <= 0.01


def test_a_failing_rank_fails_the_build_with_its_reason(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(default_config().parent, project)
    model = project / "model.py"
    model.write_text('import os\nif os.environ.get("RANK") == "1":\n    raise RuntimeError("rank one has no GPU")\n'
                     + model.read_text())
    out = tmp_path / "dist"
    result = run_cli("toolchain", "build", "--target", "jetson", "--config", str(project / "toolchain.toml"),
                     "--out", str(out), "--nproc", "2")
    assert result.returncode != 0
    assert "error: rank 1/2: config" in result.stderr and "RuntimeError: rank one has no GPU" in result.stderr
    assert not out.exists() or not any(out.glob("*.bundle"))
