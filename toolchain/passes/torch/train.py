"""Train the user's model with `training.fit`: from scratch, from `[model] weights` (fine-tuned, or with
`[train] epochs = 0` kept exactly as they are: only measured), or from an earlier build's checkpoint
(`--warm-start`). The report's `train` section says which (`pretrained`, `warm_start`)."""

from __future__ import annotations

from typing import ClassVar

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from toolchain.core.artifact import Artifact
from toolchain.core.checkpoint import load_checkpoint, warm_start
from toolchain.core.contract import BuildContext
from toolchain.core.models import build_normalized_model, normalization
from toolchain.core.weights import load_weights
from toolchain.errors import ConfigError
from toolchain.training.fit import (TRAIN_PARAMS, WARM_LR_SCALE, evaluate_torch, finetune_epochs, fit, model_overrides,
                                    pick_device, training_settings)


class TrainPass:
    name: ClassVar[str] = "train"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        data, config, metric = ctx.dataset, ctx.config, ctx.metric
        if data.y_train is None:
            raise ConfigError(f"config {config.path}: [data] source has no targets (y), and a model from [model] entry is "
                              "trained or judged on them; add y to the data")
        settings = training_settings(ctx)
        patience = config.train.patience or ctx.settings.patience
        warm = None
        if ctx.warm_start is not None:  # fine-tune an earlier build's model: its architecture, weights and normalisation
            warm = load_checkpoint(ctx.warm_start)
            ctx.hparams = {**warm["model_kwargs"], **{k: v for k, v in ctx.hparams.items() if k in TRAIN_PARAMS}}
            retrain = config.retrain
            settings["lr"] *= retrain.lr_scale if retrain else WARM_LR_SCALE
            settings["epochs"] = finetune_epochs(ctx, retrain and retrain.epochs)
        module, _ = build_normalized_model(config, data, **model_overrides(ctx))
        pretrained = None
        if warm is not None:
            warm_start(module, warm, ctx.warm_start)
        elif config.model.weights is not None:
            pretrained = {"file": str(config.resolve(config.model.weights)), "loaded_into": load_weights(module, config)}
            if config.train.epochs == 0:
                settings["epochs"] = 0
        epochs = int(settings["epochs"])
        if pretrained is not None:
            pretrained["use"] = "kept as they are ([train] epochs = 0)" if epochs == 0 else f"fine-tuned for up to {epochs} epochs"
        progress = Progress(TextColumn("  train"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=ctx.console, transient=True)
        with progress:
            task = progress.add_task("train", total=epochs, status="")
            result = fit(module, data.x_train, data.y_train, data.x_val, data.y_val, metric=metric, lr=settings["lr"],
                         weight_decay=settings["weight_decay"], batch_size=int(settings["batch_size"]),
                         max_epochs=epochs, patience=patience, seed=ctx.seed, label="train",
                         on_epoch=lambda epoch, loss, value: progress.update(
                             task, completed=epoch, status=f"val {metric.name} {metric.format_value(value)}"))
        _, train_value = evaluate_torch(result.module, torch.from_numpy(data.x_train), torch.from_numpy(data.y_train), metric)
        artifact.module = artifact.trained = result.module
        artifact.trained_state = {k: v.detach().clone() for k, v in result.module.state_dict().items()}
        artifact.metrics["train"] = {
            "warm_start": str(ctx.warm_start) if ctx.warm_start else None, "pretrained": pretrained,
            "task": data.task, "loss": "mse" if data.task == "regression" else "cross-entropy", "metric": metric.name,
            "device": pick_device().type, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "max_epochs": epochs, "patience": patience, "settings": settings,
            "model_kwargs": model_overrides(ctx), f"val_{metric.name}": round(result.val_metric, 5),
            f"train_{metric.name}": round(train_value, 5),
            "parameters": int(sum(p.numel() for p in result.module.parameters())),
            "normalize": normalization(result.module), "history": result.history,
        }
        what = (f"pretrained weights kept as they are ({pretrained['loaded_into']})" if epochs == 0 else
                f"best epoch {result.best_epoch} of {len(result.history)} on {pick_device().type}")
        ctx.console.print(f"  {what}: val {metric.name} {metric.format_value(result.val_metric)}, "
                          f"{artifact.metrics['train']['parameters']:,} parameters")
        return artifact
