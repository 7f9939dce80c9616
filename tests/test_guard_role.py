"""The DDL guard on a plain role's schema (sql/guard/merkle_guard.sql, listener/store/guard.py).

Event triggers run on everyone's DDL, in that role's session. Installed as `init` told before
migration 020, the guard's functions belonged to the role that owns schema merkle: it could
replace one and have its code run in the next superuser's session. The first test shows that
happen, then that after `guard install` none of the role's code runs in a superuser's session
whatever the role replaces or plants; the others, that the guard still refuses what it
refused, and that `guard install` and `guard status` read nothing of the role's unchecked.
"""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from listener.store import guard, migrate
from listener.store.connect import options_string
from listener.runner import connect
from listener.sequencer import Sequencer
from tests.helpers import cli
from tests.test_nonsuperuser import plain  # noqa: F401 (the fixture)


def _is_superuser(su, role: str) -> bool:
    return su.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


@pytest.fixture
def owned(plain):
    """(superuser connection, the role's connection, role): schema merkle made by the role, which
    owns tables orders and payments and may create its own in schema public; no guard yet."""
    with _roles_schema(plain) as app:
        yield plain[0], app, plain[2]


def _roles_schema(plain) -> psycopg.Connection:
    su, dsn, role, _ = plain
    su.execute(f"GRANT CREATE ON DATABASE {su.info.dbname} TO {role}")
    su.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    su.execute(f"ALTER ROLE {role} REPLICATION")
    for table in ("orders", "payments"):
        su.execute(f"ALTER TABLE {table} OWNER TO {role}")
    out = cli("init", dsn=dsn, check=True)
    assert "the DDL guard is not installed" in out.stderr and "CREATE EVENT TRIGGER" not in out.stderr, out.stderr
    return psycopg.connect(dsn, autocommit=True, options=options_string())


def _guard_cli(su, *args: str) -> subprocess.CompletedProcess:
    return cli("guard", *args, dsn=su.info.dsn)


def _spy(app, role: str) -> None:
    """public.ran_in(session_user) is written by every function of the role's below: whoever's
    session it runs in, it tries to make the role a superuser and to leave a search_path behind
    in that session."""
    app.execute("CREATE TABLE public.ran_in (who text)")
    app.execute("GRANT INSERT ON public.ran_in TO PUBLIC")
    app.execute(f"""CREATE FUNCTION public.escalate() RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.ran_in VALUES (session_user);
            PERFORM pg_catalog.set_config('search_path', 'public, pg_catalog', false);
            BEGIN
                RESET ROLE;
                ALTER ROLE {role} SUPERUSER;
            EXCEPTION WHEN OTHERS THEN NULL;
            END;
        END $$""")
    app.execute("GRANT EXECUTE ON FUNCTION public.escalate() TO PUBLIC")


def _old_style_install(su) -> None:
    """The guard as the warnings of `init` said to install it before 020: their CREATE EVENT
    TRIGGER statements, run by a superuser, on the functions of schema merkle, the role's."""
    for t in guard.EVENT_TRIGGERS:
        if su.execute("SELECT to_regprocedure(%s) IS NULL", (f"merkle.{t.function}()",)).fetchone()[0]:
            continue  # an event trigger added since (its function is merkle_guard's only)
        when = " WHEN TAG IN (" + ", ".join(f"'{tag}'" for tag in t.tags) + ")" if t.tags else ""
        su.execute(f"CREATE EVENT TRIGGER {t.name} ON {t.event}{when} EXECUTE FUNCTION merkle.{t.function}()")


def test_after_guard_install_no_code_of_the_owner_runs_in_a_superusers_ddl(plain, owned):
    su, app, role = owned
    _, dsn, _, _ = plain
    _spy(app, role)
    app.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    app.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "m", "--mode", "replication", "--append-only", dsn=dsn, check=True)
    cli("source", "add", "audit", "orders", dsn=dsn, check=True)
    app.execute("INSERT INTO orders VALUES (1, '2024-01-01', 5)")
    app.execute("INSERT INTO m VALUES (1, '2025-02-01', 1)")
    su.execute("CREATE TABLE su_table (a int)")

    # Installed the old way, the role replaces a guard function and becomes a superuser at the
    # next superuser's ALTER TABLE: what the rest of this test shows cannot happen any more.
    _old_style_install(su)
    out = _guard_cli(su, "status")
    assert out.returncode == 3 and f"UNSAFE: role {role} owns functions" in out.stdout, out.stdout
    assert "which can replace them" in cli("init", dsn=dsn, check=True).stderr
    app.execute("CREATE OR REPLACE FUNCTION merkle.check_source_ddl() RETURNS event_trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM public.escalate(); END $$")
    su.execute("ALTER TABLE su_table ADD COLUMN b int")
    assert _is_superuser(su, role)
    su.execute(f"ALTER ROLE {role} NOSUPERUSER")
    su.execute("RESET search_path")
    app.execute("DELETE FROM public.ran_in")

    # Every function of schema merkle that the old guard called, the role's own, replaced with
    # the spy while the old event triggers still call them: `guard install` must fire none.
    for signature, returns in (("check_source_ddl()", "event_trigger"), ("check_source_partitions()", "event_trigger"),
                               ("check_source_drop()", "event_trigger"), ("check_source_rewrite()", "event_trigger"),
                               ("own_ddl_running(p_purpose text, p_source_id integer DEFAULT NULL)", "boolean"),
                               ("has_rows(rel regclass)", "boolean"), ("rewrite_digest(rel regclass, cols text[])", "bytea"),
                               ("install_partition_guards(p_source_id integer)", "void")):
        ret = "" if returns in ("event_trigger", "void") else " RETURN NULL;"
        app.execute(f"CREATE OR REPLACE FUNCTION merkle.{signature} RETURNS {returns} LANGUAGE plpgsql "
                    f"AS $$ BEGIN PERFORM public.escalate();{ret} END $$")
    out = _guard_cli(su, "install")
    assert out.returncode == 0 and "call the functions of schema merkle_guard" in out.stdout, out.stdout + out.stderr
    out = _guard_cli(su, "status")
    assert out.returncode == 0 and "guard complete" in out.stdout, out.stdout

    # The superuser's DDL, each kind the guard looks at, on its own tables and on the role's.
    su.execute("ALTER TABLE su_table ADD COLUMN c int")
    su.execute("CREATE TRIGGER t BEFORE UPDATE ON su_table FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()")
    su.execute("DROP TRIGGER t ON su_table")
    su.execute("ALTER TABLE su_table ALTER COLUMN a TYPE bigint")
    # A partition the superuser would own: the guard does not put the role's trigger function on it.
    partition = "CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
    with pytest.raises(psycopg.Error, match="it belongs to role") as refused:
        su.execute(partition)
    assert refused.value.sqlstate == "ML101"
    su.execute(f"SET ROLE {role}")  # as the hint says
    su.execute(partition)
    su.execute("RESET ROLE")
    assert su.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'm_2026'::regclass").fetchone()[0] == 1
    su.execute("ALTER TABLE m DETACH PARTITION m_2026")  # empty: its guard trigger is dropped
    assert su.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'm_2026'::regclass").fetchone()[0] == 0
    for statement in ("ALTER TABLE m DETACH PARTITION m_2025",  # it holds a row
                      "ALTER TABLE orders ALTER amount TYPE numeric USING amount * 2"):  # rewrites hashed values
        with pytest.raises(psycopg.Error) as refused:
            su.execute(statement)
        assert refused.value.sqlstate == "ML101", refused.value
    su.execute("ALTER TABLE orders ALTER amount TYPE numeric USING amount")  # the same values: let through
    su.execute("DROP TABLE su_table, m_2026")
    assert su.execute("SELECT count(*) FROM public.ran_in WHERE who <> %s", (role,)).fetchone()[0] == 0
    assert not _is_superuser(su, role)
    assert su.execute("SHOW search_path").fetchone()[0] == '"$user", public'

    # The guard's functions and tables are not the role's to replace, drop, alter or write.
    for statement in ("DROP FUNCTION merkle_guard.check_source_ddl() CASCADE",
                      "ALTER FUNCTION merkle_guard.check_source_ddl() SECURITY INVOKER",
                      "CREATE OR REPLACE FUNCTION merkle_guard.has_rows(rel regclass) RETURNS boolean LANGUAGE sql "
                      "AS $$ SELECT false $$",
                      "DELETE FROM merkle_guard.sources"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(statement)


def test_the_guard_refuses_the_owners_ddl_as_before_and_keeps_its_copy(plain, owned):
    """The role's own DDL on its sources, under the guard of schema merkle_guard: refused as
    before, with its own changes (source add, partition guards, source remove) let through; the
    guard's copy of the sources follows every change of merkle.sources."""
    su, app, role = owned
    _, dsn, _, _ = plain
    assert _guard_cli(su, "install").returncode == 0  # before any source: the copy starts empty
    app.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    app.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "m", "--mode", "replication", "--append-only", dsn=dsn, check=True)
    cli("source", "add", "audit", "payments", dsn=dsn, check=True)

    def copied() -> list[tuple]:
        return su.execute("SELECT source_id, log_name, table_name, mode, retired FROM merkle_guard.sources "
                          "ORDER BY source_id").fetchall()

    def columns() -> list[tuple]:
        return su.execute("SELECT source_id, name, type_oid, typmod FROM merkle_guard.source_columns ORDER BY 1, 2").fetchall()

    m_id, payments_id = (r[0] for r in su.execute("SELECT source_id FROM merkle.sources ORDER BY source_id"))
    assert copied() == [(m_id, "audit", "m", "replication", False), (payments_id, "audit", "payments", "trigger", False)]
    assert columns() == su.execute("SELECT source_id, name, type_oid, typmod FROM merkle.source_columns ORDER BY 1, 2").fetchall()

    def refused(statement: str) -> None:
        with pytest.raises(psycopg.Error) as exc:
            app.execute(statement)
        assert exc.value.sqlstate == "ML101", f"{statement}: {exc.value.sqlstate} {exc.value}"

    app.execute("INSERT INTO m VALUES (1, '2025-02-01', 1)")
    app.execute("INSERT INTO payments VALUES (1, 7)")
    app.execute("CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    assert su.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'm_2026'::regclass").fetchone()[0] == 1
    app.execute("CREATE TABLE m_2027 (LIKE m)")
    app.execute("INSERT INTO m_2027 VALUES (2, '2027-02-01', 2)")
    refused("ALTER TABLE m ATTACH PARTITION m_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
    refused("ALTER TABLE m DETACH PARTITION m_2025")
    refused("ALTER TABLE m DETACH PARTITION m_2026 CONCURRENTLY")
    refused("ALTER TABLE m DROP COLUMN v")
    refused("ALTER TABLE payments ALTER COLUMN amount TYPE numeric USING amount + 1")
    refused(f"DROP TRIGGER merkle_capture_{payments_id} ON payments")
    refused(f"DROP TRIGGER merkle_partition_{m_id} ON m_2025")
    app.execute("ALTER TABLE m DETACH PARTITION m_2026")  # empty: let go, its guard trigger dropped
    assert su.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'm_2026'::regclass").fetchone()[0] == 0
    assert su.execute("SELECT count(*) FROM merkle_guard.rewrite_checks").fetchone()[0] == 0
    assert su.execute("SELECT count(*) FROM merkle_guard.own_ddl").fetchone()[0] == 0

    # source remove drops the capture trigger (its own DDL, marked for the guard); once the queued
    # change is logged, a second remove forgets the source, and the copy follows.
    cli("source", "remove", "audit", "payments", dsn=dsn, check=True)
    with connect(dsn) as c:
        assert Sequencer(c, "audit").drain_all() >= 1
    cli("source", "remove", "audit", "payments", dsn=dsn, check=True)
    assert [r[0] for r in copied()] == [m_id]
    cli("log", "drop", "audit", "--yes", dsn=dsn, check=True)
    assert copied() == [] and columns() == []
    assert _guard_cli(su, "status").returncode == 0


def test_guard_install_refuses_what_it_cannot_do_safely(plain, monkeypatch):
    su, dsn, role, _ = plain
    su.execute(f"GRANT CREATE ON DATABASE {su.info.dbname} TO {role}")
    su.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    known = migrate.migrations()
    with psycopg.connect(dsn, autocommit=True, options=options_string()) as app:
        with monkeypatch.context() as m:  # the role's schema before sql/020
            m.setattr(migrate, "migrations", lambda: [x for x in known if x.version < 20])
            migrate.apply(app)
    out = _guard_cli(su, "install")
    assert out.returncode == 2 and f"run `merkle-listener init` as its owner, role {role}, first" in out.stderr, out.stderr
    assert su.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0] == 0
    cli("init", dsn=dsn, check=True)

    out = cli("guard", "install", dsn=dsn)  # as the role
    assert out.returncode == 2 and "is no superuser" in out.stderr, out.stderr

    # A table of the role's that install would read as a superuser, made a view of its code.
    with psycopg.connect(dsn, autocommit=True, options=options_string()) as app:
        _spy(app, role)
        app.execute("CREATE FUNCTION public.spied() RETURNS boolean LANGUAGE plpgsql AS "
                    "$$ BEGIN PERFORM public.escalate(); RETURN true; END $$")
        app.execute("ALTER TABLE merkle.logs RENAME TO logs_table")
        app.execute("CREATE VIEW merkle.logs AS SELECT * FROM merkle.logs_table WHERE public.spied()")
        out = _guard_cli(su, "install")
        assert out.returncode == 2 and "merkle.logs is not the table" in out.stderr, out.stderr
        app.execute("DROP VIEW merkle.logs")
        app.execute("ALTER TABLE merkle.logs_table RENAME TO logs")
        app.execute("ALTER TABLE merkle.sources ALTER COLUMN mode TYPE varchar")  # another type: refused too
        out = _guard_cli(su, "install")
        assert out.returncode == 2 and "merkle.sources is not the table" in out.stderr, out.stderr
        app.execute("ALTER TABLE merkle.sources ALTER COLUMN mode TYPE text")
        assert su.execute("SELECT count(*) FROM public.ran_in").fetchone()[0] == 0
        assert su.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0] == 0  # nothing was changed

        # A schema merkle_guard that a plain role made could be changed by it.
        su.execute(f"CREATE SCHEMA merkle_guard AUTHORIZATION {role}")
        out = _guard_cli(su, "install")
        assert out.returncode == 2 and f"schema merkle_guard belongs to role {role}" in out.stderr, out.stderr
        su.execute("DROP SCHEMA merkle_guard")
    assert _guard_cli(su, "install").returncode == 0


def test_the_roles_init_says_when_an_installed_guard_is_out_of_date(plain, owned):
    """A guard installed for an earlier version (here: one event trigger it did not have yet)
    cannot be brought up to date by the role's upgrade; its `init` says so, and a superuser's
    `guard install` completes it."""
    su, app, role = owned
    _, dsn, _, _ = plain
    assert _guard_cli(su, "install").returncode == 0
    assert "warning" not in cli("init", dsn=dsn, check=True).stderr
    su.execute(f"DROP EVENT TRIGGER {guard.EVENT_TRIGGERS[-1].name}")
    # ... and one this version no longer has
    su.execute("CREATE EVENT TRIGGER merkle_retired ON ddl_command_end EXECUTE FUNCTION merkle_guard.check_source_ddl()")
    out = cli("init", dsn=dsn, check=True)
    assert "the DDL guard installed in this database is incomplete or another version's" in out.stderr, out.stderr
    assert _guard_cli(su, "status").returncode == 3
    assert _guard_cli(su, "install").returncode == 0
    assert _guard_cli(su, "status").returncode == 0
    assert su.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname = 'merkle_retired'").fetchone()[0] == 0
    assert "warning" not in cli("init", dsn=dsn, check=True).stderr


def test_guard_status_resolves_nothing_in_the_roles_schemas(plain, owned):
    """A superuser's `guard status` reads catalogs with search_path pinned: an operator the role
    puts in a schema named like the superuser (first on the default search_path) is not used."""
    su, app, role = owned
    _spy(app, role)
    superuser = su.execute("SELECT current_user").fetchone()[0]
    app.execute(f'CREATE SCHEMA "{superuser}"')
    app.execute(f'GRANT USAGE ON SCHEMA "{superuser}" TO PUBLIC')
    for left, right in (("oid", "oid"), ("name", "text"), ("text[]", "text[]")):
        fn = f'"{superuser}".eq_{left.strip("[]")}_{right.strip("[]")}'
        app.execute(f"CREATE FUNCTION {fn}(a {left}, b {right}) RETURNS boolean LANGUAGE plpgsql AS "
                    f"$$ BEGIN PERFORM public.escalate(); RETURN a::text = b::text; END $$")
        app.execute(f'CREATE OPERATOR "{superuser}".= (FUNCTION = {fn}, LEFTARG = {left}, RIGHTARG = {right})')
    assert _guard_cli(su, "install").returncode == 0
    assert _guard_cli(su, "status").returncode == 0
    assert su.execute("SELECT count(*) FROM public.ran_in").fetchone()[0] == 0
    assert not _is_superuser(su, role)


def _folded_spy(app) -> None:
    """public.folded(): an IMMUTABLE function that calls the spy; the planner calls it when it
    folds an index or statistics expression, as whoever plans the query."""
    app.execute("CREATE FUNCTION public.spy_value() RETURNS int LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM public.escalate(); RETURN 0; END $$")
    app.execute("CREATE FUNCTION public.folded() RETURNS int LANGUAGE plpgsql IMMUTABLE AS "
                "$$ BEGIN RETURN public.spy_value(); END $$")
    app.execute("GRANT EXECUTE ON FUNCTION public.spy_value(), public.folded() TO PUBLIC")


@pytest.mark.parametrize("plant", ["CREATE INDEX ON {t} (({c} + public.folded()))",
                                   "CREATE INDEX ON {t} ({c}) WHERE {c} > public.folded()",
                                   "CREATE STATISTICS public.{c}_{n} ON ({c} + public.folded()), {c} FROM {t}"])
def test_the_guard_reads_no_table_whose_planning_would_run_the_owners_code(plain, owned, plant):
    """Found by review: planning a query on a table folds the function calls in its index
    expressions and predicates and its statistics expressions, so reading a table ran its
    owner's function as the guard, a superuser, when the guard (or `guard install`) looked for
    rows or digested a rewrite. Each is refused now, before the read, and nothing ran."""
    su, app, role = owned
    _, dsn, _, _ = plain
    _spy(app, role)
    _folded_spy(app)
    # `guard install` reads the owner's tables to copy the sources: refused.
    app.execute(plant.format(t="merkle.sources", c="source_id", n=1))
    out = _guard_cli(su, "install")
    assert out.returncode == 2 and "merkle.sources is not the table" in out.stderr, out.stderr
    app.execute("SELECT 1")  # the planted object stays; a copy of the schema without it installs
    with psycopg.connect(dsn, autocommit=True) as c:
        for (name,) in c.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'merkle.sources'::regclass "
                                 "AND (indexprs IS NOT NULL OR indpred IS NOT NULL) UNION ALL SELECT 'STAT ' || "
                                 "stxnamespace::regnamespace || '.' || stxname FROM pg_statistic_ext "
                                 "WHERE stxrelid = 'merkle.sources'::regclass").fetchall():
            c.execute(f"DROP STATISTICS {name[5:]}" if name.startswith("STAT ") else f"DROP INDEX {name}")
    assert _guard_cli(su, "install").returncode == 0

    app.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    app.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "m", "--mode", "replication", dsn=dsn, check=True)
    cli("source", "add", "audit", "orders", dsn=dsn, check=True)
    app.execute("INSERT INTO m VALUES (1, '2025-02-01', 1)")
    app.execute("INSERT INTO orders VALUES (1, '2024-01-01', 5)")
    app.execute(plant.format(t="m_2025", c="v", n=2))
    app.execute(plant.format(t="orders", c="id", n=3))
    for who in (app, su):
        for statement, what in (("ALTER TABLE m DETACH PARTITION m_2025", "m_2025"),  # the guard looks for rows
                                ("ALTER TABLE orders ALTER amount TYPE numeric USING amount + 0", "orders")):  # digests
            with pytest.raises(psycopg.Error, match=f"guard must read the rows of public.{what} and will not") as exc:
                who.execute(statement)
            assert exc.value.sqlstate == "ML101"
    # A table the guard once guarded, planted where any DDL of any role would have read it.
    app.execute("CREATE TABLE public.x (a int)")
    app.execute("INSERT INTO public.x VALUES (1)")
    app.execute(plant.format(t="public.x", c="a", n=4))
    m_id = su.execute("SELECT source_id FROM merkle.sources WHERE table_name = 'm'").fetchone()[0]
    app.execute(f"CREATE TRIGGER merkle_partition_{m_id} BEFORE TRUNCATE ON public.x FOR EACH STATEMENT "
                f"EXECUTE FUNCTION merkle.partition_guard('{m_id}')")
    su.execute("CREATE TABLE su_table (a int)")  # no longer refused, nor reads x
    app.execute("CREATE TABLE public.anything (a int)")
    # The role's own statements ran its function in its own sessions (index upkeep); no other did.
    assert su.execute("SELECT count(*) FROM public.ran_in WHERE who <> %s", (role,)).fetchone()[0] == 0
    assert not _is_superuser(su, role)
