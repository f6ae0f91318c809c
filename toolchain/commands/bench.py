"""`toolchain bench`: measured host latency next to the profile's predicted latency, memory, size,
roofline fraction and budget verdicts, for a model file or a bundle."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from toolchain.commands.options import (DEFAULT_PUBKEY, BrokerOption, CaFileOption, ClientCertOption, PasswordFileOption, UsernameOption,
                                       broker_login)
from toolchain.commands.tables import print_table, print_value
from toolchain.errors import ToolchainError

if TYPE_CHECKING:
    from toolchain.deploy.device_bench import JobSettings
    from toolchain.deploy.mqtt import BrokerLogin

err = Console(stderr=True)


def bench(
    model_or_bundle: Annotated[Path, typer.Argument(help="an .onnx or .tflite model, or a .bundle")],
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="profile id, alias (e.g. jetson) or path to a "
                                                                         "profile .toml (not with --device)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    seconds: Annotated[float, typer.Option(help="measuring time")] = 5.0,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op (or LiteRT) threads (default 1; with "
                                                        "--device, the agent's own [serve] threads)")] = None,
    pubkey: Annotated[Path, typer.Option(help="trusted public key, for bundles")] = DEFAULT_PUBKEY,
    device: Annotated[Optional[str], typer.Option(help="time it on this device, through its agent (a signed benchmark job)")] = None,
    broker: BrokerOption = "mqtt://127.0.0.1:1883",
    fleet: Annotated[Optional[str], typer.Option(help="with --device: its fleet (default: looked up)")] = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
    client_cert: ClientCertOption = None,
    key: Annotated[Optional[Path], typer.Option(help="with --device: key that signs the job (default: the build key)")] = None,
    runs: Annotated[int, typer.Option(help="with --device: timed runs (after 10 warm-up runs)")] = 200,
    duty: Annotated[float, typer.Option(help="with --device: share of wall time the job may compute (pacing)")] = 0.5,
) -> None:
    """Measured host latency, predicted latency on the profile, memory, size, roofline fraction, budgets;
    with --device, the latency and memory measured on that device by its agent."""
    from toolchain.perf.bench import BenchSettings, bench_models
    from toolchain.runtime.files import model_file, sample_input_shape
    from toolchain.targets.profiles import resolve_target

    if (device is None) == (target is None):
        raise ToolchainError("say where to measure: --target PROFILE (here, with a prediction) or --device ID (on the board)")
    if device is not None:
        from toolchain.deploy.device_bench import JobSettings

        _bench_device(model_or_bundle, device, broker_login(broker, username, password_file, ca_file, client_cert),
                      fleet, key, pubkey, JobSettings(runs=runs, threads=threads, duty=duty), as_json)
        return
    profile = resolve_target(target)
    threads = 1 if threads is None else threads
    with tempfile.TemporaryDirectory(prefix="toolchain-bench-") as scratch:
        path, precision = model_file(model_or_bundle, pubkey, Path(scratch))
        with err.status(f"measuring {model_or_bundle.name} for {seconds:.0f} s"):
            row = bench_models({"model": path}, profile, sample_input_shape(path),
                               BenchSettings(seconds=seconds, min_runs=100, threads=threads))["model"]
    result = {"model": str(model_or_bundle), "target": profile.id, "precision": precision, **row}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console = Console()
    print_table(_bench_table(result, f"{model_or_bundle.name} on {profile.id} ({profile.name})"), console)
    # Why a prediction is (un)calibrated can name a calibration file: printed whole, outside the table.
    print_value(console, f"{profile.id} prediction", result["prediction_basis"])


def _bench_device(model_or_bundle: Path, device: str, login: BrokerLogin, fleet: str | None, key: Path | None,
                  pubkey: Path, settings: JobSettings, as_json: bool) -> None:
    """Send the model to `device` as a signed benchmark job; print and store what it measured."""
    from toolchain.deploy.device_bench import bench_on_device
    from toolchain.runtime.files import model_file

    if not 1 <= settings.runs <= 100_000 or not 0.01 <= settings.duty <= 1:
        raise ToolchainError(f"--runs must be in [1, 100000] and --duty in [0.01, 1], got {settings.runs} and {settings.duty}")
    with tempfile.TemporaryDirectory(prefix="toolchain-bench-") as scratch:
        path, _ = model_file(model_or_bundle, pubkey, Path(scratch))
        with err.status(f"timing {model_or_bundle.name} on {device} ({settings.runs} runs)"):
            result = bench_on_device({path.stem: path}, device, login, fleet=fleet, key=key, settings=settings)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    row = result["models"][path.stem]
    if row.get("error"):
        raise ToolchainError(f"device {device} could not time {model_or_bundle.name}: {row['error']}")
    table = Table(title=f"{model_or_bundle.name} on device {device} ({result['profile']})")
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    for label, name in (("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"), ("runs", "runs"),
                        ("threads", "threads"), ("load ms", "load_ms"), ("agent RSS MB", "rss_mb"), ("model RSS MB", "model_rss_mb")):
        table.add_row(label, f"{row[name]:,}")
    print_table(table, Console())
    print(result["stored"])


BUDGET_LABELS = {"latency_ms": "latency (ms)", "model_mb": "flash: model file (MB)", "ram_mb": "RAM (MB)"}


def _bench_table(row: dict, title: str) -> Table:
    """Measured next to predicted, each prediction labelled calibrated or roofline, then the budgets."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("note")

    def add(label: str, key: str, note: str = "") -> None:
        if key in row:
            value = row[key]
            table.add_row(label, f"{value:,.4f}" if isinstance(value, float) else f"{value:,}", note)

    add("size (bytes)", "bytes")
    add("parameters", "parameters")
    add("FLOPs", "flops")
    add("host p50 ms (measured)", "latency_ms_p50_host")
    add("host p90 ms (measured)", "latency_ms_p90_host")
    add("host p99 ms (measured)", "latency_ms_p99_host")
    host_error = f"{100 * row['prediction_error_host']:+.1f}% vs measured p50"
    if row["target"] != "host":
        add("host ms (predicted)", "latency_ms_predicted_host", f"{row['prediction_host']}, {host_error}")
    add("host roofline fraction", "roofline_fraction_host", "uncalibrated roofline time / measured p50")
    add(f"{row['target']} ms (predicted)", "latency_ms_predicted",
        f"{row['prediction']}, basis below" + (f"; {host_error}" if row["target"] == "host" else ""))
    add(f"{row['target']} ms (roofline)", "latency_ms_predicted_roofline", "uncalibrated, every kernel at peak")
    add(f"{row['target']} peak memory MB (predicted)", "peak_memory_mb_predicted", row["memory_basis"])
    add("host peak RSS MB (measured)", "process_peak_rss_mb", "fresh process")
    add("host model RSS MB (measured)", "model_rss_mb", "what the model adds")
    for key, verdict in row["budget"].items():
        mark = "[green]met[/]" if verdict["met"] else "[red]MISSED[/]"
        table.add_row(f"budget {BUDGET_LABELS.get(key, key)}", f"{verdict['value']:.4g} / {verdict['budget']:.4g}", mark)
    return table
