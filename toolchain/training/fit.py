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

TRAIN_PARAMS = ("lr", "weight_decay", "batch_size", "epochs")  # search parameters that tune training, not the model
WARM_LR_SCALE = 0.3  # fine-tuning a warm start (without a [retrain] section saying otherwise)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        on_epoch: Callable[[int, float, float], None] | None = None) -> FitResult:
    """AdamW + cosine schedule, early stopping on validation loss (cross-entropy for class labels, MSE
    for float regression targets), validation `metric` recorded every epoch. `on_epoch(epoch, val_loss,
    val_metric)` may raise to stop (Optuna's TrialPruned does). With `teacher`, trains on its soft
    targets too. `max_epochs = 0` trains nothing and only measures the module as it is."""
    device = pick_device()
    torch.manual_seed(seed)
    module = module.to(device)
    to_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    xt, yt, xv, yv = to_tensor(x_train), to_tensor(y_train), to_tensor(x_val), to_tensor(y_val)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(max_epochs, 1))
    generator = torch.Generator().manual_seed(seed)
    start = evaluate_torch(module, xv, yv, metric) if max_epochs == 0 else (float("inf"), float("nan"))
    best = (*start, 0, copy.deepcopy(module.state_dict()))
    history = []
    for epoch in range(1, max_epochs + 1):
        module.train()
        for xb, yb in _batches(xt, yt, batch_size, generator):
            optimizer.zero_grad()
            outputs = module(xb)
            if teacher is None:
                loss = sample_losses(outputs, yb).mean()
            else:
                with torch.no_grad():
                    target = teacher(xb)
                loss = distillation_loss(outputs, target, yb, temperature, alpha)
            loss.backward()
            optimizer.step()
        scheduler.step()
        val_loss, val_metric = evaluate_torch(module, xv, yv, metric)
        history.append({"epoch": epoch, "val_loss": round(val_loss, 5), f"val_{metric.name}": round(val_metric, 5)})
        if val_loss < best[0]:
            best = (val_loss, val_metric, epoch, copy.deepcopy(module.state_dict()))
        if on_epoch is not None:
            on_epoch(epoch, val_loss, val_metric)
        if epoch - best[2] >= patience:
            break
    module.load_state_dict(best[3])
    return FitResult(module=module.cpu().eval(), best_epoch=best[2], val_loss=best[0], val_metric=best[1], history=history)


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
             teacher: nn.Module | None = None) -> tuple[FitResult, dict[str, Any]]:
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
                 temperature=compress.temperature, alpha=compress.alpha)
    if teacher is not None:
        teacher.cpu().eval()
    return result, {"max_epochs": int(epochs), "patience": patience, "lr": lr, "distilled_from_teacher": teacher is not None}


def model_overrides(ctx: BuildContext) -> dict[str, Any]:
    return {k: v for k, v in ctx.hparams.items() if k not in TRAIN_PARAMS}
