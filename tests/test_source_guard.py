"""The DDL guard: ALTER TABLE may not break capture or change what a source's leaves hash."""

from __future__ import annotations

import psycopg
import pytest

from listener import registry
from listener.runner import connect
from listener.sequencer import Sequencer
from tests.helpers import check_log


@pytest.fixture
def source(conn, dsn):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body varchar(4), at timestamptz)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "notes", append_only=True)
    return conn


@pytest.mark.parametrize("ddl, why", [
    ("ALTER TABLE notes RENAME COLUMN body TO text", 'column body is hashed'),
    ("ALTER TABLE notes DROP COLUMN body", 'column body is hashed'),
    ("ALTER TABLE notes ALTER body TYPE varchar(40)", 'column body is hashed'),
    ("ALTER TABLE notes ALTER at TYPE timestamp", 'column at is hashed'),
    ("ALTER TABLE notes RENAME TO memos", "may not be renamed"),
    ("ALTER TABLE notes DISABLE TRIGGER merkle_capture_1", "merkle_capture_1 may not be disabled"),
    ("ALTER TABLE notes DISABLE TRIGGER ALL", "may not be disabled"),
    ("ALTER TABLE notes ENABLE TRIGGER merkle_guard_1", "merkle_guard_1 may not be disabled"),
])
def test_alter_that_would_break_capture_is_refused(source, ddl, why):
    with pytest.raises(psycopg.Error, match="ALTER TABLE refused on public.notes") as exc:
        source.execute(ddl)
    assert exc.value.sqlstate == "ML101" and why in str(exc.value)
    source.execute("INSERT INTO notes VALUES (1, 'abcd', now())")  # capture still works


def test_adding_a_column_is_allowed_and_capture_goes_on(source, dsn):
    source.execute("ALTER TABLE notes ADD COLUMN extra int")
    source.execute("INSERT INTO notes VALUES (1, 'abcd', now(), 7)")
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 1
    check_log(source, "audit")


def test_session_replication_role_does_not_bypass_capture_or_guard(source, dsn):
    source.execute("SET session_replication_role = replica")
    source.execute("INSERT INTO notes VALUES (1, 'x', now())")
    with pytest.raises(psycopg.Error, match="append-only"):
        source.execute("DELETE FROM notes")
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 1


def test_replication_source_guard_allows_harmless_alter_and_refuses_disabling(conn, dsn):
    conn.execute("CREATE TABLE facts (id int PRIMARY KEY, body text)")
    registry.create_log(conn, "audit")
    try:
        with connect(dsn) as c:
            registry.add_source(c, "audit", "facts", mode="replication", append_only=True, dsn=dsn)
        conn.execute("ALTER TABLE facts ADD COLUMN extra int")
        conn.execute("ALTER TABLE facts REPLICA IDENTITY FULL")
        with pytest.raises(psycopg.Error, match="may not be disabled"):
            conn.execute("ALTER TABLE facts DISABLE TRIGGER ALL")
        with pytest.raises(psycopg.Error, match="append-only"):
            conn.execute("TRUNCATE facts")
    finally:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"):
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
