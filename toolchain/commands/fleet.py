"""`toolchain fleet monitor|dashboard|status` (and `rollback|config`, `toolchain.commands.operate`): watch a fleet over MQTT into a SQLite file, and read that file.

`monitor` keeps a persistent MQTT session (the broker queues for it while it is down) and writes every
status, telemetry window and event into the database; it prints one line per device status change and
per fleet drift alarm. `dashboard` is the monitor serving a live web page too (`toolchain.fleet.dashboard`).
`status` reads the database (another process may be writing it: WAL) and
prints the device table, the merged latency per model version, and each fleet's drift alarm share.
Errors the user can fix are `ToolchainError`s, printed by the main CLI as one line.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolchain.commands.autopilot import autopilot
from toolchain.commands.operate import config, rollback
from toolchain.commands.options import ClientCertOption, read_password
from toolchain.commands.tables import print_table, print_value
from toolchain.commands.simulate import simulate
from toolchain.errors import ToolchainError

app = typer.Typer(help="Monitor and operate a fleet of devices: status, latency and drift over MQTT; rollback, config.",
                  no_args_is_help=True)
app.command()(simulate)
app.command()(autopilot)
app.command()(rollback)
app.command("config")(config)
DEFAULT_DB = "fleet.sqlite"
DASHBOARD_PORT = 8765

DbOption = Annotated[str, typer.Option("--db", help=(
    "the fleet database the monitor writes: a SQLite file, or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB "
    "(needs pip install 'edge-toolchain[postgres]')"))]


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _notice_line(kind: str, info: dict[str, Any]) -> str:
    if kind == "status":
        extra = ""
        if info["state"] == "online":
            extra = f" model v{info.get('model_version')}" + (f" ({info['profile']})" if info.get("profile") else "")
        was = f" (was {info['previous']})" if info.get("previous") else ""
        return f"{_stamp()} {info['fleet']}/{info['device']} {info['state']}{extra}{was}"
    if kind == "fleet_drift_alarm":
        return (f"{_stamp()} fleet {info['fleet']}: DRIFT ALARM: {info['in_alarm']} of {info['reporting']} devices "
                f"({100 * info['share']:.0f}% >= {100 * info['threshold']:.0f}%): {', '.join(info['devices'])}")
    if kind == "fleet_drift_cleared":
        return (f"{_stamp()} fleet {info['fleet']}: drift alarm cleared: {info['in_alarm']} of {info['reporting']} "
                f"devices ({100 * info['share']:.0f}% < {100 * info['threshold']:.0f}%)")
    return f"{_stamp()} {kind}: {info}"


def monitor(
    ctx: typer.Context,
    broker: Annotated[str, typer.Option(help="MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT")],
    db: DbOption = DEFAULT_DB,
    username: Annotated[Optional[str], typer.Option(help="broker user (the fleet operator account)")] = None,
    password_file: Annotated[Optional[Path], typer.Option(help="file holding the broker password")] = None,
    ca_file: Annotated[Optional[Path], typer.Option(help="CA certificate that signed the broker's (mqtts://)")] = None,
    client_cert: ClientCertOption = None,
    fleet: Annotated[str, typer.Option(help="fleet name, or + for every fleet")] = "+",
    threshold: Annotated[float, typer.Option(help="fleet drift alarm: share of reporting devices in alarm")] = 0.3,
    workers_group: Annotated[Optional[str], typer.Option(
        help="run as one of several monitor workers sharing the fleet's messages (MQTT v5 shared subscription "
             "$share/NAME/...; one PostgreSQL --db for all)")] = None,
    worker: Annotated[Optional[str], typer.Option(
        help="this worker's name in --workers-group (default: the host name); keep it across restarts")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log every connection and event")] = False,
    host: Annotated[str, typer.Option(help="dashboard: address to serve the web page on")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option(
        "--port", "--dashboard-port",
        help=f"dashboard: port of the web page (0: any free one). `fleet dashboard`: {DASHBOARD_PORT} unless given; "
             "`fleet monitor`: serves the dashboard only when given")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(
        help="Prometheus metrics on http://HOST:PORT/metrics (also at /metrics on the dashboard's port); "
             "needs prometheus-client (the metrics extra)")] = None,
    token_file: Annotated[Optional[Path], typer.Option(
        help="a file holding the token the dashboard and metrics port need (Authorization: Bearer TOKEN, or "
             "?token= in a browser); required when --host is not a loopback address")] = None,
) -> None:
    """Listen to the fleet until Ctrl-C; one line per status change and per fleet drift alarm."""
    from toolchain.fleet.dashboard import FleetDashboard
    from toolchain.fleet.listener import read_token
    from toolchain.fleet.monitor import FleetMonitor

    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    password = read_password(password_file, username)
    token = read_token(token_file)
    if ctx.info_name == "dashboard" and port is None:
        port = DASHBOARD_PORT
    metrics = _fleet_metrics(db, fleet, lambda: dict(watcher.stats), metrics_port, port)
    # The dashboard binds its port first: a port in use fails before the database is created.
    page = None if port is None else FleetDashboard(db, host, port, stats=lambda: dict(watcher.stats), metrics=metrics,
                                                    token=token)

    def notice(kind: str, info: dict[str, Any]) -> None:
        print(_notice_line(kind, info), flush=True)

    try:
        metrics_url = None if metrics_port is None else metrics.serve(host, metrics_port, token)
        watcher = FleetMonitor(broker, db, username, password, fleet, ca_file=ca_file, client_cert=client_cert,
                               alarm_threshold=threshold,
                               group=workers_group, worker=worker,
                               on_notice=notice, on_stored=page.notify if page else None,
                               on_telemetry=metrics.observe_ingest if metrics else None)
        if page is not None:
            page.start()
    except BaseException:
        if page is not None:
            page.stop()
        if metrics is not None:
            metrics.close()
        raise

    def terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        if page is not None:
            print(f"{_stamp()} dashboard at {page.url}", flush=True)
        if metrics_url is not None:
            print(f"{_stamp()} metrics at {metrics_url}", flush=True)
        watcher.start()
        if watcher.wait_connected(10):
            print(f"{_stamp()} monitoring {'every fleet' if fleet == '+' else 'fleet ' + fleet} on {broker} "
                  f"into {watcher.store.path} (session {watcher.client_id})", flush=True)
        else:
            print(f"{_stamp()} broker {broker} not reachable yet; retrying in the background", flush=True)
        watcher.run_forever()  # already started: blocks until Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()
        if page is not None:
            page.stop()
        if metrics is not None:
            metrics.close()
    print(f"{_stamp()} stopped; processed {watcher.stats['processed']} messages "
          f"({watcher.stats['duplicates']} duplicates, {watcher.stats['malformed']} malformed)", flush=True)


def _fleet_metrics(db: Path, fleet: str, stats: Any, metrics_port: Optional[int],
                   dashboard_port: Optional[int]) -> Any:
    """The monitor's Prometheus metrics when asked for (--metrics-port) or when the dashboard can serve them;
    without prometheus-client, --metrics-port is a one-line error and the dashboard's /metrics says what to install."""
    from toolchain.fleet.metrics import FleetMetrics, PrometheusMissing

    if metrics_port is None and dashboard_port is None:
        return None
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise ToolchainError(f"--metrics-port must be 0-65535 (0: any free port), got {metrics_port}")
    try:
        return FleetMetrics(db, stats=stats, fleet=None if fleet == "+" else fleet)
    except PrometheusMissing:
        if metrics_port is not None:
            raise
        return None


# One implementation, two commands: the dashboard is the monitor with its web page on (same options).
app.command("monitor")(monitor)
app.command("dashboard", help=(
    f"The monitor plus a live web page on http://HOST:PORT/ (default 127.0.0.1:{DASHBOARD_PORT}): devices, model "
    "versions, latency over time, a drift heat map, fleet alarms, events and rollouts, updated over server-sent "
    "events whenever the monitor stores something new. Works offline: nothing is loaded from elsewhere."))(monitor)


def _ago(ts: Optional[float], now: float) -> str:
    if ts is None:
        return "-"
    seconds = max(0.0, now - ts)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def _share(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _cert(expiry: Optional[dict[str, Any]]) -> str:
    if expiry is None:
        return "-"
    if expiry["state"] == "expired":
        return f"[red]EXPIRED {expiry['which']}[/]"
    days = f"{expiry['days_left']:.0f}d"
    return f"[yellow]{days}! {expiry['which']}[/]" if expiry["state"] == "expiring" else days


def collect_status(db: Path | str, fleet: Optional[str] = None, since_s: float = 3600.0, events: int = 10) -> dict[str, Any]:
    """Everything `fleet status` shows, as JSON-ready data."""
    from toolchain.fleet.snapshot import device_rows, with_accuracy
    from toolchain.fleet.store import FleetStore

    with FleetStore(db, create=False) as store:
        now = time.time()
        since = now - since_s if since_s > 0 else None
        fleets = [fleet] if fleet else store.fleets()
        latency = store.latency_by_fleet(since=since)
        devices = store.devices(fleet)  # read once: the rows shown and the verdicts beside them are of one moment
        verdicts = device_rows(store, fleet, now, devices)
        keys = ("prediction_drift", "crossings", "estimated_accuracy", "true_accuracy", "certificate")
        return {
            "db": str(store.path), "generated": now, "since": since,
            "devices": [{**row, **{key: verdict[key] for key in keys}} for row, verdict in zip(devices, verdicts)],
            "models": with_accuracy(store.latency_by_model(fleet, since=since), verdicts),
            "fleets": [{**store.fleet_drift(name), "latency": latency.get(name)}
                       for name in fleets],
            "events": store.recent_events(events, fleet=fleet),
            "rejected": store.rejected_count(),
        }


@app.command()
def status(
    db: DbOption = DEFAULT_DB,
    fleet: Annotated[Optional[str], typer.Option(help="only this fleet")] = None,
    since: Annotated[float, typer.Option(help="merge latency over the last SECONDS (0: everything stored)")] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Devices (state, model, last window), merged latency per model version, and fleet drift."""
    if since < 0:
        raise ToolchainError(f"--since must be >= 0 seconds, got {since}")
    data = collect_status(db, fleet, since)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console, now = Console(), data["generated"]
    print_value(console, "store", data["db"])
    # Every column but the prose ones holds values (ids, numbers): no_wrap, never cut (see print_table).
    devices = Table(title="Devices", box=box.SIMPLE_HEAD, header_style="bold",
                    caption="p50/p90/p99: ms, each device's last window; seen: ago; cert: days until its client "
                            "certificate or CA expires (! under 30)")
    devices.add_column("fleet/device", no_wrap=True)
    for column in ("state", "model", "seen", "p50", "p90", "p99", "psi max", "drift", "est. acc", "true acc", "cert"):
        devices.add_column(column, justify="left" if column in ("state", "drift") else "right", no_wrap=True)
    colour = {"online": "green", "offline": "red"}
    for row in data["devices"]:
        latest = row["latest"] or {}
        state = row["state"]
        devices.add_row(f"{escape(row['fleet'])}/{escape(row['device'])}", f"[{colour.get(state, 'yellow')}]{state}[/]",
                        "-" if row["model_version"] is None else f"v{row['model_version']}", _ago(row["last_seen"], now),
                        _ms(latest.get("p50")), _ms(latest.get("p90")), _ms(latest.get("p99")),
                        "-" if latest.get("psi_max") is None else f"{latest['psi_max']:.2f}",
                        " + ".join(["[red]COVARIATE[/]"] * bool(latest.get("alarm")) + ["prediction"] * row["prediction_drift"]),
                        _share(row["estimated_accuracy"]), _share(row["true_accuracy"]), _cert(row["certificate"]))
    print_table(devices, console)
    window = f"last {since:g} s" if since > 0 else "all stored windows"
    models = Table(title=f"Latency per model version, ms (merged sketches, {window})", box=box.SIMPLE_HEAD,
                   header_style="bold")
    for column in ("fleet", "model", "windows", "requests", "p50", "p90", "p99", "est. acc", "true acc"):
        models.add_column(column, justify="left" if column == "fleet" else "right", no_wrap=True)
    for row in data["models"]:
        models.add_row(escape(row["fleet"]), "-" if row["model_version"] is None else f"v{row['model_version']}",
                       str(row["windows"]), str(row["count"]), _ms(row["p50"]), _ms(row["p90"]), _ms(row["p99"]),
                       _share(row["estimated_accuracy"]), _share(row["true_accuracy"]))
    print_table(models, console)
    fleets = Table(title="Fleet drift (latest window of each reporting device)", box=box.SIMPLE_HEAD, header_style="bold")
    fleets.add_column("fleet", no_wrap=True)
    for column in ("reporting", "in alarm", "share", "fleet alarm", "threshold"):
        fleets.add_column(column, justify="left" if column == "fleet alarm" else "right", no_wrap=True)
    fleets.add_column("top PSI (mean)")
    for row in data["fleets"]:
        hot = ", ".join(f"{escape(name)} {v['mean']:.2f}" for name, v in list(row["psi"].items())[:3]) or "-"
        fleets.add_row(escape(row["fleet"]), str(row["reporting"]), str(row["in_alarm"]), f"{100 * row['share']:.0f}%",
                       "[red]ACTIVE[/]" if row["alarm_active"] else "clear",
                       "-" if row["threshold"] is None else f"{100 * row['threshold']:.0f}%", hot)
    print_table(fleets, console)
    if data["events"]:
        events = Table(title="Recent events", box=box.SIMPLE_HEAD, header_style="bold")
        for column in ("when", "fleet/device", "type", "detail"):
            events.add_column(column, no_wrap=column != "detail")
        for event in data["events"]:
            body = event["payload"]
            detail = body.get("reason") or ", ".join(
                f"{c['statistic']} {c['value']:g} >= {c['threshold']:g}" for c in body.get("crossings") or []) or ", ".join(
                f"{key}={body[key]}" for key in ("share", "devices", "psi_max", "ph_alarm", "version", "from_version",
                                                 "to_version") if body.get(key) is not None)
            events.add_row(_ago(event["received_at"], now), f"{escape(event['fleet'])}/{escape(event['device'])}",
                           escape(event["type"]), escape(str(detail))[:200])
        print_table(events, console)
    if data["rejected"]:
        console.print(f"[yellow]{data['rejected']} malformed message(s) rejected by the monitor[/]")


if __name__ == "__main__":  # `python -m toolchain.commands.fleet` before it is mounted in the main CLI
    app()
