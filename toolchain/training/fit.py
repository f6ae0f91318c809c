"""The one training loop of the toolchain, and the build's training settings.

`fit` is called by the train pass, hyper-parameter trials, distillation (with a teacher's soft
targets), pruning and QAT fine-tuning: seeded, on CUDA when present, early-stopped on validation loss
with the best epoch restored, so a long patience never costs accuracy. The task follows from the
targets: int64 class labels train with cross-entropy, float regression targets with mean squared
error; either way every epoch records the build's metric on validation (`val_accuracy`, `val_rmse`,
...), and that metric is what trials and keep-or-reject decisions compare.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from toolchain.core.contract import BuildContext
from toolchain.core.metrics import BUILTIN, Metric
from toolchain.core.models import sample_losses
from toolchain.training import distributed

TRAIN_PARAMS = ("lr", "weight_decay", "batch_size", "epochs")  # search parameters that tune training, not the model
WARM_LR_SCALE = 0.3  # fine-tuning a warm start (without a [retrain] section saying otherwise)


def pick_device() -> torch.device:
    return distributed.device()


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator | None):
    order = torch.randperm(len(x), generator=generator, device="cpu").to(x.device) if generator is not None \
        else torch.arange(len(x), device=x.device)
    for start in range(0, len(x), size):
        index = order[start:start + size]
        yield x[index], y[index]


def evaluate_torch(module: nn.Module, x: torch.Tensor, y: torch.Tensor, metric: Metric = BUILTIN["accuracy"],
                   batch_size: int = 512) -> tuple[float, float]:
    """(mean loss, `metric`) without gradients."""
    module.eval()
    loss_sum, outputs = 0.0, []
    with torch.no_grad():
        for xb, yb in _batches(x, y, batch_size, None):
            out = module(xb)
            loss_sum += float(sample_losses(out, yb).sum())
            outputs.append(out.cpu())
    return loss_sum / len(x), metric.value([torch.cat(outputs).numpy()], y.cpu().numpy())


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy. For
    regression (float `labels`) the teacher's soft targets are its outputs: alpha * MSE(student,
    teacher) + (1 - alpha) * MSE(student, labels), no temperature."""
    if labels.is_floating_point():
        soft = sample_losses(student_logits, teacher_logits.reshape(len(labels), -1)).mean()
        return alpha * soft + (1 - alpha) * sample_losses(student_logits, labels).mean()
    soft = nn.functional.kl_div(nn.functional.log_softmax(student_logits / temperature, dim=1),
                                nn.functional.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    return alpha * temperature ** 2 * soft + (1 - alpha) * nn.functional.cross_entropy(student_logits, labels)


def validation_metric(module: nn.Module, ctx: BuildContext) -> float:
    """The task's metric (`ctx.metric`) of a torch module on the validation split: the compression steps' yardstick."""
    data = ctx.dataset
    _, value = evaluate_torch(module.cpu(), torch.from_numpy(data.x_val), torch.from_numpy(data.y_val), ctx.metric)
    return value


@dataclass
class FitResult:
    module: nn.Module
    best_epoch: int  # 0: no epoch ran (the weights as they came)
    val_loss: float
    val_metric: float  # of the metric `fit` was given, at the best epoch
    history: list[dict[str, float]] = field(default_factory=list)  # epoch, val_loss, val_<metric name>


def fit(module: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
        metric: Metric, lr: float, weight_decay: float, batch_size: int, max_epochs: int, patience: int, seed: int,
        teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.7,
        on_epoch: Callable[[int, float, float], None] | None = None, label: str = "fit") -> FitResult:
    """AdamW + cosine schedule, early stopping on validation loss (cross-entropy for class labels, MSE
    for float regression targets), validation `metric` recorded every epoch. `on_epoch(epoch, val_loss,
    val_metric)` may raise to stop (Optuna's TrialPruned does). With `teacher`, trains on its soft
    targets too. `max_epochs = 0` trains nothing and only measures the module as it is.

    Under torchrun (`training.distributed`) the followers train the same job with this process, which
    alone validates and decides; `label` names the job in each rank's weights line."""
    settings = {"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "max_epochs": max_epochs, "seed": seed,
                "temperature": temperature, "alpha": alpha}
    if distributed.world().spread and max_epochs > 0:
        distributed.send_fit(label, module, teacher, x_train, y_train, settings)
    device = pick_device()
    xv, yv = torch.from_numpy(x_val).to(device), torch.from_numpy(y_val).to(device)
    start = evaluate_torch(module.to(device), xv, yv, metric) if max_epochs == 0 else (float("inf"), float("nan"))
    best = [*start, 0]  # val loss, val metric, epoch
    history: list[dict[str, float]] = []
    stopped_by: list[BaseException] = []

    def judge(epoch: int, trained: nn.Module) -> tuple[bool, bool]:
        val_loss, val_metric = evaluate_torch(trained, xv, yv, metric)
        history.append({"epoch": epoch, "val_loss": round(val_loss, 5), f"val_{metric.name}": round(val_metric, 5)})
        improved = val_loss < best[0]
        if improved:
            best[:] = [val_loss, val_metric, epoch]
        try:
            if on_epoch is not None:
                on_epoch(epoch, val_loss, val_metric)
        except BaseException as exc:  # noqa: BLE001 - re-raised once every rank has stopped with us
            stopped_by.append(exc)
        return improved, bool(stopped_by) or epoch - best[2] >= patience

    module, _, _ = train_epochs(module, x_train, y_train, settings, teacher, judge)
    if stopped_by:
        raise stopped_by[0]
    if distributed.world().spread and max_epochs > 0:
        distributed.report_weights(label, module, best[2], len(history))
    return FitResult(module=module, best_epoch=best[2], val_loss=best[0], val_metric=best[1], history=history)


def train_epochs(module: nn.Module, x_train: np.ndarray, y_train: np.ndarray, settings: dict[str, Any],
                 teacher: nn.Module | None, judge: Callable[[int, nn.Module], tuple[bool, bool]] | None
                 ) -> tuple[nn.Module, int, int]:
    """The epochs themselves, shared by the leader (`judge` validates and decides) and the followers
    (`judge` None: they take the leader's verdicts). Returns the module with the best epoch's weights,
    on the CPU, that epoch (0: none improved) and the epochs run."""
    device = pick_device()
    torch.manual_seed(settings["seed"])
    module = module.to(device)
    xt, yt = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    model = distributed.wrap(module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    max_epochs = int(settings["max_epochs"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(max_epochs, 1))
    batches = _epoch_batches(xt, yt, int(settings["batch_size"]), int(settings["seed"]))
    best_state, best_epoch, epochs_run = copy.deepcopy(module.state_dict()), 0, 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        for xb, yb in batches(epoch):
            optimizer.zero_grad()
            outputs = model(xb)
            if teacher is None:
                loss = sample_losses(outputs, yb).mean()
            else:
                with torch.no_grad():
                    target = teacher(xb)
                loss = distillation_loss(outputs, target, yb, settings["temperature"], settings["alpha"])
            loss.backward()
            optimizer.step()
        scheduler.step()
        distributed.sync_buffers(module)
        epochs_run = epoch
        improved, stop = distributed.agree(judge(epoch, module) if judge is not None else None)
        if improved:
            best_state, best_epoch = copy.deepcopy(module.state_dict()), epoch
        if stop:
            break
    del model  # drops DistributedDataParallel's gradient hooks: later uses of the module stay local
    module.load_state_dict(best_state)
    return module.cpu().eval(), best_epoch, epochs_run


def _epoch_batches(xt: torch.Tensor, yt: torch.Tensor, batch_size: int, seed: int):
    """epoch -> batches: one seeded shuffle stream in one process, this rank's shard under torchrun."""
    if not distributed.world().spread:
        generator = torch.Generator().manual_seed(seed)
        return lambda epoch: _batches(xt, yt, batch_size, generator)
    shard = distributed.shard(len(xt), batch_size, seed)
    return lambda epoch: ((xt[index], yt[index]) for index in shard(epoch))


def training_settings(ctx: BuildContext) -> dict[str, Any]:
    """Training settings: the config's, overridden by tuned hyper-parameters (ctx.hparams)."""
    train = ctx.config.train
    settings = {"lr": train.lr, "weight_decay": train.weight_decay, "batch_size": train.batch_size,
                "epochs": train.epochs or ctx.settings.max_epochs}
    settings.update({k: v for k, v in ctx.hparams.items() if k in TRAIN_PARAMS})
    return settings


def finetune_epochs(ctx: BuildContext, epochs: int | None = None) -> int:
    """`epochs`, else the config's `finetune_epochs`, else a quarter of the budget's epochs (at least 5)."""
    return epochs or ctx.config.compress.finetune_epochs or max(5, ctx.settings.max_epochs // 4)


def finetune(module: nn.Module, ctx: BuildContext, *, lr_scale: float, epochs: int | None = None,
             teacher: nn.Module | None = None, label: str = "fine-tune") -> tuple[FitResult, dict[str, Any]]:
    """Train `module` (already trained and then pruned or fake-quantized, or a fresh distillation student)
    with the build's settings: `fit` at `lr_scale` times the training learning rate for
    `finetune_epochs(ctx, epochs)`, distilling from `teacher` when given. Returns the result and the
    settings used, for the report."""
    settings = training_settings(ctx)
    compress = ctx.config.compress
    epochs = finetune_epochs(ctx, epochs)
    patience = min(ctx.config.train.patience or ctx.settings.patience, epochs)
    lr = settings["lr"] * lr_scale
    result = fit(module, ctx.dataset.x_train, ctx.dataset.y_train, ctx.dataset.x_val, ctx.dataset.y_val,
                 metric=ctx.metric, lr=lr, weight_decay=settings["weight_decay"], batch_size=int(settings["batch_size"]),
                 max_epochs=int(epochs), patience=patience, seed=ctx.seed, teacher=teacher,
                 temperature=compress.temperature, alpha=compress.alpha, label=label)
    if teacher is not None:
        teacher.cpu().eval()
    return result, {"max_epochs": int(epochs), "patience": patience, "lr": lr, "distilled_from_teacher": teacher is not None}


def model_overrides(ctx: BuildContext) -> dict[str, Any]:
    return {k: v for k, v in ctx.hparams.items() if k not in TRAIN_PARAMS}


def follow(job: distributed.FitJob) -> None:
    """A follower's side of one `fit` of the leader."""
    x_train, y_train = job.data
    module, best_epoch, epochs_run = train_epochs(job.module, x_train, y_train, job.settings, job.teacher, None)
    distributed.report_weights(job.label, module, best_epoch, epochs_run)


def serve(config) -> None:
    """A follower's whole build: train the leader's jobs until it is done. The user's model file is
    imported first, so the modules the leader sends can be unpickled."""
    from toolchain.core.models import model_factory

    local = None
    if not config.model.from_file:
        local = model_factory(config.model.entry, config, f"config {config.path}: [model] entry").__module__
    while (job := distributed.receive(local)) is not None:
        follow(job)
