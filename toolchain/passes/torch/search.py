"""Hyper-parameter search (`[search]`): an Optuna study over the config's space, before training.

Each trial trains the user's model with `fit` (the one training loop) on a short budget and is scored
by its objectives: `accuracy` (the build's metric on validation: accuracy maximised, or for regression
rmse minimised, whichever `ctx.metric` is; with `cv_folds >= 2` the mean over k folds of
train+validation, stratified for class labels) and `latency` (the PREDICTED latency of the trial's FP32 ONNX
graph on the target profile, minimised: the search is device-aware, it never times this host). The
chosen point's parameters land in `ctx.hparams`; the train pass then trains it on the full budget.

Samplers and pruners are small factory tables, as in Optuna itself, so adding one is one line:
tpe / random / grid / nsga2 and median / hyperband / none. Pruning reports that validation metric
after every epoch; multi-objective studies cannot prune in Optuna, so they run with `NopPruner` and
the report says so.

Resuming, by design: the study lives in a storage, by default an SQLite file in the OUTPUT folder,
`OUT/{project}-search.sqlite`. It is the one file a build writes there before it has succeeded
(everything else is published at the end): it is what makes a killed search resumable. Re-running the
same build continues the study: trials already COMPLETE or PRUNED count towards `n_trials`, and only
the remaining ones run. Several `toolchain build` processes may share one study (`load_if_exists`);
with a server storage (`storage = "postgresql://..."`) they may run on several machines.

A trial left RUNNING by a process that died (kill -9, OOM, power loss) must not block anything:
- each trial records its owner (host, boot, pid namespace, pid and process start time); a resuming
  build on the same machine sees the owner is gone, marks the trial FAIL and queues its parameters
  again (Optuna's `RetryHeartbeatStaleTrialCallback`, once), so a grid still covers every point;
- trials of other machines are caught by Optuna's heartbeat (RDB storage: a beat every
  `HEARTBEAT_S`, stale after `GRACE_S`) and retried the same way;
- a RUNNING trial with neither is ignored: it is not counted, and the grid sampler re-assigns its
  point once every other point has started.

Many workers, one study: `toolchain search --storage URL` processes (`work`), on any machines, join
the study and run trials until it has `n_trials` COMPLETE or PRUNED ones; `toolchain build --storage
URL` then finds them done and builds the best (or runs the rest itself). A worker starts a new trial
only while done + running + waiting trials are fewer than `n_trials`, else it waits for the others
(failing and re-queuing the trials of dead owners meanwhile), so a killed worker's trial is re-run by
another. Two workers that start a trial at the same instant may overshoot: a trial that finds
`n_trials` others ahead of it (by number) when it starts steps aside at once, FAIL marked `surplus`,
so exactly `n_trials` run. Each worker seeds its sampler from the seed and itself, so two workers
do not draw the same points (a shared study's trials depend on which worker ran what).

A study remembers what it was run for (data, model code, space, objectives, trial budget, seed):
if the default study of an output folder was made for a different setup, the build starts a new
study named with that setup's fingerprint instead of silently reusing stale trials; an explicit
`study_name` that does not match is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from toolchain.core.artifact import Artifact
from toolchain.core.config import BuildConfig, ParamRange, SearchSection
from toolchain.errors import ConfigError, ToolchainError
from toolchain.core.metrics import Metric
from toolchain.core.models import build_normalized_model
from toolchain.core.weights import load_weights
from toolchain.training.fit import fit, model_overrides, training_settings
from toolchain.core.contract import BuildContext

DEFAULT_TRIALS = {"quick": 6, "standard": 20, "thorough": 60}
HEARTBEAT_S, GRACE_S = 10, 60
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
AHEAD = (*DONE, TrialState.RUNNING, TrialState.WAITING)  # trials that will count, or may still
OPEN_ATTEMPTS = 3  # opening a storage (and creating its schema the first time)
POLL_S = 1.0  # a worker waiting for the others' last trials looks again this often
SURPLUS = "surplus: the study had its trials when this one started"


class SurplusTrial(Exception):
    """Raised by a trial that started after the study had its trials (a race between workers)."""


def directions(objectives: list[str], metric: Metric) -> list[str]:
    """Optuna's direction of each objective: `accuracy` is the build's metric, whichever way it improves."""
    better = "maximize" if metric.higher_is_better else "minimize"
    return [better if objective == "accuracy" else "minimize" for objective in objectives]


# ----------------------------------------------------------------------------- factories


def _tpe(seed: int, n_trials: int, grid: dict[str, list]) -> optuna.samplers.BaseSampler:
    # Optuna's default of 10 random start-up trials is the whole quick budget: scale it with n_trials.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)), multivariate=True)


def _nsga2(seed: int, n_trials: int, grid: dict[str, list]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n_trials // 3)))


SAMPLERS: dict[str, Callable[[int, int, dict[str, list]], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": lambda seed, n_trials, grid: optuna.samplers.RandomSampler(seed=seed),
    "grid": lambda seed, n_trials, grid: optuna.samplers.GridSampler(grid, seed=seed),
    "nsga2": _nsga2,
}

PRUNERS: dict[str, Callable[[int, int, int], optuna.pruners.BasePruner]] = {  # (n_trials, epochs per fit, steps per trial)
    # Early epochs mostly tell a fast learning rate from a slow one: judge only after a third of a trial.
    "median": lambda n_trials, epochs, steps: optuna.pruners.MedianPruner(
        n_startup_trials=max(2, min(5, n_trials // 3)), n_warmup_steps=max(1, epochs // 3)),
    "hyperband": lambda n_trials, epochs, steps: optuna.pruners.HyperbandPruner(
        min_resource=1, max_resource=max(steps, 1), reduction_factor=3),
    "none": lambda n_trials, epochs, steps: optuna.pruners.NopPruner(),
}


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class SearchPlan:
    n_trials: int
    sampler: str
    pruner: str  # the pruner actually used (none for multi-objective)
    objectives: list[str]
    trial_epochs: int
    patience: int
    cv_folds: int
    storage_url: str
    study_name: str
    default_name: bool
    notes: tuple[str, ...]


def _is_int_range(name: str, spec: ParamRange, raw: Any) -> bool:
    """Integers when both bounds are written as integers in the TOML (pydantic made them floats)."""
    if isinstance(raw, dict) and "low" in raw and "high" in raw:
        ints = all(isinstance(raw[k], int) and not isinstance(raw[k], bool) for k in ("low", "high"))
        return ints and (spec.step is None or float(spec.step).is_integer())
    return float(spec.low).is_integer() and float(spec.high).is_integer()


def _check_space(search: SearchSection) -> dict[str, ParamRange | list]:
    try:
        space = search.space
    except ValueError as exc:
        raise ConfigError(f"[search] {exc}") from None
    for name, spec in space.items():
        if isinstance(spec, ParamRange) and spec.log and spec.step is not None:
            raise ConfigError(f"[search] {name}: log = true and step cannot be combined; drop one of them")
    return space


def _storage_url(ctx: BuildContext) -> str:
    url = ctx.config.search.storage
    if url is None:
        return f"sqlite:///{(ctx.out_dir / f'{ctx.config.project.name}-search.sqlite').resolve()}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        # Paths resolve relative to the config file, like every other path of the build.
        return f"sqlite:///{ctx.config.resolve(url.removeprefix('sqlite:///'))}"
    return url


def public_url(url: str) -> str:
    """The storage URL without its password (for the console and the report)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: mask anything that looks like user:password@
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def make_plan(ctx: BuildContext) -> SearchPlan:
    search = ctx.config.search
    space = _check_space(search)
    notes = []
    n_trials = search.n_trials or DEFAULT_TRIALS[ctx.budget]
    if search.sampler == "grid":
        size = math.prod(len(v) for v in space.values())
        if search.n_trials is None:
            n_trials = size
        elif n_trials > size:
            notes.append(f"n_trials = {n_trials} is more than the grid's {size} points: the grid runs each point once")
            n_trials = size
    pruner = search.pruner
    if len(search.objectives) > 1 and pruner != "none":
        notes.append(f"pruner \"{pruner}\" is off: Optuna cannot prune multi-objective studies, every trial runs to the end")
        pruner = "none"
    elif "accuracy" not in search.objectives and pruner != "none":
        notes.append(f"pruner is off: pruning watches the validation {ctx.metric.name}, which is not an objective here")
        pruner = "none"
    full = ctx.config.train.epochs or ctx.settings.max_epochs
    trial_epochs = min(full, max(3, math.ceil(full / 3)))
    patience = max(2, ctx.settings.patience // 2)
    if ctx.config.train.patience:
        patience = min(patience, ctx.config.train.patience)
    default_name = search.study_name is None
    name = search.study_name or f"{ctx.config.project.name}-{ctx.profile.id}"
    return SearchPlan(n_trials=n_trials, sampler=search.sampler, pruner=pruner, objectives=list(search.objectives),
                      trial_epochs=trial_epochs, patience=patience, cv_folds=search.cv_folds,
                      storage_url=_storage_url(ctx), study_name=name, default_name=default_name, notes=tuple(notes))


def _file_digest(config: BuildConfig, relative: str | None) -> str | None:
    """The sha256 of a file the config names (None when it names none): trials depend on its content."""
    if relative is None:
        return None
    try:
        return hashlib.sha256(config.resolve(relative).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def fingerprint(ctx: BuildContext, plan: SearchPlan) -> tuple[str, dict[str, Any]]:
    """What the trials of a study depend on; n_trials, sampler and pruner may change between runs."""
    config = ctx.config
    model_code = "" if config.model.entry.startswith("zoo:") else _file_digest(config, config.model.entry.rsplit(":", 1)[0])
    setup = {
        "space": {k: (v.model_dump() if isinstance(v, ParamRange) else v) for k, v in _check_space(config.search).items()},
        "objectives": plan.objectives, "cv_folds": plan.cv_folds, "trial_epochs": plan.trial_epochs,
        "patience": plan.patience, "seed": ctx.seed, "data": ctx.dataset.sha256,
        "model": {"entry": config.model.entry, "kwargs": config.model.kwargs, "input_shape": config.model.input_shape,
                  "code": model_code, "weights": _file_digest(config, config.model.weights)},
        "metric": ctx.metric.name,
        "train": config.train.model_dump(), "splits": [config.data.validation, config.data.test],
        "target": ctx.profile.id if "latency" in plan.objectives else None,
    }
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()
    return digest, setup


# ----------------------------------------------------------------------------- orphaned trials


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]  # field 22: start time in clock ticks since boot


def _machine() -> str:
    """This host and kernel boot and pid namespace: where a pid means this process."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "|".join(parts)


def owner() -> dict[str, Any]:
    return {"machine": _machine(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def owner_alive(record: dict[str, Any]) -> bool | None:
    """True/False for an owner on this machine; None when it is elsewhere (left to the heartbeat)."""
    if not isinstance(record, dict) or record.get("machine") != _machine():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:  # never signal 0 or -1 (a process group, everyone)
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, ValueError, OverflowError):
        return False
    start = _process_start(pid)
    return start is None or record.get("start") is None or start == record["start"]


def recover_orphans(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose process on this machine is gone, and queue their parameters again."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    storage, recovered = study._storage, []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_alive(trial.user_attrs.get("owner")) is not False:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "failure", "its build process ended while it ran; retried")
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(trial._trial_id))
                recovered.append(trial.number)
        except UpdateFinishedTrialError:  # another build recovered it first
            continue
    return recovered


def retry_interrupted(study: optuna.Study, record: dict[str, Any]) -> None:
    """After Ctrl-C: the trial this process was running is FAIL; queue its parameters again (once)."""
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("owner") == record]
    if mine:
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, max(mine, key=lambda t: t.number))


# ----------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class _FoldData:
    """What `build_normalized_model` reads of a dataset: normalisation comes from the fold's own training part."""

    x_train: np.ndarray
    y_train: np.ndarray
    labels: list[str]
    task: str


def _splits(ctx: BuildContext, folds: int) -> tuple[list[tuple[np.ndarray, ...]], str]:
    data = ctx.dataset
    if folds < 2:
        return [(data.x_train, data.y_train, data.x_val, data.y_val)], "validation split"
    from sklearn.model_selection import KFold, StratifiedKFold

    x = np.concatenate([data.x_train, data.x_val])
    y = np.concatenate([data.y_train, data.y_val])
    if data.task == "classification" and np.bincount(y, minlength=len(data.labels)).min() >= folds:
        splitter, kind = StratifiedKFold(n_splits=folds, shuffle=True, random_state=ctx.seed), "stratified"
    else:
        kind = "plain (a class has fewer samples than folds)" if data.task == "classification" else "plain"
        splitter = KFold(n_splits=folds, shuffle=True, random_state=ctx.seed)
    return [(x[a], y[a], x[b], y[b]) for a, b in splitter.split(x, y)], f"{folds}-fold {kind} cross-validation of train+validation"


def suggest(trial: optuna.Trial, space: dict[str, ParamRange | list], raw: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            params[name] = trial.suggest_categorical(name, spec)
        elif _is_int_range(name, spec, raw.get(name)):
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            params[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return params


class _Trials:
    """The objective: one instance per search, holding the folds and the per-architecture latency cache."""

    def __init__(self, ctx: BuildContext, plan: SearchPlan, space: dict[str, ParamRange | list],
                 progress: Progress, task: Any) -> None:
        self.ctx, self.plan, self.space = ctx, plan, space
        self.raw = ctx.config.search.model_extra or {}
        self.splits, self.validation = _splits(ctx, plan.cv_folds)
        self.latency_cache: dict[str, float] = {}
        self.progress, self.task = progress, task
        self.owner = owner()
        self.surplus = False  # whether the last trial stepped aside (SurplusTrial)
        epochs_spec = space.get("epochs")
        if isinstance(epochs_spec, list):
            self.stride = int(max(epochs_spec))
        elif isinstance(epochs_spec, ParamRange):
            self.stride = int(epochs_spec.high)
        else:
            self.stride = plan.trial_epochs

    def predicted_latency(self, trial: optuna.Trial, overrides: dict[str, Any]) -> float:
        """The FP32 graph's predicted latency on the target; weights do not change it, so one export per architecture."""
        from toolchain.perf.graph_cost import analyze
        from toolchain.perf.roofline import predict
        from toolchain.export.onnx import export_module

        key = json.dumps(overrides, sort_keys=True, default=str)
        if key not in self.latency_cache:
            folder = self.ctx.work_path("search")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"arch-{len(self.latency_cache)}.onnx"
            module, _ = build_normalized_model(self.ctx.config, self.ctx.dataset, **overrides)
            export_module(module, self.ctx.dataset.input_shape, path)
            self.latency_cache[key] = predict(analyze(path), self.ctx.profile).latency_ms
        return self.latency_cache[key]

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        trial.set_user_attr("owner", self.owner)
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=AHEAD) if t.number < trial.number]
        self.surplus = len(ahead) >= self.plan.n_trials
        if self.surplus:
            trial.set_user_attr("failure", SURPLUS)
            raise SurplusTrial(SURPLUS)
        params = suggest(trial, self.space, self.raw)
        trial_ctx = replace(self.ctx, hparams=params)
        settings, overrides = training_settings(trial_ctx), model_overrides(trial_ctx)
        epochs = int(params["epochs"]) if "epochs" in params else self.plan.trial_epochs
        values: dict[str, float] = {}
        if "latency" in self.plan.objectives:
            values["latency"] = self.predicted_latency(trial, overrides)
            trial.set_user_attr("latency_ms", values["latency"])
        prune = self.plan.pruner != "none"
        metric, config, dataset = self.ctx.metric, self.ctx.config, self.ctx.dataset
        scores, epochs_run = [], 0
        for fold, (x_train, y_train, x_val, y_val) in enumerate(self.splits):
            data = dataset if len(self.splits) == 1 else _FoldData(x_train, y_train, dataset.labels, dataset.task)
            module, _ = build_normalized_model(config, data, **overrides)
            if config.model.weights is not None:  # trials fine-tune the pretrained weights, as the build will
                load_weights(module, config)

            def on_epoch(epoch: int, loss: float, value: float, fold: int = fold) -> None:
                where = f"fold {fold + 1}/{len(self.splits)} " if len(self.splits) > 1 else ""
                self.progress.update(self.task, status=f"trial {trial.number}: {where}epoch {epoch} "
                                                       f"val {metric.name} {metric.format_value(value)}")
                if prune:
                    trial.report(value, fold * self.stride + epoch)
                    if trial.should_prune():
                        trial.set_user_attr("pruned_at", {"fold": fold + 1, "epoch": epoch, f"val_{metric.name}": round(value, 5)})
                        raise optuna.TrialPruned(f"val {metric.name} {metric.format_value(value)} at epoch {epoch} "
                                                 "is worse than the pruner's bar")

            result = fit(module, x_train, y_train, x_val, y_val, metric=metric, lr=float(settings["lr"]),
                         weight_decay=float(settings["weight_decay"]), batch_size=int(settings["batch_size"]),
                         max_epochs=epochs, patience=self.plan.patience, seed=self.ctx.seed, on_epoch=on_epoch,
                         label=f"trial {trial.number}")
            scores.append(result.val_metric)
            epochs_run += len(result.history)
        trial.set_user_attr("epochs_run", epochs_run)
        values["accuracy"] = float(np.mean(scores))
        if len(scores) > 1:
            trial.set_user_attr("cv_scores", [round(s, 5) for s in scores])
            trial.set_user_attr("cv_mean", round(float(np.mean(scores)), 5))
            trial.set_user_attr("cv_sd", round(float(np.std(scores, ddof=1)), 5))
        else:
            trial.set_user_attr(f"val_{metric.name}", round(scores[0], 5))
        out = tuple(values[name] for name in self.plan.objectives)
        return out[0] if len(out) == 1 else out


def preflight(ctx: BuildContext, space: dict[str, ParamRange | list]) -> None:
    """Build the model at the space's first corner: an unknown keyword or a shape error is a config error."""
    corner = {name: (spec[0] if isinstance(spec, list) else spec.low) for name, spec in space.items()}
    raw = ctx.config.search.model_extra or {}
    corner = {k: (int(v) if isinstance(space[k], ParamRange) and _is_int_range(k, space[k], raw.get(k)) else v)
              for k, v in corner.items()}
    try:
        build_normalized_model(ctx.config, ctx.dataset, **model_overrides(replace(ctx, hparams=corner)))
    except ConfigError as exc:
        raise ConfigError(f"[search] the model cannot be built with {corner}: {exc}") from None


def _open_storage(url: str) -> optuna.storages.BaseStorage:
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    if url.startswith("sqlite:////"):  # the one file a build writes into the output folder early: see the docstring
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, OPEN_ATTEMPTS + 1):  # workers starting together race to create the schema: the loser retries
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        except Exception as exc:  # noqa: BLE001 - any driver error becomes one clear line
            if attempt == OPEN_ATTEMPTS:
                raise ToolchainError(f"[search] storage {public_url(url)} cannot be opened: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''} (use an SQLAlchemy URL such as "
                                     "sqlite:///path/study.sqlite or postgresql://user@host/db)") from None
            time.sleep(1.0)


def open_study(ctx: BuildContext, plan: SearchPlan, storage: optuna.storages.BaseStorage,
               sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, SearchPlan]:
    """Create or load the study; a study run for a different setup is never silently reused."""
    digest, setup = fingerprint(ctx, plan)
    wanted = directions(plan.objectives, ctx.metric)
    existing = set(optuna.study.get_all_study_names(storage))
    if plan.study_name in existing:
        old = optuna.load_study(study_name=plan.study_name, storage=storage).user_attrs.get("fingerprint")
        if old is not None and old != digest:
            if not plan.default_name:
                raise ToolchainError(f"[search] study_name {plan.study_name!r} in {public_url(plan.storage_url)} was run for "
                                     "a different setup (data, model code, space, objectives, trial budget or seed); "
                                     "choose another study_name or delete that study")
            renamed = f"{plan.study_name}-{digest[:8]}"
            plan = replace(plan, study_name=renamed, notes=(*plan.notes, f"the study {plan.study_name!r} in the output "
                           f"folder was run for a different setup; this build uses the study {renamed!r}"))
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=plan.study_name,
                                directions=wanted, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != wanted:
        raise ToolchainError(f"[search] the study {plan.study_name!r} optimises other objectives; set another study_name")
    if "fingerprint" not in study.user_attrs:
        study.set_user_attr("fingerprint", digest)
        study.set_user_attr("setup", json.loads(json.dumps(setup, default=str)))
    return study, plan


def _round(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(float(value), digits)


def _trial_row(trial: FrozenTrial, objectives: list[str]) -> dict[str, Any]:
    values = dict(zip(objectives, trial.values)) if trial.values is not None else {}
    attrs = trial.user_attrs
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else None
    row = {"number": trial.number, "state": trial.state.name, "params": dict(trial.params),
           "values": {k: _round(v, 6) for k, v in values.items()},
           "accuracy": _round(values.get("accuracy")), "latency_ms": _round(attrs.get("latency_ms"), 6),
           "cv_mean": attrs.get("cv_mean"), "cv_sd": attrs.get("cv_sd"), "cv_scores": attrs.get("cv_scores"),
           "epochs_run": attrs.get("epochs_run"), "seconds": _round(seconds, 3)}
    if trial.state == TrialState.PRUNED:
        row["pruned_at"] = attrs.get("pruned_at")
    if "failure" in attrs:
        row["failure"] = attrs["failure"]
    if "retry_history" in trial.system_attrs:
        row["retry_of"] = trial.system_attrs["retry_history"][0]
    return row


def choose(study: optuna.Study, plan: SearchPlan, ctx: BuildContext) -> tuple[FrozenTrial, list[FrozenTrial], str]:
    """Single objective: the best trial. Two: the Pareto point with the best metric within the latency budget,
    else the fastest."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        raise ToolchainError(f"[search] no trial completed ({len(study.trials)} in the study were pruned or failed); "
                             "widen the space or use pruner = \"none\"")
    if len(plan.objectives) == 1:
        best = study.best_trial
        objective = plan.objectives[0]
        if objective == "latency":
            return best, [], (f"trial {best.number} has the lowest predicted latency on {ctx.profile.id} "
                              f"({best.value:.4g} ms) of {len(complete)} completed trials.")
        name, shown = ctx.metric.name, ctx.metric.format_value
        measure = (f"mean {plan.cv_folds}-fold {name} {shown(best.user_attrs.get('cv_mean', best.value))} "
                   f"± {best.user_attrs.get('cv_sd', 0.0):.4g}") if plan.cv_folds >= 2 else f"validation {name} {shown(best.value)}"
        return best, [], f"trial {best.number} has the best {measure} of {len(complete)} completed trials."
    a, l = plan.objectives.index("accuracy"), plan.objectives.index("latency")
    sign = 1.0 if ctx.metric.higher_is_better else -1.0
    front = sorted(study.best_trials, key=lambda t: (t.values[l], -sign * t.values[a]))
    budget = ctx.profile.budget.latency_ms
    within = [t for t in front if t.values[l] <= budget]
    name, shown = ctx.metric.name, ctx.metric.format_value
    if within:
        chosen = max(within, key=lambda t: (sign * t.values[a], -t.values[l]))
        reason = (f"trial {chosen.number} has the best {name} ({shown(chosen.values[a])}) of the {len(within)} Pareto-optimal "
                  f"trials whose predicted latency on {ctx.profile.id} meets its {budget:g} ms budget "
                  f"({chosen.values[l]:.4g} ms).")
    else:
        chosen = min(front, key=lambda t: (t.values[l], -sign * t.values[a]))
        reason = (f"no Pareto-optimal trial meets the {budget:g} ms latency budget of {ctx.profile.id}, so the fastest "
                  f"one was chosen: trial {chosen.number} ({chosen.values[l]:.4g} ms, {name} {shown(chosen.values[a])}).")
    return chosen, front, reason


class _NoInterruptedTrialLog(logging.Filter):
    """Ctrl-C in a trial: Optuna logs it as a failed trial, with the whole traceback and then a second
    line; the trial is queued again for the resumed build (`retry_interrupted`), so both are noise."""

    def __init__(self) -> None:
        super().__init__()
        self.drop_next = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.drop_next = True  # its "failed with value None." line follows
            return False
        drop, self.drop_next = self.drop_next, False
        return not drop


def _quiet_optuna() -> Callable[[], None]:
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_log, interrupted = logging.getLogger("optuna.study._optimize"), _NoInterruptedTrialLog()
    trial_log.addFilter(interrupted)

    def restore() -> None:
        trial_log.removeFilter(interrupted)
        optuna.logging.set_verbosity(level)
    return restore


@dataclass(frozen=True)
class StudyRun:
    """What one process did in a study: the study, the plan it ran, and its share of the trials."""

    study: optuna.Study
    plan: SearchPlan
    ran: int  # trials this process ran to an end (COMPLETE, PRUNED or FAIL), surplus ones not counted
    done_before: int  # COMPLETE or PRUNED when it joined
    recovered: list[int]  # trials of dead owners it failed and queued again
    validation: str  # what a trial is scored on (the validation split, or k-fold CV)
    space: dict[str, ParamRange | list]


def run_study(ctx: BuildContext, worker: bool = False) -> StudyRun:
    """Open the study (creating it the first time) and run trials until it has `n_trials` done. A
    `worker` (`toolchain search`) seeds its sampler from itself, so parallel workers draw different points."""
    space = _check_space(ctx.config.search)
    preflight(ctx, space)  # a model the space cannot build fails here, before the output folder is touched
    plan = make_plan(ctx)
    grid = {k: list(v) for k, v in space.items() if isinstance(v, list)}
    seed = ctx.seed
    if worker:
        seed = int.from_bytes(hashlib.sha256(json.dumps([ctx.seed, owner()]).encode()).digest()[:4], "big") >> 1
    restore = _quiet_optuna()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.filterwarnings("ignore", message=".*GridSampler.*re-evaluating.*")
            sampler = SAMPLERS[plan.sampler](seed, plan.n_trials, grid)
            pruner = PRUNERS[plan.pruner](plan.n_trials, plan.trial_epochs, plan.trial_epochs * max(1, plan.cv_folds))
            storage = _open_storage(plan.storage_url)
            study, plan = open_study(ctx, plan, storage, sampler, pruner)
            recovered = recover_orphans(study)
            done_before = len(study.get_trials(deepcopy=False, states=DONE))
            ran, validation = _optimize(study, plan, space, ctx, sampler)
    finally:
        restore()
    return StudyRun(study, plan, ran, done_before, recovered, validation, space)


def _optimize(study: optuna.Study, plan: SearchPlan, space: dict[str, ParamRange | list], ctx: BuildContext,
              sampler: optuna.samplers.BaseSampler) -> tuple[int, str]:
    """Run trials one at a time until the study holds n_trials COMPLETE or PRUNED ones (shared with other
    processes): a new trial only while those done, running and waiting are fewer; else wait for the
    others, failing and re-queuing the trials of dead owners (this machine's at once, others' by heartbeat)."""
    def count(*states: TrialState) -> int:
        return len(study.get_trials(deepcopy=False, states=states))

    progress = Progress(TextColumn("  search"), BarColumn(), TextColumn("{task.completed}/{task.total} trials"),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=ctx.console, transient=True)
    ran = 0
    with progress:
        task = progress.add_task("search", total=plan.n_trials, completed=min(count(*DONE), plan.n_trials), status="")
        objective = _Trials(ctx, plan, space, progress, task)
        while count(*DONE) < plan.n_trials and ran < 3 * plan.n_trials + 10:  # a bound: failing trials end too
            waiting = count(TrialState.WAITING)
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study) and not waiting:
                break  # every point ran (some failed for good): never re-evaluate one
            if not waiting and count(*AHEAD) >= plan.n_trials:  # the others are running the last ones
                progress.update(task, status="waiting for other workers' trials")
                if not recover_orphans(study):
                    optuna.storages.fail_stale_trials(study)
                    time.sleep(POLL_S)
                continue
            try:
                study.optimize(objective, n_trials=1, catch=(SurplusTrial,))
            except KeyboardInterrupt:  # Optuna marked the trial FAIL: queue it again so a resumed build runs it
                retry_interrupted(study, objective.owner)
                raise
            ran += not objective.surplus
            progress.update(task, completed=min(count(*DONE), plan.n_trials), status="")
    return ran, objective.validation


def work(ctx: BuildContext) -> StudyRun:
    """`toolchain search`: one worker's share of the study named by the config."""
    if ctx.config.search is None:
        raise ConfigError(f"config {ctx.config.path}: a search worker needs a [search] section (its space and n_trials)")
    return run_study(ctx, worker=True)


class SearchPass:
    name: ClassVar[str] = "search"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        if ctx.config.search is None:
            return artifact
        if ctx.warm_start is not None:
            ctx.console.print("  skipped: a warm start keeps the architecture and settings of the model it continues")
            artifact.metrics["search"] = {"skipped": f"warm start from {ctx.warm_start}"}
            return artifact
        if ctx.config.train.epochs == 0:
            reason = "[train] epochs = 0 keeps the pretrained weights as they are: there is no training to tune"
            ctx.console.print(f"  skipped: {reason}")
            ctx.notes.append(f"search skipped: {reason}")
            artifact.metrics["search"] = {"skipped": reason}
            return artifact
        started = time.perf_counter()
        run = run_study(ctx)
        study, plan, space = run.study, run.plan, run.space
        chosen, front, reason = choose(study, plan, ctx)
        ctx.hparams = dict(chosen.params)
        for note in plan.notes:
            ctx.notes.append(f"search: {note}")
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        artifact.metrics["search"] = {
            "sampler": plan.sampler, "pruner": plan.pruner, "pruner_requested": ctx.config.search.pruner,
            "objectives": plan.objectives, "directions": directions(plan.objectives, ctx.metric),
            "metric": ctx.metric.name,
            "n_trials": plan.n_trials, "trial_epochs": plan.trial_epochs, "patience": plan.patience,
            "cv_folds": plan.cv_folds, "validation": run.validation,
            "storage": public_url(plan.storage_url), "study_name": plan.study_name,
            "resumed": {"trials_done_before": run.done_before, "trials_run_now": run.ran, "orphans_failed": run.recovered},
            "space": {k: (v.model_dump() if isinstance(v, ParamRange) else v) for k, v in space.items()},
            "latency_target": ctx.profile.id if "latency" in plan.objectives else None,
            "latency_budget_ms": ctx.profile.budget.latency_ms,
            "trials": [_trial_row(t, plan.objectives) for t in trials],
            "pareto": [_trial_row(t, plan.objectives) for t in front],
            "chosen": {"number": chosen.number, "params": dict(chosen.params),
                       "values": {k: _round(v, 6) for k, v in zip(plan.objectives, chosen.values)},
                       "cv_mean": chosen.user_attrs.get("cv_mean"), "cv_sd": chosen.user_attrs.get("cv_sd"),
                       "latency_ms": _round(chosen.user_attrs.get("latency_ms"), 6), "reason": reason},
            "notes": list(plan.notes),
            "seconds": round(time.perf_counter() - started, 3),
        }
        ctx.console.print(f"  {summary(run)}")
        for note in plan.notes:
            ctx.console.print(f"  [yellow]note[/] {note}")
        ctx.console.print(f"  chosen {dict(chosen.params)}: {reason}")
        return artifact


def summary(run: StudyRun) -> str:
    """One line: the study's trials by state, and this process's share."""
    trials = run.study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    return (f"{run.plan.sampler} search, study {run.plan.study_name!r}: {counts[TrialState.COMPLETE]} complete, "
            f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed ({run.ran} run now, "
            f"{run.done_before} resumed) [dim]{public_url(run.plan.storage_url)}[/]")


__all__ = ["SearchPass", "SAMPLERS", "PRUNERS", "make_plan", "choose", "public_url", "recover_orphans", "owner",
           "owner_alive", "run_study", "work", "summary", "StudyRun"]
