"""Tables of the CLI never lose a character, however narrow the terminal."""

from __future__ import annotations

import io
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from tests.conftest import run_cli
from toolchain.commands.tables import print_table, print_value
from toolchain.fleet.store import FleetStore

DEVICE = "a-fleet-with-a-long-name/device-with-a-long-id-0123456789"
NOTE = "calibrated on 2026-12-01, held-out median error 7.1%, see /a/long/path/to/a/calibration-file.json"


def _printed(table: Table, width: int) -> tuple[str, Console]:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    print_table(table, console)
    return console.file.getvalue(), console


def _table() -> Table:
    table = Table(title="Devices", box=box.SIMPLE_HEAD)
    table.add_column("fleet/device", no_wrap=True)
    for column in ("p50", "p90", "p99"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("note")
    table.add_row(DEVICE, "12,345.6789", "23,456.7891", "34,567.8912", NOTE)
    return table


def test_values_stay_whole_and_prose_only_wraps_when_narrow() -> None:
    for width in (40, 60, 200):
        text, console = _printed(_table(), width)
        assert console.width == width  # the console is left as it was
        lines = text.splitlines()
        assert any(DEVICE in line and "12,345.6789" in line and "34,567.8912" in line for line in lines), text
        assert "…" not in text
        # the prose column may wrap and fold, but keeps every character, in order
        assert "".join(NOTE.split()) in "".join(text.split())


def test_a_value_line_is_never_wrapped_or_read_as_markup() -> None:
    console = Console(file=io.StringIO(), width=20, color_system=None)
    value = "/" + "/".join(["a-folder-with-a-long-name"] * 12) + "/[bold]file.toml"
    print_value(console, "source", value)
    assert console.file.getvalue() == f"source: {value}\n"


def test_fleet_status_prints_long_ids_and_the_store_path_whole(tmp_path: Path, narrow_terminal: None) -> None:
    folder = tmp_path.joinpath(*(f"a-deeply-nested-folder-with-a-long-name-{i}" for i in range(4)))
    folder.mkdir(parents=True)
    db = folder / "fleet.sqlite"
    fleet, device = DEVICE.split("/")
    with FleetStore(db) as store:
        store.update_status(fleet, device, "online", seen_at=time.time(), model_name="digits", model_version=3)
        store.insert_event(fleet, device, 1, "drift", {"reason": NOTE})
    result = run_cli("toolchain", "fleet", "status", "--db", str(db), "--since", "0", check=True)
    assert f"store: {db}\n" in result.stdout
    assert len([line for line in result.stdout.splitlines() if DEVICE in line]) == 2  # devices and events
    assert "…" not in result.stdout and "".join(NOTE.split()) in "".join(result.stdout.split())
