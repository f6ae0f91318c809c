"""One search, many workers, on a real PostgreSQL (tests/postgres.py): `toolchain search` workers share
the config's study through Optuna's RDB storage; a worker killed mid-trial has its trial failed and
re-run by another; `toolchain build --storage` then builds the best trial without searching again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from tests.build.projects import digits_project
from tests.conftest import BIN, REPO, run_cli
from toolchain.passes.torch.search import SURPLUS

pytestmark = pytest.mark.slow

PROJECT = """
[project]
name = "searched_digits"

[model]
entry = "model.py:build_model"
input_shape = [1, 8, 8]
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[data]
source = "sklearn:digits"

[train]
epochs = 6

[compress]
quantize = ["int8"]

[search]
n_trials = 4
sampler = "random"
pruner = "none"
width = { low = 4, high = 24 }
lr = { low = 0.001, high = 0.01, log = true }
"""
STUDY = "searched_digits-jetson-orin-nano"  # the default study name: project and target
SEARCHED = {"width", "lr"}  # the [search] space above


def _worker(config: Path, storage: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "toolchain"), "search", "--target", "jetson", "--config", str(config),
                             "--storage", storage, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ))


def _finish(worker: subprocess.Popen[str]) -> str:
    stdout, stderr = worker.communicate(timeout=600)
    assert worker.returncode == 0, stderr
    return stdout


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def _running(storage: str, pid: int) -> bool:
    """Whether the worker `pid` is in the middle of a trial: running, its parameters drawn (False while it has not
    made the study yet, or in the instant between creating a trial and drawing its parameters)."""
    try:
        trials = _trials(storage)
    except KeyError:
        return False
    return any(t.state == optuna.trial.TrialState.RUNNING and set(t.params) == SEARCHED
               and t.user_attrs.get("owner", {}).get("pid") == pid for t in trials)


def _stopped_in_a_trial(worker: subprocess.Popen[str], storage: str) -> bool:
    """Stop `worker` (SIGSTOP) and say whether it is in the middle of a trial; if not, let it go on. Why stop
    it first: a worker seen running a trial could finish it before a kill lands, leaving nothing to re-run."""
    worker.send_signal(signal.SIGSTOP)
    while (state := Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) not in "TtZX":
        time.sleep(0.01)  # the signal is delivered asynchronously
    if state in "Tt" and _running(storage, worker.pid):
        return True
    worker.send_signal(signal.SIGCONT)
    return False


def test_two_workers_in_parallel_finish_exactly_n_trials(tmp_path: Path, postgres_url: str) -> None:
    config = digits_project(tmp_path, PROJECT)
    workers = [_worker(config, postgres_url, "--n-trials", "3") for _ in range(2)]
    outputs = [_finish(w) for w in workers]
    ran = [int(out.split(" ran ")[1].split()[0]) for out in outputs]
    trials = _trials(postgres_url)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and sum(ran) == 3, outputs
    assert all(t.user_attrs.get("failure") == SURPLUS for t in trials if t not in complete)  # only steps aside
    assert {t.user_attrs["owner"]["pid"] for t in complete} <= {w.pid for w in workers}
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 3  # no point run twice


def test_a_killed_workers_trial_is_rerun_by_another_and_the_build_uses_the_best(tmp_path: Path, postgres_url: str) -> None:
    config = digits_project(tmp_path, PROJECT)
    doomed = _worker(config, postgres_url)
    while not _stopped_in_a_trial(doomed, postgres_url):
        assert doomed.poll() is None, doomed.communicate()
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    survivor = _finish(_worker(config, postgres_url))

    trials = _trials(postgres_url)
    (killed,) = [t for t in trials if t.user_attrs["owner"]["pid"] == doomed.pid and t.state == optuna.trial.TrialState.FAIL]
    assert killed.user_attrs["failure"].startswith("its build process ended while it ran")
    (rerun,) = [t for t in trials if t.system_attrs.get("retry_history") == [killed.number]]
    assert rerun.state == optuna.trial.TrialState.COMPLETE and rerun.params == killed.params
    assert rerun.user_attrs["owner"]["pid"] != doomed.pid
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and "has 4 of 4 done" in survivor

    out = tmp_path / "dist"
    run_cli("toolchain", "build", "--target", "jetson", "--config", str(config), "--storage", postgres_url,
            "--out", str(out), check=True)
    report = json.loads(next(out.glob("*report.json")).read_text())["search"]
    best = optuna.load_study(study_name=STUDY, storage=postgres_url).best_trial
    assert report["chosen"]["number"] == best.number and report["resumed"]["trials_run_now"] == 0
