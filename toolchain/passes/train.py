"""Train the user's model: seeded, on CUDA when present, early-stopped on validation loss.

The best validation epoch is restored before returning, so a long patience never costs accuracy.
The input normalisation is learned from the training split only and becomes the model's first layer.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from toolchain.artifact import Artifact
from toolchain.models import Standardize, build_user_model
from toolchain.workflow import BuildContext


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator | None):
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
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


class TrainPass:
    name: ClassVar[str] = "train"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        data, train_cfg = ctx.dataset, ctx.config.train
        device = pick_device()
        torch.manual_seed(ctx.seed)
        body = build_user_model(ctx.config, len(data.labels))
        mean, std = float(data.x_train.mean()), float(data.x_train.std()) or 1.0
        module = nn.Sequential(Standardize(mean, std), body).to(device)
        to_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        x_train, y_train = to_tensor(data.x_train), to_tensor(data.y_train)
        x_val, y_val = to_tensor(data.x_val), to_tensor(data.y_val)
        optimizer = torch.optim.AdamW(module.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        max_epochs = train_cfg.epochs or ctx.settings.max_epochs
        patience = train_cfg.patience or ctx.settings.patience
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        generator = torch.Generator().manual_seed(ctx.seed)
        best = (float("inf"), 0.0, 0, copy.deepcopy(module.state_dict()))
        history = []
        progress = Progress(TextColumn("  train"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=ctx.console, transient=True)
        with progress:
            task = progress.add_task("train", total=max_epochs, status="")
            for epoch in range(1, max_epochs + 1):
                module.train()
                for xb, yb in _batches(x_train, y_train, train_cfg.batch_size, generator):
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(module(xb), yb).backward()
                    optimizer.step()
                scheduler.step()
                val_loss, val_acc = evaluate_torch(module, x_val, y_val)
                history.append({"epoch": epoch, "val_loss": round(val_loss, 5), "val_accuracy": round(val_acc, 5)})
                if val_loss < best[0]:
                    best = (val_loss, val_acc, epoch, copy.deepcopy(module.state_dict()))
                progress.update(task, advance=1, status=f"val acc {val_acc:.3f}")
                if epoch - best[2] >= patience:
                    break
        module.load_state_dict(best[3])
        module = module.cpu().eval()
        _, train_acc = evaluate_torch(module, torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
        artifact.module = module
        artifact.metrics["train"] = {
            "device": device.type, "epochs_run": len(history), "best_epoch": best[2], "max_epochs": max_epochs,
            "patience": patience, "val_accuracy": round(best[1], 5), "train_accuracy": round(train_acc, 5),
            "parameters": int(sum(p.numel() for p in module.parameters())),
            "normalize": {"mean": mean, "std": std}, "history": history,
        }
        ctx.console.print(f"  best epoch {best[2]} of {len(history)} on {device.type}: "
                          f"val accuracy {best[1]:.4f}, {artifact.metrics['train']['parameters']:,} parameters")
        return artifact

