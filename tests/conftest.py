"""Fixtures: one throwaway PostgreSQL cluster per test session, a fresh database per test.

The cluster is the embedded server the product ships (listener.embedded), started in a
temporary directory with wal_level=logical and stopped at the end of the session. The
migrations are applied once to a template; each test gets its own copy.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from listener.embedded import EmbeddedPostgres
from listener.store import migrate
from listener.store.connect import options_string

TEMPLATE = "merkle_template"
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    base = Path(tempfile.mkdtemp(prefix="ml-test-", dir=os.environ.get("MERKLE_TEST_TMP")))
    # fsync=off only speeds tests up: a PostgreSQL crash (-m immediate) still keeps the WAL
    # that the OS holds, so durability tests stay meaningful.
    server = EmbeddedPostgres(base, settings={"fsync": "off", "full_page_writes": "off", "max_connections": "200"})
    server.start(owned=True)
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        with psycopg.connect(server.dsn(TEMPLATE)) as conn:
            migrate.apply(conn)
        yield server
    finally:
        server.destroy()


@pytest.fixture
def dsn(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """DSN of a fresh database with the merkle schema applied, dropped after the test."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
    yield pg_server.dsn(name)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection with the pinned canonical-encoding settings."""
    with psycopg.connect(dsn, autocommit=True, options=options_string()) as c:
        yield c


@pytest.fixture
def rconn(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """`conn`, and afterwards no slot of the test's database is left behind (each pins WAL,
    and DROP DATABASE refuses a database with a slot)."""
    from tests.helpers import slots

    try:
        yield conn
    finally:
        for name in slots(conn):
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND active_pid IS NOT NULL", (name,))
            for _ in range(50):
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                    break
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.1)
