"""The two databases the fleet store runs on, behind one small connection interface: a SQLite file (the
default: nothing to install or run) and PostgreSQL (``postgresql://...``: several monitor workers on
several machines writing one database). The store's SQL is written once, with ``?`` placeholders and
what both understand (``ON CONFLICT``, ``RETURNING``, row values); a backend only translates what differs:
the placeholder, the DDL types, and how to list tables, lock the schema and tell retryable errors.

PostgreSQL goes through psycopg 3 (the optional extra ``edge-toolchain[postgres]``), used directly as
a DB-API connection: the store's SQL is already hand-written and per-statement, so a query builder would
only add a layer; psycopg's binary protocol and server-side parameters keep the per-message cost low.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from toolchain.errors import ToolchainError, first_line

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_INSERT_VALUES = re.compile(r"INSERT INTO (\w+) \(([^)]*)\) VALUES \{rows\}")
_PYTHON_TYPES = {"bigint": int, "integer": int, "double precision": float, "text": str}
INSTALL_HINT = "pip install 'edge-toolchain[postgres]'"


def is_postgres(target: Path | str) -> bool:
    return str(target).startswith(POSTGRES_SCHEMES)


def _journal_mode_wal(conn: sqlite3.Connection, wait_s: float = 10.0) -> str:
    """``PRAGMA journal_mode=WAL``; the mode it leaves. Why a loop: switching the mode takes the file's
    exclusive lock, and SQLite answers "database is locked" at once, without its busy handler, while
    another connection holds a lock (a monitor creating the schema as `fleet status` opens the file,
    or two writers opening a new file together); it is tried again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


class SQLiteBackend:
    """A SQLite file in WAL mode: other processes read while the monitor writes."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    retryable: tuple[type[BaseException], ...] = ()  # writers are serialized by BEGIN IMMEDIATE
    begin = "BEGIN IMMEDIATE"
    broken = False  # a file does not drop its connection

    def __init__(self, path: Path, *, create: bool) -> None:
        self.location = path
        if not create and not path.is_file():
            raise ToolchainError(f"no fleet database at {path}; start `toolchain fleet monitor --db {path}` first")
        if path.is_dir():
            raise ToolchainError(f"{path} is a folder, not a fleet database file")
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise ToolchainError(f"cannot open the fleet database {path}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            mode = _journal_mode_wal(conn)
            if str(mode).lower() != "wal":
                raise ToolchainError(f"{path}: cannot switch the fleet database to WAL mode (got {mode!r})")
            # NORMAL in WAL: a committed window survives a crash of the monitor; a power cut may lose the
            # last few, which the persistent MQTT session does not re-send (they were acknowledged).
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ToolchainError(f"{path} is not a usable fleet database: {exc}") from None
        self.conn = conn

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return self.conn.execute(sql, tuple(params))

    def ddl(self, sql: str) -> str:
        return sql

    def insert_many(self, sql: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``sql`` (an INSERT whose ``VALUES {rows}`` takes one ``(?, ...)`` per row, ``RETURNING ...``) for
        all ``rows`` in one statement; the rows it returned."""
        values = "(" + ", ".join("?" * len(rows[0])) + ")"
        return self.execute(sql.format(rows=", ".join([values] * len(rows))),
                            [value for row in rows for value in row]).fetchall()

    def tables(self) -> set[str]:
        return {row[0] for row in self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def lock_schema(self) -> None:
        """Nothing to do: the schema transaction's BEGIN IMMEDIATE already excludes other writers."""

    def close(self) -> None:
        self.conn.close()


class PostgresBackend:
    """A PostgreSQL database that exists (create it with `createdb`; the store creates its tables). The
    connection is in autocommit mode: the store issues BEGIN/COMMIT itself, as on SQLite."""

    begin = "BEGIN"
    _TYPES = ((re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
              (re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"))

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise ToolchainError(f"--db {redact(url)}: PostgreSQL needs the psycopg driver: {INSTALL_HINT}") from None
        self.location = redact(url)
        self.errors = (psycopg.Error,)
        # Two writers' transactions can wait on each other (both touch the same devices): PostgreSQL aborts
        # one; it is retried. A serialization failure is the same kind of transient conflict.
        self.retryable = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
        self._url = url
        self.conn = self._connect()
        self._sql: dict[str, str] = {}
        self._unnest: dict[str, tuple[str, list[type]]] = {}

    def _connect(self) -> Any:
        import psycopg

        try:
            conn = psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ToolchainError(f"cannot open the fleet database {self.location}: {first_line(exc)}") from None
        try:
            # A window's drift report (~2.5 KB with 64 features) is compressed as it is stored: LZ4 costs the
            # server ~16 us less per window than its default pglz. A server built without LZ4 keeps pglz.
            conn.execute("SET default_toast_compression = lz4")
        except psycopg.Error:
            pass
        return conn

    @property
    def broken(self) -> bool:
        """The server dropped the connection (restarted, or the network went away): `reconnect`."""
        return bool(self.conn.closed)

    def reconnect(self) -> None:
        """A new connection in place of a dropped one; ToolchainError while the server cannot be reached."""
        self.conn = self._connect()

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.conn.info.transaction_status != TransactionStatus.IDLE

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        translated = self._sql.get(sql)
        if translated is None:
            translated = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return self.conn.execute(translated, tuple(params))

    def insert_many(self, sql: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """One statement whatever the number of rows: ``VALUES {rows}`` becomes ``SELECT * FROM unnest(...)``
        of one array per column, typed as the table's columns. Why: the server plans and runs one statement
        instead of one per row, and psycopg dumps each column's values in one go (binary, so the ~3 KB JSON
        texts need no escaping). Against the one-row statement pipelined once per row, a monitor worker's
        batches of 50 windows on a local PostgreSQL took 83 instead of 128 us of the worker's CPU per
        window, and 155 instead of 222 us of wall time (the server's share included)."""
        statement = self._unnest.get(sql)
        if statement is None:
            statement = self._unnest[sql] = self._unnest_statement(sql)
        query, kinds = statement
        columns = [[None if value is None else kind(value) for value in column] for kind, column in zip(kinds, zip(*rows))]
        return self.conn.execute(query, columns).fetchall()

    def _unnest_statement(self, sql: str) -> tuple[str, list[type]]:
        """``sql`` with its VALUES as an unnest of typed arrays, and the Python type each column's values are
        given (a column of floats with an int among them is dumped as one float array)."""
        match = _INSERT_VALUES.match(sql)
        if match is None:
            raise ValueError(f"insert_many needs 'INSERT INTO table (columns) VALUES {{rows}} ...', got {sql[:80]!r}")
        table, columns = match[1], [column.strip() for column in match[2].split(",")]
        types = dict(self.conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                       "WHERE table_schema = current_schema() AND table_name = %s", (table,)).fetchall())
        arrays = ", ".join(f"%b::{types[column]}[]" for column in columns)  # binary: no escaping
        query = sql.replace("%", "%%").replace("?", "%s").replace("VALUES {rows}", f"SELECT * FROM unnest({arrays})")
        return query, [_PYTHON_TYPES.get(types[column], str) for column in columns]

    def ddl(self, sql: str) -> str:
        """SQLite's DDL in PostgreSQL's types: 8-byte integers and floats (REAL is 4 bytes there)."""
        for pattern, replacement in self._TYPES:
            sql = pattern.sub(replacement, sql)
        return sql

    def tables(self) -> set[str]:
        return {row[0] for row in self.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}

    def lock_schema(self) -> None:
        """Workers starting together: one creates or upgrades the schema, the others wait and find it done."""
        self.execute("SELECT pg_advisory_xact_lock(7231604)")

    def close(self) -> None:
        self.conn.close()


def redact(url: str) -> str:
    """The URL without its password, for messages and listings."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(target: Path | str, *, create: bool) -> SQLiteBackend | PostgresBackend:
    """The backend for ``--db``: a ``postgresql://`` URL, else a SQLite file path."""
    if is_postgres(target):
        return PostgresBackend(str(target))
    return SQLiteBackend(Path(target), create=create)
