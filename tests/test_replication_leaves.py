"""The same awkward rows give the same leaves whether captured by trigger or by replication.

Two databases hold the same table (same "<schema>.<table>", so the same entry "source"); one
captures it with the statement trigger, the other through the log's slot. Rows come from
writer sessions whose TimeZone, DateStyle, IntervalStyle, extra_float_digits and
bytea_output all differ from the pinned ones (the value list of tests/test_canonical_sql.py).
"""

from __future__ import annotations

import psycopg
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from psycopg import sql

from listener import registry
from listener.runner import connect
from listener.sequencer import Sequencer
from tests.conftest import TEMPLATE
from tests.helpers import check_log, start_listener
from tests.test_canonical_sql import ROWS, SCHEMA, TABLE, WRITERS, _insert
from tests.test_canonical_sql import source_table as make_table  # noqa: F401 (fixture body reused below)
from tests.test_replication import wait_for_size

N_ROWS = 80


def _make_source_table(conn) -> None:
    make_table.__wrapped__(conn)
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(sql.Identifier(SCHEMA, TABLE)))
    # Left out of the default column set in both modes (pgoutput does not send it).
    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN derived boolean GENERATED ALWAYS AS (id IS NULL) STORED").format(
        sql.Identifier(SCHEMA, TABLE)))


def _draw_rows(n: int) -> list[tuple[dict, str]]:
    """n rows and writer sessions drawn by Hypothesis, the same on every run (derandomized)."""
    drawn = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(row=ROWS, writer=st.sampled_from(WRITERS))
    def collect(row, writer):
        drawn.append((row, writer))

    collect()
    return drawn


def test_trigger_and_replication_leaves_are_identical(pg_server, conn):
    rows = _draw_rows(N_ROWS)
    base = conn.info.dbname
    names = [f"{base}_trg", f"{base}_repl"]
    dsns = [pg_server.dsn(n) for n in names]
    try:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            for n in names:
                _drop_database(pg_server, n)
                admin.execute(f"CREATE DATABASE {n} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
        trg_dsn, repl_dsn = dsns
        for d in dsns:
            with connect(d, autocommit=True) as c:
                _make_source_table(c)
                registry.create_log(c, "same")
        qualified = f'"{SCHEMA}"."{TABLE.replace(chr(34), chr(34) * 2)}"'
        with connect(trg_dsn) as c:
            registry.add_source(c, "same", qualified, key=["id"])
        with connect(repl_dsn) as c:
            registry.add_source(c, "same", qualified, key=["id"], mode="replication")
        for i, (row, writer) in enumerate(rows, start=1):
            for d in dsns:
                _insert(d, writer, i, row)
        with connect(trg_dsn) as c:
            Sequencer(c, "same").drain_all()
            c.commit()
        listener = start_listener(repl_dsn)
        try:
            with connect(repl_dsn, autocommit=True) as c:
                wait_for_size(c, "same", len(rows), listener=listener)
        finally:
            listener.stop()
        with connect(trg_dsn, autocommit=True) as c1, connect(repl_dsn, autocommit=True) as c2:
            by_trigger = [(r[2], bytes(r[4])) for r in check_log(c1, "same")]
            by_replication = [(r[2], bytes(r[4])) for r in check_log(c2, "same")]
        assert len(by_trigger) == len(rows)
        assert by_replication == by_trigger
    finally:
        for n in names:
            _drop_database(pg_server, n)


def _drop_database(pg_server, name: str) -> None:
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            with psycopg.connect(pg_server.dsn(name), autocommit=True) as c:
                c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                          "WHERE database = current_database()")
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
