"""A real PostgreSQL for the tests (`toolchain.fleet.store.local_server`: Debian's postgresql 15 in a
temporary folder on a free loopback port, as a non-root user): one server per test session (per
pytest-xdist worker), durability off, and a fresh database per test.

Imported by tests/conftest.py, so any test can ask for `postgres_url` (or `postgres_server`).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from toolchain.fleet.store.local_server import PostgresServer, start_server, stop_server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for this session (or xdist worker). Its folder is made with tempfile, not pytest's
    tmp_path: pytest's is private to root, and the server runs as another user."""
    root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
    try:
        server = start_server(root)
        try:
            yield server
        finally:
            stop_server(server)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database for this test: its `postgresql://user@127.0.0.1:port/name` URL."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")
