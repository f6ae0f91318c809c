"""Ctrl-C in a search trial: the build stops quietly (exit 130; the trial is queued again for the resumed
build), not with Optuna's "Trial 0 failed ... KeyboardInterrupt()" warning and its whole traceback.
Another failure of a trial is still logged."""

from __future__ import annotations

import optuna
import pytest

from toolchain.passes.torch.search import _quiet_optuna


def failing(error: BaseException):
    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("lr", 1e-3, 1e-1)
        raise error
    return objective


def test_an_interrupted_trial_logs_nothing_and_other_failures_still_do(caplog: pytest.LogCaptureFixture) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    restore = _quiet_optuna()
    try:
        with pytest.raises(KeyboardInterrupt):
            study.optimize(failing(KeyboardInterrupt()), n_trials=1)
        assert [r.getMessage() for r in caplog.records if "Trial 0" in r.getMessage()] == []
        study.optimize(failing(ValueError("diverged")), n_trials=1, catch=(ValueError,))
        logged = [r for r in caplog.records if "Trial 1" in r.getMessage()]
        lr = study.trials[1].params["lr"]
        assert [r.getMessage().split(" because")[0] for r in logged] == [f"Trial 1 failed with parameters: {{'lr': {lr!r}}}",
                                                                         "Trial 1 failed with value None."]
        assert isinstance(logged[0].exc_info[1], ValueError)
    finally:
        restore()
