"""`toolchain calibrate`: fit a profile's latency/memory predictor and store it as a calibration file.

`--target host` measures generated model variants on this machine; a board's profile is fitted to the
same variants timed on one of its devices (`--from-device ID`, through its agent), or re-fitted from
what its devices reported (`--from-fleet DB --models DIR`). Mounted by the main CLI as a
command; errors are `ToolchainError`s printed as one line. The file is written only once the fit
succeeded, by an atomic rename; its path is printed last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolchain.commands.options import (DEFAULT_PUBKEY, BrokerOption, CaFileOption, ClientCertOption, PasswordFileOption, TargetOption,
                                       UsernameOption, broker_login)
from toolchain.commands.tables import print_table
from toolchain.errors import ToolchainError


def calibrate(
    target: TargetOption,
    quick: Annotated[bool, typer.Option(help="fewer variants and a shorter measurement (well under a minute)")] = False,
    from_fleet: Annotated[Optional[Path], typer.Option(help="fleet database (`toolchain fleet monitor --db`): "
                                                            "re-fit the profile from its devices' telemetry")] = None,
    models: Annotated[Optional[Path], typer.Option(help="with --from-fleet: folder of the bundles the devices ran")] = None,
    pubkey: Annotated[Path, typer.Option(help="trusted public key the bundles must verify with")] = DEFAULT_PUBKEY,
    out: Annotated[Optional[Path], typer.Option(help="calibration file to write (default: the lookup path for the profile)")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="seed of the variant sample and the fit/held-out split")] = 0,
    runtime: Annotated[str, typer.Option(help="whose kernels to calibrate: onnxruntime, or litert (.tflite, needs "
                                              "the tflite extra to measure here)")] = "onnxruntime",
    as_json: Annotated[bool, typer.Option("--json", help="print the calibration as JSON")] = False,
    from_device: Annotated[Optional[str], typer.Option(help="time the generated variants on this device through its "
                                                           "agent (signed benchmark jobs) and fit the profile to them")] = None,
    broker: BrokerOption = "mqtt://127.0.0.1:1883",
    fleet: Annotated[Optional[str], typer.Option(help="with --from-device: its fleet (default: looked up)")] = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
    client_cert: ClientCertOption = None,
    key: Annotated[Optional[Path], typer.Option(help="with --from-device: key that signs the jobs (default: the build key)")] = None,
    variants: Annotated[Optional[int], typer.Option(help="with --from-device: how many variants (default: as --quick or not)")] = None,
    runs: Annotated[int, typer.Option(help="with --from-device: timed runs per variant")] = 50,
) -> None:
    """Fit the predictor of a profile from measurements and store it next to the profile lookup path."""
    from toolchain.core.paths import unwritable
    from toolchain.perf.calibration import default_path, file_name, write_calibration
    from toolchain.targets.profiles import resolve_target

    if (from_fleet is None) != (models is None):
        raise ToolchainError("--from-fleet DB and --models DIR go together (telemetry latencies and the bundles' graphs)")
    file_name(target, runtime)  # an unknown runtime is an error before anything is measured
    profile = resolve_target(target)
    destination = out or default_path(profile.id, runtime)
    if (reason := unwritable(destination.parent)) is not None or destination.is_dir():
        raise ToolchainError(f"cannot write calibration file {destination}: {reason or 'it is a folder'}; "
                             "pass --out FILE in a folder you can write to")
    err = Console(stderr=True)
    if from_device is not None and from_fleet is not None:
        raise ToolchainError("--from-device and --from-fleet are two ways to calibrate a board: give one")
    if from_device is not None:
        from dataclasses import replace

        from toolchain.deploy.device_bench import JobSettings, device_timer
        from toolchain.perf.calibrate_device import calibrate_device
        from toolchain.perf.calibrate_host import CalibrationSettings

        settings = CalibrationSettings.quick(seed, runtime) if quick else CalibrationSettings(seed=seed, runtime=runtime)
        if variants is not None:
            if variants < 8:
                raise ToolchainError(f"--variants must be at least 8 (a fit and a held-out set of every family), got {variants}")
            settings = replace(settings, variants=variants)
        timer = device_timer(from_device, broker_login(broker, username, password_file, ca_file, client_cert),
                             fleet, key, profile.id, JobSettings(runs=runs, seed=seed))
        err.print(f"[bold]calibrating[/] {escape(profile.id)} ({runtime}) on device {escape(from_device)}: "
                  f"{settings.variants} generated variants, {runs} runs each")
        calibration = calibrate_device(profile, settings, timer, console=err).calibration
    elif from_fleet is not None and models is not None:
        from toolchain.fleet.calibrate import calibrate_from_fleet

        with err.status(f"fitting {profile.id} to the telemetry in {from_fleet}"):
            calibration = calibrate_from_fleet(profile, from_fleet, models, pubkey, runtime)
    else:
        from toolchain.perf.calibrate_host import CalibrationSettings, calibrate_host, check_measurable

        check_measurable(profile)
        settings = CalibrationSettings.quick(seed, runtime) if quick else CalibrationSettings(seed=seed, runtime=runtime)
        err.print(f"[bold]calibrating[/] {escape(profile.id)} ({runtime}): {settings.variants} generated variants, "
                  f"{settings.seconds:.0f} s interleaved on {settings.threads} thread")
        calibration = calibrate_host(profile, settings, console=err).calibration
    path = write_calibration(calibration, destination)
    if as_json:
        typer.echo(json.dumps(calibration.to_dict(), indent=2))
    else:
        print_table(_summary_table(calibration.to_dict()), Console())
    print(path)


def _summary_table(data: dict[str, Any]) -> Table:
    """Fit and held-out statistics, the parameters that matter most, for a person to judge the fit."""
    table = Table(title=f"calibration of {data['profile']} ({data['source']})", show_header=True, header_style="bold")
    table.add_column("")
    for column in ("models", "median |error|", "within 10%", "max |error|"):
        table.add_column(column, justify="right", no_wrap=True)
    rows = [("latency, fitted", data["fit"])]
    validation = data.get("validation") or {}
    if validation.get("latency"):
        rows.append((f"latency, held out ({validation.get('method', 'never fitted')})", validation["latency"]))
    if data["fit"].get("prior_errors"):
        rows.append(("latency, before the re-fit", data["fit"]["prior_errors"]))
    if validation.get("memory", {}).get("errors"):
        rows.append(("memory, held out (within 20%: {:.0%})".format(validation["memory"].get("within_20pct", 0)),
                     validation["memory"]))
    for label, stats in rows:
        count = len(stats.get("errors", {})) or stats.get("samples", "")
        table.add_row(label, str(count), f"{100 * stats['median_abs_error']:.1f}%", f"{100 * stats['within_10pct']:.0f}%",
                      f"{100 * stats['max_abs_error']:.1f}%")
    return table
