"""Quantization-aware training: when static INT8 misses the accuracy gate, train the model to live with it.

Runs only when the static INT8 candidate loses more than `max_accuracy_drop` on validation (PTQ is
cheaper, and good enough for most models). Then, on a copy of the trained module (`toolchain.quantize.qat`):
BatchNorm is folded into its convolution, every Conv / Linear gets fake-quantized weights (per-channel
symmetric INT8, as onnxruntime quantizes them) and inputs (per tensor, the profile's activation
scheme); each input range is first chosen by a loss-aware search (min/max is one candidate, so it
never starts worse than PTQ; an outlier channel or feature gets clipped instead of stretching the
range; on a few hundred samples, within the budget's `qat_search_seconds`, a progress bar showing
it), then the whole model is fine-tuned through the quantizers. The result is exported like any
model, each learned range as a `Clip` whose output range is handed to onnxruntime's static quantizer
(no calibration guesswork left), so the INT8 file computes what training saw. The candidate goes to
the gate like any INT8 one (`onnx-int8-qat`), and the report gets the chosen ranges and both drops.
"""

from __future__ import annotations

import copy
import time
from typing import Any, ClassVar

import onnx
import torch
from onnxruntime.quantization import quant_pre_process
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from toolchain.core.artifact import Artifact, Candidate
from toolchain.export.onnx import export_module
from toolchain.quantize.int8 import activation_scheme, quantize_int8, representative_indices, representative_samples
from toolchain.quantize.int8 import int8_validation_drops
from toolchain.training.fit import finetune
from toolchain.quantize.qat import prepare_qat, search_ranges, strip_qat
from toolchain.core.contract import BuildContext
from toolchain.core.metrics import allowed_drop

QAT_LR_SCALE = 0.1  # the weights are already trained: small steps that adapt them to the grid
SEARCH_SAMPLES = 256  # paired comparisons of candidates on the same samples: a few hundred tell them apart


def clip_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Output tensor -> (min, max) of every Clip whose bounds are constants (the QAT clamps)."""
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    ranges = {}
    for node in model.graph.node:
        if node.op_type == "Clip" and len(node.input) == 3 and node.input[1] in constants and node.input[2] in constants:
            ranges[node.output[0]] = (float(constants[node.input[1]]), float(constants[node.input[2]]))
    return ranges


def choose_ranges(module: torch.nn.Module, ctx: BuildContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The loss-aware range search on SEARCH_SAMPLES training samples, capped by the budget's
    `qat_search_seconds` (a small share of the build), with a progress bar. Returns the ranges and a
    summary for the report."""
    data, seconds = ctx.dataset, ctx.settings.qat_search_seconds
    pick = representative_indices(len(data.x_train), SEARCH_SAMPLES, ctx.seed)
    progress = Progress(TextColumn("  choosing activation ranges"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} inputs"), TimeElapsedColumn(), console=ctx.console,
                        transient=True)
    started = time.perf_counter()
    with progress:
        task = progress.add_task("ranges", total=None)
        ranges = search_ranges(module, torch.from_numpy(data.x_train[pick]), torch.from_numpy(data.y_train[pick]),
                               seconds=seconds,
                               on_step=lambda done, total: progress.update(task, completed=done, total=total))
    searched = sum(r["candidates"] > 0 for r in ranges)
    summary = {"inputs": len(ranges), "searched": searched, "samples": len(pick), "budget_seconds": seconds,
               "seconds": round(time.perf_counter() - started, 2)}
    if searched < len(ranges):
        ctx.notes.append(f"QAT: the range search priced {searched} of {len(ranges)} layer inputs within the "
                         f"{ctx.budget} budget's {seconds:.0f} s; the others start at min/max and are learned in fine-tuning")
    ctx.console.print(f"  activation ranges: {searched} of {len(ranges)} inputs searched in {summary['seconds']:.1f} s")
    return ranges, summary


class QuantizeQatPass:
    name: ClassVar[str] = "quantize-qat"

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact:
        drops = int8_validation_drops(artifact, ctx)
        limit, _ = allowed_drop(ctx.config, ctx.metric, artifact.metrics["validation_metric"][artifact.reference.name])
        report: dict[str, Any] = {"validation_int8_drop": drops.get("onnx-int8-qdq")}
        artifact.metrics["qat"] = report
        if "onnx-int8-qdq" not in drops or drops["onnx-int8-qdq"] <= limit:
            report["decision"] = "not needed: static INT8 is within the gate on validation" if drops else "no static INT8 candidate"
            ctx.console.print(f"  {report['decision']}")
            return artifact
        data = ctx.dataset
        symmetric = activation_scheme(ctx.profile.providers).symmetric
        module = prepare_qat(copy.deepcopy(artifact.module).cpu(), symmetric)
        report["ranges"], report["range_search"] = choose_ranges(module, ctx)
        with ctx.console.status("  quantization-aware fine-tuning"):
            result, report["finetune"] = finetune(module, ctx, lr_scale=QAT_LR_SCALE, epochs=ctx.config.compress.qat_epochs,
                                                label="qat")
        exported, prepared = ctx.work_path("model-qat-fp32.onnx"), ctx.work_path("model-qat-prepared.onnx")
        export_module(strip_qat(result.module), data.input_shape, exported)
        quant_pre_process(str(exported), str(prepared), skip_symbolic_shape=True)
        output = ctx.work_path("model-int8-qat.onnx")
        samples = representative_samples(data.x_train, ctx.config.compress.calibration_samples, ctx.seed)
        ranges = clip_ranges(onnx.load(str(prepared)))
        activations = quantize_int8(prepared, output, samples, ctx.profile.providers, ranges=ranges)
        candidate = Candidate(name="onnx-int8-qat", precision="int8", path=output,
                              metrics={"method": f"quantization-aware training, {activations.label} activations, "
                                                 f"{len(ranges)} learned ranges"})
        artifact.candidates.append(candidate)
        drop = int8_validation_drops(artifact, ctx)["onnx-int8-qat"]
        report.update(validation_qat_drop=drop, best_epoch=result.best_epoch, epochs_run=len(result.history),
                      decision=f"static INT8 loses {ctx.metric.format_drop(drops['onnx-int8-qdq'])} of "
                               f"{ctx.metric.name} on validation, after QAT {ctx.metric.format_drop(drop)}")
        ctx.console.print(f"  {report['decision']}")
        return artifact
