"""`toolchain fleet simulate`: run N simulated devices against a broker; print accuracy per drift phase.

The work lives in `toolchain.fleet.sim.simulate`; this module only maps options to its settings and prints
the result (a table, or JSON with `--json`, or both with `--out FILE`).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from runtime_agent.signing import PUBLIC_KEY_NAME, default_key_dir
from toolchain.commands.tables import print_table
from toolchain.errors import ToolchainError


def _accuracy(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_result(data: dict[str, Any], console: Console) -> None:
    phases = Table(title=f"Fleet {data['fleet']}: {len(data['devices'])} simulated devices, model v{data['model_version']}",
                   box=box.SIMPLE_HEAD, header_style="bold")
    for column in ("from s", "to s", "drift active", "requests", "accuracy"):
        phases.add_column(column, justify="left" if column == "drift active" else "right", no_wrap=column != "drift active")
    for row in data["phases"]:
        phases.add_row(f"{row['from_s']:g}", f"{row['to_s']:.1f}", ", ".join(row["drift"]) or "none", str(row["n"]),
                       _accuracy(row["accuracy"]))
    print_table(phases, console)
    messages = data["messages"]
    console.print(f"sent {messages['sent']} messages (telemetry and events), {messages['pending']} still queued, "
                  f"{messages['dropped_telemetry']} telemetry windows dropped by full queues; "
                  f"{sum(d['windows'] for d in data['devices'])} windows")


def simulate(
    devices: Annotated[int, typer.Option(help="how many simulated devices")],
    broker: Annotated[str, typer.Option(help="MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT")],
    fleet: Annotated[str, typer.Option(help="fleet name of the simulated devices")] = "sim",
    drift: Annotated[Optional[list[str]], typer.Option(
        help="covariate shift FEATURE=SHIFT@SECONDS, e.g. x21=1.5@30: from 30 s on add 1.5 standard deviations to "
             "feature x21 (telemetry's feature names; 'all' = every input value); repeatable")] = None,
    duration: Annotated[float, typer.Option(help="seconds to simulate (0: until Ctrl-C)")] = 60.0,
    rate: Annotated[float, typer.Option(help="inference requests per second per device")] = 10.0,
    window_s: Annotated[float, typer.Option("--window-s", help="telemetry window of every device, seconds")] = 10.0,
    processes: Annotated[Optional[int], typer.Option(
        help="worker processes (default: one per 100 devices, at most one per core)")] = None,
    seed: Annotated[int, typer.Option(help="seed of every device's request stream")] = 0,
    bundle: Annotated[Optional[Path], typer.Option(help="the bundle the devices serve (default: the newest in dist/)")] = None,
    pubkey: Annotated[Path, typer.Option(help="trusted public key")] = default_key_dir() / PUBLIC_KEY_NAME,
    config: Annotated[Optional[Path], typer.Option(
        help="build config whose held-out data is served (default: the bundle's)")] = None,
    broker_dir: Annotated[Optional[Path], typer.Option(
        help="a `toolchain broker` folder: add the devices' credentials there")] = None,
    ca_file: Annotated[Optional[Path], typer.Option(help="CA certificate of the broker (mqtts://)")] = None,
    prefix: Annotated[str, typer.Option(help="device ids are PREFIX-0001 ...")] = "sim",
    accuracy_every: Annotated[int, typer.Option(help="send an `accuracy` event every N windows (0: never)")] = 1,
    work_dir: Annotated[Optional[Path], typer.Option(help="keep the device folders (outboxes) here (default: temporary)")] = None,
    fresh_data: Annotated[Optional[Path], typer.Option(
        help="keep this .npz current with fresh labelled samples of what the devices see now (an npz: data "
             "source for retraining: x, y and x_test, y_test)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    out: Annotated[Optional[Path], typer.Option(help="also write the result (JSON) to this file")] = None,
) -> None:
    """Simulate a fleet: real agent telemetry, drift and queues per device; replayed inference with ground truth."""
    from toolchain.fleet.sim.simulate import SimulationSettings
    from toolchain.fleet.sim.simulate import simulate as run

    if out is not None and not out.parent.is_dir():
        raise ToolchainError(f"--out {out}: folder {out.parent} does not exist")
    settings = SimulationSettings(devices=devices, broker=broker, bundle=bundle, pubkey=pubkey, config=config, fleet=fleet,
                                  prefix=prefix, drift=tuple(drift or ()), duration_s=duration, rate=rate, window_s=window_s,
                                  processes=processes, seed=seed, broker_dir=broker_dir, ca_file=ca_file, work_dir=work_dir,
                                  accuracy_every=accuracy_every, fresh_data=fresh_data)
    def terminate(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the simulation like Ctrl-C: last windows delivered, devices offline

    signal.signal(signal.SIGTERM, terminate)
    data = run(settings, Console(stderr=True)).to_dict()
    if out is not None:
        out.write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        print_result(data, Console())
