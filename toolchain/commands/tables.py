"""Print a rich table without losing a character of it.

Rich fits a table to the terminal by cutting cells short with "…" and, when that is not enough, by
dropping whole columns: a profile id, a device name or a latency cut that way is lost to the user (and a
test that reads the output depends on the terminal's width). Every table of the CLI is printed here
instead, by one rule: a `no_wrap` column holds values (ids, numbers) and is never narrowed; any other
column holds prose, wraps at spaces and folds a word too long for it onto the next line. A terminal too
narrow even for that gets the table wider than itself and wraps the lines; a pipe gets them whole.
Values a user copies that can be long (paths) belong outside tables, on a line of their own (`print_value`).
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

_UNBOUNDED = 1 << 20  # measuring width: wide enough that nothing is wrapped while measuring


def print_table(table: Table, console: Console) -> None:
    """Print `table` on `console`, narrowing only its prose columns to fit (see the module's docstring);
    sets the columns' `min_width` (values) and `overflow` (prose) to do so."""
    options = console.options.update_width(_UNBOUNDED)
    for column in table.columns:
        if column.no_wrap:
            widest = max(Measurement.get(console, options, cell).maximum for cell in (column.header, *column.cells))
            column.min_width = max(column.min_width or 0, widest)
        else:
            column.overflow = "fold"
    needed = Measurement.get(console, options, table).minimum
    width = console.width
    console.width = max(width, needed)  # `print(width=...)` may only narrow
    try:
        console.print(table)
    finally:
        console.width = width


def print_value(console: Console, label: str, value: str) -> None:
    """`label: value` on one line, never wrapped or cut by rich and never read as markup, so that a long
    path or id can be copied whole (the terminal wraps it if it must)."""
    console.print(f"{label}: {escape(value)}", soft_wrap=True, highlight=False)
