"""A throwaway local PostgreSQL for the tests and benchmarks of the PostgreSQL fleet store, as
`ManagedBroker` is a local mosquitto: Debian's postgresql 15 server binaries (`initdb`, `pg_ctl`) in a
temporary data folder on a free loopback port, `trust` authentication on 127.0.0.1 only. Not a way to
run production data: that is the user's own PostgreSQL (`--db postgresql://...`).

PostgreSQL refuses to run as root, and tests often do (CI runs as root): then the server runs as the
`postgres` system user (Debian's package creates it; `runuser` switches to it), otherwise as the current
user. Its root folder must be one that user can own (not pytest's tmp_path, private to root).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

from toolchain.deploy.broker import free_port

PG_BIN = Path(os.environ.get("EDGE_TOOLCHAIN_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its data folder, port, and the OS user it runs as (None: the current user)."""

    data: Path
    port: int
    os_user: str | None
    durable: bool = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of the server's command-line tools as the server's OS user."""
        command = [str(PG_BIN / tool), *args]
        if self.os_user:
            command = ["runuser", "-u", self.os_user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        return self.url(name)


def start_server(root: Path, durable: bool = False) -> PostgresServer:
    """initdb + pg_ctl start in `root`, on a free loopback port; a port taken between choosing and binding
    (another test worker) is retried with a new one. ``durable``: PostgreSQL's own defaults (fsync,
    synchronous commit: what a benchmark must measure); else both off (tests: the data lives for a session)."""
    os_user = SUPERUSER if os.geteuid() == 0 else None
    if os_user:
        entry = pwd.getpwnam(os_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data = root / "data"
    probe = PostgresServer(data=data, port=0, os_user=os_user)
    probe.run("initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-sync")
    for _attempt in range(5):
        server = PostgresServer(data=data, port=free_port(), os_user=os_user, durable=durable)
        try:
            run_server(server)
        except RuntimeError:
            continue
        return server
    raise RuntimeError(f"PostgreSQL did not start; its log: {(root / 'server.log').read_text()}")


def run_server(server: PostgresServer) -> None:
    """pg_ctl start of the server's data folder on its port: its first start, or again after `stop_server`."""
    server.run("pg_ctl", "start", "-w", "-t", "60", "-D", str(server.data), "-l", str(server.data.parent / "server.log"),
               "-o", f"-p {server.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
               "-c max_connections=200" + ("" if server.durable else
                                           " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"))


def stop_server(server: PostgresServer) -> None:
    server.run("pg_ctl", "stop", "-D", str(server.data), "-m", "fast", "-w")
