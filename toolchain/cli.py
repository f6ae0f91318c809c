"""`toolchain`: the host command line. It only mounts the commands of `toolchain.commands` (each thin;
the work lives in the packages they call) and turns a user's mistake into one line.

Errors a user can fix (`ToolchainError`, the agent's `AgentError` for bundles and keys, and the fleet
database's `DatabaseLost` when PostgreSQL drops the connection) print one line and exit 2; `--debug`
(anywhere on the command line) shows the traceback too. A command stopped by Ctrl-C or SIGTERM unwinds (a
build removes its work folder) and says so in one line, exiting 128 + the signal.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Annotated

import typer

from runtime_agent.errors import AgentError
from toolchain.commands.bench import bench
from toolchain.commands.broker import app as broker_app
from toolchain.commands.build import build
from toolchain.commands.calibrate import calibrate
from toolchain.commands.flash import flash
from toolchain.commands.fleet import app as fleet_app
from toolchain.commands.keys import app as keys_app
from toolchain.commands.keys import verify
from toolchain.commands.push import push
from toolchain.commands.search import search
from toolchain.commands.targets import app as targets_app
from toolchain.errors import DatabaseLost, ToolchainError

app = typer.Typer(help="Build, compress, sign and benchmark models for edge devices.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.command()(build)
app.command()(search)
app.add_typer(targets_app, name="targets")
app.add_typer(keys_app, name="keys")
app.command()(verify)
app.command()(flash)
app.command()(bench)
app.add_typer(broker_app, name="broker")
app.add_typer(fleet_app, name="fleet")
app.command()(push)
app.command()(calibrate)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False) -> None:
    """Edge compile-and-deploy toolchain."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (`timeout`, a cancelled CI job, `kill`) unwinds like Ctrl-C does, so a build's work folder
    is removed on the way out instead of being left in the temp folder; 143 = 128 + 15, as shells report it.
    Commands that stop gracefully on SIGTERM (the fleet monitor, the simulator) install their own handler."""
    raise SystemExit(128 + signum)


# How a command stopped by a signal exits (128 + the signal), and the line that says so: Typer exits 130 on
# Ctrl-C without a word, which in a log reads like a crash.
STOPPED_BY = {128 + signal.SIGINT: "Ctrl-C (SIGINT)", 128 + signal.SIGTERM: "SIGTERM"}


def main() -> None:
    debug = "--debug" in sys.argv
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app(prog_name="toolchain")
    except SystemExit as exc:
        if exc.code in STOPPED_BY:
            print(f"stopped by {STOPPED_BY[exc.code]}", file=sys.stderr)
        raise
    except (ToolchainError, AgentError, DatabaseLost) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {_rank()}{exc}", file=sys.stderr)
        sys.exit(2)


def _rank() -> str:
    """Under torchrun, which rank failed ("rank 1/2: "): any rank's failure fails the build."""
    size = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '0')}/{size}: " if size != "1" else ""


if __name__ == "__main__":
    main()
