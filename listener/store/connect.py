"""Where to connect: --dsn, else DATABASE_URL, else libpq's PG* variables, else embedded.

The connection settings pinned here are the ones the canonical entry encoding is defined
under (docs/canonical-entry.md); every connection of the listener uses them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import pq

PINNED_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    # money's text is "$1,234.50" under C, "1.234,50 €" under de_DE: the database's or the
    # role's locale must not decide what a leaf commits to.
    "lc_monetary": "C",
    "client_encoding": "UTF8",
}

LIBPQ_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


@dataclass(frozen=True)
class Target:
    """A resolved database target: a DSN, or None meaning the embedded server."""

    dsn: str | None
    described_as: str

    @property
    def embedded(self) -> bool:
        return self.dsn is None


def resolve(dsn: str | None, environ: dict[str, str] | None = None) -> Target:
    env = os.environ if environ is None else environ
    if dsn:
        return Target(dsn, "--dsn")
    if env.get("DATABASE_URL"):
        return Target(env["DATABASE_URL"], "DATABASE_URL")
    if any(env.get(v) for v in LIBPQ_VARS):
        return Target("", "PG* environment variables")  # libpq reads them itself
    return Target(None, "embedded PostgreSQL")


# Not part of the encoding, but of correctness: the drain and the backfill rely on READ
# COMMITTED taking a new snapshot per statement, whatever the database's default is; and a
# batch must be durable when its COMMIT returns, whatever synchronous_commit the database or
# role sets, before its end_lsn is confirmed to the slot or a checkpoint is signed over it.
SESSION_SETTINGS = {**PINNED_SETTINGS, "default_transaction_isolation": "read committed",
                    "synchronous_commit": "on",
                    # A large replication transaction is one batch transaction whatever it takes,
                    # and a COPY stays open while its rows are hashed: a timeout the database or
                    # role sets would cancel it at every retry and wedge the log. (PostgreSQL 17's
                    # transaction_timeout, unknown to older servers, is set by open_session.)
                    "statement_timeout": "0", "lock_timeout": "0", "idle_in_transaction_session_timeout": "0",
                    "idle_session_timeout": "0"}


# The search_path of the listener's own sessions under `run` (its writers and their probes)
# and `serve`:
# they name every object of theirs with its schema, and a function that a table's owner put
# on the default path could otherwise win the call of a polymorphic built-in (to_json,
# concat, format) and run as the listener's role. Commands such as `source add` keep the
# caller's path, which names the tables they are given.
RUN_SEARCH_PATH = "pg_catalog, pg_temp"


def options_string(*, search_path: str | None = None) -> str:
    """libpq `options` value that pins these settings (and `search_path`, if given) for a
    session of the listener."""
    settings = SESSION_SETTINGS if search_path is None else {**SESSION_SETTINGS, "search_path": search_path}
    return " ".join(f"-c {k.lower()}={v.replace(' ', chr(92) + ' ')}" for k, v in settings.items())


def open_session(dsn: str, *, autocommit: bool, search_path: str | None = None) -> psycopg.Connection:
    """A session of the listener: the settings above, and no transaction_timeout (PostgreSQL
    17 on) either."""
    conn = psycopg.connect(dsn, autocommit=autocommit, options=options_string(search_path=search_path),
                           application_name="merkle-listener")
    try:
        if conn.info.server_version >= 170000:
            conn.execute("SET transaction_timeout = 0")
            if not autocommit:
                conn.commit()
    except BaseException:
        conn.close()
        raise
    return conn


def open_replication(dsn: str) -> pq.PGconn:
    """A walsender connection (replication=database) of the listener, for replication commands
    and streams, with the settings above; the caller checks its status. A walsender decodes,
    and holds an exported snapshot, inside a transaction: transaction_timeout would end it."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info.update(replication="database", options=options_string(), application_name="merkle-listener")
    pgconn = pq.PGconn.connect(psycopg.conninfo.make_conninfo(**info).encode())
    if pgconn.status == pq.ConnStatus.OK and pgconn.server_version >= 170000:
        res = pgconn.exec_(b"SET transaction_timeout = 0")
        if res.status != pq.ExecStatus.COMMAND_OK:
            pgconn.finish()
            raise psycopg.OperationalError(f"replication connection: {res.get_error_message().strip()}")
    return pgconn


def replication_refusal(pgconn: pq.PGconn) -> str:
    """Why a walsender connection failed, with the fix when it is a setting."""
    message = pgconn.get_error_message().strip()
    if "max_wal_senders" in message:
        # PostgreSQL's message names the setting but not who holds the walsenders.
        message += ("; every log a listener streams holds a walsender, `source add --mode replication` takes one "
                    "more while it creates a log's slot, and standbys and base backups take theirs: raise "
                    "max_wal_senders (a restart of PostgreSQL), or stop a stream (pg_stat_replication)")
    return message


class KeptConnection:
    """One autocommit connection of `run` (RUN_SEARCH_PATH) kept open for periodic small
    queries (a new backend per query costs PostgreSQL milliseconds of CPU that the writers
    and the sequencer need).
    Reconnects on the next call after a failure. Not thread-safe: one user at a time."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._conn = None

    def get(self):
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = open_session(self.dsn, autocommit=True, search_path=RUN_SEARCH_PATH)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# What libpq says when the server is not there yet or is starting, stopping or recovering: a
# condition that ends by itself. A refused login, a missing database or a bad DSN does not.
_TRANSIENT = ("connection refused", "no such file or directory", "the database system is",
              "consistent recovery state", "server closed the connection unexpectedly",
              "terminating connection", "timeout expired", "could not translate host name")


def transient(exc: Exception) -> bool:
    """Whether a failure to connect (or a lost connection) may end by itself."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if exc.sqlstate and exc.sqlstate[:2] in ("08", "57"):  # connection exception, operator intervention
        return True
    text = str(exc).lower()
    return any(t in text for t in _TRANSIENT)


def wait_for_server(attempt: Callable[[], None], wait: float, on_retry: Callable[[Exception, float], None]) -> None:
    """Run `attempt` (connect and check) until it succeeds, retrying for up to `wait` seconds
    while it fails for a transient reason; `on_retry(error, delay)` before each pause. Other
    failures, and the last transient one, are raised."""
    deadline = time.monotonic() + wait
    delay = 0.2
    while True:
        try:
            return attempt()
        except psycopg.OperationalError as exc:
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            on_retry(exc, delay)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
