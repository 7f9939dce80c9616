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
    ("ALTER TRIGGER merkle_capture_1 ON notes RENAME TO innocent", "may not be altered or renamed"),
])
def test_alter_that_would_break_capture_is_refused(source, ddl, why):
    with pytest.raises(psycopg.Error, match="ALTER refused on public.notes") as exc:
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


def test_replication_source_guard_allows_harmless_alter_and_refuses_disabling(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE facts (id int PRIMARY KEY, body text)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "facts", mode="replication", append_only=True, dsn=dsn)
    conn.execute("ALTER TABLE facts ADD COLUMN extra int")
    conn.execute("ALTER TABLE facts REPLICA IDENTITY FULL")
    with pytest.raises(psycopg.Error, match="may not be disabled"):
        conn.execute("ALTER TABLE facts DISABLE TRIGGER ALL")
    with pytest.raises(psycopg.Error, match="append-only"):
        conn.execute("TRUNCATE facts")


def test_drop_trigger_is_refused_but_source_remove_works(source, dsn):
    with pytest.raises(psycopg.Error, match="DROP TRIGGER refused") as exc:
        source.execute("DROP TRIGGER merkle_capture_1 ON notes")
    assert exc.value.sqlstate == "ML101"
    with connect(dsn) as c:
        assert registry.remove_source(c, "audit", "notes") == 0
    assert source.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'notes'::regclass").fetchone()[0] == 0


def test_roles_that_cannot_read_merkle_can_still_alter_their_tables(source, dsn):
    source.execute("DROP ROLE IF EXISTS app_owner")
    source.execute("CREATE ROLE app_owner LOGIN")
    source.execute("GRANT CREATE ON SCHEMA public TO app_owner")
    try:
        with psycopg.connect(dsn, user="app_owner", autocommit=True) as app:
            app.execute("CREATE TABLE mine (id int)")
            app.execute("ALTER TABLE mine ADD COLUMN x int")
            app.execute("ALTER TABLE mine RENAME TO ours")
            app.execute("DROP TABLE ours")
    finally:
        source.execute("REVOKE CREATE ON SCHEMA public FROM app_owner")
        source.execute("DROP ROLE app_owner")


def test_replica_identity_must_stay_full_while_updates_are_logged(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
    conn.execute("ALTER TABLE accounts REPLICA IDENTITY FULL")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "accounts", mode="replication", events=["insert", "update", "delete"],
                            dsn=dsn)
    with pytest.raises(psycopg.Error, match="REPLICA IDENTITY must stay FULL"):
        conn.execute("ALTER TABLE accounts REPLICA IDENTITY DEFAULT")
