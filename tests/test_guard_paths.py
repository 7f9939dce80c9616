"""The DDL guard against the other ways PostgreSQL offers to do what it refuses (found by
review): replacing a merkle-listener trigger with CREATE OR REPLACE TRIGGER; renaming a
source's table or hashed columns under other command tags (ALTER INDEX, VIEW, MATERIALIZED
VIEW, FOREIGN TABLE, TYPE ... CASCADE, SCHEMA); dropping or renaming them through a parent
table; changing an append-only source's rows through a parent; renaming a hashed enum's
values; `guard install` copying sources of tables that do not exist; a trigger of another
role's function on a source (it runs as whoever writes there); dropping a source through what
it depends on; changing the attributes of a hashed composite type; hashing OID-alias columns.
Each test makes the attempt as a role the guard protects the sources from, and shows it
refused (ML101) with the committed rows unchanged; where the attempt is let through, it shows
what it changed."""

from __future__ import annotations

import contextlib
import re
import shlex
import threading
import time
from typing import NamedTuple

import psycopg
import pytest

from listener.store.connect import options_string
from tests.helpers import cli
from tests.test_guard_role import _guard_cli, owned  # noqa: F401 (the fixture)
from tests.test_nonsuperuser import plain  # noqa: F401 (the fixture)

# Fifty set-ups of a role's schema with the guard: run where the catalogs and event triggers
# differ most, PostgreSQL 15 and 18 (each check is plain catalog SQL, the same from 15 on).
pytestmark = pytest.mark.oldest_and_newest


class Guarded(NamedTuple):
    su: psycopg.Connection  # a superuser's session
    app: psycopg.Connection  # the session of the role that owns schema merkle and the tables
    role: str
    dsn: str  # the role's
    writer: str  # another plain role


@pytest.fixture
def guarded(plain, owned) -> Guarded:
    """A role's schema merkle with the guard installed by a superuser and a log "audit"."""
    su, app, role = owned
    _, dsn, _, writer = plain
    assert _guard_cli(su, "install").returncode == 0
    cli("log", "create", "audit", dsn=dsn, check=True)
    return Guarded(su, app, role, dsn, writer)


def _connect_as(dsn: str, role: str) -> psycopg.Connection:
    return psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user=role), autocommit=True, options=options_string())


def _wait_until_waiting_for_a_lock(su: psycopg.Connection, statement_start: str) -> None:
    """Until a session running a statement that starts so waits for a lock (30 s at most)."""
    deadline = time.monotonic() + 30
    while not su.execute("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                         "AND starts_with(query, %s))", (statement_start,)).fetchone()[0]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _let_through(conn: psycopg.Connection, statement: str) -> bool:
    """Run it: False when the guard refuses it (ML101), True when it went through."""
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        assert exc.sqlstate == "ML101", exc
        return False
    return True


def _text_kept(guarded: Guarded, conn: psycopg.Connection, column_type: str, value: str, change: str) -> None:
    """A source hashing a column of `column_type`, a committed row holding `value`: `change`,
    run by `conn`, is refused (ML101) or leaves that value's text as it was."""
    su, app, role, dsn, writer = guarded
    app.execute(f"CREATE TABLE invoices (id int PRIMARY KEY, amounts {column_type})")
    cli("source", "add", "audit", "invoices", dsn=dsn, check=True)
    app.execute("INSERT INTO invoices VALUES (1, %s)", (value,))
    before = su.execute("SELECT amounts::text FROM invoices").fetchone()[0]
    if _let_through(conn, change):
        after = su.execute("SELECT amounts::text FROM invoices").fetchone()[0]
        assert after == before, (f"{change!r} changed the text of a committed hashed value without a leaf: "
                                 f"{before} -> {after}")


# --------------------------------------------------------------------------------------------------
# CREATE [OR REPLACE] TRIGGER needs only the TRIGGER privilege, not ownership: a role given it
# could swap a source's capture trigger for a no-op, where DROP TRIGGER is refused it. A trigger
# of a merkle-listener name on a source (or a partition of one) is merkle-listener's to create.


def _other(dsn, su, writer) -> psycopg.Connection:
    """The writer role, with a schema of its own for its trigger function."""
    su.execute(f"CREATE SCHEMA w AUTHORIZATION {writer}")
    conn = _connect_as(dsn, writer)
    conn.execute("CREATE FUNCTION w.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
    return conn


def test_a_role_with_trigger_privilege_cannot_replace_the_capture_trigger(guarded):
    su, app, role, dsn, writer = guarded
    cli("source", "add", "audit", "payments", dsn=dsn, check=True)
    sid = su.execute("SELECT source_id FROM merkle.sources WHERE table_name = 'payments'").fetchone()[0]
    app.execute(f"GRANT TRIGGER, INSERT ON payments TO {writer}")  # e.g. for an audit trigger of its own
    w = _other(dsn, su, writer)
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # it may not drop it...
            w.execute(f"DROP TRIGGER merkle_capture_{sid} ON payments")
        replaced = None
        try:  # ...and must not replace it
            w.execute(f"CREATE OR REPLACE TRIGGER merkle_capture_{sid} AFTER INSERT ON payments "
                      "FOR EACH STATEMENT EXECUTE FUNCTION w.noop()")
            replaced = su.execute("SELECT tgfoid::regproc::text, tgenabled FROM pg_trigger "
                                  "WHERE tgname = %s", (f"merkle_capture_{sid}",)).fetchone()
        except psycopg.Error as exc:
            assert exc.sqlstate == "ML101", exc
        w.execute("INSERT INTO payments VALUES (1, 7)")
        captured = su.execute(f"SELECT count(*) FROM merkle.outbox_{sid}").fetchone()[0]
        assert replaced is None and captured == 1, (
            f"capture trigger replaced by another role: now {replaced}; an insert captured {captured} rows")
    finally:
        w.close()


@pytest.mark.parametrize("trigger, then", [
    ("merkle_partition_{sid} BEFORE TRUNCATE ON m_2025", "ALTER TABLE m DETACH PARTITION m_2025"),
    ("merkle_guard_{sid} BEFORE UPDATE OR DELETE ON m", "DELETE FROM m"),  # append-only
])
def test_a_member_of_the_owning_role_cannot_replace_a_guard_trigger(guarded, trigger, then):
    """A co-owner (member of the role that owns the tables), held back by the guard from
    dropping or disabling these triggers, replaces one and then removes committed rows. (A
    member can act as the owner, who may mark its own DDL: this guards against mistakes, as
    docs/replication.md says, not against a member set on it.)"""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    app.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    cli("source", "add", "audit", "m", "--mode", "replication", "--append-only", dsn=dsn, check=True)
    sid = su.execute("SELECT source_id FROM merkle.sources WHERE table_name = 'm'").fetchone()[0]
    app.execute("INSERT INTO m VALUES (1, '2025-02-01', 1)")
    su.execute(f"GRANT {role} TO {writer}")
    w = _other(dsn, su, writer)
    try:
        name = trigger.format(sid=sid).split()[0]
        table = trigger.split()[-1]
        for refused in (f"DROP TRIGGER {name} ON {table}", f"ALTER TABLE {table} DISABLE TRIGGER {name}", then):
            with pytest.raises(psycopg.Error) as exc:
                w.execute(refused)
            assert exc.value.sqlstate in ("ML100", "ML101"), exc.value  # the guard's, or the trigger's own refusal
        try:
            w.execute(f"CREATE OR REPLACE TRIGGER {trigger.format(sid=sid)} FOR EACH STATEMENT "
                      "EXECUTE FUNCTION w.noop()")
        except psycopg.Error as exc:
            assert exc.sqlstate == "ML101", exc
            return  # refused: safe
        outcome = "refused"
        try:
            w.execute(then)
            outcome = "let through"
        except psycopg.Error as exc:
            outcome = f"refused ({exc.sqlstate})"
        left = su.execute("SELECT count(*) FROM m").fetchone()[0]
        pytest.fail(f"CREATE OR REPLACE TRIGGER {name} was let through; then {then!r} was {outcome}; "
                    f"rows left in the source: {left} (1 committed)")
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# PostgreSQL renames a table's columns with ALTER VIEW, MATERIALIZED VIEW and FOREIGN TABLE ...
# RENAME COLUMN too, a typed table's with ALTER TYPE ... RENAME ATTRIBUTE ... CASCADE, a table
# with ALTER INDEX ... RENAME and its schema with ALTER SCHEMA ... RENAME. Swapping two hashed
# columns' names would move every committed value to the other column without a leaf.


def _source(guarded):
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE inv (id int PRIMARY KEY, a numeric, b numeric)")
    cli("source", "add", "audit", "inv", dsn=dsn, check=True)
    app.execute("INSERT INTO inv VALUES (1, 10, 20)")
    return su, app


def test_alter_table_rename_column_is_refused(guarded):
    """The rule the other tags must keep, as ALTER TABLE keeps it."""
    su, app = _source(guarded)
    with pytest.raises(psycopg.Error) as exc:
        app.execute("ALTER TABLE inv RENAME COLUMN a TO tmp")
    assert exc.value.sqlstate == "ML101"


@pytest.mark.parametrize("kind", ["VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE"])
def test_rename_column_under_another_tag_is_refused(guarded, kind):
    su, app = _source(guarded)
    if not _let_through(app, f"ALTER {kind} inv RENAME COLUMN a TO tmp"):
        return  # refused
    app.execute(f"ALTER {kind} inv RENAME COLUMN b TO a")
    app.execute(f"ALTER {kind} inv RENAME COLUMN tmp TO b")
    row = su.execute("SELECT a, b FROM inv WHERE id = 1").fetchone()
    pytest.fail(f"ALTER {kind} ... RENAME COLUMN renamed hashed columns of a source: the row logged as "
                f"a=10, b=20 now reads a={row[0]}, b={row[1]}")


def test_rename_attribute_cascade_to_a_typed_source_is_refused(guarded):
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TYPE public.pair AS (x numeric, y numeric, z numeric)")
    app.execute("CREATE TABLE tt OF public.pair (PRIMARY KEY (x))")
    cli("source", "add", "audit", "tt", dsn=dsn, check=True)
    app.execute("INSERT INTO tt VALUES (1, 2, 3)")
    with pytest.raises(psycopg.Error) as exc:  # a typed table's columns are renamed through its type only
        app.execute("ALTER TABLE tt RENAME COLUMN y TO w")
    assert exc.value.sqlstate == "42809"
    if not _let_through(app, "ALTER TYPE public.pair RENAME ATTRIBUTE y TO tmp CASCADE"):
        return  # refused
    app.execute("ALTER TYPE public.pair RENAME ATTRIBUTE z TO y CASCADE")
    app.execute("ALTER TYPE public.pair RENAME ATTRIBUTE tmp TO z CASCADE")
    row = su.execute("SELECT y, z FROM tt WHERE x = 1").fetchone()
    pytest.fail(f"ALTER TYPE ... RENAME ATTRIBUTE ... CASCADE renamed hashed columns of a source: the row "
                f"logged as y=2, z=3 now reads y={row[0]}, z={row[1]}")


def test_rename_table_with_alter_index_is_refused(guarded):
    su, app = _source(guarded)
    with pytest.raises(psycopg.Error) as exc:
        app.execute("ALTER TABLE inv RENAME TO inv2")
    assert exc.value.sqlstate == "ML101"
    if not _let_through(app, "ALTER INDEX inv RENAME TO inv2"):
        return  # refused
    pytest.fail("ALTER INDEX inv RENAME TO inv2 renamed a source table, which ALTER TABLE ... RENAME may not")


def test_rename_of_a_sources_schema_is_refused(guarded):
    """ALTER SCHEMA ... RENAME moves a source's table to another qualified name, as ALTER TABLE
    ... SET SCHEMA would, which the guard refuses (minor: no value changes)."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE SCHEMA s2")
    app.execute("CREATE TABLE s2.q (id int PRIMARY KEY, v int)")
    cli("source", "add", "audit", "s2.q", dsn=dsn, check=True)
    app.execute("CREATE SCHEMA s3")
    with pytest.raises(psycopg.Error) as exc:
        app.execute("ALTER TABLE s2.q SET SCHEMA s3")
    assert exc.value.sqlstate == "ML101"
    if not _let_through(app, "ALTER SCHEMA s2 RENAME TO s4"):
        return  # refused
    pytest.fail("ALTER SCHEMA s2 RENAME TO s4 renamed the schema of source s2.q, now s4.q")


# --------------------------------------------------------------------------------------------------
# ALTER TABLE on a parent recurses into its inheritance children and partitions, and names only
# the parent: a source's inherited hashed column would be dropped or renamed through it.


ANCESTOR_SETUPS = {
    "inheritance child": ("CREATE TABLE par (id int, a numeric, b numeric)",
                          "CREATE TABLE src (PRIMARY KEY (id)) INHERITS (par)",
                          ("source", "add", "audit", "src"),
                          "INSERT INTO src VALUES (1, 10, 20)"),
    "partition": ("CREATE TABLE par (id int, a numeric, b numeric, PRIMARY KEY (id)) PARTITION BY RANGE (id)",
                  "CREATE TABLE src PARTITION OF par FOR VALUES FROM (0) TO (100)",
                  ("source", "add", "audit", "src", "--mode", "replication"),
                  "INSERT INTO par VALUES (1, 10, 20)"),
}


@pytest.mark.parametrize("statement", ["ALTER TABLE {t} DROP COLUMN b", "ALTER TABLE {t} RENAME COLUMN b TO c"])
@pytest.mark.parametrize("setup", list(ANCESTOR_SETUPS))
def test_ddl_on_a_sources_parent_cannot_drop_or_rename_its_hashed_columns(guarded, setup, statement):
    su, app, role, dsn, writer = guarded
    parent, child, add, insert = ANCESTOR_SETUPS[setup]
    app.execute(parent)
    app.execute(child)
    cli(*add, dsn=dsn, check=True)
    app.execute(insert)
    with pytest.raises(psycopg.Error) as exc:  # on the source itself: an inherited column goes with its parent's
        app.execute(statement.format(t="src"))
    assert exc.value.sqlstate == "42P16"
    if not _let_through(app, statement.format(t="par")):
        return  # refused
    columns = [r[0] for r in su.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'src'::regclass "
                                        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")]
    pytest.fail(f"{statement.format(t='par')} went through to source src ({setup}): its columns are now {columns}, "
                "hashed column b among them no more")


# --------------------------------------------------------------------------------------------------
# An append-only source refuses UPDATE and DELETE with a statement trigger, which fires only for
# the statement's own table: one naming a parent would reach the source's rows. Such a table is
# not taken as an append-only source, nor may it join a parent later.


APPEND_ONLY_SETUPS = {
    "trigger mode, inheritance child": (
        "CREATE TABLE par (id int, a numeric)", "CREATE TABLE src (PRIMARY KEY (id)) INHERITS (par)",
        ("source", "add", "audit", "src", "--append-only"), "INSERT INTO src VALUES (1, 10)"),
    "replication mode, partition": (
        "CREATE TABLE par (id int, a numeric, PRIMARY KEY (id)) PARTITION BY RANGE (id)",
        "CREATE TABLE src PARTITION OF par FOR VALUES FROM (0) TO (100)",
        ("source", "add", "audit", "src", "--mode", "replication", "--append-only"), "INSERT INTO par VALUES (1, 10)"),
}


@pytest.mark.parametrize("statement", ["UPDATE {t} SET a = 99", "DELETE FROM {t}"])
@pytest.mark.parametrize("setup", list(APPEND_ONLY_SETUPS))
def test_an_append_only_sources_rows_cannot_be_changed_through_its_parent(guarded, setup, statement):
    su, app, role, dsn, writer = guarded
    parent, child, add, insert = APPEND_ONLY_SETUPS[setup]
    app.execute(parent)
    app.execute(child)
    out = cli(*add, dsn=dsn)
    if out.returncode != 0:
        return  # not taken as an append-only source: safe
    app.execute(insert)
    app.execute(f"GRANT SELECT, UPDATE, DELETE ON par, src TO {writer}")
    other = _connect_as(dsn, writer)
    try:
        with pytest.raises(psycopg.Error) as exc:  # naming the source: refused
            other.execute(statement.format(t="src"))
        assert exc.value.sqlstate == "ML100", exc.value
        try:
            other.execute(statement.format(t="par"))
        except psycopg.Error as exc:
            assert exc.sqlstate in ("ML100", "ML101"), exc
            return
        rows = su.execute("SELECT id, a FROM src").fetchall()
        pytest.fail(f"{statement.format(t='par')} changed append-only source src ({setup}): its rows, "
                    f"[(1, 10)] as logged, are now {rows}")
    finally:
        other.close()


@pytest.mark.parametrize("join", ["ALTER TABLE src INHERIT par", "ALTER TABLE ppar ATTACH PARTITION src FOR VALUES FROM (0) TO (100)"])
def test_an_append_only_source_cannot_join_a_parent_later(guarded, join):
    """The same, the table joining a parent after it was added: refused (ML101)."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE par (id int, a numeric)")
    app.execute("CREATE TABLE ppar (id int, a numeric, PRIMARY KEY (id)) PARTITION BY RANGE (id)")
    app.execute("CREATE TABLE src (id int PRIMARY KEY, a numeric)")
    mode = ("--mode", "replication") if "ATTACH" in join else ()
    cli("source", "add", "audit", "src", "--append-only", *mode, dsn=dsn, check=True)
    if not _let_through(app, join):
        return  # refused
    pytest.fail(f"{join} made append-only source src a child of another table, whose UPDATE and DELETE reach its rows")


# --------------------------------------------------------------------------------------------------
# An enum's stored value is its label's OID: ALTER TYPE ... RENAME VALUE changes the text of
# every committed value at once, with no rewrite for the rewrite check to see.


@pytest.mark.parametrize("column_type", ["types.status", "types.status[]"])
def test_renaming_a_hashed_enums_value_is_refused(guarded, column_type):
    su, app, role, dsn, writer = guarded
    su.execute(f"CREATE SCHEMA types AUTHORIZATION {writer}")
    other = _connect_as(dsn, writer)
    try:
        other.execute("CREATE TYPE types.status AS ENUM ('paid', 'void')")
        other.execute(f"GRANT USAGE ON SCHEMA types TO {role}")
        app.execute(f"CREATE TABLE invoices (id int PRIMARY KEY, status {column_type})")
        cli("source", "add", "audit", "invoices", dsn=dsn, check=True)
        paid, void = ("'paid'", "'void'") if column_type == "types.status" else ("'{paid}'", "'{void}'")
        app.execute(f"INSERT INTO invoices VALUES (1, {paid}), (2, {void})")
        if not _let_through(other, "ALTER TYPE types.status RENAME VALUE 'paid' TO 'tmp'"):
            return  # refused
        other.execute("ALTER TYPE types.status RENAME VALUE 'void' TO 'paid'")
        other.execute("ALTER TYPE types.status RENAME VALUE 'tmp' TO 'void'")
        now = su.execute("SELECT id, status::text FROM invoices ORDER BY id").fetchall()
        pytest.fail(f"another role renamed the values of a hashed {column_type} column: rows logged as "
                    f"[(1, {paid}), (2, {void})] now read {now}")
    finally:
        other.close()


def test_adding_a_value_to_a_hashed_enum_is_let_through(guarded):
    """ADD VALUE changes no stored value: let through, as is renaming an enum no source hashes."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TYPE public.status AS ENUM ('paid', 'void')")
    app.execute("CREATE TABLE invoices (id int PRIMARY KEY, status public.status[])")
    cli("source", "add", "audit", "invoices", dsn=dsn, check=True)
    app.execute("INSERT INTO invoices VALUES (1, '{paid}')")
    for _ in range(3):
        app.execute("ALTER TYPE public.status ADD VALUE IF NOT EXISTS 'open' BEFORE 'paid'")
    with app.transaction():
        app.execute("ALTER TYPE public.status ADD VALUE 'late' AFTER 'paid'")
    app.execute("CREATE TYPE public.other AS ENUM ('x')")
    app.execute("ALTER TYPE public.other RENAME VALUE 'x' TO 'y'")  # no source hashes it


# --------------------------------------------------------------------------------------------------
# `guard install` copies the sources itself: it must take no more than put_source would, or an
# owner's rows naming OIDs not used yet would claim the next tables any role creates.


def test_guard_install_copies_no_source_of_a_table_that_put_source_would_refuse(plain, owned):
    su, app, role = owned
    _, dsn, _, _ = plain
    cli("log", "create", "audit", dsn=dsn, check=True)
    app.execute("CREATE TABLE public.probe ()")
    next_oid = app.execute("SELECT 'public.probe'::regclass::oid::bigint").fetchone()[0]
    app.execute("""INSERT INTO merkle.sources (log_id, table_schema, table_name, table_oid, mode, key_columns, columns)
                   SELECT l.log_id, 'public', 'mine', o::oid, 'trigger', '{a}', '{a}'
                     FROM merkle.logs l, generate_series(%s::bigint + 3000, %s::bigint + 8000) o
                    WHERE l.name = 'audit' AND NOT EXISTS (SELECT FROM pg_class WHERE oid = o::oid)""",
                (next_oid, next_oid))
    assert _guard_cli(su, "install").returncode == 0
    # The owner moves the OID counter to the range (creating and dropping a table of its own).
    app.execute("""DO $$ DECLARE o bigint := 0; BEGIN
                     WHILE o < %s LOOP
                         CREATE TABLE public.burn (); o := 'public.burn'::regclass::oid; DROP TABLE public.burn;
                     END LOOP; END $$""" % (next_oid + 3000))
    su.execute("CREATE TABLE su_table (a int)")
    claimed = su.execute("SELECT count(*) FROM merkle_guard.sources s LEFT JOIN pg_class c ON c.oid = s.table_oid "
                         "WHERE c.oid IS NULL OR c.relowner <> %s::regrole", (role,)).fetchone()[0]
    try:
        su.execute("ALTER TABLE su_table ADD COLUMN b int")
        refused = None
    except psycopg.Error as exc:
        refused = f"{exc.sqlstate} {exc}"
    assert claimed == 0 and refused is None, (
        f"the guard's copy holds {claimed} sources of tables that are not the owner's; the superuser's "
        f"ALTER TABLE of its own new table: {refused}")


# --------------------------------------------------------------------------------------------------
# A trigger's function runs as whichever role writes to the table, the owner's too: a role with
# the TRIGGER privilege could empty the outbox from the owner's own INSERT. On a source, a new
# trigger must call the code of a role that may act as the table's owner, or a superuser's.


def test_a_role_with_trigger_privilege_cannot_act_as_the_owner(guarded):
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)")
    cli("source", "add", "audit", "ledger", "--append-only", dsn=dsn, check=True)
    sid = su.execute("SELECT source_id FROM merkle.sources WHERE table_name = 'ledger'").fetchone()[0]
    app.execute(f"GRANT TRIGGER ON ledger TO {writer}")
    su.execute(f"CREATE SCHEMA w AUTHORIZATION {writer}")
    w = _connect_as(dsn, writer)
    try:
        w.execute(f"""CREATE FUNCTION w.audit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                -- runs as the role that wrote to the table
                IF pg_has_role(current_user, (SELECT relowner FROM pg_class
                                              WHERE oid = 'merkle.outbox_{sid}'::regclass), 'USAGE') THEN
                    EXECUTE 'DELETE FROM merkle.outbox_{sid}';
                END IF;
                RETURN NULL;
            END $$""")
        # Named to fire after merkle_capture_<id> (statement triggers fire in name order).
        w.execute("CREATE TRIGGER zz_audit AFTER INSERT ON ledger FOR EACH STATEMENT EXECUTE FUNCTION w.audit()")
    except psycopg.Error as exc:
        assert exc.sqlstate == "ML101", exc
        return  # refused
    finally:
        w.close()
    app.execute("INSERT INTO ledger VALUES (1, 10)")  # the owner's own insert
    rows = su.execute("SELECT count(*) FROM ledger").fetchone()[0]
    captured = su.execute(f"SELECT count(*) FROM merkle.outbox_{sid}").fetchone()[0]
    assert captured == rows, (f"role {writer}'s trigger ran as the owner and emptied the outbox: {rows} row in "
                              f"append-only source ledger, {captured} captured")


# --------------------------------------------------------------------------------------------------
# Another role's object that a source depends on (a typed table's type, a partition's or
# child's parent, the schema) would take the source's table with it when dropped, rows and all.
# The table is dropped by naming it (or another source it goes with) only.


# (what the other role creates, what the owner creates, `source add` options, the other role's drop);
# a parent is the owner's first (PostgreSQL lets only its owner add a child), then given away.
DROP_SETUPS = {
    "typed table's type": (
        ["CREATE TYPE ext.pair AS (id int, v numeric)"],
        ["CREATE TABLE src OF ext.pair (PRIMARY KEY (id))"], (), "DROP TYPE ext.pair CASCADE"),
    "partition's parent": (
        [], ["CREATE TABLE ext.par (id int, v numeric) PARTITION BY RANGE (id)",
             "CREATE TABLE src PARTITION OF ext.par (PRIMARY KEY (id)) FOR VALUES FROM (0) TO (100)"],
        ("--mode", "replication"), "DROP TABLE ext.par"),
    "inheritance parent": (
        [], ["CREATE TABLE ext.par (id int, v numeric)", "CREATE TABLE src (PRIMARY KEY (id)) INHERITS (ext.par)"],
        (), "DROP TABLE ext.par CASCADE"),
    "schema": (
        [], ["CREATE TABLE ext.src (id int PRIMARY KEY, v numeric)"], (), "DROP SCHEMA ext CASCADE"),
}


@pytest.mark.parametrize("setup", list(DROP_SETUPS))
def test_another_role_cannot_drop_a_source_through_what_it_owns(guarded, setup):
    su, app, role, dsn, writer = guarded
    theirs, create, mode, drop = DROP_SETUPS[setup]
    su.execute(f"CREATE SCHEMA ext AUTHORIZATION {writer}")
    other = _connect_as(dsn, writer)
    try:
        for statement in theirs:
            other.execute(statement)
        other.execute(f"GRANT USAGE, CREATE ON SCHEMA ext TO {role}")
        for statement in create:
            app.execute(statement)
        if "par" in " ".join(create):
            su.execute(f"ALTER TABLE ext.par OWNER TO {writer}")
        table = "ext.src" if setup == "schema" else "src"
        cli("source", "add", "audit", table, *mode, dsn=dsn, check=True)
        app.execute(f"INSERT INTO {table} VALUES (1, 10)")
        if setup != "schema":  # (a schema's owner may drop any table in it, by name too)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                other.execute(f"DROP TABLE {table}")  # naming it: not its table
        if not _let_through(other, drop):
            return  # refused
        gone = su.execute("SELECT to_regclass(%s) IS NULL", (table,)).fetchone()[0]
        assert not gone, f"role {writer} dropped source {table} (1 committed row) with {drop!r}"
    finally:
        other.close()


# --------------------------------------------------------------------------------------------------
# A composite value prints the attributes its type has now: adding or dropping one (ALTER TYPE,
# ALTER TABLE on a table whose row type a column uses, CREATE OR REPLACE VIEW) changes the text of
# every committed value of a hashed column of that type, with no rewrite.


@pytest.mark.parametrize("column_type, change", [
    ("types.pair", "ALTER TYPE types.pair DROP ATTRIBUTE y"),
    ("types.pair", "ALTER TYPE types.pair ADD ATTRIBUTE z numeric"),
    ("types.pair[]", "ALTER TYPE types.pair DROP ATTRIBUTE y"),
    ("types.rowt", "ALTER TABLE types.rowt DROP COLUMN y"),
    ("types.rowt", "ALTER TABLE types.rowt ADD COLUMN z numeric"),
    ("types.v", "CREATE OR REPLACE VIEW types.v AS SELECT 1::numeric AS x, 2::numeric AS y, 3::numeric AS z"),
])
def test_changing_the_attributes_of_a_hashed_composite_is_refused(guarded, column_type, change):
    su, app, role, dsn, writer = guarded
    su.execute(f"CREATE SCHEMA types AUTHORIZATION {writer}")
    other = _connect_as(dsn, writer)
    try:
        other.execute("CREATE TYPE types.pair AS (x numeric, y numeric)")
        other.execute("CREATE TABLE types.rowt (x numeric, y numeric)")
        other.execute("CREATE VIEW types.v AS SELECT 1::numeric AS x, 2::numeric AS y")
        other.execute(f"GRANT USAGE ON SCHEMA types TO {role}")
        _text_kept(guarded, other, column_type, "(1,2)" if not column_type.endswith("[]") else '{"(1,2)"}', change)
    finally:
        other.close()


def test_what_changes_no_stored_text_is_let_through(guarded):
    """Renaming an attribute, altering other tables, and a composite no source hashes: let through."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TYPE public.pair AS (x numeric, y numeric)")
    app.execute("CREATE TYPE public.free AS (x numeric)")
    app.execute("CREATE TABLE invoices (id int PRIMARY KEY, amounts public.pair)")
    cli("source", "add", "audit", "invoices", dsn=dsn, check=True)
    app.execute("INSERT INTO invoices VALUES (1, '(1,2)')")
    app.execute("ALTER TYPE public.pair RENAME ATTRIBUTE y TO w")
    app.execute("ALTER TYPE public.free ADD ATTRIBUTE y numeric")
    app.execute("ALTER TABLE invoices ADD COLUMN note text")
    app.execute("CREATE TABLE public.other (a int)")
    with app.transaction():
        app.execute("ALTER TABLE public.other ADD COLUMN b int")
        app.execute("ALTER TYPE public.free DROP ATTRIBUTE y")
    with pytest.raises(psycopg.Error) as exc:
        with app.transaction():
            app.execute("ALTER TABLE public.other ADD COLUMN c int")
            app.execute("ALTER TYPE public.pair ADD ATTRIBUTE z numeric")
    assert exc.value.sqlstate == "ML101"
    assert su.execute("SELECT amounts::text FROM invoices").fetchone()[0] == "(1,2)"


def test_the_composite_check_makes_no_ddl_wait_for_another_sessions(guarded):
    """What the check remembers of finished transactions is cleared by the next DDL; two
    sessions' DDL on unrelated tables must not wait for each other over it."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TYPE public.pair AS (x numeric, y numeric)")
    app.execute("CREATE TABLE invoices (id int PRIMARY KEY, amounts public.pair)")
    cli("source", "add", "audit", "invoices", dsn=dsn, check=True)
    app.execute("CREATE TABLE public.a (i int)")
    app.execute("CREATE TABLE public.b (i int)")
    app.execute("ALTER TABLE public.a ADD COLUMN j int")  # leaves a record of a finished transaction
    assert su.execute("SELECT count(*) FROM merkle_guard.composite_attrs").fetchone()[0] >= 1
    other = _connect_as(dsn, role)
    try:
        with app.transaction():
            app.execute("ALTER TABLE public.a ADD COLUMN k int")  # clears it, and holds what it cleared
            other.execute("SET lock_timeout = '3s'")
            other.execute("ALTER TABLE public.b ADD COLUMN j int")  # waited before, and timed out
    finally:
        other.close()


# --------------------------------------------------------------------------------------------------
# An OID-alias column (regclass, regtype, regprocedure, ...) prints the name of what it names:
# renaming that object would change every committed value's text. Such columns are not hashed.


@pytest.mark.parametrize("column_type, value, rename", [
    ("regclass", "types.target", "ALTER TABLE types.target RENAME TO renamed"),
    ("regtype", "types.kind", "ALTER TYPE types.kind RENAME TO renamed"),
    ("regprocedure", "types.f(integer)", "ALTER FUNCTION types.f(integer) RENAME TO renamed"),
    ("regnamespace", "types", "ALTER SCHEMA types RENAME TO renamed"),
])
def test_renaming_what_a_hashed_oid_alias_names_is_refused_or_the_source_is(guarded, column_type, value, rename):
    su, app, role, dsn, writer = guarded
    su.execute(f"CREATE SCHEMA types AUTHORIZATION {writer}")
    other = _connect_as(dsn, writer)
    try:
        other.execute("CREATE TABLE types.target (a int)")
        other.execute("CREATE TYPE types.kind AS (a int)")
        other.execute("CREATE FUNCTION types.f(integer) RETURNS integer LANGUAGE sql AS 'SELECT 1'")
        other.execute(f"GRANT USAGE ON SCHEMA types TO {role}")
        app.execute(f"CREATE TABLE refs (id int PRIMARY KEY, what {column_type})")
        added = cli("source", "add", "audit", "refs", dsn=dsn)
        if added.returncode != 0:
            return  # such a column is not taken: safe
        app.execute("INSERT INTO refs VALUES (1, %s)", (value,))
        before = su.execute("SET search_path = pg_catalog, pg_temp; SELECT what::text FROM refs").fetchone()[0]
        if not _let_through(other, rename):
            return  # refused
        after = su.execute("SELECT what::text FROM refs").fetchone()[0]
        assert after == before, (
            f"another role's {rename!r} changed the text of a committed hashed {column_type} value without a "
            f"leaf: {before} -> {after}")
    finally:
        other.close()


# --------------------------------------------------------------------------------------------------
# A subscription's apply worker fires row triggers only, never statement triggers: trigger-mode
# capture would miss the rows it applies, and an append-only guard its updates and deletes.


@contextlib.contextmanager
def _publisher(su: psycopg.Connection, dsn: str, tables: list[str]):
    """A database of the same cluster publishing each of `tables` (id int PRIMARY KEY, amount
    numeric) in a publication of its own; yields subscribe(name, table), which makes a slot
    beforehand (in one cluster, CREATE SUBSCRIPTION would wait for itself to make it) and
    returns the CREATE SUBSCRIPTION statement's text."""
    params = su.info.get_parameters()
    pubdb = params["dbname"] + "_pub"
    su.execute(f"CREATE DATABASE {pubdb}")
    pub_dsn = psycopg.conninfo.make_conninfo(dsn, user=params["user"], dbname=pubdb)
    made = []
    try:
        with psycopg.connect(pub_dsn, autocommit=True) as pub:
            for table in tables:
                pub.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, amount numeric)")
                pub.execute(f"CREATE PUBLICATION p_{table} FOR TABLE {table}")

            def subscribe(name: str, table: str, enabled: bool = True) -> str:
                pub.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
                made.append(name)
                return (f"CREATE SUBSCRIPTION {name} CONNECTION '{pub_dsn}' PUBLICATION p_{table} WITH (copy_data = "
                        f"false, create_slot = false, slot_name = '{name}', enabled = {str(enabled).lower()})")

            yield subscribe
    finally:
        for name in made:
            if su.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)).fetchone():
                su.execute(f"ALTER SUBSCRIPTION {name} DISABLE")
                su.execute(f"ALTER SUBSCRIPTION {name} SET (slot_name = NONE)")
                su.execute(f"DROP SUBSCRIPTION {name}")
        su.execute(f"DROP DATABASE {pubdb} WITH (FORCE)")  # its slots with it


def test_a_subscription_into_a_trigger_mode_or_append_only_source_is_refused(guarded):
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)")
    app.execute("CREATE TABLE feed (id int PRIMARY KEY, amount numeric)")
    cli("source", "add", "audit", "ledger", dsn=dsn, check=True)
    app.execute("INSERT INTO ledger VALUES (1, 10)")
    tag = su.info.get_parameters()["dbname"][-12:]
    with _publisher(su, dsn, ["ledger", "feed"]) as subscribe:
        with pytest.raises(psycopg.Error) as exc:
            su.execute(subscribe(f"into_ledger_{tag}", "ledger"))
        assert exc.value.sqlstate == "ML101" and "trigger-mode capture would miss its rows" in str(exc.value)
        # Made before feed became a source (and left disabled): refused at `source add`, unless the
        # source streams what the apply worker writes.
        su.execute(subscribe(f"into_feed_{tag}", "feed", enabled=False))
        assert su.execute("SELECT srrelid::regclass::text FROM pg_subscription_rel").fetchall() == [("feed",)]
        for options in ([], ["--mode", "replication", "--append-only"]):
            out = cli("source", "add", "audit", "feed", *options, dsn=dsn)
            assert out.returncode == 2 and "apply worker fires no statement trigger" in out.stderr, out.stderr
        cli("source", "add", "audit", "feed", "--mode", "replication", dsn=dsn, check=True)
    assert su.execute("SELECT id, amount::text FROM ledger").fetchall() == [(1, "10")]


# --------------------------------------------------------------------------------------------------
# Another role's trigger function reaches a source's writes other ways than CREATE TRIGGER on
# it: a trigger there before `source add`, a row trigger on a partitioned parent (cloned onto the
# source), a trigger on a table attached as a partition later.


SPY = """CREATE FUNCTION w.spy() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO w.ran VALUES (current_user);  -- the owner's privileges are this code's now
        RETURN NULL;
    END $$"""


def _spying_writer(su, dsn, writer):
    su.execute(f"CREATE SCHEMA w AUTHORIZATION {writer}")
    w = _connect_as(dsn, writer)
    w.execute("CREATE TABLE w.ran (who text)")
    w.execute("GRANT USAGE ON SCHEMA w TO PUBLIC")
    w.execute("GRANT INSERT ON w.ran TO PUBLIC")
    w.execute(SPY)
    return w


# (the owner's set-up, the writer's trigger, the owner's step that makes it a source's, options, the owner's write)
TRIGGER_CASES = {
    "made before source add": (
        ["CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)", "GRANT TRIGGER ON ledger TO {writer}"],
        "CREATE TRIGGER zz AFTER INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION w.spy()",
        None, ("ledger",), "INSERT INTO ledger VALUES (1, 10)"),
    "row trigger on the source's parent": (
        ["CREATE TABLE par (id int, amount numeric) PARTITION BY RANGE (id)",
         "CREATE TABLE ledger PARTITION OF par (PRIMARY KEY (id)) FOR VALUES FROM (0) TO (100)",
         "GRANT TRIGGER ON par, ledger TO {writer}"],
        None, None, ("ledger", "--mode", "replication"), "INSERT INTO ledger VALUES (1, 10)"),
    "trigger on a table attached later": (
        ["CREATE TABLE ledger (id int, amount numeric, PRIMARY KEY (id)) PARTITION BY RANGE (id)",
         "CREATE TABLE ledger_1 (id int NOT NULL, amount numeric)", "GRANT TRIGGER ON ledger_1 TO {writer}"],
        "CREATE TRIGGER zz AFTER INSERT ON ledger_1 FOR EACH ROW EXECUTE FUNCTION w.spy()",
        "ALTER TABLE ledger ATTACH PARTITION ledger_1 FOR VALUES FROM (0) TO (100)",
        ("ledger", "--mode", "replication"), "INSERT INTO ledger VALUES (1, 10)"),
}


@pytest.mark.parametrize("case", list(TRIGGER_CASES))
def test_another_roles_trigger_function_never_runs_on_the_owners_writes_to_a_source(guarded, case):
    su, app, role, dsn, writer = guarded
    setup, early, join, add, write = TRIGGER_CASES[case]
    for statement in setup:
        app.execute(statement.format(writer=writer))
    w = _spying_writer(su, dsn, writer)
    try:
        if early:
            w.execute(early)
        added = cli("source", "add", "audit", *add, dsn=dsn)
        if added.returncode != 0:
            assert "ML101" in added.stderr or "trigger" in added.stderr, added.stderr
            return  # refused: safe
        if case == "row trigger on the source's parent":
            try:
                w.execute("CREATE TRIGGER zz AFTER INSERT ON par FOR EACH ROW EXECUTE FUNCTION w.spy()")
            except psycopg.Error as exc:
                assert exc.sqlstate == "ML101", exc
                return
        if join:
            try:
                app.execute(join)
            except psycopg.Error as exc:
                assert exc.sqlstate == "ML101", exc
                return
    finally:
        w.close()
    app.execute(write)  # the owner's own write to its source
    ran = [r[0] for r in su.execute("SELECT who FROM w.ran").fetchall()]
    assert role not in ran, f"role {writer}'s trigger function ran as the owner {role} on a write to a source: {ran}"


# --------------------------------------------------------------------------------------------------
# An attribute of a hashed composite also goes when what its type is made of is dropped with
# CASCADE (a domain, an enum, a table's row type, DROP OWNED BY).


@pytest.mark.parametrize("attr_type, drop", [
    ("types.d", "DROP DOMAIN types.d CASCADE"),
    ("types.e", "DROP TYPE types.e CASCADE"),
    ("types.inner_row", "DROP TABLE types.inner_row CASCADE"),
    ("types.d", "DROP OWNED BY {writer} CASCADE"),
])
def test_dropping_what_a_hashed_composites_attribute_is_made_of_is_refused(guarded, attr_type, drop):
    su, app, role, dsn, writer = guarded
    su.execute(f"CREATE SCHEMA types AUTHORIZATION {writer}")
    other = _connect_as(dsn, writer)
    try:
        other.execute("CREATE DOMAIN types.d AS numeric")
        other.execute("CREATE TYPE types.e AS ENUM ('a', 'b')")
        other.execute("CREATE TABLE types.inner_row (z int)")
        other.execute(f"CREATE TYPE types.pair AS (x numeric, y {attr_type})")
        other.execute(f"GRANT USAGE ON SCHEMA types TO {role}")
        # the composite in a schema the writer does not own, so that DROP OWNED drops only d
        su.execute("CREATE SCHEMA keep; ALTER TYPE types.pair SET SCHEMA keep")
        su.execute(f"ALTER TYPE keep.pair OWNER TO {role}; GRANT USAGE ON SCHEMA keep TO {role}")
        value = {"types.d": "(1,2)", "types.e": "(1,a)", "types.inner_row": "(1,\"(3)\")"}[attr_type]
        _text_kept(guarded, other, "keep.pair", value, drop.format(writer=writer))
    finally:
        other.close()


# --------------------------------------------------------------------------------------------------
# The subscription check looks at the subscription the command made or altered, while it is
# enabled: one made before the check must stay stoppable, and others alterable.


def test_a_subscription_left_from_before_the_check_can_still_be_stopped_and_others_altered(guarded):
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)")
    app.execute("CREATE TABLE feed (id int PRIMARY KEY, amount numeric)")
    cli("source", "add", "audit", "ledger", dsn=dsn, check=True)
    tag = su.info.get_parameters()["dbname"][-12:]
    with _publisher(su, dsn, ["ledger", "feed"]) as subscribe:
        # as an earlier guard let it be made
        su.execute("ALTER EVENT TRIGGER merkle_source_subscription DISABLE")
        su.execute(subscribe(f"old_{tag}", "ledger", enabled=False))
        su.execute("ALTER EVENT TRIGGER merkle_source_subscription ENABLE")
        su.execute(subscribe(f"other_{tag}", "feed", enabled=False))  # into a table no source is
        results = {
            "other's ALTER ... SET (binary = true)": _let_through(su, f"ALTER SUBSCRIPTION other_{tag} SET (binary = true)"),
            "old's ALTER ... DISABLE": _let_through(su, f"ALTER SUBSCRIPTION old_{tag} DISABLE"),
            "old's SET (slot_name = NONE)": _let_through(su, f"ALTER SUBSCRIPTION old_{tag} SET (slot_name = NONE)"),
        }
        refused = [k for k, ok in results.items() if not ok]
        assert not refused, f"refused, though none lets a subscription apply to a source: {refused}"


# --------------------------------------------------------------------------------------------------
# A log's publication decides which changes its slot sends, as a capture trigger does in trigger
# mode, and pgoutput reads it as it was at each change's place in the WAL: a change it let
# through is never streamed again (found by review: each statement below lost committed rows
# without a word). Only merkle-listener changes it; its owner may be changed.

_PUBLICATION_CHANGES = [
    "ALTER PUBLICATION merkle_audit DROP TABLE ledger",
    "ALTER PUBLICATION merkle_audit SET TABLE ledger WHERE (id < 0), feed",
    "ALTER PUBLICATION merkle_audit ADD TABLE spare",
    "ALTER PUBLICATION merkle_audit SET (publish = 'update')",
    "ALTER PUBLICATION merkle_audit SET (publish_via_partition_root = false)",
    "ALTER PUBLICATION merkle_audit RENAME TO elsewhere",
    "DROP PUBLICATION merkle_audit",
    "DROP OWNED BY {role}",
]


def _publication(su) -> tuple:
    return su.execute(
        "SELECT p.pubname, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, p.pubviaroot, "
        "(SELECT array_agg(tablename || ':' || coalesce(rowfilter, '') ORDER BY tablename) FROM pg_publication_tables t "
        " WHERE t.pubname = p.pubname) FROM pg_publication p WHERE p.oid = "
        "(SELECT oid FROM pg_publication WHERE pubname IN ('merkle_audit', 'elsewhere'))").fetchone()


def test_a_logs_publication_is_changed_by_merkle_listener_only(guarded):
    su, app, role, dsn, writer = guarded
    for table in ("ledger", "feed", "spare"):
        app.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, amount numeric)")
        app.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    cli("source", "add", "audit", "ledger", "--mode", "replication", "--events", "insert,update", dsn=dsn, check=True)
    cli("source", "add", "audit", "feed", "--mode", "replication", dsn=dsn, check=True)
    before = _publication(su)
    let_through = []
    for statement in _PUBLICATION_CHANGES:
        for who, conn in (("the owner", app), ("a superuser", su)):
            if "DROP OWNED" in statement and conn is app:
                continue  # the owner dropping all it owns: refused for its sources' tables already
            if _let_through(conn, statement.format(role=role)):
                let_through.append(f"{who}: {statement}")
            assert _publication(su) == before, statement
    assert not let_through, f"changed the log's publication: {let_through}"
    # Event triggers enabled plainly would not fire in replica mode: the guard's are ALWAYS.
    su.execute("SET session_replication_role = replica")
    try:
        assert not _let_through(su, "ALTER PUBLICATION merkle_audit DROP TABLE ledger")
    finally:
        su.execute("RESET session_replication_role")
    # Its owner may change (the fix `source add` gives a role that does not own it).
    su.execute(f"ALTER PUBLICATION merkle_audit OWNER TO {writer}")
    su.execute(f"ALTER PUBLICATION merkle_audit OWNER TO {role}")
    # merkle-listener's own changes go through: removing a source, adding one, dropping the log.
    assert cli("source", "remove", "audit", "feed", dsn=dsn).returncode == 3  # no listener confirms the stream
    assert _publication(su)[-1] == ["ledger:"]
    cli("source", "add", "audit", "spare", "--mode", "replication", dsn=dsn, check=True)
    assert _publication(su)[-1] == ["ledger:", "spare:"]
    cli("log", "drop", "audit", "--yes", dsn=dsn, check=True)
    assert _publication(su) is None


def test_a_guard_from_before_the_publication_check_takes_no_publication_mark(guarded):
    """Until a superuser installs this version's guard, an earlier one (whose marks have no
    purpose 'publication') stays: merkle-listener's own publication changes must not fail on it."""
    su, app, role, dsn, writer = guarded
    su.execute("DROP FUNCTION merkle_guard.check_log_publications() CASCADE")
    su.execute("ALTER TABLE merkle_guard.own_ddl DROP CONSTRAINT own_ddl_purpose_check")
    su.execute("ALTER TABLE merkle_guard.own_ddl ADD CONSTRAINT own_ddl_purpose_check "
               "CHECK (purpose IN ('drop_triggers', 'install_partition_guards', 'truncate'))")
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
    cli("source", "add", "audit", "ledger", "--mode", "replication", dsn=dsn, check=True)
    cli("log", "drop", "audit", "--yes", dsn=dsn, check=True)
    assert _guard_cli(su, "status").returncode == 3  # says the guard is incomplete


def test_a_filter_columns_cascade_drop_does_not_take_a_source_out_of_its_publication(guarded):
    """PostgreSQL drops a published table's row filter with a column it reads, and the table
    with it from the publication: ALTER TABLE ... DROP COLUMN ... CASCADE of an unhashed column
    that the filter reads took the source out of its log's publication."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric, flag boolean)")
    cli("source", "add", "audit", "ledger", "--columns", "id,amount", "--where", "flag", "--mode", "replication",
        dsn=dsn, check=True)
    before = _publication(su)
    for conn in (app, su):
        assert not _let_through(conn, "ALTER TABLE ledger DROP COLUMN flag CASCADE")
        assert _publication(su) == before


def test_a_change_that_waited_for_a_source_add_is_checked_against_it(guarded):
    """A statement that waits for the publication's lock while `source add` holds it is checked,
    at its end, against the source that add committed meanwhile, not only against the
    publication as it was at its start, before that add."""
    su, app, role, dsn, writer = guarded
    for table in ("t1", "t2"):
        app.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    cli("source", "add", "audit", "t1", "--mode", "replication", dsn=dsn, check=True)
    t2 = app.execute("SELECT 't2'::regclass::oid").fetchone()[0]
    log_id = app.execute("SELECT log_id FROM merkle.logs WHERE name = 'audit'").fetchone()[0]
    adding = psycopg.connect(dsn, options=options_string())  # what `source add audit t2` writes, held open
    adding.execute("INSERT INTO merkle.sources (log_id, table_schema, table_name, table_oid, mode, key_columns, "
                   "columns, events) VALUES (%s, 'public', 't2', %s, 'replication', '{id}', '{id}', '{insert}')",
                   (log_id, t2))
    adding.execute("SELECT merkle.mark_own_ddl('publication')")
    adding.execute("ALTER PUBLICATION merkle_audit ADD TABLE t2")
    outcome: list = []
    superuser = psycopg.connect(su.info.dsn, autocommit=True, options=options_string())

    def take_it_out() -> None:
        outcome.append(_let_through(superuser, "ALTER PUBLICATION merkle_audit DROP TABLE t2"))

    taker = threading.Thread(target=take_it_out)
    taker.start()
    try:
        _wait_until_waiting_for_a_lock(su, "ALTER PUBLICATION merkle_audit DROP")
        adding.commit()
    finally:
        adding.close()
        taker.join(30)
        superuser.close()
    assert outcome == [False], "a registered source was taken out of its log's publication"


def test_a_cascade_from_any_drop_does_not_take_a_source_out_of_its_publication(guarded):
    """DROP FUNCTION ... CASCADE of the function of a generated column that a row filter reads
    drops the column, and the table from the publication with it: every drop is checked."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE FUNCTION is_big(numeric) RETURNS boolean IMMUTABLE LANGUAGE sql AS 'SELECT $1 > 100'")
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric, big boolean "
                "GENERATED ALWAYS AS (is_big(amount)) STORED)")
    cli("source", "add", "audit", "ledger", "--columns", "id,amount", "--where", "big", "--mode", "replication",
        dsn=dsn, check=True)
    before = _publication(su)
    assert not _let_through(app, "DROP FUNCTION is_big(numeric) CASCADE")
    assert _publication(su) == before


def test_a_statement_nested_in_the_change_does_not_hide_it(guarded):
    """A superuser's own event trigger (or a function the ALTER TABLE runs) that runs DDL of its
    own inside the statement: the publication is checked against a record no statement writes."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric, flag boolean)")
    app.execute("CREATE TABLE scratch (id int)")
    cli("source", "add", "audit", "ledger", "--columns", "id,amount", "--where", "flag", "--mode", "replication",
        dsn=dsn, check=True)
    su.execute("CREATE FUNCTION public.dba_hook() RETURNS event_trigger LANGUAGE plpgsql AS "
               "$$ BEGIN IF current_query() NOT LIKE '%scratch%' THEN "
               "EXECUTE 'ALTER TABLE public.scratch ADD COLUMN IF NOT EXISTS seen int'; END IF; END $$")
    su.execute("CREATE EVENT TRIGGER a_dba_hook ON ddl_command_end WHEN TAG IN ('ALTER TABLE') "
               "EXECUTE FUNCTION public.dba_hook()")
    try:
        before = _publication(su)
        assert not _let_through(su, "ALTER TABLE ledger DROP COLUMN flag CASCADE")
        assert _publication(su) == before
    finally:
        su.execute("DROP EVENT TRIGGER a_dba_hook")


def test_ddl_that_waited_for_a_source_add_is_not_refused_for_it(guarded):
    """An ALTER TABLE that waits (for a lock, or a long rewrite) while `source add` commits a new
    source's publication change is no change to the publication."""
    su, app, role, dsn, writer = guarded
    for table in ("t1", "t2", "unrelated"):
        app.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    cli("source", "add", "audit", "t1", "--mode", "replication", dsn=dsn, check=True)
    holder = psycopg.connect(su.info.dsn, options=options_string())
    holder.execute("LOCK TABLE unrelated IN ACCESS EXCLUSIVE MODE")
    dba = psycopg.connect(su.info.dsn, autocommit=True, options=options_string())
    outcome: list = []
    waiter = threading.Thread(target=lambda: outcome.append(
        _let_through(dba, "ALTER TABLE unrelated ADD COLUMN note text")))
    waiter.start()
    try:
        _wait_until_waiting_for_a_lock(su, "ALTER TABLE unrelated")
        cli("source", "add", "audit", "t2", "--mode", "replication", dsn=dsn, check=True)
    finally:
        holder.close()
        waiter.join(30)
        dba.close()
    assert outcome == [True]


def test_a_publication_for_all_tables_leaves_merkle_listener_working(guarded):
    """A CDC tool's publication FOR ALL TABLES publishes merkle-listener's own tables too, and
    PostgreSQL refuses deletes from a published table without a replica identity: the marks
    of merkle-listener's DDL are deleted in every `source add`, `source remove` and `log drop`."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
    su.execute("CREATE PUBLICATION cdc_everything FOR ALL TABLES")
    try:
        cli("source", "add", "audit", "ledger", "--mode", "replication", dsn=dsn, check=True)
        assert cli("source", "remove", "audit", "ledger", dsn=dsn).returncode in (0, 3)
        cli("log", "drop", "audit", "--yes", dsn=dsn, check=True)
    finally:
        su.execute("DROP PUBLICATION cdc_everything")


def test_a_publication_changed_with_the_guard_off_is_reported_until_recovered(guarded):
    """A row filter's text changed while the guard was off: `status` says so (exit 3) with the
    recovery, DDL that could change publications is refused meanwhile, installing the guard
    again keeps the record (and warns) rather than accept the change, and the recovery ends it."""
    su, app, role, dsn, writer = guarded
    app.execute("CREATE TABLE ledger (id int PRIMARY KEY, v int)")
    app.execute("CREATE TABLE other (id int)")
    cli("source", "add", "audit", "ledger", "--where", "v > 1", "--mode", "replication", dsn=dsn, check=True)
    su.execute("ALTER EVENT TRIGGER merkle_log_publication DISABLE")
    su.execute("ALTER EVENT TRIGGER merkle_log_publication_drop DISABLE")
    su.execute("ALTER PUBLICATION merkle_audit SET TABLE ledger WHERE (v > 100)")
    su.execute("ALTER EVENT TRIGGER merkle_log_publication ENABLE ALWAYS")
    su.execute("ALTER EVENT TRIGGER merkle_log_publication_drop ENABLE ALWAYS")
    assert not _let_through(app, "ALTER TABLE other ADD COLUMN b int")
    status = cli("status", dsn=dsn)
    assert status.returncode == 3 and "not as merkle-listener made it" in status.stdout, status.stdout
    install = _guard_cli(su, "install")
    assert install.returncode == 0 and "publication merkle_audit is not as merkle-listener made it" in install.stdout
    assert not _let_through(app, "ALTER TABLE other ADD COLUMN b int")
    commands = re.findall(r"`(merkle-listener source (?:remove|add) [^`]*)`", status.stdout)
    assert [c.split()[2] for c in commands] == ["remove", "add"], status.stdout
    cli(*shlex.split(commands[0])[1:], dsn=dsn)  # exit 3: no listener confirms the stream; the source is retired
    su.execute("SELECT pg_drop_replication_slot('merkle_audit')")
    cli(*shlex.split(commands[0])[1:], dsn=dsn, check=True)
    cli(*shlex.split(commands[1])[1:], dsn=dsn, check=True)
    assert cli("status", dsn=dsn).returncode == 0
    assert _let_through(app, "ALTER TABLE other ADD COLUMN b int")


def test_init_warns_when_the_guards_schema_came_back_without_its_event_triggers(guarded):
    """As after a restore by a role that may not create event triggers: schema merkle_guard is
    there, its triggers are not, and nothing refuses DDL; the owner's `init` says so."""
    su, app, role, dsn, writer = guarded
    for (name,) in su.execute("SELECT evtname FROM pg_event_trigger").fetchall():
        su.execute(f'DROP EVENT TRIGGER "{name}"')
    init = cli("init", dsn=dsn, check=True)
    assert "the DDL guard's event triggers are not" in init.stderr and "guard install" in init.stderr, init.stderr
