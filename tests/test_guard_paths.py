"""The DDL guard against the other ways PostgreSQL offers to do what it refuses (found by
review): replacing a merkle-listener trigger with CREATE OR REPLACE TRIGGER; renaming a
source's table or hashed columns under other command tags (ALTER INDEX, VIEW, MATERIALIZED
VIEW, FOREIGN TABLE, TYPE ... CASCADE, SCHEMA); dropping or renaming them through a parent
table; changing an append-only source's rows through a parent; renaming a hashed enum's
values; and `guard install` copying sources of tables that do not exist. Each test makes the
attempt as a role the guard protects the sources from, and shows it refused (ML101) with the
committed rows unchanged; where the attempt is let through, it shows what it changed."""

from __future__ import annotations

from typing import NamedTuple

import psycopg
import pytest

from listener.store.connect import options_string
from tests.helpers import cli
from tests.test_guard_role import _guard_cli, owned  # noqa: F401 (the fixture)
from tests.test_nonsuperuser import plain  # noqa: F401 (the fixture)


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


def _let_through(conn: psycopg.Connection, statement: str) -> bool:
    """Run it: False when the guard refuses it (ML101), True when it went through."""
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        assert exc.sqlstate == "ML101", exc
        return False
    return True


# --------------------------------------------------------------------------------------------------
# CREATE [OR REPLACE] TRIGGER needs only the TRIGGER privilege, not ownership: a role given it
# could swap a source's capture trigger for a no-op, where DROP TRIGGER is refused it. A trigger
# of a merkle-listener name on a source (or a partition of one) is merkle-listener's to create.


def _other(dsn, su, writer) -> psycopg.Connection:
    """The writer role, with a schema of its own for its trigger function."""
    su.execute(f"CREATE SCHEMA w AUTHORIZATION {writer}")
    conn = psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user=writer), autocommit=True,
                           options=options_string())
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
    dropping or disabling these triggers, replaces one and then removes committed rows."""
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
    other = psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user=writer), autocommit=True, options=options_string())
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
    other = psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user=writer), autocommit=True, options=options_string())
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
