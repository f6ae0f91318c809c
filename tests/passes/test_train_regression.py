"""Regression with a torch entry (examples/diabetes): MSE training that beats predicting the mean, and
the passes that train (search, distillation, pruning, QAT's range search) judging by the build's
metric, rmse, lower is better."""

from __future__ import annotations

import copy
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from tests.conftest import REPO
from toolchain.core.artifact import Artifact
from toolchain.core.config import load_config
from toolchain.core.contract import BuildContext
from toolchain.core.data import load_dataset
from toolchain.passes.torch.distill import DistillPass
from toolchain.passes.torch.prune import PrunePass
from toolchain.passes.torch.search import SearchPass
from toolchain.passes.torch.train import TrainPass
from toolchain.quantize.qat import prepare_qat, search_ranges
from toolchain.targets.profiles import resolve_target

pytestmark = pytest.mark.slow  # trains models

EXAMPLE = REPO / "examples" / "diabetes"


def make_ctx(root: Path, extra: str = "") -> BuildContext:
    """The diabetes example copied to `root`, with `extra` TOML appended (e.g. a [search] section)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("data.py", "model.py"):
        shutil.copy(EXAMPLE / name, root / name)
    (root / "toolchain.toml").write_text((EXAMPLE / "toolchain.toml").read_text() + extra)
    config = load_config(root / "toolchain.toml")
    (root / "work").mkdir(exist_ok=True)
    return BuildContext(config=config, profile=resolve_target("rpi5"), dataset=load_dataset(config, 0),
                        out_dir=root / "out", work_dir=root / "work", console=Console(file=io.StringIO(), width=140))


def rmse(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predicted = module.eval()(torch.from_numpy(x)).numpy().reshape(-1)
    return float(np.sqrt(((predicted - y) ** 2).mean()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildContext, Artifact]:
    ctx = make_ctx(tmp_path_factory.mktemp("diabetes"))
    return ctx, TrainPass().run(Artifact(), ctx)


def test_mse_training_beats_predicting_the_mean(trained: tuple[BuildContext, Artifact]) -> None:
    ctx, artifact = trained
    data, train = ctx.dataset, artifact.metrics["train"]
    assert (data.task, train["task"], train["loss"], train["metric"]) == ("regression", "regression", "mse", "rmse")
    assert all("val_rmse" in epoch and "val_accuracy" not in epoch for epoch in train["history"])
    assert train["val_rmse"] == pytest.approx(rmse(artifact.module, data.x_val, data.y_val), rel=1e-4)
    # on the test split no decision has seen: the model explains over a quarter of the variance the
    # training split's mean leaves (rmse below sqrt(0.75) of the mean predictor's)
    baseline = float(np.sqrt(((data.y_test - data.y_train.mean()) ** 2).mean()))
    assert rmse(artifact.module, data.x_test, data.y_test) < np.sqrt(0.75) * baseline
    assert train["normalize"]["target_mean"] == pytest.approx(float(data.y_train.mean()))


def test_search_minimises_rmse(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, '\n[search]\nn_trials = 4\nsampler = "random"\nhidden = [4, 32]\n'
                             'lr = {low = 1e-3, high = 1e-2, log = true}\n')
    search = SearchPass().run(Artifact(), ctx).metrics["search"]
    assert search["metric"] == "rmse" and search["directions"] == ["minimize"]
    complete = [t for t in search["trials"] if t["state"] == "COMPLETE"]
    best = min(complete, key=lambda t: t["values"]["accuracy"])
    assert search["chosen"]["number"] == best["number"] and ctx.hparams == best["params"]
    assert search["chosen"]["reason"].startswith(f"trial {best['number']} has the best validation rmse")


def test_distillation_and_pruning_judge_by_rmse(trained: tuple[BuildContext, Artifact], tmp_path: Path) -> None:
    ctx, artifact = trained
    ctx = make_ctx(tmp_path, "distill = true\nstudent_width = 0.5\nprune_ratio = 0.25\nfinetune_epochs = 5\n")
    teacher_rmse = rmse(artifact.module, ctx.dataset.x_val, ctx.dataset.y_val)
    start = Artifact(module=artifact.module, trained_state=artifact.trained_state)
    after = PrunePass().run(DistillPass().run(start, ctx), ctx)
    distill, prune = after.metrics["distill"], after.metrics["prune"]
    assert distill["teacher"]["val_rmse"] == pytest.approx(teacher_rmse, rel=1e-4)
    assert distill["width_kwargs"] == {"hidden": {"teacher": 64, "student": 32}}
    for step, reference in ((distill, teacher_rmse), (prune, None)):
        assert step["metric"] == "rmse" and step["decision"] in ("distilled", "pruned", "rejected")
        assert step["max_drop"] == pytest.approx(0.02 * (reference or step["reference_val_rmse"]), rel=1e-3)
        assert (step["decision"] != "rejected") == (step["metric_drop"] <= step["max_drop"] + 1e-9)
    student = distill["student"]["val_rmse"]
    assert distill["metric_drop"] == pytest.approx(student - teacher_rmse, abs=1e-4)  # worse = a larger error


def test_qat_range_search_prices_ranges_by_squared_error(trained: tuple[BuildContext, Artifact]) -> None:
    ctx, artifact = trained
    data = ctx.dataset
    module = prepare_qat(copy.deepcopy(artifact.module).cpu(), False)
    ranges = search_ranges(module, torch.from_numpy(data.x_train[:128]), torch.from_numpy(data.y_train[:128]))
    assert ranges and all(r["candidates"] >= 1 for r in ranges)
    searched = [r for r in ranges if r["loss"] is not None]
    assert searched  # squared errors in the targets' units, far above any cross-entropy of 3 classes
    assert all(r["loss"] > 100 for r in searched)
