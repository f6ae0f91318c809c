"""Static INT8 quantization (QDQ format, per-channel weights) calibrated on training samples, with the
calibration method and the layers left in float chosen by measurement.

QDQ keeps the graph portable (TensorRT, onnxruntime CPU/GPU and others fuse the Q/DQ pairs into
integer kernels); per-channel weight scales keep the accuracy drop of small convolutions low. The
representative samples are a seeded subset of the training split, never test data.

Calibration (`toolchain.quantize.calibration_choice`): min/max, percentile and entropy ranges, and a
final Softmax/Sigmoid kept in float, are each tried; the file with the smallest drop of the build's
metric on validation becomes `onnx-int8-qdq`.

Latency-aware variant (`onnx-int8-fast`): an INT8 kernel is not faster than FP32 for every layer.
Profiled on MobileNetV2 at 224x224 (one thread, x86 U8S8, AMD EPYC), the INT8 1x1 convs ran 3x
faster than FP32 but the 3x3 stem conv 1.4x and the first depthwise conv 1.7x slower. Which layers
lose depends on the host's kernels, so onnxruntime's profiler times every layer here, in FP32 and in
the plain INT8 file (`toolchain.quantize.profiling`), and the layers whose INT8 kernel with its Q/DQ
is slower are kept in float. Keeping a layer in float adds Q/DQ and layout transitions around it, which
the per-layer times do not show (on MobileNetV2 all four slower layers in float were slower than none;
the two at the input alone, 7% faster), so two sets are built, every slower layer and those of them
that run from the input on, timed interleaved against the plain INT8, and the fastest is kept as a
second INT8 candidate only when it is at least `FAST_MIN_GAIN` faster. The gate then decides between
the two like any other pair of candidates of one precision.
"""

from __future__ import annotations

from typing import Any, ClassVar

from toolchain.core.artifact import Artifact, Candidate
from toolchain.core.contract import BuildContext
from toolchain.quantize.calibration_choice import choose_calibration, quantize_as_chosen
from toolchain.quantize.int8 import activation_scheme, prepared_reference, validation_metric
from toolchain.quantize.profiling import OTHER, leading_nodes, node_times, profile_kernels, slower_in_int8
from toolchain.runtime.measure import measure_latencies

FAST_MIN_GAIN = 0.03  # a float-layer variant must beat the plain INT8 by this much on host p50 to become a candidate
INT8_TIMING = {"max_seconds": 1.0, "max_runs": 200}  # is INT8 faster than FP32 here at all?
VARIANT_TIMING = {"max_seconds": 2.5, "max_runs": 300}  # tiny models stop at max_runs in milliseconds
EVERY_SLOWER, LEADING_SLOWER = "every slower layer", "the slower layers from the input"  # the variants' labels


def float_layer_sets(artifact: Artifact, ctx: BuildContext, plain: Candidate, report: dict[str, Any]) -> dict[str, list[str]]:
    """Profile FP32 and the plain INT8 layer by layer (into `report`) and return the sets of layers to
    try in float: every layer slower in INT8, and those of them that run from the input on."""
    prepared = prepared_reference(artifact, ctx)
    shape = ctx.dataset.input_shape
    fp32 = node_times(prepared, profile_kernels(prepared, shape, ctx.work_dir))
    int8 = node_times(plain.path, profile_kernels(plain.path, shape, ctx.work_dir))
    layers = [name for name in int8 if name != OTHER and name in fp32]
    report["profile_us"] = {name: {"fp32": round(fp32[name], 1), "int8": round(int8[name], 1)} for name in layers}
    report["profile_other_us"] = {"fp32": round(fp32.get(OTHER, 0.0), 1), "int8": round(int8.get(OTHER, 0.0), 1)}
    slower = list(slower_in_int8(fp32, int8))
    report["slower_in_int8"] = slower
    sets = {EVERY_SLOWER: slower} if slower else {}
    leading = leading_nodes(prepared, slower)
    if leading and leading != slower:
        sets[LEADING_SLOWER] = leading
    return sets


def latency_aware_int8(artifact: Artifact, ctx: BuildContext, plain: Candidate) -> dict[str, Any]:
    """Time the plain INT8 against variants with the layers profiled slower in INT8 kept in FP32 and add
    the fastest as `onnx-int8-fast` when it wins by `FAST_MIN_GAIN`; returns the decision with its numbers."""
    report: dict[str, Any] = {"min_gain": FAST_MIN_GAIN}
    shape = ctx.dataset.input_shape
    first = measure_latencies({"fp32": artifact.source.path, plain.name: plain.path}, shape, threads=1, **INT8_TIMING)
    p50 = {name: round(stats.p50_ms, 5) for name, stats in first.items()}
    report["int8_vs_fp32_p50_ms"] = p50  # its own interleaved run: compare within one dict only
    if p50[plain.name] >= p50["fp32"]:
        report["decision"] = (f"skipped: {plain.name} is not faster than FP32 on this host "
                              f"({p50[plain.name]:.3f} vs {p50['fp32']:.3f} ms p50)")
        return report
    sets = float_layer_sets(artifact, ctx, plain, report)
    report["variants"] = sets
    if not sets:
        report["decision"] = "not added: no layer ran slower in INT8 than in FP32 on this host (profiled)"
        return report
    variants = {label: ctx.work_path(f"model-int8-variant-{index}.onnx") for index, label in enumerate(sets)}
    for label, nodes in sets.items():
        quantize_as_chosen(artifact, ctx, variants[label], nodes)
    timed = measure_latencies({plain.name: plain.path, **variants}, shape, threads=1, **VARIANT_TIMING)
    p50 = {name: round(stats.p50_ms, 5) for name, stats in timed.items()}
    report["p50_ms"] = p50
    best = min(variants, key=p50.__getitem__)
    gain = 1 - p50[best] / p50[plain.name]
    report.update(best=best, gain=round(gain, 5))
    numbers = ", ".join(f"{name} {ms:.3f} ms" for name, ms in p50.items())
    if gain < FAST_MIN_GAIN:
        report["decision"] = f"not added: best variant ({best}) is {100 * gain:.1f}% faster than {plain.name} (< {100 * FAST_MIN_GAIN:.0f}%; {numbers} p50)"
    else:
        output = variants.pop(best).replace(ctx.work_path("model-int8-fast.onnx"))
        artifact.candidates.append(Candidate(
            name="onnx-int8-fast", precision="int8", path=output,
            metrics={"calibration_samples": plain.metrics["calibration_samples"], "calibration": plain.metrics["calibration"],
                     "float_layers": sets[best],
                     "method": f"{plain.metrics['method']}; {best} ({len(sets[best])}, profiled on this host) kept in FP32"}))
        report.update(float_layers=sets[best],
                      decision=f"added onnx-int8-fast: {best} ({len(sets[best])}) in FP32, {100 * gain:.1f}% faster than {plain.name} ({numbers} p50)")
    for path in variants.values():
        path.unlink(missing_ok=True)
    return report


class QuantizeInt8Pass:
    name: ClassVar[str] = "quantize-int8"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        reference = artifact.reference
        prepared = prepared_reference(artifact, ctx)
        measured = artifact.metrics.setdefault("validation_metric", {})  # shared with int8_validation_drops
        if reference.name not in measured:
            measured[reference.name] = validation_metric(reference.path, ctx, reference.path)
        with ctx.console.status("  choosing the calibration method on validation data"):
            choice = choose_calibration(prepared, reference.path, ctx, measured[reference.name])
        artifact.metrics["int8_calibration"] = choice.report
        ctx.notes.append(f"INT8 calibration: {choice.report['decision']}")  # notes reach report.json and report.html
        ctx.console.print(f"  INT8 calibration: {choice.report['decision']}")
        output = choice.path.replace(ctx.work_path("model-int8.onnx"))
        candidate = Candidate(name="onnx-int8-qdq", precision="int8", path=output,
                              metrics={"calibration_samples": choice.trial.samples, "calibration": choice.trial.label,
                                       "method": f"static QDQ per-channel, {activation_scheme(ctx.profile.providers).label} "
                                                 f"activations, {choice.trial.label}"})
        artifact.candidates.append(candidate)
        measured[candidate.name] = choice.value
        ctx.console.print(f"  {output.name}: {candidate.bytes:,} bytes ({candidate.bytes / reference.bytes:.2f}x FP32)")
        with ctx.console.status("  profiling INT8 layer by layer; timing the slower ones kept in float"):
            fast = latency_aware_int8(artifact, ctx, candidate)
        artifact.metrics["int8_fast"] = fast
        ctx.notes.append(f"latency-aware INT8: {fast['decision']}")
        ctx.console.print(f"  latency-aware INT8: {fast['decision']}")
        return artifact
