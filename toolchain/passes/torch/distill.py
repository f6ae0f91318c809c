"""Knowledge distillation: train a narrower copy of the user's model on the trained model's soft targets.

The teacher is the trained module. The student is the *same* entry function called with a smaller
width, so no second architecture has to be written: for `zoo:mobilenet_v2` the multiplier scales
`width_mult`; for a user's entry it scales every integer keyword argument named like a width
(`width`, `channels`, `hidden`, ...; rounded, at least 4) or a float `width_mult`. An entry with no
such argument cannot be shrunk automatically: distillation is skipped with a note (not an error).

The multiplier is `[compress] student_width`, or with "auto" the largest of 0.75, 0.5, 0.35, 0.25
whose student's *predicted* latency on the target (the roofline cost model on the exported graph)
fits the profile's latency budget with a 20% margin. When the teacher already fits, the budget says
nothing about how small to go and 0.5 is used: half the channels is about a quarter of the MACs of
every layer between two scaled widths, the usual point where a distilled student still matches its
teacher on small tasks.

The student replaces the teacher only if its validation metric (the build's: accuracy, rmse, ...) is
within the allowed drop of the teacher's (for regression the student learns the teacher's outputs by
mean squared error, `training.fit.distillation_loss`); otherwise the teacher is kept and the report
says why (the keep-or-reject rule pruning shares: `toolchain.training.trial`). The teacher stays on
the artifact (`artifact.teacher`) so a later pruning fine-tune can distil from it too.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from toolchain.core.artifact import Artifact
from toolchain.core.contract import BuildContext
from toolchain.core.models import build_normalized_model, factory_defaults, model_factory
from toolchain.perf.module_cost import module_cost
from toolchain.training.fit import model_overrides, training_settings, validation_metric
from toolchain.training.trial import KeepOrReject

AUTO_MULTIPLIERS = (0.75, 0.5, 0.35, 0.25)
DEFAULT_MULTIPLIER = 0.5  # when the teacher already fits the budget
LATENCY_MARGIN = 0.8  # "fits" = predicted latency <= 80% of the budget
MIN_CHANNELS = 4
_WIDTH_NAME = re.compile(r"width|channel|hidden|filters")
_NOT_A_WIDTH = re.compile(r"input|kernel|stride|patch|image|img|pad")
DECISION = KeepOrReject("distill", "distillation", kept="distilled")


# ----------------------------------------------------------------------------- the student's width


def entry_kwargs(ctx: BuildContext, overrides: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments the entry function is called with: its defaults, [model] kwargs, overrides."""
    config = ctx.config
    values = factory_defaults(model_factory(config.model.entry, config, f"config {config.path}: [model] entry"))
    values.update(config.model.kwargs)
    values.update(overrides)
    return values


def width_kwargs(entry: str, kwargs: dict[str, Any]) -> list[str]:
    """The kwargs that control width: `width_mult` when there is one (always for zoo:mobilenet_v2),
    otherwise every integer named like width/channels/hidden/filters."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if "width_mult" in kwargs and number(kwargs["width_mult"]):
        return ["width_mult"]
    if entry.startswith("zoo:"):
        return []
    return [name for name, value in kwargs.items()
            if isinstance(value, int) and not isinstance(value, bool) and value > 0
            and _WIDTH_NAME.search(name.lower()) and not _NOT_A_WIDTH.search(name.lower())]


def scale_widths(kwargs: dict[str, Any], names: list[str], multiplier: float) -> dict[str, Any]:
    scaled: dict[str, Any] = {}
    for name in names:
        value = kwargs[name]
        if name == "width_mult" or isinstance(value, float):
            scaled[name] = round(float(value) * multiplier, 4)
        else:
            scaled[name] = min(value, max(MIN_CHANNELS, int(round(value * multiplier))))
    return scaled


def _build_student(ctx: BuildContext, overrides: dict[str, Any]) -> nn.Module:
    torch.manual_seed(ctx.seed)  # the same initial weights for the same seed and width
    module, _ = build_normalized_model(ctx.config, ctx.dataset, **overrides)
    return module


class DistillPass:
    name: ClassVar[str] = "distill"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        compress = ctx.config.compress
        teacher: nn.Module = artifact.module.cpu().eval()
        base_overrides = model_overrides(ctx)
        kwargs = entry_kwargs(ctx, base_overrides)
        names = width_kwargs(ctx.config.model.entry, kwargs)
        if not names:
            return DECISION.skip(artifact, ctx, f"the entry {ctx.config.model.entry} has no width keyword argument to "
                                 "shrink a student with (an integer named like width/channels/hidden, or a float "
                                 "width_mult); the trained model is kept")
        shape = ctx.dataset.input_shape
        profile = ctx.profile
        budget = profile.budget.latency_ms
        limit = LATENCY_MARGIN * budget
        teacher_cost = module_cost(teacher, shape, profile, ctx.work_path("distill-teacher.onnx"))
        metric = ctx.metric
        value_key, shown = f"val_{metric.name}", metric.format_value
        teacher_cost[value_key] = round(validation_metric(teacher, ctx), 5)

        tried: list[dict[str, Any]] = []
        costs: dict[float, dict[str, Any]] = {}

        def student_cost(multiplier: float) -> dict[str, Any]:
            if multiplier not in costs:
                overrides = {**base_overrides, **scale_widths(kwargs, names, multiplier)}
                costs[multiplier] = module_cost(_build_student(ctx, overrides), shape, profile,
                                                ctx.work_path(f"distill-student-{multiplier:g}.onnx"))
                tried.append({"multiplier": multiplier, **costs[multiplier],
                              "fits": costs[multiplier]["latency_ms_predicted"] <= limit})
            return costs[multiplier]

        if compress.student_width != "auto":
            multiplier = float(compress.student_width)
            reason = f"student_width = {multiplier:g} from the config"
        elif teacher_cost["latency_ms_predicted"] <= limit:
            multiplier = DEFAULT_MULTIPLIER
            reason = (f"auto: the teacher already fits the latency budget ({teacher_cost['latency_ms_predicted']:.4g} ms "
                      f"predicted on {profile.id} <= {limit:.4g} ms, {LATENCY_MARGIN:.0%} of {budget:g} ms), so the "
                      f"budget does not force a size; {DEFAULT_MULTIPLIER:g} (about a quarter of the MACs between "
                      "scaled layers) is the default")
        else:
            fitting = next((m for m in AUTO_MULTIPLIERS if student_cost(m)["latency_ms_predicted"] <= limit), None)
            if fitting is not None:
                multiplier = fitting
                reason = (f"auto: the largest of {', '.join(f'{m:g}' for m in AUTO_MULTIPLIERS)} whose student fits "
                          f"{LATENCY_MARGIN:.0%} of the {budget:g} ms budget on {profile.id} "
                          f"({costs[fitting]['latency_ms_predicted']:.4g} ms predicted; teacher "
                          f"{teacher_cost['latency_ms_predicted']:.4g} ms)")
            else:
                multiplier = AUTO_MULTIPLIERS[-1]
                reason = (f"auto: no student fits {LATENCY_MARGIN:.0%} of the {budget:g} ms budget on {profile.id}; "
                          f"the smallest, {multiplier:g}, predicts {costs[multiplier]['latency_ms_predicted']:.4g} ms")
                ctx.notes.append(f"distillation: even a {multiplier:g}x student misses the {budget:g} ms latency budget "
                                 f"of {profile.id} ({costs[multiplier]['latency_ms_predicted']:.4g} ms predicted); "
                                 "consider pruning or a smaller architecture")
        scaled = scale_widths(kwargs, names, multiplier)
        if all(scaled[n] == kwargs[n] for n in names):
            return DECISION.skip(artifact, ctx, f"a {multiplier:g}x width leaves {', '.join(f'{n} = {kwargs[n]}' for n in names)} "
                                 f"unchanged (already at the minimum of {MIN_CHANNELS}); the trained model is kept")

        student = _build_student(ctx, {**base_overrides, **scaled})
        # a fresh student gets the teacher's full training budget and learning rate
        trial = DECISION.trial(student, ctx, reference=teacher_cost[value_key], lr_scale=1.0,
                               epochs=int(training_settings(ctx)["epochs"]), teacher=teacher,
                               status=f"  distilling a {multiplier:g}x student ({', '.join(f'{n}={scaled[n]}' for n in names)})")
        result, drop = trial.result, trial.drop
        student = result.module
        student_metrics = dict(costs[multiplier]) if multiplier in costs else \
            module_cost(student, shape, profile, ctx.work_path("distill-student.onnx"))
        student_metrics.update({value_key: round(result.val_metric, 5), "best_epoch": result.best_epoch,
                                "epochs_run": len(result.history)})
        if trial.accepted:
            decision = (f"the {multiplier:g}x student replaces the teacher: {student_metrics['parameters']:,} vs "
                        f"{teacher_cost['parameters']:,} parameters, validation {metric.name} {shown(result.val_metric)} vs "
                        f"{shown(teacher_cost[value_key])} (drop {metric.format_drop(drop)} <= {metric.format_drop(trial.limit)})")
            artifact.teacher = teacher
            artifact.module = student
        else:
            decision = (f"the teacher is kept: the {multiplier:g}x student's validation {metric.name} {shown(result.val_metric)} "
                        f"is {metric.format_drop(drop)} worse than the teacher's {shown(teacher_cost[value_key])}, more "
                        f"than the allowed {metric.format_drop(trial.limit)}")
        DECISION.record(artifact, ctx, trial, decision, {
            "multiplier": multiplier,
            "multiplier_choice": reason,
            "width_kwargs": {n: {"teacher": kwargs[n], "student": scaled[n]} for n in names},
            "model_kwargs": {**base_overrides, **scaled},
            "latency_budget_ms": budget,
            "candidates": tried,
            "teacher": teacher_cost,
            "student": student_metrics,
            "settings": {"temperature": compress.temperature, "alpha": compress.alpha,
                         **{key: trial.settings[key] for key in ("lr", "max_epochs", "patience")}},
        })
        ctx.console.print(f"  {multiplier:g}x student ({reason.split(':')[0]}): {student_metrics['parameters']:,} params "
                          f"(teacher {teacher_cost['parameters']:,}), predicted {student_metrics['latency_ms_predicted']:.4g} ms "
                          f"(teacher {teacher_cost['latency_ms_predicted']:.4g} ms), val {metric.name} "
                          f"{shown(result.val_metric)} (teacher {shown(teacher_cost[value_key])}): "
                          f"{'accepted' if trial.accepted else 'rejected, teacher kept'}")
        return artifact
