"""Keep or reject a compressed candidate: the skeleton that distillation and pruning share.

Both passes make a smaller module (a narrower student, a pruned copy), fine-tune it, and let it
replace the incumbent only if its validation metric (the build's: accuracy, rmse, ...) is within the
allowed drop of a reference value (`toolchain.core.metrics.allowed_drop`: `[eval] max_drop`, else
`[compress] max_accuracy_drop` for accuracy, 2% of the reference for an error metric). Either way
the decision and its numbers go into the report (`metric`, `metric_drop`, `max_drop`), and a
rejected or skipped candidate also becomes a build note, so a user sees why the model did not shrink. One copy
of the rule (with its float tolerance) and of the report's shape makes the two passes judge and
report alike; it lives in a library because a pass never imports another pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from toolchain.core.artifact import Artifact
from toolchain.core.contract import BuildContext
from toolchain.core.metrics import allowed_drop
from toolchain.training.fit import FitResult, finetune

TOLERANCE = 1e-9  # a drop exactly at the gate passes despite float rounding


@dataclass(frozen=True)
class Trial:
    """A fine-tuned candidate judged against the reference value of the metric."""

    result: FitResult  # `result.module` is the fine-tuned candidate
    settings: dict[str, Any]  # what the fine-tune used, for the report
    drop: float  # how much worse the candidate's validation metric is than the reference (metric units)
    limit: float  # the allowed drop
    accepted: bool


@dataclass(frozen=True)
class KeepOrReject:
    """One compression pass's bookkeeping: its report section `key` (artifact.metrics), the `label` its
    notes start with, and the decision word when its candidate is kept (else "rejected" or "skipped")."""

    key: str
    label: str
    kept: str

    def trial(self, candidate: nn.Module, ctx: BuildContext, *, reference: float, status: str, lr_scale: float,
              epochs: int | None = None, teacher: nn.Module | None = None) -> Trial:
        """Fine-tune `candidate` (`finetune`, showing `status`) and judge it against `reference`."""
        with ctx.console.status(status):
            result, settings = finetune(candidate, ctx, lr_scale=lr_scale, epochs=epochs, teacher=teacher,
                                        label=self.key)
        drop = ctx.metric.drop(reference, result.val_metric)
        limit, _ = allowed_drop(ctx.config, ctx.metric, reference)
        return Trial(result, settings, drop, limit, drop <= limit + TOLERANCE)

    def record(self, artifact: Artifact, ctx: BuildContext, trial: Trial, summary: str, details: dict[str, Any]) -> None:
        """Write the decision, `summary` and the pass's `details` into the report; a rejection into the notes."""
        if not trial.accepted:
            ctx.notes.append(f"{self.label}: {summary}")
        artifact.metrics[self.key] = {
            "decision": self.kept if trial.accepted else "rejected",
            "summary": summary,
            **details,
            "metric": ctx.metric.name,
            "metric_drop": round(trial.drop, 5),
            "max_drop": round(trial.limit, 6),
            "history": trial.result.history,
        }

    def skip(self, artifact: Artifact, ctx: BuildContext, reason: str) -> Artifact:
        """No candidate worth a fine-tune (nothing to shrink, or the tool could not): say why, keep the model."""
        artifact.metrics[self.key] = {"decision": "skipped", "summary": reason}
        ctx.notes.append(f"{self.label} skipped: {reason}")
        ctx.console.print(f"  [yellow]skipped[/]: {reason}")
        return artifact
