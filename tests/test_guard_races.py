"""The DDL guard and `guard install` against a schema owner that renames tables and schemas
while they wait for a lock (found by review: a statement by name could then lock, check, read
or alter another table than the one meant). Each test holds a lock to make the guard wait,
swaps names meanwhile, and shows the statement refused with nothing of the owner's run as a
superuser and nothing put on another role's table (merkle_guard.pin, guard._copy_sources)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psycopg
import pytest

from listener.store.connect import options_string
from tests.helpers import ROOT, cli, environment
from tests.test_guard_role import _guard_cli, _is_superuser, owned  # noqa: F401 (the fixture)
from tests.test_nonsuperuser import plain  # noqa: F401 (the fixture)

# Lock waits of the guard's event triggers, alike from 15 on: run at either end.
pytestmark = pytest.mark.oldest_and_newest


def _recorder(app, role: str) -> None:
    """public.folded(), IMMUTABLE, records whom it ran as, and makes the role a superuser if that was one."""
    app.execute("CREATE TABLE public.ran_as (who text, superuser boolean)")
    app.execute("GRANT INSERT ON public.ran_as TO PUBLIC")
    app.execute(f"""CREATE FUNCTION public.record() RETURNS int LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.ran_as SELECT current_user, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user;
            IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                ALTER ROLE {role} SUPERUSER;
            END IF;
            RETURN 0;
        END $$""")
    app.execute("CREATE FUNCTION public.folded() RETURNS int LANGUAGE plpgsql IMMUTABLE AS "
                "$$ BEGIN RETURN public.record(); END $$")
    app.execute("GRANT EXECUTE ON FUNCTION public.record(), public.folded() TO PUBLIC")


def _wait(su, query: str, args=()) -> None:
    deadline = time.monotonic() + 20
    while not su.execute(query, args).fetchone()[0]:
        assert time.monotonic() < deadline, query
        time.sleep(0.05)


def _waits_for(su, pid: int, table: str, mode: str | None = None) -> None:
    _wait(su, "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = %s AND NOT granted AND relation = %s::regclass "
              "AND (%s::text IS NULL OR mode = %s))", (pid, table, mode, mode))


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except psycopg.Error as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _partitioned_source(app, dsn: str, *extra: str) -> int:
    app.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    app.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    for statement in extra:
        app.execute(statement)
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "m", "--mode", "replication", "--append-only", dsn=dsn, check=True)
    return app.execute("SELECT source_id FROM merkle.sources WHERE table_name = 'm'").fetchone()[0]


def test_a_table_renamed_while_the_guard_waits_to_read_it_is_not_read(plain, owned):
    """The guard looks for rows in a table carrying a source's partition guard (here a stale one
    the owner planted); the owner swaps that table's name with a clean one's while the guard
    waits for its lock, and plants a folded index expression on the first once it is free."""
    su, app, role = owned
    _, dsn, _, _ = plain
    assert _guard_cli(su, "install").returncode == 0
    _recorder(app, role)
    source = _partitioned_source(app, dsn)
    app.execute("CREATE TABLE public.pa (v int)")
    app.execute("CREATE TABLE public.a () INHERITS (public.pa)")  # so that another lock can queue by OID
    app.execute("INSERT INTO public.a VALUES (1)")
    app.execute("DELETE FROM public.a")  # a file, no visible row: the guard reads it
    app.execute("CREATE TABLE public.b (v int)")
    app.execute(f"CREATE TRIGGER merkle_partition_{source} BEFORE TRUNCATE ON public.a FOR EACH STATEMENT "
                f"EXECUTE FUNCTION merkle.partition_guard('{source}')")
    s1, s2 = (psycopg.connect(dsn, options=options_string()) for _ in range(2))
    ddl = psycopg.connect(dsn, autocommit=True, options=options_string())
    try:
        s1.execute("LOCK TABLE public.a IN ROW EXCLUSIVE MODE")
        thread, result = _in_thread(lambda: ddl.execute("ALTER TABLE m_2025 SET (fillfactor = 90)"))
        _waits_for(su, ddl.info.backend_pid, "public.a", "ShareRowExclusiveLock")
        late, _ = _in_thread(lambda: s2.execute("LOCK TABLE public.pa IN ACCESS EXCLUSIVE MODE"))
        _waits_for(su, s2.info.backend_pid, "public.a")
        s1.execute("ALTER INDEX public.a RENAME TO a_old")  # works on tables, under a tag no guard watches
        s1.execute("ALTER INDEX public.b RENAME TO a")
        s1.commit()
        thread.join(30)
        assert "was renamed while the guard waited" in str(result.get("error")), result
        assert result["error"].sqlstate == "ML101"
        late.join(30)
        s2.execute("CREATE INDEX ON public.a_old ((v + public.folded()))")
        s2.commit()
        assert su.execute("SELECT count(*) FROM public.ran_as WHERE superuser").fetchone()[0] == 0
        assert not _is_superuser(su, role)
    finally:
        for c in (s1, s2, ddl):
            c.close()


def test_a_partition_swapped_for_another_roles_table_while_the_guard_waits_gets_no_trigger(plain, owned):
    """The guard puts a partition's missing guard trigger back, by the partition's name; the
    owner swaps the name of the partition's schema with that of a schema holding a superuser's
    table meanwhile."""
    su, app, role = owned
    _, dsn, _, _ = plain
    assert _guard_cli(su, "install").returncode == 0
    app.execute("CREATE SCHEMA vs")
    app.execute("GRANT USAGE ON SCHEMA vs TO PUBLIC")
    su.execute("CREATE TABLE vs.secret (v int)")
    app.execute("CREATE SCHEMA rs")
    source = _partitioned_source(
        app, dsn, "CREATE TABLE rs.secret PARTITION OF m FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')")
    trigger = f"merkle_partition_{source}"
    with app.transaction():
        app.execute("SELECT merkle_guard.mark_own_ddl('drop_triggers')")  # as merkle-listener's own DDL may
        app.execute(f"DROP TRIGGER {trigger} ON rs.secret")
    s1 = psycopg.connect(dsn, options=options_string())
    ddl = psycopg.connect(dsn, autocommit=True, options=options_string())
    try:
        s1.execute("LOCK TABLE rs.secret IN ROW EXCLUSIVE MODE")
        thread, result = _in_thread(lambda: ddl.execute("ALTER TABLE m_2025 SET (fillfactor = 90)"))
        _waits_for(su, ddl.info.backend_pid, "rs.secret")
        # As merkle-listener's own DDL may (a trigger of its name is refused otherwise).
        s1.execute("SELECT merkle_guard.mark_own_ddl('install_partition_guards')")
        s1.execute(f"CREATE TRIGGER {trigger} BEFORE TRUNCATE ON rs.secret FOR EACH STATEMENT "
                   f"EXECUTE FUNCTION merkle.partition_guard('{source}')")
        s1.execute("ALTER SCHEMA rs RENAME TO rs_old")
        s1.execute("ALTER SCHEMA vs RENAME TO rs")
        s1.execute("SELECT merkle_guard.set_retired(%s, true)", (source,))
        s1.commit()
        thread.join(30)
        assert "was renamed while the guard waited" in str(result.get("error")), result
        assert su.execute("SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                          "WHERE c.relowner = 'postgres'::regrole AND t.tgname = %s", (trigger,)).fetchone()[0] == 0
    finally:
        s1.close()
        ddl.close()


def test_guard_install_reads_no_table_swapped_in_while_it_waits(plain, owned):
    """`guard install` locks the owner's four tables by name; the owner swaps schema merkle for
    one with clean copies while it waits, and plants a folded index expression on a copy once
    install would read it."""
    su, app, role = owned
    _, dsn, _, _ = plain
    _recorder(app, role)
    app.execute("CREATE SCHEMA merkle_new")
    for table in ("sources", "logs", "source_columns", "replication_retired"):
        app.execute(f"CREATE TABLE merkle_new.{table} (LIKE merkle.{table})")
    s1, s2 = (psycopg.connect(dsn, options=options_string()) for _ in range(2))
    try:
        s1.execute("LOCK TABLE merkle.replication_retired IN ROW EXCLUSIVE MODE")
        s2.execute("LOCK TABLE merkle_new.sources IN ACCESS EXCLUSIVE MODE")
        thread, result = _in_thread(lambda: subprocess.run(
            [sys.executable, "-m", "listener", "--dsn", su.info.dsn, "guard", "install"], cwd=ROOT,
            capture_output=True, text=True, timeout=120, env=environment(None)))
        _wait(su, "SELECT EXISTS (SELECT FROM pg_locks WHERE NOT granted AND mode = 'ShareRowExclusiveLock' "
                  "AND relation = 'merkle.replication_retired'::regclass)")
        # install holds schema merkle's name once it has pinned its first table: the rename
        # waits for it, and one of the two is chosen to fail as a deadlock.
        try:
            s1.execute("ALTER SCHEMA merkle RENAME TO merkle_old")
            s1.execute("ALTER SCHEMA merkle_new RENAME TO merkle")
            s1.commit()
        except psycopg.errors.DeadlockDetected:
            s1.rollback()
        thread.join(120)
        out = result["value"]
        assert out.returncode == 0 or (out.returncode == 2 and (
            "deadlock detected" in out.stderr or "while the guard waited for it" in out.stderr)), out.stderr
        s2.execute("CREATE INDEX ON merkle.sources ((source_id + public.folded()))")
        s2.commit()
        assert su.execute("SELECT count(*) FROM public.ran_as WHERE superuser").fetchone()[0] == 0
        assert not _is_superuser(su, role)
    finally:
        s1.close()
        s2.close()


def test_a_retyped_column_that_is_not_hashed_is_not_read_in_a_rewrite(plain, owned):
    """Found by review: the rewrite check read every column a source lists, as the type the
    catalog gives it while the rows still hold the old bytes. A column of an entry-column source
    that the leaves are not computed from, retyped, was read so: the server crashed. It reads
    only what the leaves are computed from, each checked to keep its recorded type."""
    su, app, role = owned
    _, dsn, _, _ = plain
    assert _guard_cli(su, "install").returncode == 0
    app.execute("CREATE TABLE public.t (id int8 PRIMARY KEY, v int8, e bytea NOT NULL)")
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "public.t", "--entry-column", "e", dsn=dsn, check=True)
    app.execute("INSERT INTO public.t VALUES (1, 2147483632, 'x')")  # v's bytes read as a text header: 0x7FFFFFF0
    app.execute("ALTER TABLE public.t ALTER COLUMN v TYPE text USING v::text")
    assert app.execute("SELECT v FROM public.t").fetchone()[0] == "2147483632"
    with pytest.raises(psycopg.Error, match="hashed column e") as refused:
        app.execute("ALTER TABLE public.t ALTER COLUMN e TYPE bytea USING e || 'y'")
    assert refused.value.sqlstate == "ML101"
    # What the role tells the guard of its own columns weakens its own guard only: forgotten,
    # the entry column is not read either, and nothing is misread.
    source = su.execute("SELECT source_id FROM merkle.sources").fetchone()[0]
    app.execute("SELECT merkle_guard.forget_source_column(%s, 'id')", (source,))
    app.execute("ALTER TABLE public.t ALTER COLUMN id TYPE text USING id::text || ''")
    assert su.execute("SELECT 1").fetchone()[0] == 1  # the server is up


def _refused_alive(su, app, statement: str, match: str) -> None:
    with pytest.raises(psycopg.Error, match=match) as refused:
        app.execute(statement)
    assert refused.value.sqlstate == "ML101", refused.value
    assert su.execute("SELECT 1").fetchone()[0] == 1  # the server is up


def test_what_the_owner_records_cannot_make_the_rewrite_check_misread_a_column(plain, owned):
    """Found by review: the owner chose which columns the rewrite check read and as which type
    (merkle_guard.put_source_column, or merkle.source_columns through its trigger, also from
    inside the statement), and a column read as a type its bytes are not crashed the server.
    Only listed columns with a record are read, only as the type the guard saw them have, and a
    record written by the statement's transaction is refused."""
    su, app, role = owned
    _, dsn, _, _ = plain
    assert _guard_cli(su, "install").returncode == 0
    app.execute("CREATE TABLE public.base (v int8)")
    app.execute("CREATE TABLE public.t (id int8 PRIMARY KEY, w int8) INHERITS (public.base)")
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "public.t", "--columns", "id,v", dsn=dsn, check=True)
    source = su.execute("SELECT source_id FROM merkle.sources").fetchone()[0]
    app.execute("INSERT INTO public.t VALUES (2147483632, 1, 2147483632)")
    app.execute("INSERT INTO public.base VALUES (5)")
    # A record for a column that is not hashed: not read.
    app.execute("SELECT merkle_guard.put_source_column(%s, 'w', 'int8'::regtype, -1)", (source,))
    app.execute("ALTER TABLE public.t ALTER COLUMN w TYPE text USING w::text")
    # A record of the type a hashed column is about to get: the values are still read as theirs.
    app.execute("SELECT merkle_guard.put_source_column(%s, 'v', 'text'::regtype, -1)", (source,))
    assert su.execute("SELECT heap_type::regtype::text FROM merkle_guard.source_columns WHERE name = 'v'").fetchone()[0] \
        == "bigint"
    _refused_alive(su, app, "ALTER TABLE public.base ALTER COLUMN v TYPE text USING v::text",
                   "column v does not have the type of its stored values")
    # The record changed by the owner's code inside the statement (the parent is rewritten first).
    app.execute(f"""CREATE FUNCTION public.f(x int8) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE merkle.source_columns SET type_oid = 'text'::regtype, typmod = -1  -- what the catalog says now
             WHERE source_id = {source} AND name = 'v';
            RETURN x::text;
        END $$""")
    _refused_alive(su, app, "ALTER TABLE public.base ALTER COLUMN v TYPE text USING public.f(v)",
                   "registered or changed in this transaction")


def test_the_type_of_stored_values_is_read_after_a_retype_under_way_commits(plain, owned):
    """Found by review: put_source_column read the column's type under the caller's snapshot,
    while another session's retype was under way, and recorded a type the stored values no
    longer had. It now waits for the table and reads the type afterwards."""
    su, app, role = owned
    _, dsn, _, _ = plain
    assert _guard_cli(su, "install").returncode == 0
    app.execute("CREATE TABLE public.t (id int8 PRIMARY KEY, v text)")
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "public.t", "--columns", "id,v", dsn=dsn, check=True)
    source = su.execute("SELECT source_id FROM merkle.sources").fetchone()[0]
    app.execute("INSERT INTO public.t VALUES (1, '2147483632')")
    app.execute("SELECT merkle_guard.forget_source_column(%s, 'v')", (source,))  # v may be retyped now
    retype = psycopg.connect(dsn, options=options_string())
    put = psycopg.connect(dsn, autocommit=True, options=options_string())
    try:
        retype.execute("ALTER TABLE public.t ALTER v TYPE int8 USING v::int8")  # not committed yet
        thread, result = _in_thread(lambda: put.execute(
            "SELECT merkle_guard.put_source_column(%s, 'v', 'text'::regtype, -1)", (source,)))
        _waits_for(su, put.info.backend_pid, "public.t")
        retype.commit()
        thread.join(30)
        assert "error" not in result, result
        assert su.execute("SELECT heap_type::regtype::text FROM merkle_guard.source_columns "
                          "WHERE name = 'v'").fetchone()[0] == "bigint"
        _refused_alive(su, app, "ALTER TABLE public.t ALTER v TYPE text USING v::text",
                       "column v does not have the type of its stored values")
    finally:
        retype.close()
        put.close()


def test_the_records_a_rewrite_is_checked_against_are_held_until_its_transaction_ends(plain, owned):
    """Found by review: another session could forget a column between the statements of the
    rewrite check, which then read it unchecked. The check locks the records it reads."""
    su, app, role = owned
    _, dsn, _, _ = plain
    assert _guard_cli(su, "install").returncode == 0
    app.execute("CREATE TABLE public.t (id int8 PRIMARY KEY, v int8)")
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "public.t", dsn=dsn, check=True)
    source = su.execute("SELECT source_id FROM merkle.sources").fetchone()[0]
    app.execute("INSERT INTO public.t VALUES (1, 2147483632)")
    rewrite = psycopg.connect(dsn, options=options_string())
    forget = psycopg.connect(dsn, autocommit=True, options=options_string())
    try:
        rewrite.execute("ALTER TABLE public.t ALTER v TYPE int8 USING v + 0")  # checked, values kept; still open
        thread, result = _in_thread(lambda: forget.execute(
            "SELECT merkle_guard.forget_source_column(%s, 'v')", (source,)))
        _wait(su, "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = %s AND NOT granted)", (forget.info.backend_pid,))
        rewrite.rollback()
        thread.join(30)
        assert "error" not in result, result
    finally:
        rewrite.close()
        forget.close()
