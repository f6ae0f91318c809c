"""`toolchain targets`: see which boards the toolchain knows and what it believes about them.

Every prediction and gate decision rests on a profile's numbers, so users need a way to read them
(and their source file) before trusting a build. Errors are `TargetError`s, left for the main CLI
to print as one line.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolchain.commands.options import DEFAULT_PUBKEY
from toolchain.commands.tables import print_table, print_value
from toolchain.targets.profiles import Profile, list_profiles, resolve_target

app = typer.Typer(help="List and inspect device profiles.", no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def _unit(profile: Profile) -> str:
    """Which unit the runtime runs models on: the accelerator when it differs from the CPU."""
    return "CPU" if profile.compute == profile.cpu_compute else "accel"


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.4g}"


def _print_json(data: Any) -> None:
    # Plain echo, not rich: JSON must stay byte-exact for pipes and parsers.
    typer.echo(json.dumps(data, indent=2))


@app.command("list")
def list_command(as_json: JsonFlag = False) -> None:
    """List the shipped device profiles (measuring this host once for `host`)."""
    profiles = list_profiles()
    if as_json:
        _print_json([p.to_dict() for p in profiles])
        return
    console = Console()
    # On a narrow terminal the aliases go under the id and the long name is left out.
    wide = console.width >= 120
    table = Table(title="Device profiles", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="fp32 / int8: peak GFLOP/s / GOP/s of the unit models run on"
                  + ("" if wide else "; ms: latency budget"))
    # Narrow, the aliases wrap under the id (one word, never split: see print_table).
    table.add_column("id" if wide else "id (aliases)", style="cyan", no_wrap=wide)
    if wide:
        table.add_column("aliases")
    table.add_column("unit", no_wrap=True)
    table.add_column("fp32", justify="right", no_wrap=True)
    table.add_column("int8", justify="right", no_wrap=True)
    table.add_column("GB/s", justify="right", no_wrap=True)
    table.add_column("precisions", no_wrap=True)
    table.add_column("budget ms" if wide else "ms", justify="right", no_wrap=True)
    if wide:
        table.add_column("name")
    for p in profiles:
        # Profiles can be the user's own files: their text is data, never rich markup.
        pid, aliases = escape(p.id), escape(", ".join(p.aliases))
        head = [pid, aliases] if wide else [f"{pid}\n[dim]({aliases})[/]" if aliases else pid]
        tail = [escape(p.name)] if wide else []
        table.add_row(*head, _unit(p), _num(p.compute.fp32_gflops), _num(p.compute.int8_gops),
                      _num(p.bandwidth_gbs), ",".join(p.precisions), _num(p.budget.latency_ms), *tail)
    print_table(table, console)


@app.command("show")
def show_command(
    profile: Annotated[str, typer.Argument(help="Profile id, alias, or path to a profile .toml file.")],
    as_json: JsonFlag = False,
) -> None:
    """Show every value of one profile and the file it came from."""
    p = resolve_target(profile)
    if as_json:
        _print_json(p.to_dict())
        return
    console = Console()
    # The id and the paths are printed whole, outside the table, so that they can be copied.
    console.print(f"[bold cyan]{escape(p.id)}[/]  {escape(p.name)}", soft_wrap=True)
    print_value(console, "source", str(p.path) if p.path else "-")
    if p.raw.get("measured") is True:
        from toolchain.targets.hostprobe import cache_path

        print_value(console, "measured on this host, cached in", str(cache_path()))
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("section", style="dim", no_wrap=True)
    table.add_column("key", no_wrap=True)
    table.add_column("value")
    table.add_row("", "aliases", escape(", ".join(p.aliases)) or "-")
    rows: list[tuple[str, str, str]] = [
        ("cpu", "arch", p.cpu_arch),
        ("cpu", "cores", str(p.cpu_cores)),
        ("cpu", "freq_ghz", f"{p.cpu_freq_ghz:g}"),
        ("cpu", "isa", ", ".join(p.cpu_isa) or "-"),
        ("memory", "ram_mb", f"{p.ram_mb:,}"),
        ("memory", "bandwidth_gbs", f"{p.bandwidth_gbs:g}"),
        (f"compute ({_unit(p)})", "fp32_gflops", _num(p.compute.fp32_gflops)),
        (f"compute ({_unit(p)})", "fp16_gflops", _num(p.compute.fp16_gflops)),
        (f"compute ({_unit(p)})", "int8_gops", _num(p.compute.int8_gops)),
        (f"compute ({_unit(p)})", "op_overhead_us", f"{p.op_overhead_us:g}"),
        ("compute.cpu", "fp32_gflops", _num(p.cpu_compute.fp32_gflops)),
        ("compute.cpu", "fp16_gflops", _num(p.cpu_compute.fp16_gflops)),
        ("compute.cpu", "int8_gops", _num(p.cpu_compute.int8_gops)),
        ("runtime", "formats", ", ".join(p.formats)),
        ("runtime", "providers", ", ".join(p.providers)),
        ("runtime", "precisions", ", ".join(p.precisions)),
        ("budget", "latency_ms", f"{p.budget.latency_ms:g}"),
        ("budget", "model_mb", f"{p.budget.model_mb:g}"),
        ("budget", "ram_mb", f"{p.budget.ram_mb:g}"),
    ]
    previous = ""
    for section, key, value in rows:
        table.add_row(section if section != previous else "", key, escape(value))
        previous = section
    print_table(table, console)


def _versus(value: float, verdict: dict[str, Any], marker: str = "") -> str:
    """`value <= budget` in green when met, `value > budget` in red when not."""
    if verdict["met"]:
        return f"[green]{value:.4g}{marker} ≤ {verdict['budget']:g}[/]"
    return f"[red]{value:.4g}{marker} > {verdict['budget']:g}[/]"


@app.command("compare")
def compare_command(
    model: Annotated[Path, typer.Argument(help="An .onnx model or a .bundle.")],
    targets: Annotated[Optional[str], typer.Option("--targets", help="Comma-separated profiles (ids, aliases or "
                                                                     "files); default: every shipped profile.")] = None,
    as_json: JsonFlag = False,
    pubkey: Annotated[Path, typer.Option(help="Trusted public key, for bundles.")] = DEFAULT_PUBKEY,
) -> None:
    """Predicted latency, memory and budget fit of one model on several boards, to pick hardware."""
    from toolchain.perf.compare import compare_targets, parse_targets
    from toolchain.runtime.files import model_file

    profiles = parse_targets(targets)  # an unknown target fails here, before any work
    with tempfile.TemporaryDirectory(prefix="toolchain-compare-") as scratch:
        path, _ = model_file(model, pubkey, Path(scratch))
        rows = compare_targets(path, profiles)
    if as_json:
        _print_json({"model": str(model), "targets": rows})
        return
    table = Table(title=f"{escape(model.name)}: predicted on {len(rows)} profiles", header_style="bold",
                  box=box.SIMPLE_HEAD, caption="* calibrated prediction, else the uncalibrated roofline; "
                                               "flash: the model file against the model_mb budget")
    for column in ("target", "latency ms", "RAM MB", "flash MB", "fits"):
        table.add_column(column, justify="left" if column == "target" else "right", no_wrap=True)
    for row in rows:
        budget = row["budget"]
        table.add_row(escape(row["target"]),
                      _versus(row["latency_ms"], budget["latency_ms"], "*" if row["prediction"] == "calibrated" else ""),
                      _versus(row["memory_mb"], budget["ram_mb"]), _versus(row["model_mb"], budget["model_mb"]),
                      "[green]yes[/]" if row["fits"] else "[red]no[/]")
    console = Console()
    print_table(table, console)
    for row in rows:
        for reason in row["not_supported"]:
            console.print(f"[yellow]note:[/] {escape(row['target'])} {escape(reason)}")
