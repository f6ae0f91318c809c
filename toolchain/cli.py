"""`toolchain`: the host command line. Each command is thin; the work lives in the modules it calls.

Errors a user can fix (`ToolchainError`, and the agent's `AgentError` for bundles and keys) print one
line and exit 2; `--debug` (anywhere on the command line) shows the traceback too.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runtime_agent.errors import AgentError
from runtime_agent.signing import default_key_dir
from toolchain.commands.broker import app as broker_app
from toolchain.commands.calibrate import calibrate
from toolchain.commands.fleet import app as fleet_app
from toolchain.commands.options import DEFAULT_PUBKEY, TargetOption
from toolchain.commands.push import push
from toolchain.commands.targets import app as targets_app
from toolchain.errors import ToolchainError

app = typer.Typer(help="Build, compress, sign and benchmark models for edge devices.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
keys_app = typer.Typer(help="Manage the ed25519 key that signs bundles.", no_args_is_help=True)
app.add_typer(targets_app, name="targets")
app.add_typer(keys_app, name="keys")
app.add_typer(broker_app, name="broker")
app.add_typer(fleet_app, name="fleet")
app.command()(push)
app.command()(calibrate)
err = Console(stderr=True)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False) -> None:
    """Edge compile-and-deploy toolchain."""


@app.command()
def build(
    target: TargetOption,
    config: Annotated[Optional[Path], typer.Option(help="toolchain.toml of your project (default: the embedded digits example)")] = None,
    out: Annotated[Path, typer.Option(help="where the bundle and the report go")] = Path("dist"),
    budget: Annotated[str, typer.Option(help="quick | standard | thorough")] = "quick",
    seed: Annotated[int, typer.Option(help="seed for every random number generator")] = 0,
    key: Annotated[Optional[Path], typer.Option(help="ed25519 private key (default: created on first use in the key folder)")] = None,
    warm_start: Annotated[Optional[Path], typer.Option(help="fine-tune the model of an earlier build (its NAME-VERSION-TARGET.pt) "
                                                           "instead of training from scratch")] = None,
) -> None:
    """Train, compress, verify, benchmark and sign a model for a device profile."""
    from toolchain.config import load_config
    from toolchain.targets import resolve_target
    from toolchain.workflow import BUDGETS, build as run_build

    if budget not in BUDGETS:
        raise ToolchainError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    profile = resolve_target(target)
    build_config = load_config(config)
    err.print(f"[bold]building[/] {build_config.project.name} ({build_config.path}) for [bold]{profile.id}[/] "
              f"({profile.name}), budget {budget}, seed {seed}")
    artifact, ctx = run_build(build_config, profile, out, seed=seed, budget=budget, key_path=key, console=err,
                              warm_start=warm_start)
    shipped = artifact.shipped
    err.print(f"[bold green]shipped {shipped.name}[/]: accuracy {shipped.metrics['accuracy']:.4f} "
              f"(FP32 {artifact.reference.metrics['accuracy']:.4f}), host p50 {shipped.metrics['latency_ms_p50_host']:.4f} ms, "
              f"predicted {shipped.metrics['latency_ms_predicted']:.4f} ms on {profile.id}")
    for note in ctx.notes:
        err.print(f"[yellow]note:[/] {note}")
    print(f"report: {artifact.outputs['report_html']}")
    print(artifact.outputs["bundle"])


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="folder for signing.key (private, 0600) and signing.pub")] = default_key_dir(),
    force: Annotated[bool, typer.Option(help="replace an existing key")] = False,
) -> None:
    """Create a signing key pair."""
    from runtime_agent.signing import write_keypair

    private, public = write_keypair(out, overwrite=force)
    print(f"private key: {private}\npublic key: {public}")


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="a .bundle file")],
    pubkey: Annotated[Path, typer.Option(help="trusted public key")] = DEFAULT_PUBKEY,
) -> None:
    """Check a bundle's signature, format and every file's hash."""
    from runtime_agent.bundle import read_bundle
    from runtime_agent.signing import load_public_key

    verified = read_bundle(bundle, load_public_key(pubkey))
    manifest = verified.manifest
    print(f"OK {bundle}: {manifest['name']} v{manifest['version']} for {manifest['target']}, "
          f"{len(manifest['artifacts'])} files verified, signed by key {manifest['key_id']}")


@app.command()
def flash(
    device_dir: Annotated[Path, typer.Option(help="the device folder to provision")],
    device_id: Annotated[str, typer.Option(help="device id: MQTT client id and username")],
    bundle: Annotated[Path, typer.Option(help="the first bundle to install")],
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT or mqtts://HOST:PORT")],
    fleet: Annotated[str, typer.Option(help="fleet name")] = "default",
    pubkey: Annotated[Path, typer.Option(help="trusted public key")] = DEFAULT_PUBKEY,
    broker_dir: Annotated[Optional[Path], typer.Option(help="a `toolchain broker` folder: add the device's credentials there")] = None,
    port: Annotated[int, typer.Option(help="the agent's local REST port")] = 8080,
    window: Annotated[float, typer.Option(help="telemetry window, seconds")] = 10.0,
    force: Annotated[bool, typer.Option(help="re-flash an existing device (new credentials, new model)")] = False,
) -> None:
    """Provision a device: agent.toml, credentials, trusted key, first bundle, install script and systemd unit."""
    from toolchain.flash import flash as provision

    path = provision(device_dir, device_id, bundle, broker, fleet=fleet, pubkey=pubkey, broker_dir=broker_dir,
                     serve_port=port, window_s=window, force=force)
    print(f"provisioned {device_id} (fleet {fleet}) in {path}; start it with: edge-agent run --device-dir {path}")


@app.command()
def bench(
    model_or_bundle: Annotated[Path, typer.Argument(help="an .onnx or .tflite model, or a .bundle")],
    target: TargetOption,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    seconds: Annotated[float, typer.Option(help="measuring time")] = 5.0,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op (or LiteRT) threads")] = 1,
    pubkey: Annotated[Path, typer.Option(help="trusted public key, for bundles")] = DEFAULT_PUBKEY,
) -> None:
    """Measured host latency, predicted latency on the profile, memory, size, roofline fraction, budgets."""
    from toolchain.bench import BenchSettings, bench_models
    from toolchain.onnx_io import model_file, sample_input_shape
    from toolchain.targets import resolve_target

    profile = resolve_target(target)
    with tempfile.TemporaryDirectory(prefix="toolchain-bench-") as scratch:
        path, precision = model_file(model_or_bundle, pubkey, Path(scratch))
        with err.status(f"measuring {model_or_bundle.name} for {seconds:.0f} s"):
            row = bench_models({"model": path}, profile, sample_input_shape(path),
                               BenchSettings(seconds=seconds, min_runs=100, threads=threads))["model"]
    result = {"model": str(model_or_bundle), "target": profile.id, "precision": precision, **row}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    Console().print(_bench_table(result, f"{model_or_bundle.name} on {profile.id} ({profile.name})"))


BUDGET_LABELS = {"latency_ms": "latency (ms)", "model_mb": "flash: model file (MB)", "ram_mb": "RAM (MB)"}


def _bench_table(row: dict, title: str) -> Table:
    """Measured next to predicted, each prediction labelled calibrated or roofline, then the budgets."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
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
        escape(row["prediction_basis"]) + (f"; {host_error}" if row["target"] == "host" else ""))
    add(f"{row['target']} ms (roofline)", "latency_ms_predicted_roofline", "uncalibrated, every kernel at peak")
    add(f"{row['target']} peak memory MB (predicted)", "peak_memory_mb_predicted", row["memory_basis"])
    add("host peak RSS MB (measured)", "process_peak_rss_mb", "fresh process")
    add("host model RSS MB (measured)", "model_rss_mb", "what the model adds")
    for key, verdict in row["budget"].items():
        mark = "[green]met[/]" if verdict["met"] else "[red]MISSED[/]"
        table.add_row(f"budget {BUDGET_LABELS.get(key, key)}", f"{verdict['value']:.4g} / {verdict['budget']:.4g}", mark)
    return table


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app(prog_name="toolchain")
    except (ToolchainError, AgentError) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
