"""A build is a list of passes run in order over one `Artifact`; the profile decides the list.

Every pass has the same shape (`name`, `run(artifact, ctx) -> artifact`), so adding a technique is one
new file under `toolchain/passes/` plus one line in `plan_passes`. Passes write only into the
context's private work folder; the finished bundle and report are moved into the output folder in one
step at the end, so a failed build leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from toolchain.core.artifact import Artifact
from toolchain.core.config import BuildConfig
from toolchain.core.contract import Budget, BuildContext, Pass
from toolchain.core.paths import unwritable
from toolchain.errors import ToolchainError
from toolchain.targets.profiles import Profile


def plan_passes(config: BuildConfig, profile: Profile, framework: str = "torch") -> list[Pass]:
    """The pipeline for this profile: quantizers only for precisions the board accelerates."""
    if framework == "keras":
        return plan_keras_passes(config, profile)
    if config.model.from_file:
        return plan_file_passes(config, profile)
    from toolchain.passes.torch.export_onnx import ExportOnnxPass
    from toolchain.passes.torch.search import SearchPass
    from toolchain.passes.torch.distill import DistillPass
    from toolchain.passes.torch.prune import PrunePass
    from toolchain.passes.torch.train import TrainPass

    compress: list[Pass] = [DistillPass()] if config.compress.distill else []
    if config.compress.prunes:
        compress.append(PrunePass())
    return [*([SearchPass()] if config.search else []), TrainPass(), *compress, ExportOnnxPass(),
            *onnx_candidate_passes(config, profile, trained=True), *shipping_passes()]


def plan_file_passes(config: BuildConfig, profile: Profile) -> list[Pass]:
    """A model file: an ONNX file is the FP32 reference the usual candidates are made from (no training,
    so no QAT); a `.tflite` file is shipped as it is."""
    if config.model.file.lower().endswith(".tflite"):
        from toolchain.passes.tflite.import_tflite import ImportTflitePass

        if "tflite" not in profile.formats:  # refused before it is measured, not by the gate at the end
            raise ToolchainError(f"model {config.model.file}: a .tflite file ships as it is, and target {profile.id} runs only "
                                 f"{', '.join(profile.formats)} models; give the model's ONNX file, or pick a target "
                                 "that runs tflite (e.g. rpi5, stm32h7)")

        return [ImportTflitePass(), *shipping_passes()]
    from toolchain.passes.onnx.import_onnx import ImportOnnxPass

    return [ImportOnnxPass(), *onnx_candidate_passes(config, profile, trained=False), *shipping_passes()]


def onnx_candidate_passes(config: BuildConfig, profile: Profile, trained: bool) -> list[Pass]:
    """The candidates made from an FP32 ONNX reference: the quantizers the board accelerates, QAT when
    the model was trained here (it fine-tunes the torch module), mixed precision when INT8 is tried,
    and `.tflite` files (last) when the board runs them."""
    from toolchain.passes.onnx.export_tflite import ExportTflitePass
    from toolchain.passes.onnx.quantize_dynamic import QuantizeDynamicPass
    from toolchain.passes.onnx.quantize_fp16 import QuantizeFp16Pass
    from toolchain.passes.onnx.quantize_int8 import QuantizeInt8Pass
    from toolchain.passes.onnx.quantize_mixed import MixedPrecisionPass
    from toolchain.passes.torch.quantize_qat import QuantizeQatPass

    # config name -> (pass, the precision the board must accelerate for it to be worth trying)
    quantizers = {"int8": (QuantizeInt8Pass, "int8"), "dynamic": (QuantizeDynamicPass, "int8"), "fp16": (QuantizeFp16Pass, "fp16")}
    # ONNX quantizers only for boards that run ONNX; a .tflite-only board still needs the FP32 ONNX
    # reference, which is the source of its .tflite files.
    chosen = [key for key in config.compress.quantize
              if quantizers[key][1] in profile.precisions and "onnx" in profile.formats]
    quantize: list[Pass] = [quantizers[key][0]() for key in chosen]
    if "int8" in chosen and config.compress.qat and trained:
        quantize.append(QuantizeQatPass())
    if "int8" in chosen and config.compress.mixed:
        quantize.append(MixedPrecisionPass())
    if "tflite" in profile.formats:
        quantize.append(ExportTflitePass())
    return quantize


def shipping_passes() -> list[Pass]:
    """What every pipeline ends with, whatever made its candidates: measure them in the device's
    runtime, choose one, sign it, report."""
    from toolchain.passes.shipping.benchmark import BenchmarkPass
    from toolchain.passes.shipping.bundle import BundlePass
    from toolchain.passes.shipping.evaluate import EvaluatePass
    from toolchain.passes.shipping.gate import GatePass
    from toolchain.passes.shipping.report import ReportPass

    return [EvaluatePass(), BenchmarkPass(), GatePass(), BundlePass(), ReportPass()]


def plan_keras_passes(config: BuildConfig, profile: Profile) -> list[Pass]:
    """A Keras model: trained, pruned and quantization-aware-trained with Keras and TF Model
    Optimization, shipped as `.tflite` (there is no Keras -> ONNX path here)."""
    from toolchain.errors import ConfigError
    from toolchain.passes.keras.export import KerasExportTflitePass
    from toolchain.passes.keras.prune import KerasPrunePass
    from toolchain.passes.keras.qat import KerasQatPass
    from toolchain.passes.keras.train import KerasTrainPass

    where = f"config {config.path}"
    if "tflite" not in profile.formats:
        raise ConfigError(f"{where}: a Keras model ships as .tflite, and target {profile.id} runs only "
                          f"{', '.join(profile.formats)}; pick a target that runs tflite (e.g. rpi5, stm32h7) or use a torch model")
    if config.search:
        raise ConfigError(f"{where}: [search] tunes torch models; remove it for a Keras model (its entry sets the architecture)")
    if config.compress.distill:
        raise ConfigError(f"{where}: [compress] distill = true needs a torch model; set it to false for a Keras model")
    qat = config.compress.qat and "int8" in profile.precisions
    return [KerasTrainPass(), *([KerasPrunePass()] if config.compress.prunes else []), KerasExportTflitePass(),
            *([KerasQatPass()] if qat else []), *shipping_passes()]


def run_passes(passes: list[Pass], ctx: BuildContext, artifact: Artifact | None = None) -> Artifact:
    artifact = artifact or Artifact()
    for index, step in enumerate(passes, start=1):
        started = time.perf_counter()
        ctx.console.rule(f"[bold]{index}/{len(passes)} {step.name}", align="left")
        artifact = step.run(artifact, ctx)
        seconds = time.perf_counter() - started
        ctx.stages.append({"name": step.name, "seconds": round(seconds, 3)})
        ctx.console.print(f"[green]✓[/] {step.name} [dim]({seconds:.1f} s)[/]")
    return artifact


def check_out_dir(out_dir: Path) -> None:
    """Refuse an `--out` that cannot take the bundle before the build starts, not after it."""
    reason = unwritable(out_dir)
    if reason is not None:
        raise ToolchainError(f"--out {out_dir}: {reason}; pass a folder you can write to for the bundle and the report")


def publish(outputs: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """Move staged files into `out_dir` by atomic renames: every file is copied under a temp name first
    (same file system), so a copy that fails (disk full, permissions) publishes none of them."""
    temps = {role: out_dir / f".{staged.name}.tmp-{os.getpid()}" for role, staged in outputs.items()}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for role, staged in outputs.items():
            shutil.copyfile(staged, temps[role])
    except OSError as exc:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise ToolchainError(f"--out {out_dir}: cannot write the bundle and the report there ({exc.strerror or exc}); "
                             "pass a folder you can write to") from exc
    published = {}
    for role, staged in outputs.items():
        os.replace(temps[role], out_dir / staged.name)
        published[role] = out_dir / staged.name
    return published


def model_file_inputs(config: BuildConfig) -> tuple | None:
    """The inputs (`TensorSpec`s) a `[model] file` takes, which the data must supply; None for an entry
    (its one float32 input is the data's shape)."""
    if not config.model.from_file:
        return None
    path = config.resolve(config.model.file)
    if path.suffix.lower() == ".tflite":
        from toolchain.runtime.files import tflite_inputs

        return tflite_inputs(path)
    from toolchain.runtime.files import onnx_inputs

    return onnx_inputs(path, config.model.input_shape)


def join_search(config: BuildConfig, profile: Profile, *, seed: int = 0, budget: Budget = "quick",
                console: Console | None = None):
    """`toolchain search`: load the data as a build does and run this worker's share of the config's study
    (`passes.torch.search.work`); returns its `StudyRun`. Nothing is written but the study."""
    from toolchain.core.data import load_dataset
    from toolchain.core.seeding import seed_everything
    from toolchain.passes.torch.search import work

    seed_everything(seed)
    console = console or Console(stderr=True)
    with console.status("loading data"):
        dataset = load_dataset(config, seed, model_file_inputs(config))
    with tempfile.TemporaryDirectory(prefix="toolchain-search-") as folder:
        ctx = BuildContext(config=config, profile=profile, dataset=dataset, out_dir=Path(folder), work_dir=Path(folder),
                           seed=seed, budget=budget, console=console)
        return work(ctx)


def build(config: BuildConfig, profile: Profile, out_dir: Path, *, seed: int = 0, budget: Budget = "quick",
          key_path: Path | None = None, console: Console | None = None,
          warm_start: Path | None = None, track: str | None = None,
          device_timer: Callable[[dict[str, Path]], dict[str, Any]] | None = None) -> tuple[Artifact, BuildContext] | None:
    """Load the data, run the profile's passes, publish bundle and report into `out_dir`. Under torchrun
    only rank 0 does that; the other ranks train its `fit`s with it and return None (`training.distributed`).
    `device_timer` (`--measure-on`): times every candidate on a board, and the gate then trusts those numbers.
    With `[tracking]` or `track` (an MLflow URI) the build is one MLflow run (`build.tracking`), opened
    before any training."""
    from toolchain.build.tracking import open_tracking
    from toolchain.core.data import load_dataset
    from toolchain.core.models import output_width
    from toolchain.passes.shipping.bundle import check_signing_key
    from toolchain.training import distributed
    from toolchain.training.keras import framework_of
    from toolchain.core.seeding import seed_everything

    check_out_dir(Path(out_dir))
    check_signing_key(key_path)
    here = distributed.start()
    seed_everything(seed)
    console = console or Console(stderr=True)
    with console.status("loading data"):
        dataset = load_dataset(config, seed, model_file_inputs(config))
    if here.spread:
        distributed.share_arrays(x_train=dataset.x_train, y_train=dataset.y_train)
    if not here.leader:
        from toolchain.training.fit import serve

        serve(config)
        return None
    tracker = open_tracking(config, track, profile, seed=seed, budget=budget)
    with tempfile.TemporaryDirectory(prefix="toolchain-build-") as work:
        ctx = BuildContext(config=config, profile=profile, dataset=dataset, out_dir=Path(out_dir),
                           work_dir=Path(work), seed=seed, budget=budget, key_path=key_path, console=console,
                           warm_start=warm_start, device_timer=device_timer)
        framework = "file" if config.model.from_file else framework_of(config, output_width(dataset))
        try:
            artifact = run_passes(plan_passes(config, profile, framework), ctx)
            distributed.send_done()
            artifact.outputs = publish(artifact.outputs, Path(out_dir))
            if tracker is not None:
                tracker.finish(artifact, ctx, artifact.outputs)
        except BaseException:
            if tracker is not None:
                tracker.fail()
            raise
    return artifact, ctx
