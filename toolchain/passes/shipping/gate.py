"""Choose what ships: the least precise candidate that keeps the task's metric and is really faster.

Walk from FP32 towards lower precision. A candidate is accepted when its metric drop vs FP32 is
within the allowed drop (`[eval] max_drop` in the metric's units; by default `[compress]
max_accuracy_drop` for shares such as accuracy, 2% of the reference for errors such as RMSE) AND it
beats the currently accepted, more precise candidate by at least `min_speedup` both measured on this
host (p50) and predicted on the target. Otherwise it is rejected and the more precise one stays. FP32
is always the fallback. Every verdict keeps its numbers.

Candidates of one precision (plain INT8, its latency-aware variant, dynamic INT8, QAT) are walked in
the order the passes made them. `min_speedup` is the price of giving up precision; between two of one
precision nothing is given up, so a later one replaces the incumbent when it is within the accuracy
gate and not slower on either measure (>= 1.00x): the faster of two INT8 files ships.

The yardstick of every drop is the model as trained (`onnx-fp32-trained`) when distillation or
pruning replaced it, so their losses and quantization's add up in the one number the gate bounds,
measured on the test split that none of the earlier keep-or-reject decisions saw; the compressed
FP32 model is then a candidate like the others and the trained one the fallback.

With `--measure-on DEVICE` every candidate was also timed on that board (toolchain.perf.device_numbers):
the speed test is then the device's p50 alone, host and prediction are only reported beside it, and a
candidate the device could not run is rejected with its error.

Only formats the profile's runtime runs can ship (`[runtime] formats`). The FP32 ONNX reference stays
the accuracy yardstick either way; on a `.tflite`-only board the walk starts from the FP32 `.tflite`.
"""

from __future__ import annotations

from typing import ClassVar

from toolchain.core.artifact import PRECISION_ORDER, Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.core.metrics import Metric, allowed_drop
from toolchain.errors import ToolchainError
from toolchain.perf.device_numbers import device_speedup


def judge(candidate: Candidate, incumbent: Candidate, metric: Metric, max_drop: float, min_speedup: float) -> tuple[bool, str]:
    drop = candidate.metrics["metric_drop"]
    quality = f"{metric.name} drop {metric.format_drop(drop)}"
    if drop > max_drop:
        return False, f"{quality} > allowed {metric.format_drop(max_drop)}"
    if "device_error" in candidate.metrics:
        return False, f"the device could not run it: {candidate.metrics['device_error']}"
    on_device = device_speedup(incumbent.metrics, candidate.metrics)
    if on_device is not None:  # measured on the board itself (--measure-on): that is the only speed that counts
        speed = f"{on_device:.2f}x measured on the device vs {incumbent.name}"
        if on_device < min_speedup:
            return False, f"not faster enough ({speed}; need >= {min_speedup:.2f}x)"
        return True, f"{quality} within {metric.format_drop(max_drop)}; {speed}"
    host = incumbent.metrics["latency_ms_p50_host"] / candidate.metrics["latency_ms_p50_host"]
    target = incumbent.metrics["latency_ms_predicted"] / candidate.metrics["latency_ms_predicted"]
    if candidate.format != incumbent.format and candidate.precision == incumbent.precision:
        # One graph in two formats: the predictor prices their operators alike, so only the
        # measured runtimes (onnxruntime vs LiteRT kernels) can tell them apart.
        speed = f"{host:.2f}x on host vs {incumbent.name} (same precision, other format: compared on host)"
        if host < min_speedup:
            return False, f"not faster enough ({speed}; need >= {min_speedup:.2f}x)"
        return True, f"{quality} within {metric.format_drop(max_drop)}; {speed}"
    speed = f"{host:.2f}x on host, {target:.2f}x predicted on target vs {incumbent.name}"
    if host < min_speedup or target < min_speedup:
        return False, f"not faster enough ({speed}; need >= {min_speedup:.2f}x on both)"
    return True, f"{quality} within {metric.format_drop(max_drop)}; {speed}"


class GatePass:
    name: ClassVar[str] = "gate"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        compress, formats, metric = ctx.config.compress, ctx.profile.formats, ctx.metric
        max_drop, source = allowed_drop(ctx.config, metric, artifact.reference.metrics["metric_value"])
        artifact.metrics["gate"] = {"metric": metric.name, "higher_is_better": metric.higher_is_better, "fraction": metric.fraction,
                                    "max_drop": max_drop, "max_drop_from": source}
        shippable = [c for c in artifact.candidates if c.format in formats]
        fallbacks = sorted((c for c in shippable if c.precision == "fp32"), key=lambda c: formats.index(c.format))
        if artifact.reference in shippable:
            incumbent = artifact.reference
            incumbent.verdict = "reference (always acceptable fallback)"
            if len(artifact.candidates) == 1:
                incumbent.verdict = "imported as it is: the only candidate, nothing to compare it against"
        elif fallbacks:
            incumbent = fallbacks[0]
            incumbent.verdict = f"fallback: {ctx.profile.id} runs {', '.join(formats)} only"
        else:
            raise ToolchainError(f"no FP32 candidate in a format {ctx.profile.id} runs ({', '.join(formats)})")
        incumbent.accepted = True
        for candidate in sorted(artifact.candidates, key=lambda c: PRECISION_ORDER[c.precision]):
            if candidate is incumbent:
                continue
            if candidate not in shippable:
                candidate.accepted, candidate.verdict = False, f"{ctx.profile.id} does not run {candidate.format} models"
                continue
            needed = 1.0 if candidate.precision == incumbent.precision else compress.min_speedup
            candidate.accepted, candidate.verdict = judge(candidate, incumbent, metric, max_drop, needed)
            if candidate.accepted:
                incumbent.verdict += f"; superseded by {candidate.name}"
                incumbent = candidate
        artifact.shipped = incumbent
        for candidate in artifact.candidates:
            mark = "[green]ship[/]" if candidate is incumbent else ("[yellow]pass[/]" if candidate.accepted else "[red]reject[/]")
            ctx.console.print(f"  {candidate.name:<16} {mark}  {candidate.verdict}")
        return artifact
