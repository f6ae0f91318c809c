"""`toolchain push`: send a signed bundle to devices over MQTT, canaries first, wave by wave.

Mounted by the main CLI as a command (`app.command()(push)`). Errors the user can fix (a bundle that
does not verify, an unreachable broker, no devices) are `ToolchainError`s that the main CLI prints as
one line (exit 2); a push that ran but did not install everywhere exits 1 with a one-line summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from runtime_agent.protocol import ACK_EVERY, MAX_CHUNK_BYTES
from toolchain.commands.options import DEFAULT_PUBKEY, ClientCertOption, broker_login
from toolchain.commands.tables import print_table
from toolchain.errors import ToolchainError


def push(
    bundle: Annotated[Path, typer.Argument(help="the signed .bundle to send")],
    device: Annotated[Optional[list[str]], typer.Option("--device", "-d", help="device id (repeatable)")] = None,
    fleet: Annotated[Optional[str], typer.Option(help="fleet name: alone, every online device of the fleet; "
                                                      "with --device, the fleet of those devices (default: looked up)")] = None,
    broker: Annotated[str, typer.Option(help="MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    username: Annotated[Optional[str], typer.Option(help="broker user (the fleet operator account)")] = None,
    password_file: Annotated[Optional[Path], typer.Option(help="file holding the broker password")] = None,
    ca_file: Annotated[Optional[Path], typer.Option(help="CA certificate that signed the broker's (mqtts://)")] = None,
    client_cert: ClientCertOption = None,
    pubkey: Annotated[Path, typer.Option(help="trusted public key: the bundle must verify with it")] = DEFAULT_PUBKEY,
    canary: Annotated[Optional[int], typer.Option(help="devices to update first; the rollout stops if any fails "
                                                       "(default: 1 with --fleet, else 0)")] = None,
    wave: Annotated[Optional[int], typer.Option(help="devices per wave after the canaries (default: all at once)")] = None,
    chunk_kb: Annotated[int, typer.Option(help="chunk size in KiB")] = 64,
    window: Annotated[int, typer.Option(help="chunks in flight (sent, not yet acknowledged by the device)")] = 32,
    timeout: Annotated[float, typer.Option(help="seconds per device to transfer and install")] = 600.0,
    wait_probation: Annotated[Optional[bool], typer.Option("--wait-probation/--no-wait-probation",
                                                           help="wait for each device's probation verdict "
                                                                "(default: when there are canaries or waves)")] = None,
    probation_timeout: Annotated[float, typer.Option(help="seconds to wait for a probation verdict")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Push a bundle to devices: chunked, resumable, verified on the device; canaries first, then waves."""
    from toolchain.deploy.push import (PushClient, RolloutSettings, discover_devices, fleet_of_devices, load_push_bundle,
                                       plan_stages, rollout)

    err = Console(stderr=True)
    if not device and not fleet:
        raise ToolchainError("say where to push: --device ID (repeatable) or --fleet NAME")
    for value, name, low in ((chunk_kb, "--chunk-kb", 1), (timeout, "--timeout", 0.001)):
        if value < low:
            raise ToolchainError(f"{name} must be at least {low}, got {value}")
    if chunk_kb > MAX_CHUNK_BYTES >> 10:
        raise ToolchainError(f"--chunk-kb must be at most {MAX_CHUNK_BYTES >> 10} (devices accept chunks up to "
                             f"{MAX_CHUNK_BYTES >> 20} MiB), got {chunk_kb}")
    if window < ACK_EVERY:
        raise ToolchainError(f"--window must be at least {ACK_EVERY}: devices acknowledge every {ACK_EVERY} "
                             f"chunks, a smaller window stalls until the ack timeout; got {window}")
    if wave is not None and wave < 1:
        raise ToolchainError(f"--wave must be at least 1, got {wave}")
    if canary is not None and canary < 0:
        raise ToolchainError(f"--canary must be 0 or more, got {canary}")
    login = broker_login(broker, username, password_file, ca_file, client_cert)
    verified = load_push_bundle(bundle, pubkey)  # refuse before touching the network

    with PushClient(login) as client:
        targets = list(dict.fromkeys(device or []))
        if targets:
            fleet = fleet_of_devices(client, targets, fleet)
        else:
            targets = discover_devices(client, fleet)
            if not targets:
                raise ToolchainError(f"no online device in fleet {fleet!r} on {broker} (nothing has a retained 'online' status)")
        canaries = canary if canary is not None else (1 if not device and len(targets) > 1 else 0)
        stages = plan_stages(targets, canaries, wave)
        waiting = wait_probation if wait_probation is not None else len(stages) > 1
        if not as_json:
            err.print(f"pushing [bold]{escape(verified.name)} v{verified.version}[/] ({verified.target}, "
                      f"{verified.size / 1e6:.1f} MB, transfer {verified.transfer}) to {len(targets)} device(s) of fleet "
                      f"[bold]{escape(fleet)}[/] in {len(stages)} stage(s)"
                      + (", waiting for probation verdicts" if waiting else ""))
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("chunks  {task.fields[state]}"), TimeElapsedColumn(),
                            console=err, disable=as_json, transient=False)
        tasks: dict[str, TaskID] = {}

        def on_progress(name: str, acked: int, total: int, state: str) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(escape(name), total=total, state=state)
            progress.update(tasks[name], completed=acked, state=state)

        def on_decision(decision: dict[str, Any]) -> None:
            if not as_json:
                progress.console.print(f"[bold]{decision['stage']}[/]: {decision['action']} "
                                       f"{', '.join(decision['devices'])} - {escape(decision['reason'])}")

        with progress:
            settings = RolloutSettings(canary=canaries, waves=wave, chunk_kb=chunk_kb, window=window, timeout_s=timeout,
                                       wait_probation=waiting, probation_timeout_s=probation_timeout)
            result = rollout(verified, fleet, targets, settings, client=client, progress=on_progress,
                             on_decision=on_decision)

    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table(result, waiting)
    failed = [r for r in result.results.values() if not r.ok]
    if result.ok:
        err.print(f"[green]pushed {escape(verified.name)} v{verified.version} to {len(result.results)} device(s)"
                  f"{' (all passed probation)' if waiting else ''}[/]")
        return
    detail = "; ".join(f"{r.device} {r.summary}" for r in failed)
    skipped = f"; {len(result.skipped)} not offered ({', '.join(result.skipped)})" if result.skipped else ""
    targeted = len(result.results) + len(result.skipped)
    typer.echo(f"push failed: {len(failed)} of {targeted} device(s) did not succeed ({detail}){skipped}", err=True)
    raise typer.Exit(1)


def _print_table(result: Any, waiting: bool) -> None:
    table = Table(title=f"{result.name} v{result.version} -> fleet {result.fleet} ({result.state})")
    for column, justify, value in (("device", "left", True), ("state", "left", False), ("reason", "left", False),
                                   ("seconds", "right", True), ("MB/s", "right", True), ("resent", "right", True)):
        table.add_column(column, justify=justify, no_wrap=value)  # type: ignore[arg-type]
    for item in result.results.values():
        state = item.state if item.state != "installed" or not waiting else f"installed, probation {item.probation}"
        style = "green" if item.ok else "red"
        reason = item.reason or item.probation_reason or ("resumed: device held "
                                                           f"{item.held_before}/{item.chunks} chunks" if item.held_before else "")
        rate = item.mb_per_s
        table.add_row(item.device, f"[{style}]{escape(state)}[/]", escape(reason), f"{item.seconds:.2f}",
                      f"{rate:.1f}" if rate else "-", f"{item.resent}/{item.chunks_sent}")
    for name in result.skipped:
        table.add_row(name, "[yellow]not offered[/]", "rollout stopped before this device", "-", "-", "-")
    print_table(table, Console())
