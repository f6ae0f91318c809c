"""Write `report.json` (every number and decision) and the self-contained `report.html` beside the bundle."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, ClassVar

from toolchain.core.artifact import Artifact
from toolchain.perf.compare import compare_targets
from toolchain.report.html import render
from toolchain.targets.profiles import list_profiles
from toolchain.core.contract import BuildContext


def build_report(artifact: Artifact, ctx: BuildContext) -> dict[str, Any]:
    shipped = artifact.shipped
    return {
        "project": ctx.config.project.name,
        "version": artifact.metrics["bundle"]["version"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget": ctx.budget, "seed": ctx.seed,
        "config": str(ctx.config.path),
        "target": ctx.profile.to_dict(),
        "task": ctx.dataset.task,
        "gate": artifact.metrics["gate"],
        "train": artifact.metrics.get("train"),  # None for a model file (not trained here)
        "import": artifact.metrics.get("import"),  # None for a model trained here
        "export": artifact.metrics["export"],
        "benchmark": artifact.metrics["benchmark"],
        "bundle": artifact.metrics["bundle"],
        "reference": artifact.reference.to_dict(),
        "shipped": shipped.to_dict(),
        "candidates": [c.to_dict() for c in artifact.candidates],
        "stages": list(ctx.stages),  # every stage before the report itself
        "notes": list(ctx.notes),
        # the shipped model predicted on every shipped profile, to see which boards it fits
        "targets": compare_targets(shipped.path, list_profiles()),
        # what the optional passes did, with their numbers (None when the pass did not run)
        **{name: artifact.metrics.get(name) for name in ("search", "distill", "prune", "mixed", "int8_calibration", "int8_fast")},
    }


class ReportPass:
    name: ClassVar[str] = "report"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        report = build_report(artifact, ctx)
        json_path, html_path = ctx.work_path("report.json"), ctx.work_path("report.html")
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        html_path.write_text(render(report))
        artifact.outputs.update({"report_json": json_path, "report_html": html_path})
        return artifact
