"""The hyper-parameter search pass: samplers, pruning, resuming a killed study, multi-objective choice, CV."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from rich.console import Console

from runtime_agent.signing import write_keypair
from tests.conftest import REPO, run_cli
from tests.build.test_user_project import MODEL
from toolchain.core.artifact import Artifact
from toolchain.core.config import load_config
from toolchain.core.data import load_dataset
from toolchain.errors import ConfigError
from toolchain.passes.torch.search import SearchPass, public_url
from toolchain.report.html import search_section
from toolchain.targets.profiles import Budget, resolve_target
from toolchain.core.contract import BuildContext

pytestmark = pytest.mark.slow  # every trial trains a model

BASE = '''
[project]
name = "blobs"
version = 1
[model]
entry = "src/model.py:build_model"
input_shape = [6]
labels = ["a", "b", "c"]
[data]
source = "npz:data/blobs.npz"
[train]
epochs = 9
[compress]
quantize = ["int8"]
max_accuracy_drop = 0.05
[search]
'''


def make_project(root: Path, search: str) -> Path:
    """The blobs project of test_user_project (600 samples, 6 features, 3 classes), with a [search] section."""
    if not (root / "data" / "blobs.npz").exists():
        rng = np.random.default_rng(7)
        y = np.arange(600) % 3
        x = rng.normal(size=(600, 6)) + np.eye(3, 6)[y] * 4
        (root / "src").mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        (root / "src" / "model.py").write_text(MODEL)
        np.savez(root / "data" / "blobs.npz", x=x, y=y)
    (root / "toolchain.toml").write_text(BASE + search)
    return root / "toolchain.toml"


def make_ctx(root: Path, search: str, profile: str = "rpi4") -> BuildContext:
    config = load_config(make_project(root, search))
    work = root / "work"
    work.mkdir(exist_ok=True)
    return BuildContext(config=config, profile=resolve_target(profile), dataset=load_dataset(config, 0),
                        out_dir=root / "out", work_dir=work, seed=0, budget="quick",
                        console=Console(file=io.StringIO(), width=140))


def run_search(ctx: BuildContext) -> dict:
    artifact = SearchPass().run(Artifact(), ctx)
    return artifact.metrics["search"]


def by_state(search: dict, *states: str) -> list[dict]:
    return [t for t in search["trials"] if t["state"] in states]


def test_grid_sampler_covers_exactly_its_grid(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, 'sampler = "grid"\npruner = "none"\nhidden = [4, 8, 16]\nweight_decay = [0.0, 0.01]\n')
    search = run_search(ctx)
    assert search["n_trials"] == 6  # defaults to the grid's size
    points = [(t["params"]["hidden"], t["params"]["weight_decay"]) for t in search["trials"]]
    assert sorted(points) == sorted(itertools.product([4, 8, 16], [0.0, 0.01]))  # every combination, once
    assert all(t["state"] == "COMPLETE" for t in search["trials"])
    assert ctx.hparams == search["chosen"]["params"]
    best = max(search["trials"], key=lambda t: t["accuracy"])
    assert search["chosen"]["values"]["accuracy"] == best["values"]["accuracy"]
    assert (tmp_path / "out" / "blobs-search.sqlite").is_file()  # the default storage, in the output folder


def test_resumed_study_continues_instead_of_restarting(tmp_path: Path) -> None:
    space = 'sampler = "tpe"\npruner = "none"\nhidden = [4, 16]\nlr = {low = 1e-3, high = 3e-2, log = true}\n'
    first = run_search(make_ctx(tmp_path, "n_trials = 2\n" + space))
    assert [t["number"] for t in first["trials"]] == [0, 1]
    second = run_search(make_ctx(tmp_path, "n_trials = 4\n" + space))
    assert second["resumed"] == {"trials_done_before": 2, "trials_run_now": 2, "orphans_failed": []}
    assert [t["number"] for t in second["trials"]] == [0, 1, 2, 3]
    assert second["trials"][:2] == first["trials"]  # the first two are untouched (params, values, timings)
    assert second["study_name"] == first["study_name"] == "blobs-raspberry-pi-4"
    third = run_search(make_ctx(tmp_path, "n_trials = 4\n" + space))  # nothing left to do
    assert third["resumed"]["trials_run_now"] == 0 and third["trials"] == second["trials"]


KILLED_CHILD = r'''
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.passes.test_search import make_ctx, run_search
import toolchain.passes.torch.search as search

calls = []
real_fit = search.fit
def fit(*args, **kwargs):  # the second trial never ends: the parent kills this process inside it
    calls.append(1)
    if len(calls) == 2:
        Path(sys.argv[3]).write_text("in trial 2")
        while True:
            time.sleep(1)
    return real_fit(*args, **kwargs)
search.fit = fit
run_search(make_ctx(Path(sys.argv[2]), sys.argv[4]))
'''


def test_a_trial_left_running_by_a_killed_build_does_not_block(tmp_path: Path) -> None:
    """kill -9 mid-trial leaves it RUNNING in the storage. The next build on this machine sees its process is gone,
    marks it FAIL and queues its parameters again, so the grid is still covered exactly once by finished trials."""
    space = 'sampler = "grid"\npruner = "none"\nhidden = [4, 16]\nweight_decay = [0.0, 0.01]\n'
    make_project(tmp_path, space)
    marker = tmp_path / "in-trial"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(REPO), str(tmp_path), str(marker), space],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the child never reached its second trial"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    url = f"sqlite:///{tmp_path / 'out' / 'blobs-search.sqlite'}"
    left = optuna.load_study(study_name="blobs-raspberry-pi-4", storage=url).trials
    assert [t.state.name for t in left] == ["COMPLETE", "RUNNING"]
    killed = left[1].params

    search = run_search(make_ctx(tmp_path, space))
    states = {t["number"]: t["state"] for t in search["trials"]}
    assert states[1] == "FAIL" and search["resumed"]["orphans_failed"] == [1]
    assert "ended while it ran" in search["trials"][1]["failure"]
    retry = next(t for t in search["trials"] if t.get("retry_of") == 1)
    assert retry["params"] == killed and retry["state"] == "COMPLETE"
    finished = [(t["params"]["hidden"], t["params"]["weight_decay"]) for t in by_state(search, "COMPLETE", "PRUNED")]
    assert sorted(finished) == sorted(itertools.product([4, 16], [0.0, 0.01]))
    assert search["trials"][0]["params"] == left[0].params and search["trials"][0]["values"]["accuracy"] == pytest.approx(left[0].value, abs=1e-6)


@pytest.mark.parametrize("sampler,pruner", [("tpe", "median"), ("random", "hyperband")])
def test_samplers_pick_params_inside_the_space(tmp_path: Path, sampler: str, pruner: str) -> None:
    ctx = make_ctx(tmp_path, f'n_trials = 5\nsampler = "{sampler}"\npruner = "{pruner}"\n'
                             'lr = {low = 1e-3, high = 5e-2, log = true}\nhidden = {low = 4, high = 32}\n'
                             'weight_decay = {low = 0.0, high = 0.01, step = 0.005}\nbatch_size = [32, 64]\n')
    search = run_search(ctx)
    assert len(by_state(search, "COMPLETE", "PRUNED")) == 5 and search["sampler"] == sampler and search["pruner"] == pruner
    for t in search["trials"]:
        p = t["params"]
        assert 1e-3 <= p["lr"] <= 5e-2
        assert isinstance(p["hidden"], int) and 4 <= p["hidden"] <= 32  # integer bounds: an integer parameter
        assert min(abs(p["weight_decay"] - v) for v in (0.0, 0.005, 0.01)) < 1e-12  # on the step
        assert p["batch_size"] in (32, 64)
    assert ctx.hparams == search["chosen"]["params"]
    assert search["chosen"]["values"]["accuracy"] == max(t["values"]["accuracy"] for t in by_state(search, "COMPLETE"))
    assert search["chosen"]["reason"].startswith(f"trial {search['chosen']['number']} has the best validation accuracy")


def test_median_pruner_stops_hopeless_trials(tmp_path: Path) -> None:
    search = run_search(make_ctx(tmp_path, 'n_trials = 8\nsampler = "random"\npruner = "median"\n'
                                           'lr = {low = 1e-7, high = 1e-1, log = true}\n'))
    pruned = by_state(search, "PRUNED")
    assert pruned, [(t["params"], t["state"]) for t in search["trials"]]
    for t in pruned:  # never before the warm-up (a third of a trial's epochs) is over
        assert max(1, search["trial_epochs"] // 3) <= t["pruned_at"]["epoch"] <= search["trial_epochs"]
    # what was pruned is worse than what was kept
    assert max(t["pruned_at"]["val_accuracy"] for t in pruned) < search["chosen"]["values"]["accuracy"]


def test_multi_objective_chooses_on_the_pareto_front_within_the_latency_budget(tmp_path: Path) -> None:
    space = ('n_trials = 5\nsampler = "nsga2"\npruner = "median"\nobjectives = ["accuracy", "latency"]\n'
             'hidden = [2, 64]\nlr = {low = 3e-3, high = 3e-2, log = true}\n')
    ctx = make_ctx(tmp_path, space)
    search = run_search(ctx)
    assert search["pruner"] == "none" and any("cannot prune multi-objective" in n for n in search["notes"])
    assert search["pareto"] and search["directions"] == ["maximize", "minimize"]
    assert all(t["latency_ms"] > 0 for t in search["trials"])
    front = {t["number"] for t in search["pareto"]}
    chosen = search["chosen"]
    assert chosen["number"] in front and "Pareto-optimal" in chosen["reason"] and "budget" in chosen["reason"]
    assert chosen["latency_ms"] <= ctx.profile.budget.latency_ms
    assert chosen["values"]["accuracy"] == max(t["values"]["accuracy"] for t in search["pareto"])
    # nothing dominates a Pareto point
    for p in search["pareto"]:
        assert not any(t["values"]["accuracy"] >= p["values"]["accuracy"] and t["values"]["latency"] <= p["values"]["latency"]
                       and t["values"] != p["values"] for t in by_state(search, "COMPLETE"))

    # The same study on a board with an impossible budget: no trial runs again, and the fastest point is chosen.
    tight = make_ctx(tmp_path, space)
    tight.profile = dataclasses.replace(tight.profile, budget=Budget(latency_ms=1e-9, model_mb=1, ram_mb=1))
    again = run_search(tight)
    assert again["resumed"]["trials_run_now"] == 0
    assert again["chosen"]["reason"].startswith("no Pareto-optimal trial meets")
    assert again["chosen"]["latency_ms"] == min(t["latency_ms"] for t in again["pareto"])


def test_cross_validation_reports_mean_and_sd_per_trial(tmp_path: Path) -> None:
    search = run_search(make_ctx(tmp_path, 'n_trials = 2\ncv_folds = 3\nsampler = "random"\npruner = "none"\n'
                                           'hidden = [8, 16]\n'))
    assert search["validation"].startswith("3-fold stratified")
    for t in search["trials"]:
        assert len(t["cv_scores"]) == 3
        assert t["cv_mean"] == pytest.approx(np.mean(t["cv_scores"]), abs=1e-5)
        assert t["cv_sd"] == pytest.approx(np.std(t["cv_scores"], ddof=1), abs=1e-5)
        assert t["values"]["accuracy"] == pytest.approx(t["cv_mean"], abs=1e-5)
    assert "± " in search["chosen"]["reason"]
    html = search_section(search)
    assert "<th>mean accuracy</th><th>sd</th>" in html and "chart-pareto" not in html  # one objective: no scatter


def test_a_changed_setup_starts_a_new_study_in_the_same_output_folder(tmp_path: Path) -> None:
    first = run_search(make_ctx(tmp_path, 'n_trials = 1\nsampler = "random"\npruner = "none"\nhidden = [8, 16]\n'))
    second = run_search(make_ctx(tmp_path, 'n_trials = 1\nsampler = "random"\npruner = "none"\nhidden = [4, 32]\n'))
    assert first["study_name"] == "blobs-raspberry-pi-4" and second["study_name"].startswith("blobs-raspberry-pi-4-")
    assert second["resumed"]["trials_done_before"] == 0 and any("different setup" in n for n in second["notes"])


def test_a_space_the_model_cannot_build_fails_before_writing_anything(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, 'n_trials = 2\nwidth = [8, 16]\n')  # the blobs model has no `width` keyword
    with pytest.raises(ConfigError, match=r"\[search\] the model cannot be built with \{'width': 8\}.*the entry has no parameter 'width'"):
        run_search(ctx)
    assert not (tmp_path / "out").exists()


def test_storage_url_passwords_never_reach_the_report() -> None:
    assert public_url("postgresql://tuner:s3cret@db.lab:5432/optuna") == "postgresql://tuner:***@db.lab:5432/optuna"
    assert "s3cret" not in public_url("mysql+pymysql://tuner:s3cret@db/optuna")


def test_build_with_a_search_section_reports_the_search(tmp_path: Path) -> None:
    config = make_project(tmp_path / "project", 'n_trials = 3\nsampler = "tpe"\npruner = "none"\n'
                                                'objectives = ["accuracy", "latency"]\nhidden = [8, 24]\n'
                                                'lr = {low = 3e-3, high = 3e-2, log = true}\n')
    out = tmp_path / "out"
    private, _ = write_keypair(tmp_path / "keys")  # its own key: the session's default key is the default build's to create
    result = run_cli("toolchain", "build", "--target", "rpi4", "--config", str(config), "--out", str(out),
                     "--key", str(private), check=True)
    assert Path(result.stdout.strip().splitlines()[-1]) == out / "blobs-1-raspberry-pi-4.bundle"
    assert (out / "blobs-search.sqlite").is_file()
    report = json.loads((out / "report.json").read_text())
    search = report["search"]
    assert len(search["trials"]) == 3 and search["pareto"] and search["chosen"]["reason"]
    assert report["stages"][0]["name"] == "search" and report["stages"][1]["name"] == "train"
    chosen = search["chosen"]["params"]
    assert report["train"]["settings"]["lr"] == pytest.approx(chosen["lr"])
    assert report["train"]["model_kwargs"] == {"hidden": chosen["hidden"]}
    html = (out / "report.html").read_text()
    assert 'id="search-trials"' in html and 'id="chart-pareto"' in html and 'class="chosen"' in html
    assert "<script" not in html
