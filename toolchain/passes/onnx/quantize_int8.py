"""Static INT8 quantization (QDQ format, per-channel weights) calibrated on training samples.

QDQ keeps the graph portable (TensorRT, onnxruntime CPU/GPU and others fuse the Q/DQ pairs into
integer kernels); per-channel weight scales keep the accuracy drop of small convolutions low. The
calibration set is a seeded, class-balanced-by-chance subset of the training split, never test data.

Latency-aware variant (`onnx-int8-fast`): an INT8 kernel is not faster than FP32 for every
convolution. Profiled on MobileNetV2 at 224x224 (one thread, x86 U8S8), the INT8 1x1 convs ran 2.9x
faster than FP32 but the INT8 depthwise convs were slightly slower and the 3x3 stem conv 1.5x slower.
Which ones lose depends on the host's kernels, and keeping a conv in float adds Q/DQ transitions
around it, so no fixed list is right: each candidate group of float convs (the stem, all depthwise,
both) is built and timed interleaved against the plain INT8 on this host, and the fastest set is
kept as a second INT8 candidate only when it is at least `FAST_MIN_GAIN` faster. The gate then
decides between the two like any other pair of candidates of one precision.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.runtime.measure import measure_latencies
from toolchain.quantize.int8 import prepared_reference, quantize_int8, representative_samples


FAST_MIN_GAIN = 0.03  # a float-conv variant must beat the plain INT8 by this much on host p50 to become a candidate
INT8_TIMING = {"max_seconds": 1.0, "max_runs": 200}  # is INT8 faster than FP32 here at all?
VARIANT_TIMING = {"max_seconds": 2.5, "max_runs": 300}  # tiny models stop at max_runs in milliseconds


def float_conv_groups(model_path: Path) -> dict[str, list[str]]:
    """The Conv nodes whose INT8 kernel may lose to FP32, by kind (empty kinds left out):
    "stem" = non-1x1, non-depthwise convs reached from the graph input before any other Conv (RGB-like
    inputs: few channels, poorly packed INT8 kernels); "depthwise" = one filter per channel (memory-bound,
    INT8 saves little compute but adds requantization)."""
    graph = onnx.load(str(model_path)).graph
    weights = {w.name: w.dims for w in graph.initializer}
    before_conv = {i.name for i in graph.input}  # tensors computed from the input without passing a Conv
    groups: dict[str, list[str]] = {"stem": [], "depthwise": []}
    for node in graph.node:
        if node.op_type != "Conv":
            if node.op_type not in ("Gemm", "MatMul") and any(name in before_conv for name in node.input):
                before_conv.update(node.output)
            continue
        shape = weights.get(node.input[1])
        if shape is None or len(shape) < 3:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1 and shape[1] == 1:
            groups["depthwise"].append(node.name)
        elif node.input[0] in before_conv and math.prod(shape[2:]) > 1:
            groups["stem"].append(node.name)
    return {kind: names for kind, names in groups.items() if names}


def exclusion_sets(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each group alone and, when there are two, both: a label ("float stem+depthwise") -> node names."""
    kinds = list(groups)
    sets = [[kind] for kind in kinds] + ([kinds] if len(kinds) > 1 else [])
    return {f"float {'+'.join(chosen)}": [name for kind in chosen for name in groups[kind]] for chosen in sets}


def latency_aware_int8(artifact: Artifact, ctx: BuildContext, plain: Candidate, samples: np.ndarray) -> dict[str, object]:
    """Time the plain INT8 against variants with groups of convs kept in FP32 and add the fastest as
    `onnx-int8-fast` when it wins by `FAST_MIN_GAIN`; returns the decision with its numbers."""
    prepared = prepared_reference(artifact, ctx)
    groups = float_conv_groups(prepared)
    report: dict[str, object] = {"groups": groups, "min_gain": FAST_MIN_GAIN}
    if not groups:
        report["decision"] = "skipped: no stem or depthwise convolution to keep in float"
        return report
    shape = ctx.dataset.input_shape
    first = measure_latencies({"fp32": artifact.reference.path, plain.name: plain.path}, shape, threads=1, **INT8_TIMING)
    p50 = {name: round(stats.p50_ms, 5) for name, stats in first.items()}
    report["int8_vs_fp32_p50_ms"] = p50  # its own interleaved run: compare within one dict only
    if p50[plain.name] >= p50["fp32"]:
        report["decision"] = (f"skipped: {plain.name} is not faster than FP32 on this host "
                              f"({p50[plain.name]:.3f} vs {p50['fp32']:.3f} ms p50)")
        return report
    variants = {label: ctx.work_path(f"model-int8-{label.replace(' ', '-').replace('+', '-')}.onnx")
                for label in exclusion_sets(groups)}
    for label, nodes in exclusion_sets(groups).items():
        quantize_int8(prepared, variants[label], samples, ctx.profile.providers, exclude=nodes)
    timed = measure_latencies({plain.name: plain.path, **variants}, shape, threads=1, **VARIANT_TIMING)
    p50 = {name: round(stats.p50_ms, 5) for name, stats in timed.items()}
    report["p50_ms"] = p50
    best = min(variants, key=p50.__getitem__)
    gain = 1 - p50[best] / p50[plain.name]
    report.update(best=best, gain=round(gain, 5))
    numbers = ", ".join(f"{name} {ms:.3f} ms" for name, ms in p50.items())
    if gain < FAST_MIN_GAIN:
        report["decision"] = f"not added: best variant {best} is {100 * gain:.1f}% faster than {plain.name} (< {100 * FAST_MIN_GAIN:.0f}%; {numbers} p50)"
    else:
        kinds = best.removeprefix("float ").split("+")
        output = variants.pop(best).replace(ctx.work_path("model-int8-fast.onnx"))
        artifact.candidates.append(Candidate(
            name="onnx-int8-fast", precision="int8", path=output,
            metrics={"calibration_samples": len(samples), "float_convs": {kind: groups[kind] for kind in kinds},
                     "method": f"{plain.metrics['method']}; {best.removeprefix('float ')} convs kept in FP32 (timed faster on this host)"}))
        report.update(float_convs={kind: groups[kind] for kind in kinds},
                      decision=f"added onnx-int8-fast: {best} is {100 * gain:.1f}% faster than {plain.name} ({numbers} p50)")
    for path in variants.values():
        path.unlink(missing_ok=True)
    return report


class QuantizeInt8Pass:
    name: ClassVar[str] = "quantize-int8"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        reference = artifact.reference
        output = ctx.work_path("model-int8.onnx")
        samples = representative_samples(ctx.dataset.x_train, ctx.config.compress.calibration_samples, ctx.seed)
        with ctx.console.status(f"  calibrating on {len(samples)} training samples"):
            activations = quantize_int8(prepared_reference(artifact, ctx), output, samples, ctx.profile.providers)
        candidate = Candidate(name="onnx-int8-qdq", precision="int8", path=output,
                              metrics={"calibration_samples": len(samples),
                                       "method": f"static QDQ per-channel, {activations.label} activations, minmax"})
        artifact.candidates.append(candidate)
        ctx.console.print(f"  {output.name}: {candidate.bytes:,} bytes ({candidate.bytes / reference.bytes:.2f}x FP32)")
        with ctx.console.status("  timing INT8 with slow convs kept in float"):
            fast = latency_aware_int8(artifact, ctx, candidate, samples)
        artifact.metrics["int8_fast"] = fast
        ctx.notes.append(f"latency-aware INT8: {fast['decision']}")  # notes reach report.json and report.html
        ctx.console.print(f"  latency-aware INT8: {fast['decision']}")
        return artifact
