"""Train the user's model (or fine-tune an earlier build's, `--warm-start`) with `training.fit`."""

from __future__ import annotations

from typing import ClassVar

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from toolchain.core.artifact import Artifact
from toolchain.core.checkpoint import load_checkpoint, warm_start
from toolchain.core.contract import BuildContext
from toolchain.core.models import build_normalized_model
from toolchain.training.fit import (TRAIN_PARAMS, WARM_LR_SCALE, evaluate_torch, finetune_epochs, fit, model_overrides,
                                    pick_device, training_settings)


class TrainPass:
    name: ClassVar[str] = "train"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        data = ctx.dataset
        settings = training_settings(ctx)
        patience = ctx.config.train.patience or ctx.settings.patience
        warm = None
        if ctx.warm_start is not None:  # fine-tune an earlier build's model: its architecture, weights and normalisation
            warm = load_checkpoint(ctx.warm_start)
            ctx.hparams = {**warm["model_kwargs"], **{k: v for k, v in ctx.hparams.items() if k in TRAIN_PARAMS}}
            retrain = ctx.config.retrain
            settings["lr"] *= retrain.lr_scale if retrain else WARM_LR_SCALE
            settings["epochs"] = finetune_epochs(ctx, retrain and retrain.epochs)
        module, normalize = build_normalized_model(ctx.config, data, **model_overrides(ctx))
        if warm is not None:
            warm_start(module, warm, ctx.warm_start)
            normalize = {"mean": float(module[0].mean), "std": float(module[0].std)}
        progress = Progress(TextColumn("  train"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=ctx.console, transient=True)
        with progress:
            task = progress.add_task("train", total=settings["epochs"], status="")
            result = fit(module, data.x_train, data.y_train, data.x_val, data.y_val, lr=settings["lr"],
                         weight_decay=settings["weight_decay"], batch_size=int(settings["batch_size"]),
                         max_epochs=int(settings["epochs"]), patience=patience, seed=ctx.seed,
                         on_epoch=lambda epoch, loss, acc: progress.update(task, completed=epoch, status=f"val acc {acc:.3f}"))
        _, train_acc = evaluate_torch(result.module, torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
        artifact.module = result.module
        artifact.trained_state = {k: v.detach().clone() for k, v in result.module.state_dict().items()}
        artifact.metrics["train"] = {
            "warm_start": str(ctx.warm_start) if ctx.warm_start else None,
            "device": pick_device().type, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "max_epochs": int(settings["epochs"]), "patience": patience, "settings": settings,
            "model_kwargs": model_overrides(ctx), "val_accuracy": round(result.val_accuracy, 5),
            "train_accuracy": round(train_acc, 5), "parameters": int(sum(p.numel() for p in result.module.parameters())),
            "normalize": normalize, "history": result.history,
        }
        ctx.console.print(f"  best epoch {result.best_epoch} of {len(result.history)} on {pick_device().type}: "
                          f"val accuracy {result.val_accuracy:.4f}, {artifact.metrics['train']['parameters']:,} parameters")
        return artifact
