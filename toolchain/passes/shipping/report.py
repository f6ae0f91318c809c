"""Write the build's report beside its bundle: `NAME-VERSION-TARGET.report.json` (every number and decision)
and the self-contained `NAME-VERSION-TARGET.report.html`, kept per bundle so no build overwrites another's;
`report.json` / `report.html` are copies of the latest build's, for scripts that want "the last one"."""

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
        stem = artifact.outputs["bundle"].name.removesuffix(".bundle")
        text, page = json.dumps(report, indent=2, default=str) + "\n", render(report)
        paths = {"report_json": ctx.work_path(f"{stem}.report.json"), "report_html": ctx.work_path(f"{stem}.report.html"),
                 "latest_report_json": ctx.work_path("report.json"), "latest_report_html": ctx.work_path("report.html")}
        for role, path in paths.items():
            path.write_text(text if role.endswith("json") else page)
        artifact.outputs.update(paths)
        return artifact
