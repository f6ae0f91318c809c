"""The one training loop of the toolchain, and the build's training settings.

`fit` is called by the train pass, hyper-parameter trials, distillation (with a teacher's soft
targets), pruning and QAT fine-tuning: seeded, on CUDA when present, early-stopped on validation loss
with the best epoch restored, so a long patience never costs accuracy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from toolchain.core.contract import BuildContext

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


def evaluate_torch(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) without gradients."""
    module.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for xb, yb in _batches(x, y, batch_size, None):
            logits = module(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(x), correct / len(x)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy."""
    soft = nn.functional.kl_div(nn.functional.log_softmax(student_logits / temperature, dim=1),
                                nn.functional.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    return alpha * temperature ** 2 * soft + (1 - alpha) * nn.functional.cross_entropy(student_logits, labels)


def validation_accuracy(module: nn.Module, dataset) -> float:
    """Accuracy of a torch module on the dataset's validation split (the compression steps' yardstick)."""
    _, accuracy = evaluate_torch(module.cpu(), torch.from_numpy(dataset.x_val), torch.from_numpy(dataset.y_val))
    return accuracy


@dataclass
class FitResult:
    module: nn.Module
    best_epoch: int
    val_loss: float
    val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


def fit(module: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
        lr: float, weight_decay: float, batch_size: int, max_epochs: int, patience: int, seed: int,
        teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.7,
        on_epoch: Callable[[int, float, float], None] | None = None) -> FitResult:
    """AdamW + cosine schedule, early stopping on validation loss. `on_epoch(epoch, val_loss, val_accuracy)`
    may raise to stop (Optuna's TrialPruned does). With `teacher`, trains on its soft targets too."""
    device = pick_device()
    torch.manual_seed(seed)
    module = module.to(device)
    to_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    xt, yt, xv, yv = to_tensor(x_train), to_tensor(y_train), to_tensor(x_val), to_tensor(y_val)
    if teacher is not None:
        teacher = teacher.to(device).eval()
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    generator = torch.Generator().manual_seed(seed)
    best = (float("inf"), 0.0, 0, copy.deepcopy(module.state_dict()))
    history = []
    for epoch in range(1, max_epochs + 1):
        module.train()
        for xb, yb in _batches(xt, yt, batch_size, generator):
            optimizer.zero_grad()
            logits = module(xb)
            if teacher is None:
                loss = nn.functional.cross_entropy(logits, yb)
            else:
                with torch.no_grad():
                    target = teacher(xb)
                loss = distillation_loss(logits, target, yb, temperature, alpha)
            loss.backward()
            optimizer.step()
        scheduler.step()
        val_loss, val_acc = evaluate_torch(module, xv, yv)
        history.append({"epoch": epoch, "val_loss": round(val_loss, 5), "val_accuracy": round(val_acc, 5)})
        if val_loss < best[0]:
            best = (val_loss, val_acc, epoch, copy.deepcopy(module.state_dict()))
        if on_epoch is not None:
            on_epoch(epoch, val_loss, val_acc)
        if epoch - best[2] >= patience:
            break
    module.load_state_dict(best[3])
    return FitResult(module=module.cpu().eval(), best_epoch=best[2], val_loss=best[0], val_accuracy=best[1], history=history)


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
                 lr=lr, weight_decay=settings["weight_decay"], batch_size=int(settings["batch_size"]),
                 max_epochs=int(epochs), patience=patience, seed=ctx.seed, teacher=teacher,
                 temperature=compress.temperature, alpha=compress.alpha)
    if teacher is not None:
        teacher.cpu().eval()
    return result, {"max_epochs": int(epochs), "patience": patience, "lr": lr, "distilled_from_teacher": teacher is not None}


def model_overrides(ctx: BuildContext) -> dict[str, Any]:
    return {k: v for k, v in ctx.hparams.items() if k not in TRAIN_PARAMS}
