"""A role that is no superuser, from `init` to `log drop`: each privilege it lacks is named,
with what to run, before anything is written; with the privileges of docs/replication.md
("Running as a non-superuser role") the whole flow works, in both modes."""

from __future__ import annotations

import itertools
import os
import time

import psycopg
import pytest

from listener.store import guard
from listener.store.connect import options_string
from tests.helpers import check_log, cli, drop_slot, slots, start_listener
from tests.test_replication import wait_for_size

_counter = itertools.count()


@pytest.fixture
def plain(pg_server):
    """(superuser connection, the role's DSN, role, writer role) on a new database without
    schema merkle; the role may log in and read the tables, nothing more."""
    n = f"{os.getpid()}_{next(_counter)}"
    db, role, writer = f"np{n}", f"app{n}", f"writer{n}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {db}")
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"CREATE ROLE {writer} LOGIN")
    su = psycopg.connect(pg_server.dsn(db), autocommit=True, options=options_string())
    try:
        su.execute("CREATE TABLE orders (id int PRIMARY KEY, placed timestamptz, amount numeric)")
        su.execute("CREATE TABLE payments (id int PRIMARY KEY, amount numeric)")
        su.execute(f"GRANT SELECT ON orders, payments TO {role}")
        su.execute(f"GRANT SELECT, INSERT, UPDATE ON orders, payments TO {writer}")
        yield su, psycopg.conninfo.make_conninfo(pg_server.dsn(db), user=role), role, writer
    finally:
        for name in slots(su):
            drop_slot(su, name)
        su.close()
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {db} WITH (FORCE)")
            admin.execute(f"DROP ROLE {role}")
            admin.execute(f"DROP ROLE {writer}")


def _footprint(su) -> tuple:
    return su.execute(
        "SELECT (SELECT count(*) FROM merkle.sources), (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal), "
        "(SELECT count(*) FROM pg_class WHERE relnamespace = 'merkle'::regnamespace), "
        "(SELECT count(*) FROM pg_publication), (SELECT count(*) FROM merkle.replication_progress)"
    ).fetchone() + (tuple(slots(su)),)


def _refused(out, *needles: str) -> None:
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


def _five_leaves(su, listener) -> list[tuple]:
    """Wait for the flow's five leaves (the backfilled order, three inserts, an update); their rows."""
    deadline = time.monotonic() + 60
    while su.execute("SELECT tree_size FROM merkle.logs").fetchone()[0] < 5:
        assert time.monotonic() < deadline, listener.stop()[-3000:]
        time.sleep(0.05)
    rows = check_log(su, "audit")
    assert sorted(r[3] for r in rows) == ["backfill", "insert", "insert", "insert", "update"]
    return rows


def test_a_plain_role_is_told_each_privilege_then_runs_both_modes(plain):
    su, dsn, role, writer = plain
    db = su.info.dbname
    su.execute("INSERT INTO orders VALUES (1, '2024-01-01', 5)")

    # init creates schema merkle: CREATE on the database.
    _refused(cli("init", dsn=dsn), f'GRANT CREATE ON DATABASE "{db}" TO "{role}";')
    assert su.execute("SELECT to_regnamespace('merkle')").fetchone()[0] is None
    su.execute(f"GRANT CREATE ON DATABASE {db} TO {role}")
    out = cli("init", dsn=dsn, check=True)
    # The guard needs a superuser: init says what to run, not the CREATE EVENT TRIGGER
    # statements of the migrations, whose functions would be the role's.
    assert "the DDL guard is not installed" in out.stderr and "`merkle-listener guard install`" in out.stderr
    assert "CREATE EVENT TRIGGER" not in out.stderr, out.stderr
    cli("log", "create", "audit", dsn=dsn, check=True)

    # Both modes make triggers ENABLE ALWAYS: the table's owner only.
    before = _footprint(su)
    _refused(cli("source", "add", "audit", "payments", dsn=dsn),
             "lacks what trigger mode needs", f'ALTER TABLE "public"."payments" OWNER TO "{role}";')
    assert _footprint(su) == before
    su.execute(f"REVOKE CREATE ON DATABASE {db} FROM {role}")
    out = cli("source", "add", "audit", "orders", "--mode", "replication", dsn=dsn)
    _refused(out, f'ALTER ROLE "{role}" REPLICATION;', f'GRANT CREATE ON DATABASE "{db}" TO "{role}";',
             f'ALTER TABLE "public"."orders" OWNER TO "{role}";')
    assert "GRANT postgres" not in out.stderr  # never suggest joining a superuser's role
    assert _footprint(su) == before
    su.execute(f"ALTER TABLE orders OWNER TO {role}")
    su.execute(f"ALTER TABLE payments OWNER TO {role}")
    out = cli("source", "add", "audit", "orders", "--mode", "replication", dsn=dsn)
    _refused(out, "(or use --mode trigger)", "REPLICATION", "CREATE ON DATABASE")
    assert "OWNER TO" not in out.stderr
    assert _footprint(su) == before

    # The minimal privileges of docs/replication.md.
    su.execute(f"ALTER ROLE {role} REPLICATION")
    su.execute(f"GRANT CREATE ON DATABASE {db} TO {role}")
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
    cli("source", "add", "audit", "orders", "--mode", "replication", "--events", "insert,update",
        "--backfill", dsn=dsn, check=True)
    cli("source", "add", "audit", "payments", "--append-only", dsn=dsn, check=True)
    assert slots(su) == ["merkle_audit"]

    # Writers in another role, with privileges on their tables only: the capture function runs
    # as the role that added the source.
    with psycopg.connect(su.info.dsn, user=writer, autocommit=True) as w:
        w.execute("INSERT INTO orders VALUES (2, '2024-01-02', 7)")
        w.execute("UPDATE orders SET amount = 8 WHERE id = 2")
        w.execute("INSERT INTO payments VALUES (1, 7), (2, 9)")
        outbox = su.execute("SELECT 'merkle.outbox_' || source_id FROM merkle.sources "
                            "WHERE table_name = 'payments'").fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            w.execute(f"SELECT count(*) FROM {outbox}")  # the outbox itself stays out of its reach

    listener = start_listener(dsn)
    try:
        _five_leaves(su, listener)
        # REPLICATION revoked while it runs: the stream cannot reopen, which the listener says
        # as an error with the fix, and it resumes once the privilege is back.
        su.execute(f"ALTER ROLE {role} NOREPLICATION")
        su.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'merkle_audit'")
        su.execute("INSERT INTO orders VALUES (3, '2024-01-03', 1)")
        listener.wait_for(f"role '{role}' lacks the REPLICATION privilege", timeout=30)
        listener.wait_for(f'ALTER ROLE \\"{role}\\" REPLICATION', timeout=1)  # JSON-escaped quotes
        su.execute(f"ALTER ROLE {role} REPLICATION")
        wait_for_size(su, "audit", 6, listener=listener)
        assert check_log(su, "audit")[-1][3] == "insert"
        proof = cli("prove", "inclusion", "audit", "4", dsn=dsn, check=True).stdout
        assert cli("verify", "-", input=proof, check=True).stdout.startswith("OK")
        cli("status", dsn=dsn, check=True)
        cli("source", "remove", "audit", "orders", dsn=dsn, check=True)
    finally:
        listener.stop()
    cli("log", "drop", "audit", "--yes", dsn=dsn, check=True)
    assert slots(su) == [] and su.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0


def test_init_refuses_to_upgrade_a_schema_of_another_role(plain):
    su, dsn, role, _ = plain
    su.execute(f"GRANT CREATE ON DATABASE {su.info.dbname} TO {role}")
    with psycopg.connect(su.info.dsn, autocommit=False) as c:
        # A schema merkle that a superuser made and that lacks the latest migration.
        from listener.store import migrate

        migrate.apply(c)
        c.execute("DELETE FROM merkle.schema_version WHERE version = %s", (migrate.latest_version(),))
        c.commit()
    su.execute(f"GRANT USAGE ON SCHEMA merkle TO {role}")
    su.execute(f"GRANT SELECT ON merkle.schema_version TO {role}")
    _refused(cli("init", dsn=dsn), "schema merkle belongs to role postgres", "run init as postgres or as a superuser")


def _not_the_owners(su) -> list[str]:
    """What in schema merkle belongs to another role than the schema's owner."""
    return [r[0] for r in su.execute(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'merkle' AND c.relowner <> n.nspowner "
        "UNION ALL SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'merkle' AND p.proowner <> n.nspowner ORDER BY 1")]


# The role's schema stopped before: the replication tables and the column types (005, 008),
# the guard's own-DDL marks (014, read by the guard during 015's DDL), the removed sources' names (019).
@pytest.mark.parametrize("role_applied_before", [5, 14, 19])
def test_a_superuser_upgrade_of_a_roles_schema_leaves_it_usable_by_that_role(plain, monkeypatch, role_applied_before):
    """`init` as a superuser upgrades a schema merkle of another role (docs/replication.md):
    what each migration creates is handed to the schema's owner, the role the listener,
    `source add`/`remove`, proofs and the HTTP API run as, and the guard the superuser
    installed, as the role's `init` told, keeps running through the upgrade. Then the role's
    whole flow works in both modes; a superuser's later `init` repairs a schema that an
    upgrade of an earlier version left partly the superuser's."""
    from listener import proofs
    from listener.store import migrate

    su, dsn, role, writer = plain
    db = su.info.dbname
    su.execute(f"GRANT CREATE ON DATABASE {db} TO {role}")
    su.execute(f"ALTER ROLE {role} REPLICATION")
    for table in ("orders", "payments"):
        su.execute(f"ALTER TABLE {table} OWNER TO {role}")
    known = migrate.migrations()
    hints = []
    with psycopg.connect(dsn, autocommit=True, options=options_string()) as app:
        app.add_notice_handler(lambda d: hints.append(d.message_hint))
        with monkeypatch.context() as m:  # the role's schema, as an earlier version left it
            m.setattr(migrate, "migrations", lambda: [x for x in known if x.version < role_applied_before])
            migrate.apply(app)
        app.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
    for hint in hints:  # the superuser installs the guard as the warnings say
        if hint and hint.startswith("As a superuser: "):
            su.execute(hint.removeprefix("As a superuser: "))
    if role_applied_before > 7:  # sql/007 brought the first
        assert su.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'merkle%'").fetchone()[0] > 0
    su.execute("INSERT INTO orders VALUES (1, '2024-01-01', 5)")

    with psycopg.connect(su.info.dsn, autocommit=True, options=options_string()) as upgrade:  # init as a superuser
        applied = migrate.apply(upgrade)
    assert [x.version for x in applied] == [x.version for x in known if x.version >= role_applied_before]
    assert _not_the_owners(su) == []

    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "orders", "--mode", "replication", "--events", "insert,update",
        "--backfill", dsn=dsn, check=True)
    cli("source", "add", "audit", "payments", "--append-only", dsn=dsn, check=True)
    with psycopg.connect(su.info.dsn, user=writer, autocommit=True) as w:
        w.execute("INSERT INTO orders VALUES (2, '2024-01-02', 7)")
        w.execute("UPDATE orders SET amount = 8 WHERE id = 2")
        w.execute("INSERT INTO payments VALUES (1, 7), (2, 9)")
    listener = start_listener(dsn)
    try:
        rows = _five_leaves(su, listener)
        cli("source", "remove", "audit", "orders", dsn=dsn, check=True)
    finally:
        listener.stop()
    backfilled = next(r[0] for r in rows if r[3] == "backfill")
    with psycopg.connect(dsn, autocommit=True, options=options_string()) as app:
        assert proofs.inclusion(app, "audit", backfilled)["source"] == "public.orders"  # named after its removal
    proof = cli("prove", "inclusion", "audit", str(backfilled), dsn=dsn, check=True).stdout
    assert cli("verify", "-", input=proof, check=True).stdout.startswith("OK")

    # A table an earlier superuser upgrade left the superuser's: `init` hands it over.
    su.execute("ALTER TABLE merkle.source_columns OWNER TO postgres")
    assert _not_the_owners(su) == ["merkle.source_columns", "merkle.source_columns_pkey"]
    out = cli("init", dsn=su.info.dsn, check=True).stdout  # as the superuser
    assert "(up to date)" in out and f"handed 1 object(s) in schema merkle to its owner, role {role}" in out, out
    assert _not_the_owners(su) == []
    cli("log", "drop", "audit", "--yes", dsn=dsn, check=True)
    assert slots(su) == []


def test_a_member_of_the_owners_role_without_set_is_told_before_the_upgrade(plain, monkeypatch):
    """PostgreSQL 16 lets only a role that may SET ROLE to the owner hand objects to it: a
    member without that option is refused up front, with the GRANT that fixes it; with it,
    the member's upgrade leaves everything the owner's."""
    from listener.store import migrate

    su, dsn, role, _ = plain
    if su.info.server_version < 160000:
        pytest.skip("GRANT ... WITH SET exists from PostgreSQL 16")
    member = f"m_{role}"
    su.execute(f"GRANT CREATE ON DATABASE {su.info.dbname} TO {role}")
    known = migrate.migrations()
    with psycopg.connect(dsn, autocommit=True, options=options_string()) as app:
        with monkeypatch.context() as m:  # the role's schema, as an earlier version left it
            m.setattr(migrate, "migrations", lambda: known[:-1])
            migrate.apply(app)
    su.execute(f"CREATE ROLE {member} LOGIN")
    try:
        su.execute(f"GRANT {role} TO {member} WITH INHERIT TRUE, SET FALSE")
        member_dsn = psycopg.conninfo.make_conninfo(dsn, user=member)
        out = cli("init", dsn=member_dsn)
        assert out.returncode == 2, out.stdout + out.stderr
        assert (f"role '{member}' is a member of role {role}, which owns schema merkle, without the SET option"
                in out.stderr and f'GRANT {role} TO "{member}" WITH SET TRUE;' in out.stderr), out.stderr
        assert migrate.current_version(su) == known[-2].version  # nothing changed
        su.execute(f"GRANT {role} TO {member} WITH SET TRUE")
        cli("init", dsn=member_dsn, check=True)
        assert migrate.current_version(su) == known[-1].version and _not_the_owners(su) == []
    finally:
        su.execute(f"DROP ROLE {member}")


def _superuser_upgrades(su, dsn, role_applied_before, monkeypatch, *, user=None, before_upgrade=None) -> list[str]:
    """The role's schema at an earlier version, the guard installed as init's warnings say,
    `before_upgrade(app)` run as the role, then `init` as a superuser: its warnings."""
    from listener.store import migrate

    known = migrate.migrations()
    hints, warnings = [], []
    with psycopg.connect(dsn, user=user, autocommit=True, options=options_string()) as app:
        app.add_notice_handler(lambda d: hints.append(d.message_hint))
        with monkeypatch.context() as m:
            m.setattr(migrate, "migrations", lambda: [x for x in known if x.version < role_applied_before])
            migrate.apply(app)
        if before_upgrade:
            before_upgrade(app)
    for hint in hints:
        if hint and hint.startswith("As a superuser: "):
            su.execute(hint.removeprefix("As a superuser: "))
    with psycopg.connect(su.info.dsn, autocommit=True, options=options_string()) as upgrade:
        upgrade.add_notice_handler(lambda d: warnings.append(d.message_primary))
        applied = migrate.apply(upgrade)
    assert [x.version for x in applied] == [x.version for x in known if x.version >= role_applied_before]
    return warnings


@pytest.mark.parametrize("role_applied_before", [5, 14])
def test_a_superuser_upgrade_across_014_may_drop_triggers_the_role_s_guard_checks(plain, monkeypatch,
                                                                                  role_applied_before):
    """sql/014 drops the triggers on merkle-listener's trigger functions that it did not make;
    each DROP TRIGGER runs the guard, as the schema's owner, which reads merkle.own_ddl, made by
    014 itself: the table is the role's from its creation, not from the end of 014."""
    su, dsn, role, _ = plain
    su.execute(f"GRANT CREATE ON DATABASE {su.info.dbname} TO {role}")
    su.execute(f"ALTER TABLE orders OWNER TO {role}")
    warnings = _superuser_upgrades(su, dsn, role_applied_before, monkeypatch, before_upgrade=lambda app: app.execute(
        "CREATE TRIGGER planted BEFORE DELETE ON orders FOR EACH STATEMENT EXECUTE FUNCTION merkle.refuse_change('x')"))
    assert any(w.startswith("merkle-listener: dropping trigger planted on public.orders") for w in warnings), warnings
    assert su.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'planted'").fetchone()[0] == 0
    assert su.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'merkle%'").fetchone()[0] == len(guard.EVENT_TRIGGERS)
    assert _not_the_owners(su) == []


def test_a_superuser_upgrade_hands_all_over_to_a_role_whose_name_needs_quoting(plain, monkeypatch):
    """The schema's owner is named as PostgreSQL quotes it ("Merkle ..." once, not twice); a
    partitioned table is handed over with its partitions and its serial column's sequence."""
    su, dsn, _, _ = plain
    role = f"Merkle {su.info.dbname}"
    quoted = psycopg.sql.Identifier(role).as_string(su)
    su.execute(f"CREATE ROLE {quoted} LOGIN")
    try:
        su.execute(f"GRANT CREATE ON DATABASE {su.info.dbname} TO {quoted}")
        su_made = ("CREATE TABLE merkle.parts (id int, n serial) PARTITION BY RANGE (id)",
                   "CREATE TABLE merkle.parts_1 PARTITION OF merkle.parts FOR VALUES FROM (0) TO (10)")
        _superuser_upgrades(su, dsn, 5, monkeypatch, user=role,
                            before_upgrade=lambda app: [su.execute(s) for s in su_made])
        assert su.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'merkle'").fetchone()[0] \
            == quoted
        assert _not_the_owners(su) == []
    finally:
        su.execute(f"REASSIGN OWNED BY {quoted} TO CURRENT_USER")
        su.execute(f"DROP OWNED BY {quoted}")
        su.execute(f"DROP ROLE {quoted}")
