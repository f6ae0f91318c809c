"""Structured channel pruning with torch-pruning, then a fine-tune.

Channels are *physically* removed: torch-pruning's dependency graph finds every layer coupled to a
channel (the BatchNorm after a conv, the next layer's inputs, both sides of a residual add, the
flattened features of a Linear, depthwise groups) and slices them all, so the result is a smaller
dense model that exports to ONNX like any other, with fewer parameters and MACs. No masks, no
sparse kernels: every runtime gets the speed-up.

Importance is the L2 norm of each channel's weights (`MagnitudeImportance(p=2)`), and the ratio is
applied per layer (not globally), so no layer can be emptied and the predicted latency falls
monotonically with the ratio. In wide models (median layer width >= 64) widths are rounded to
multiples of 16, the block INT8/FP32 kernels work in (`channel_multiple`). The final classifier (the last Linear/Conv the forward pass runs) is
never pruned: its outputs are the labels (or the regression targets).

`prune_ratio = "auto"` searches the ratio from the latency budget: a binary search on a 0.05 grid
up to 0.7 for the smallest ratio whose pruned model's *predicted* latency on the target (the
roofline cost model on the real ONNX export) meets `[budget] latency_ms`. When the unpruned model
already meets the budget, 0.3 is used (a moderate default that usually costs no accuracy after the
fine-tune); when even 0.7 misses it, 0.7 is used and a note says so.

The fine-tune runs `fit` for `finetune_epochs` (default: a quarter of the budget's epochs, at least
5) at a third of the training learning rate, distilling from `artifact.teacher` when the distill
pass left one. The pruned model replaces the unpruned one only if its validation metric (the
build's: accuracy, rmse, ...) is within the allowed drop of the reference (the teacher when there is one, so distillation and pruning
together never lose more than the gate allows); otherwise the unpruned model is kept and the report
says why (the keep-or-reject rule distillation shares: `toolchain.training.trial`).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from toolchain.core.artifact import Artifact
from toolchain.perf.module_cost import module_cost
from toolchain.training.fit import validation_metric
from toolchain.training.trial import KeepOrReject
from toolchain.core.contract import BuildContext

MAX_AUTO_RATIO = 0.7
AUTO_STEP = 0.05
DEFAULT_RATIO = 0.3  # "auto" when the unpruned model already meets the budget
SIMD_CHANNELS = 16
FINETUNE_LR_SCALE = 1 / 3
DECISION = KeepOrReject("prune", "pruning", kept="pruned")


def classifier_layers(module: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The last Linear/Conv the forward pass executes: the layer whose outputs are the logits."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, inputs, output: order.append(mod))
             for m in module.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            module.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1:]


def classifier_names(module: nn.Module, example: torch.Tensor) -> list[str]:
    ignored = classifier_layers(module, example)
    return [name for name, m in module.named_modules() if any(m is i for i in ignored)]


def _widths(module: nn.Module) -> list[int]:
    return [m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            for m in module.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def channel_multiple(module: nn.Module) -> int:
    """What pruned widths are rounded to. INT8 (and FP32) kernels work on blocks of 16 channels (AVX-512
    VNNI, NEON dot product): a layer pruned from 96 to 72 channels keeps its speed, one pruned to 71 can
    run slower than unpruned (measured: a 0.25-pruned MobileNetV2 with free widths ran INT8 2.4 ms, with
    multiples of 16 1.1 ms). Models whose typical layer is narrower than 64 channels are dominated by
    per-operator overhead instead, so their widths stay free (1)."""
    widths = _widths(module)
    return SIMD_CHANNELS if widths and float(np.median(widths)) >= 4 * SIMD_CHANNELS else 1


def prune_module(module: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """A pruned deep copy of `module`: per-layer L2-magnitude channel pruning, the classifier left whole;
    widths rounded to `channel_multiple` (layers too narrow to lose a whole block are left whole)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(module).cpu().eval()
    multiple = channel_multiple(pruned)
    ignored = classifier_layers(pruned, example)
    if multiple > 1:
        ignored += [m for m in pruned.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
                    and _widths(m)[0] < 2 * multiple and m not in ignored]
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, global_pruning=False, ignored_layers=ignored,
                                       round_to=multiple if multiple > 1 else None)
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned


class PrunePass:
    name: ClassVar[str] = "prune"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        compress = ctx.config.compress
        module: nn.Module = artifact.module.cpu().eval()
        shape = ctx.dataset.input_shape
        example = torch.from_numpy(np.ascontiguousarray(ctx.dataset.x_train[:2]))
        profile = ctx.profile
        budget = profile.budget.latency_ms

        metric = ctx.metric
        value_key, shown = f"val_{metric.name}", metric.format_value
        distilled = artifact.metrics.get("distill", {})
        if distilled.get("decision") == "distilled" and \
                distilled["student"]["parameters"] == sum(p.numel() for p in module.parameters()):
            # the distill pass has just measured this student on this profile: no second export
            before = {k: distilled["student"][k] for k in ("parameters", "macs", "flops", "latency_ms_predicted", value_key)}
        else:
            before = module_cost(module, shape, profile, ctx.work_path("prune-before.onnx"))
            before[value_key] = round(validation_metric(module, ctx), 5)
        search: list[dict[str, Any]] = []
        candidates: dict[float, tuple[nn.Module, dict[str, Any]]] = {}

        def pruned_at(ratio: float) -> tuple[nn.Module, dict[str, Any]]:
            ratio = round(ratio, 4)
            if ratio not in candidates:
                pruned = prune_module(module, ratio, example)
                cost = module_cost(pruned, shape, profile, ctx.work_path(f"prune-{ratio:g}.onnx"))
                candidates[ratio] = (pruned, cost)
                search.append({"ratio": ratio, **cost, "meets_budget": cost["latency_ms_predicted"] <= budget})
            return candidates[ratio]

        try:
            if compress.prune_ratio != "auto":
                ratio = float(compress.prune_ratio)
                reason = f"prune_ratio = {ratio:g} from the config"
            elif before["latency_ms_predicted"] <= budget:
                ratio = DEFAULT_RATIO
                reason = (f"auto: the unpruned model already meets the latency budget ({before['latency_ms_predicted']:.4g} ms "
                          f"predicted on {profile.id} <= {budget:g} ms), so the moderate default {DEFAULT_RATIO:g} is used")
            else:
                ratio, reason = self._search(pruned_at, before, budget, profile.id, ctx)
            pruned, after = pruned_at(ratio)
        except Exception as exc:  # an operator torch-pruning cannot trace: keep the model, say why
            return DECISION.skip(artifact, ctx, f"torch-pruning could not prune this model ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); the unpruned model is kept")
        ignored = classifier_names(module, example)
        if after["parameters"] >= before["parameters"]:
            return DECISION.skip(artifact, ctx, f"a ratio of {ratio:g} removes no channel (nothing prunable besides the "
                                 f"classifier {', '.join(ignored)}); the unpruned model is kept")

        after[f"{value_key}_before_finetune"] = round(validation_metric(pruned, ctx), 5)
        teacher = artifact.teacher
        if teacher is not None:
            reference = round(validation_metric(teacher, ctx), 5)
            reference_name = "the distillation teacher"
        else:
            reference, reference_name = before[value_key], "the unpruned model"
        trial = DECISION.trial(pruned, ctx, reference=reference, status=f"  fine-tuning the {ratio:g}-pruned model",
                               lr_scale=FINETUNE_LR_SCALE, teacher=teacher)
        result, drop = trial.result, trial.drop
        pruned = result.module
        after.update({value_key: round(result.val_metric, 5), "best_epoch": result.best_epoch, "epochs_run": len(result.history)})

        if trial.accepted:
            summary = (f"pruned {ratio:g} of the channels per layer: {before['parameters']:,} -> {after['parameters']:,} "
                       f"parameters, {before['macs']:,} -> {after['macs']:,} MACs, predicted "
                       f"{before['latency_ms_predicted']:.4g} -> {after['latency_ms_predicted']:.4g} ms on {profile.id}; "
                       f"validation {metric.name} {shown(result.val_metric)}, {reference_name} {shown(reference)} "
                       f"(drop {metric.format_drop(drop)} <= {metric.format_drop(trial.limit)})")
            artifact.module = pruned
        else:
            summary = (f"the unpruned model is kept: after pruning {ratio:g} and fine-tuning, validation {metric.name} "
                       f"{shown(result.val_metric)} is {metric.format_drop(drop)} worse than {reference_name} "
                       f"({shown(reference)}), more than the allowed {metric.format_drop(trial.limit)}")
        DECISION.record(artifact, ctx, trial, summary, {
            "ratio": ratio,
            "ratio_choice": reason,
            "method": "torch-pruning MagnitudePruner, L2 magnitude per output channel, per-layer ratio",
            "ignored_layers": ignored,
            "latency_budget_ms": budget,
            "search": sorted(search, key=lambda row: row["ratio"]),
            "before": before,
            "after": after,
            f"reference_{value_key}": reference,
            "finetune": trial.settings,
        })
        ctx.console.print(f"  ratio {ratio:g} ({reason.split(':')[0]}): params {before['parameters']:,} -> {after['parameters']:,}, "
                          f"MACs {before['macs']:,} -> {after['macs']:,}, predicted {before['latency_ms_predicted']:.4g} -> "
                          f"{after['latency_ms_predicted']:.4g} ms, val {metric.name} {shown(before[value_key])} -> "
                          f"{shown(after[f'{value_key}_before_finetune'])} (pruned) -> {shown(result.val_metric)} (fine-tuned): "
                          f"{'accepted' if trial.accepted else 'rejected, unpruned model kept'}")
        return artifact

    @staticmethod
    def _search(pruned_at, before: dict[str, Any], budget: float, profile_id: str, ctx: BuildContext) -> tuple[float, str]:
        """The smallest ratio on the grid whose predicted latency meets the budget (binary search)."""
        grid = [round(AUTO_STEP * i, 4) for i in range(1, int(round(MAX_AUTO_RATIO / AUTO_STEP)) + 1)]
        meets = lambda r: pruned_at(r)[1]["latency_ms_predicted"] <= budget  # noqa: E731
        if not meets(grid[-1]):
            latency = pruned_at(grid[-1])[1]["latency_ms_predicted"]
            ctx.notes.append(f"pruning: even a ratio of {grid[-1]:g} misses the {budget:g} ms latency budget of "
                             f"{profile_id} ({latency:.4g} ms predicted); {grid[-1]:g} is used")
            return grid[-1], (f"auto: no ratio up to {grid[-1]:g} meets the {budget:g} ms budget on {profile_id} "
                              f"({latency:.4g} ms predicted at {grid[-1]:g}); the cap {grid[-1]:g} is used")
        low, high = -1, len(grid) - 1  # grid[low] misses (-1: unpruned), grid[high] meets
        while high - low > 1:
            middle = (low + high) // 2
            if meets(grid[middle]):
                high = middle
            else:
                low = middle
        ratio = grid[high]
        return ratio, (f"auto: the smallest ratio (step {AUTO_STEP:g}, binary search, cap {MAX_AUTO_RATIO:g}) whose "
                       f"predicted latency meets the {budget:g} ms budget on {profile_id}: "
                       f"{pruned_at(ratio)[1]['latency_ms_predicted']:.4g} ms (unpruned {before['latency_ms_predicted']:.4g} ms)")
