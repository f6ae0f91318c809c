"""One connection, guarded by a lock, so the monitor's network thread and readers in other threads can
share one store; other processes (`toolchain fleet status`) read concurrently thanks to WAL.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Self

from toolchain.errors import ToolchainError
from toolchain.fleet.store.schema import _MIGRATIONS, _SCHEMA, SCHEMA_VERSION


class Database:
    """The connection: opened in WAL mode, created or upgraded (``create=True``, the monitor) or only
    checked (``create=False``: readers neither create nor upgrade a file)."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ToolchainError(f"no fleet database at {self.path}; start `toolchain fleet monitor --db {self.path}` first")
        if self.path.is_dir():
            raise ToolchainError(f"{self.path} is a folder, not a fleet database file")
        self._lock = threading.RLock()
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise ToolchainError(f"cannot open the fleet database {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ToolchainError(f"{self.path}: cannot switch the fleet database to WAL mode (got {mode!r})")
            # NORMAL in WAL: a committed window survives a crash of the monitor; a power cut may lose the
            # last few, which the persistent MQTT session does not re-send (they were acknowledged).
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn: sqlite3.Connection | None = conn
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:
                raise ToolchainError(f"{self.path} is not a fleet database (written by `toolchain fleet monitor`)")
            if create:
                self._init_schema()
            else:
                self._check_readable()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ToolchainError(f"{self.path} is not a usable fleet database: {exc}") from None
        except BaseException:
            conn.close()
            raise

    def _schema_version(self) -> int | None:
        """The file's schema version; None for a new (empty) file."""
        conn = self._db()
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else int(row[0])

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise ToolchainError(f"{self.path} has fleet schema {version}; this toolchain understands up to "
                                 f"{SCHEMA_VERSION} (upgrade the toolchain)")

    def _check_readable(self) -> None:
        """Readers neither create nor upgrade: a file the monitor has not upgraded yet is an error."""
        version = self._schema_version()
        if version is None:
            raise ToolchainError(f"{self.path} is not a fleet database (written by `toolchain fleet monitor`)")
        self._refuse_newer(version)
        if version < SCHEMA_VERSION:
            raise ToolchainError(f"{self.path} has fleet schema {version} from an older toolchain; run "
                                 f"`toolchain fleet monitor --db {self.path}` once to upgrade it")

    def _init_schema(self) -> None:
        with self._lock:
            conn = self._db()
            version = self._schema_version()
            if version is not None:
                self._refuse_newer(version)
            while version is not None and version < SCHEMA_VERSION:
                # One transaction per step (executescript runs the BEGIN/COMMIT inside the script).
                try:
                    conn.executescript(f"BEGIN IMMEDIATE;\n{_MIGRATIONS[version]}\nCOMMIT;")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                version = self._schema_version()
            conn.executescript(_SCHEMA)
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('client_id', ?)",
                           (f"fleet-monitor-{secrets.token_hex(6)}",))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write: its own transaction, or inside `batch` a savepoint (a failed write undoes only itself)."""
        with self._lock:
            conn = self._db()
            nested = conn.in_transaction
            conn.execute("SAVEPOINT write" if nested else "BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO write" if nested else "ROLLBACK")
                if nested:
                    conn.execute("RELEASE write")
                raise
            conn.execute("RELEASE write" if nested else "COMMIT")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes, one commit. Why: the monitor stores what arrived together in one transaction; a
        commit per message costs about twice the insert itself and writes the shared pages (device rows,
        index pages) into the WAL again for every message. Other threads' reads wait until the commit."""
        with self._tx():
            yield

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ToolchainError(f"fleet database {self.path} is closed")
        return self._conn

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db().execute(sql, tuple(params))
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client_id(self) -> str:
        """A stable MQTT client id for the monitor of this database (made once, kept in ``meta``)."""
        return self._rows("SELECT value FROM meta WHERE key = 'client_id'")[0]["value"]
