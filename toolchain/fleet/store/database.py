"""One connection, guarded by a lock, so the monitor's network thread and readers in other threads can
share one store. Other processes read and write concurrently: a SQLite file in WAL mode (`toolchain
fleet status` reads while the monitor writes), or PostgreSQL, where several monitor workers write one
database and its unique keys keep them from storing anything twice (`toolchain.fleet.store.backend`).
"""

from __future__ import annotations

import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Self

from toolchain.errors import DatabaseLost, ToolchainError, first_line
from toolchain.fleet.store.backend import connect
from toolchain.fleet.store.schema import _MIGRATIONS, _SCHEMA, SCHEMA_VERSION


def _statements(script: str) -> list[str]:
    """A script's statements (the schema's SQL has no ';' inside literals)."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]


class Database:
    """The connection: created or upgraded (``create=True``, the monitor) or only checked (``create=False``:
    readers neither create nor upgrade a database). ``target``: a SQLite file, or a ``postgresql://`` URL."""

    def __init__(self, target: Path | str, *, create: bool = True) -> None:
        self._backend = connect(target, create=create)
        self.path = self._backend.location  # where the data is (a file, or the URL without its password)
        self.errors, self.retryable = self._backend.errors, self._backend.retryable
        self._lock = threading.RLock()
        self._pending: list[dict[Any, Any]] = []  # per open transaction/savepoint: work left for the commit
        self._open = True
        try:
            tables = self._backend.tables()
            if tables and "meta" not in tables:
                raise ToolchainError(f"{self.path} is not a fleet database (written by `toolchain fleet monitor`)")
            if create:
                self._init_schema()
            else:
                self._check_readable()
        except self.errors as exc:
            self.close()
            raise ToolchainError(f"{self.path} is not a usable fleet database: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _schema_version(self) -> int | None:
        """The database's schema version; None for a new (empty) one."""
        if "meta" not in self._backend.tables():
            return None
        row = self._backend.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else int(row[0])

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise ToolchainError(f"{self.path} has fleet schema {version}; this toolchain understands up to "
                                 f"{SCHEMA_VERSION} (upgrade the toolchain)")

    def _check_readable(self) -> None:
        """Readers neither create nor upgrade: a database the monitor has not upgraded yet is an error."""
        version = self._schema_version()
        if version is None:
            raise ToolchainError(f"{self.path} is not a fleet database (written by `toolchain fleet monitor`)")
        self._refuse_newer(version)
        if version < SCHEMA_VERSION:
            raise ToolchainError(f"{self.path} has fleet schema {version} from an older toolchain; run "
                                 f"`toolchain fleet monitor --db {self.path}` once to upgrade it")

    def _init_schema(self) -> None:
        """Create the tables, or upgrade older ones one migration step at a time, all in one transaction
        that also excludes other monitors doing the same."""
        with self._tx() as db:
            db.lock_schema()
            version = self._schema_version()
            if version is not None:
                self._refuse_newer(version)
            while version is not None and version < SCHEMA_VERSION:
                for statement in _statements(_MIGRATIONS[version]):
                    db.execute(db.ddl(statement))
                version = self._schema_version()
            for statement in _statements(_SCHEMA):
                db.execute(db.ddl(statement))
            db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
                       (str(SCHEMA_VERSION),))
            db.execute("INSERT INTO meta (key, value) VALUES ('client_id', ?) ON CONFLICT (key) DO NOTHING",
                       (f"fleet-monitor-{secrets.token_hex(6)}",))

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One write: its own transaction, or inside `batch` a savepoint (a failed write undoes only itself).
        Yields the backend (``execute(sql, params)`` with ``?`` placeholders). What a write leaves for the
        end of its transaction (`_pending`) is kept only if the write succeeds: `_before_commit` writes it,
        `_after_commit` keeps what is true once committed."""
        with self._lock, self._lost():
            db = self._db()
            nested = db.in_transaction
            db.execute("SAVEPOINT write" if nested else db.begin)
            self._pending.append({})
            try:
                try:
                    yield db
                finally:
                    done = self._pending.pop()
                if nested:
                    self._merge_pending(self._pending[-1], done)
                else:
                    self._before_commit(db, done)
            except BaseException:
                if self._open and not db.broken:  # a dropped connection took its transaction with it
                    db.execute("ROLLBACK TO SAVEPOINT write" if nested else "ROLLBACK")
                    if nested:
                        db.execute("RELEASE SAVEPOINT write")
                raise
            db.execute("RELEASE SAVEPOINT write" if nested else "COMMIT")
            if not nested:
                self._after_commit(done)

    def _merge_pending(self, into: dict[Any, Any], done: dict[Any, Any]) -> None:
        """A nested write succeeded: what it left joins its transaction's (`StoreWrites` combines by key)."""
        into.update(done)

    def _before_commit(self, db: Any, pending: dict[Any, Any]) -> None:
        """Write what the transaction's writes left for its end (nothing here; see `StoreWrites`)."""

    def _after_commit(self, pending: dict[Any, Any]) -> None:
        """The transaction committed (nothing here; see `StoreWrites`)."""

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes, one commit. Why: the monitor stores what arrived together in one transaction; a
        commit per message costs about twice the insert itself and writes the shared pages (device rows,
        index pages) again for every message. Other threads' reads wait until the commit."""
        with self._tx():
            yield

    @property
    def disconnected(self) -> bool:
        """The database server dropped the connection (PostgreSQL restarted): the next write or read
        connects again (DatabaseLost while it cannot); what failed meanwhile can be tried again."""
        return self._open and self._backend.broken

    @contextmanager
    def _lost(self) -> Iterator[None]:
        """A database error (or a failed reconnect) with the connection dropped becomes DatabaseLost."""
        try:
            yield
        except (*self.errors, ToolchainError) as exc:
            if not self.disconnected:
                raise
            raise DatabaseLost(f"lost the fleet database {self.path}: {first_line(exc)}") from exc

    def _db(self) -> Any:
        """The connection; a dropped one is replaced first, between transactions only (a transaction's
        writes must all go to the connection that began it: its loss fails the whole transaction)."""
        if not self._open:
            raise ToolchainError(f"fleet database {self.path} is closed")
        if self._backend.broken and not self._pending:
            self._backend.reconnect()
        return self._backend

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock, self._lost():
            cursor = self._db().execute(sql, params)
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client_id(self) -> str:
        """A stable MQTT client id for the monitor of this database (made once, kept in ``meta``)."""
        return self._rows("SELECT value FROM meta WHERE key = 'client_id'")[0]["value"]
