"""`toolchain build`: train, compress, verify, benchmark and sign a model for a device profile.

The work is `toolchain.build.workflow.build`; this prints what was decided and, last, the bundle's path
(scripts read the last line). `--nproc N` runs the same command under torchrun, N ranks training
data-parallel on this machine; under torchrun only rank 0 prints and writes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from toolchain.commands.options import (BrokerOption, CaFileOption, ClientCertOption, PasswordFileOption, TargetOption, UsernameOption,
                                       broker_login)
from toolchain.errors import ConfigError, ToolchainError

err = Console(stderr=True)


def build(
    target: TargetOption,
    config: Annotated[Optional[Path], typer.Option(help="toolchain.toml of your project (default: the embedded digits example)")] = None,
    out: Annotated[Path, typer.Option(help="where the bundle and the report go")] = Path("dist"),
    budget: Annotated[str, typer.Option(help="quick | standard | thorough")] = "quick",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="seed for every random number generator")] = 0,
    key: Annotated[Optional[Path], typer.Option(help="ed25519 private key (default: created on first use in the key folder)")] = None,
    warm_start: Annotated[Optional[Path], typer.Option(help="fine-tune the model of an earlier build (its NAME-VERSION-TARGET.pt) "
                                                           "instead of training from scratch")] = None,
    model: Annotated[Optional[Path], typer.Option(help="your own model file (.onnx or .tflite) instead of --config: "
                                                      "the FP32 reference, not trained")] = None,
    data: Annotated[Optional[str], typer.Option(help="with --model: the data source (npz:FILE, csv:FILE, images:DIR, "
                                                     "python:FILE.py:FN, sklearn:NAME)")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="with --model: one sample's shape fixing dynamic dims, e.g. 3,48,192")] = None,
    metric: Annotated[Optional[str], typer.Option(help="with --model: the gate's metric (default: accuracy with class labels, "
                                                       "agreement without)")] = None,
    track: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (http://host:5000, file:/path/mlruns, "
                                                     "sqlite:///mlflow.db); overrides \\[tracking] uri")] = None,
    storage: Annotated[Optional[str], typer.Option(help="the search's Optuna storage (e.g. postgresql://user@host/db), "
                                                       "shared with `toolchain search` workers; overrides \\[search] storage")] = None,
    nproc: Annotated[int, typer.Option(help="train data-parallel with N processes on this machine (torchrun); "
                                            "several machines: torchrun ... -m toolchain build ...")] = 1,
    measure_on: Annotated[Optional[str], typer.Option(help="time every candidate on this device through its agent (a "
                                                          "signed benchmark job) and gate on its numbers")] = None,
    broker: BrokerOption = "mqtt://127.0.0.1:1883",
    fleet: Annotated[Optional[str], typer.Option(help="with --measure-on: the device's fleet (default: looked up)")] = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
    client_cert: ClientCertOption = None,
) -> None:
    """Train, compress, verify, benchmark and sign a model for a device profile (or optimize your own model file)."""
    from toolchain.core.config import command_line_config, command_line_message, load_config, with_search
    from toolchain.targets.profiles import resolve_target
    from toolchain.core.contract import BUDGETS
    from toolchain.build.workflow import build as run_build

    if nproc != 1:
        from toolchain.training.distributed import launch

        raise typer.Exit(launch(nproc, sys.argv[1:]))
    if budget not in BUDGETS:
        raise ToolchainError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    profile = resolve_target(target)
    if model is not None:
        if config is not None:
            raise ToolchainError("give --model (with --data) or --config, not both; a config file names its model in [model] file")
        if data is None:
            raise ToolchainError("--model needs --data SOURCE (e.g. npz:samples.npz): the samples to quantize and evaluate on")
        build_config = command_line_config(model, data, input_shape, metric)
    elif data is not None or input_shape is not None or metric is not None:
        raise ToolchainError("--data, --input-shape and --metric go with --model; with --config, set them in the config file")
    else:
        build_config = with_search(load_config(config), storage=storage)
    err.print(f"[bold]building[/] {build_config.project.name} ({build_config.path if model is None else f'--model {model}'}) for [bold]{profile.id}[/] "
              f"({profile.name}), budget {budget}, seed {seed}")
    timer = None
    if measure_on is not None:
        from toolchain.deploy.device_bench import device_timer

        timer = device_timer(measure_on, broker_login(broker, username, password_file, ca_file, client_cert),
                             fleet, key, profile.id)
    try:
        built = run_build(build_config, profile, out, seed=seed, budget=budget, key_path=key, console=err, warm_start=warm_start,
                          track=track, device_timer=timer)
    except ConfigError as exc:
        if model is None:
            raise
        raise ConfigError(command_line_message(str(exc))) from exc
    if built is None:  # a follower rank under torchrun: rank 0 reports
        return
    artifact, ctx = built
    shipped, metric = artifact.shipped, ctx.metric
    err.print(f"[bold green]shipped {shipped.name}[/]: {metric.name} {metric.format_value(shipped.metrics['metric_value'])} "
              f"(reference {metric.format_value(artifact.reference.metrics['metric_value'])}), "
              f"host p50 {shipped.metrics['latency_ms_p50_host']:.4f} ms, "
              f"predicted {shipped.metrics['latency_ms_predicted']:.4f} ms on {profile.id}"
              + (f", measured {shipped.metrics['latency_ms_p50_device']:.4f} ms on {measure_on}" if measure_on else ""))
    for note in ctx.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")  # notes name config keys: "[train] lr" is not markup
    print(f"report: {artifact.outputs['report_html']}")
    print(artifact.outputs["bundle"])
