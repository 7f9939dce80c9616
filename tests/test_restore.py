"""A database restored from pg_dump: its tables come back under new OIDs.

Sources name their tables by OID; `status` reports a table back under a new OID, `init`
points the source at it again (by its capture trigger, or by its registered name among its
publication's tables), and then capture, the DDL guard, `source remove` and the recovery of
the replication slot (which no dump carries) work as before. The log itself (leaves, tree,
root) comes back byte for byte.
"""

from __future__ import annotations

import json
import shlex
import subprocess

import psycopg
import pytest

from listener import registry, relink
from listener.embedded import bin_dir
from listener.runner import connect
from tests.helpers import check_log, cli, start_listener
from tests.test_replication import wait_for_size

# pg_dump/pg_restore round trips of the registry, alike on every version between the ends.
pytestmark = pytest.mark.oldest_and_newest


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}: {done.stderr}"


def _restore(dump, dsn: str, *options: str, on_error_stop: bool = True) -> None:
    """pg_restore of `dump` into `dsn`, through a script: the tools are the wheel's (18), whose
    scripts set transaction_timeout, which servers before 17 do not know."""
    script = dump.with_suffix(".sql")
    _run(str(bin_dir() / "pg_restore"), *options, "-f", str(script), str(dump))
    script.write_text("".join(line for line in script.read_text().splitlines(keepends=True)
                              if not line.startswith("SET transaction_timeout")))
    _run(str(bin_dir() / "psql"), "-X", "-q", "-v", f"ON_ERROR_STOP={int(on_error_stop)}", "-d", dsn,
         "-f", str(script))


def _dump(dsn: str, tmp_path):
    dump = tmp_path / "backup.dump"
    _run(str(bin_dir() / "pg_dump"), "-Fc", "-f", str(dump), "-d", dsn)
    return dump


def _restored_copy(pg_server, dsn: str, name: str, tmp_path, *, keep_slots: bool = False) -> str:
    """pg_dump of `dsn` restored into a new database `name` of the same server (as a superuser,
    as restoring the DDL guard's event triggers needs); the old database's slots are dropped, as
    on a new server, unless `keep_slots`."""
    dump = _dump(dsn, tmp_path)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        old = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        for (slot,) in admin.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s AND NOT %s",
                                     (old, keep_slots)).fetchall():
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    new = pg_server.dsn(name)
    _restore(dump, new)
    return new


def _log_three_rows_each(rconn, tables) -> None:
    """Rows 1-3 into each of `tables` (id, v), all logged in log a by a listener run."""
    for i in range(1, 4):
        for table in tables:
            rconn.execute(f"INSERT INTO {table} (id, v) VALUES (%s, 'before')", (i,))
    listener = start_listener(rconn.info.dsn)
    try:
        wait_for_size(rconn, "a", 3 * len(tables), listener=listener)
    finally:
        listener.stop()


@pytest.fixture
def restored_name(pg_server):
    name = "restored_copy"
    yield name
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        for (slot,) in admin.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)).fetchall():
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_restored_database_is_relinked_by_init(pg_server, rconn, restored_name, tmp_path):
    dsn = rconn.info.dsn
    for table in ("t", "ao", "r"):
        rconn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    rconn.execute("CREATE TYPE mood AS ENUM ('calm', 'tense')")
    rconn.execute("ALTER TABLE r ADD COLUMN m mood")  # a hashed column of a type with an OID of its own
    registry.create_log(rconn, "a")
    with connect(dsn) as c:
        registry.add_source(c, "a", "t")
        registry.add_source(c, "a", "ao", append_only=True)
        registry.add_source(c, "a", "r", mode="replication")
    cli("guard", "install", dsn=dsn, check=True)
    _log_three_rows_each(rconn, ("t", "ao", "r"))
    before = check_log(rconn, "a")

    new = _restored_copy(pg_server, dsn, restored_name, tmp_path)

    with connect(new, autocommit=True) as c:
        assert [r[1:] for r in check_log(c, "a")] == [r[1:] for r in before]  # the log came back as it was
        moved = relink.moved_sources(c)
        assert sorted(m.qualified for m in moved) == ["public.ao", "public.r", "public.t"]
        assert all(m.new_oid == c.execute("SELECT %s::regclass::oid", (m.qualified,)).fetchone()[0] for m in moved)
        # The DDL guard's record of the publication names its tables by name: still as restored.
        c.execute("CREATE TABLE scratch (i int); DROP TABLE scratch")
    status = cli("status", dsn=new)
    assert status.returncode == 3, status.stdout + status.stderr
    for table in ("t", "ao", "r"):
        assert f"table public.{table} came back under a new OID" in status.stdout
    assert "run `merkle-listener init`" in status.stdout
    # Until then the sources are not changed: an add would not see t as a source already.
    for args in (("source", "add", "a", "t"), ("source", "remove", "a", "t"), ("source", "remove", "a", "r"),
                 ("log", "drop", "a", "--yes")):
        refused = cli(*args, dsn=new)
        assert refused.returncode == 2 and "run `merkle-listener init` first" in refused.stderr, refused.stderr

    init = cli("init", dsn=new, check=True)
    for table in ("t", "ao", "r"):
        assert f"source public.{table} now names its table by OID" in init.stdout, init.stdout
    with connect(new, autocommit=True) as c:
        assert relink.moved_sources(c) == []
    assert "now names its table" not in cli("init", dsn=new, check=True).stdout  # done once

    with connect(new, autocommit=True) as c:
        c.execute("CREATE TABLE scratch (i int); DROP TABLE scratch")
        # ... and it still guards the sources' tables, now by their new OIDs.
        with pytest.raises(psycopg.DatabaseError, match="merkle_capture"):
            c.execute("DROP TRIGGER merkle_capture_1 ON t")
        with pytest.raises(psycopg.DatabaseError, match="append-only"):
            c.execute("UPDATE ao SET v = 'changed'")
        with pytest.raises(psycopg.DatabaseError):
            c.execute("ALTER TABLE r ALTER COLUMN m TYPE text")  # a hashed column's type, OID updated by init
    # The slot is not in any dump: status gives the recovery, which works as printed.
    status = cli("status", dsn=new)
    assert status.returncode == 3 and "slot merkle_a: MISSING" in status.stdout
    assert "came back under a new OID" not in status.stdout
    cli("source", "remove", "a", "public.r", dsn=new, check=True)
    cli("source", "add", "a", "public.r", "--key", "id", "--columns", "id,m,v", "--mode", "replication",
        "--events", "insert", "--backfill", dsn=new, check=True)
    status = cli("status", dsn=new)
    assert status.returncode == 0, status.stdout + status.stderr

    with psycopg.connect(new, autocommit=True) as w:
        for i in range(4, 6):
            for table in ("t", "ao", "r"):
                w.execute(f"INSERT INTO {table} (id, v) VALUES (%s, 'after')", (i,))
    listener = start_listener(new)
    try:
        with connect(new, autocommit=True) as c:
            # 9 before; r's 3 rows again as backfill; 2 new rows of each table
            wait_for_size(c, "a", 9 + 3 + 6, listener=listener)
            after = check_log(c, "a")
    finally:
        listener.stop()
    assert [r[1:] for r in after[:9]] == [r[1:] for r in before]
    ops = [(r[3], r[2]) for r in after[9:]]
    assert sorted(ops).count(("backfill", '{"id":"1"}')) == 1 and len(ops) == 9
    # `source remove` finds the trigger's table again (nothing queued: it goes at once).
    cli("source", "remove", "a", "public.t", dsn=new, check=True)
    with connect(new, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass").fetchone() == (0,)


def test_a_table_dropped_and_made_again_is_not_taken_for_the_source(rconn):
    dsn = rconn.info.dsn
    rconn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    rconn.execute("CREATE TABLE r (id int PRIMARY KEY, v text)")
    registry.create_log(rconn, "a")
    with connect(dsn) as c:
        registry.add_source(c, "a", "t")
        registry.add_source(c, "a", "r", mode="replication")
    for table in ("t", "r"):  # no DDL guard here: the drop is allowed
        rconn.execute(f"DROP TABLE {table}")
        rconn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    moved = relink.moved_sources(rconn)
    assert sorted((m.qualified, m.new_oid) for m in moved) == [("public.r", None), ("public.t", None)]
    init = cli("init", dsn=dsn, check=True)
    assert init.stderr.count("none was found with certainty") == 2, init.stderr
    status = cli("status", dsn=dsn)
    assert status.stdout.count("no longer exists (dropped)") == 2, status.stdout


def test_restored_on_a_new_server(pg_server, rconn, tmp_path):
    """A new cluster hands out OIDs from the same range: old and new OIDs of the sources mix."""
    from listener.embedded import EmbeddedPostgres

    dsn = rconn.info.dsn
    tables = [f"t{i}" for i in range(6)]
    for i, table in enumerate(tables):
        rconn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    registry.create_log(rconn, "a")
    with connect(dsn) as c:
        for i, table in enumerate(tables):
            registry.add_source(c, "a", table, mode="replication" if i % 3 == 0 else "trigger")
    for table in tables:
        rconn.execute(f"INSERT INTO {table} VALUES (1, 'before')")
    listener = start_listener(dsn)
    try:
        wait_for_size(rconn, "a", len(tables), listener=listener)
    finally:
        listener.stop()
    dump = _dump(dsn, tmp_path)

    server = EmbeddedPostgres(tmp_path / "new-server", settings={"fsync": "off"}, bin_dir=pg_server.bin_dir)
    server.start(owned=True)
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE restored TEMPLATE template0")
        new = server.dsn("restored")
        _restore(dump, new)
        assert cli("status", dsn=new).stdout.count("came back under a new OID") == len(tables)
        init = cli("init", dsn=new, check=True)
        assert init.stdout.count("now names its table by OID") == len(tables), init.stdout + init.stderr
        with connect(new, autocommit=True) as c:
            assert relink.moved_sources(c) == []
            assert sorted(c.execute("SELECT table_name, table_oid FROM merkle.sources").fetchall()) == sorted(
                c.execute("SELECT relname, oid FROM pg_class WHERE relname = ANY(%s)", (tables,)).fetchall())
            for table in tables:
                c.execute(f"INSERT INTO {table} VALUES (2, 'after')")
        listener = start_listener(new)
        try:
            with connect(new, autocommit=True) as c:
                # The trigger sources' new rows; the replication ones wait for the slot's recovery.
                wait_for_size(c, "a", len(tables) + 4, listener=listener)
                assert "slot merkle_a: MISSING" in cli("status", dsn=new).stdout
                check_log(c, "a")
        finally:
            listener.stop()
    finally:
        server.destroy()


def _next_oid(c) -> int:
    """The OID the server hands out next (one counter per cluster), used up by a large object."""
    oid = c.execute("SELECT lo_create(0)").fetchone()[0]
    c.execute("SELECT lo_unlink(%s)", (oid,))
    return oid


def test_a_new_oid_that_was_another_sources_old_one_is_not_taken_for_it(pg_server, tmp_path):
    """On a new server the new OID of r's table is t's old OID (arranged here): t is not taken
    to be in place because its OID names a table of its log's publication. Both servers are
    fresh, so that the OIDs are the test's alone."""
    from listener.embedded import EmbeddedPostgres
    from listener.store import migrate

    servers = [EmbeddedPostgres(tmp_path / name, settings={"fsync": "off", "wal_level": "logical"},
                                bin_dir=pg_server.bin_dir) for name in ("old-server", "new-server")]
    try:
        for server in servers:
            server.start(owned=True)
            with psycopg.connect(server.dsn(), autocommit=True) as admin:
                admin.execute("CREATE DATABASE app TEMPLATE template0")
                admin.execute("CREATE DATABASE probe TEMPLATE template0")
        dsn = servers[0].dsn("app")
        with connect(dsn) as c:
            migrate.apply(c)
            c.commit()
        with connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE r (id int PRIMARY KEY, v text)")
            c.execute("SELECT lo_unlink(lo_create(0)) FROM generate_series(1, 3000)")  # t's OID above r's new one
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            registry.create_log(c, "a")
            t_old = c.execute("SELECT 't'::regclass::oid").fetchone()[0]
        with connect(dsn) as c:
            registry.add_source(c, "a", "t")
            registry.add_source(c, "a", "r", mode="replication")
        dump = _dump(dsn, tmp_path)
        new, probe = servers[1].dsn("app"), servers[1].dsn("probe")
        with psycopg.connect(probe, autocommit=True) as c:  # where r lands: a restore is repeatable
            start = _next_oid(c)
        _restore(dump, probe)
        with psycopg.connect(probe, autocommit=True) as c:
            offset = c.execute("SELECT 'r'::regclass::oid").fetchone()[0] - start
        with psycopg.connect(new, autocommit=True) as c:
            c.execute("SELECT lo_unlink(lo_create(0)) FROM generate_series(1, %s)", (t_old - offset - _next_oid(c),))
        _restore(dump, new)
        with psycopg.connect(new, autocommit=True) as c:
            assert c.execute("SELECT 'r'::regclass::oid").fetchone()[0] == t_old
        cli("init", dsn=new, check=True)
        with psycopg.connect(new, autocommit=True) as c:
            assert dict(c.execute("SELECT s.table_name, c.relname::text FROM merkle.sources s "
                                  "JOIN pg_class c ON c.oid = s.table_oid").fetchall()) == {"t": "t", "r": "r"}
    finally:
        for server in servers:
            server.destroy()


def _guarded_replication_source(rconn, where: str | None = None) -> str:
    dsn = rconn.info.dsn
    rconn.execute("CREATE TABLE r (id int PRIMARY KEY, v text)")
    registry.create_log(rconn, "a")
    with connect(dsn) as c:
        registry.add_source(c, "a", "r", mode="replication", where=where)
    cli("guard", "install", dsn=dsn, check=True)
    return dsn


def _publication_problem(dsn: str) -> str | None:
    return json.loads(cli("status", "--json", dsn=dsn).stdout)["logs"][0]["slot"]["publication_problem"]


def test_a_publication_changed_by_hand_stays_reported_after_a_restore(pg_server, rconn, restored_name, tmp_path):
    dsn = _guarded_replication_source(rconn, where="id > 0")
    for trigger in ("merkle_log_publication", "merkle_log_publication_drop"):  # the guard off for a moment
        rconn.execute(f"ALTER EVENT TRIGGER {trigger} DISABLE")
    rconn.execute("ALTER PUBLICATION merkle_a SET TABLE r WHERE (id > 100)")  # rows 1..100 escape the log
    for trigger in ("merkle_log_publication", "merkle_log_publication_drop"):
        rconn.execute(f"ALTER EVENT TRIGGER {trigger} ENABLE ALWAYS")
    assert "not as merkle-listener made it" in _publication_problem(dsn)

    new = _restored_copy(pg_server, dsn, restored_name, tmp_path)
    cli("init", dsn=new, check=True)  # as a superuser: it installs the guard again
    assert "not as merkle-listener made it" in (_publication_problem(new) or "")


def test_the_guards_record_holds_after_a_restore_without_a_superuser(pg_server, rconn, restored_name, tmp_path):
    """`init` by the schema's owner relinks without reinstalling the guard: the guard's record of
    the publication, by table name, needs nothing of it."""
    new = _restored_copy(pg_server, _guarded_replication_source(rconn), restored_name, tmp_path)
    with connect(new, autocommit=False) as c:
        assert c.execute("SELECT count(*) FROM merkle_guard.changed_log_publications()").fetchone() == (0,)
        done, left = relink.relink(c)
        c.commit()
        assert [m.qualified for m in done] == ["public.r"] and left == []
        assert c.execute("SELECT count(*) FROM merkle_guard.changed_log_publications()").fetchone() == (0,)
        c.execute("CREATE TABLE scratch (i int); DROP TABLE scratch")


def test_a_record_by_table_oid_is_put_in_names_by_guard_install(rconn):
    """A record from before names (an earlier version's) is rewritten at the next install."""
    dsn = _guarded_replication_source(rconn, where="id > 0")
    oid = rconn.execute("SELECT 'r'::regclass::oid").fetchone()[0]
    rconn.execute("UPDATE merkle_guard.log_publications SET tables = jsonb_build_object(%s::text, "
                  "jsonb_build_array('(id > 0)', NULL::text)), namespaces = '[]'", (oid,))
    assert rconn.execute("SELECT count(*) FROM merkle_guard.changed_log_publications()").fetchone() == (1,)
    cli("guard", "install", dsn=dsn, check=True)
    assert rconn.execute("SELECT tables FROM merkle_guard.log_publications").fetchone()[0] == {
        "public.r": ["(id > 0)", None]}
    assert rconn.execute("SELECT count(*) FROM merkle_guard.changed_log_publications()").fetchone() == (0,)


def test_a_copy_on_the_same_server_is_told_whose_slot_it_is(pg_server, rconn, restored_name, tmp_path):
    """Slot names are the server's: a restored copy beside its original cannot make the log's
    slot while the original has it, and `status` says so rather than print a recovery that fails."""
    dsn = rconn.info.dsn
    rconn.execute("CREATE TABLE r (id int PRIMARY KEY, v text)")
    registry.create_log(rconn, "a")
    with connect(dsn) as c:
        registry.add_source(c, "a", "r", mode="replication")
    new = _restored_copy(pg_server, dsn, restored_name, tmp_path, keep_slots=True)
    cli("init", dsn=new, check=True)
    status = cli("status", dsn=new)
    assert status.returncode == 3
    assert f"slot merkle_a is not this database's but database {rconn.info.dbname}'s" in status.stdout, status.stdout
    assert "is missing" not in status.stdout


def test_a_data_only_restore_into_a_schema_made_by_init(pg_server, rconn, restored_name, tmp_path):
    """`init` on a new database, the tables made by hand, then `pg_restore --data-only`: the
    sources' rows come back, not their outboxes, capture triggers and functions, nor the log's
    publication (schema). status says so and how to recover, `source remove` unregisters such
    a source, `run` goes on with the log's other sources, and the printed recovery works."""
    dsn = rconn.info.dsn
    tables = ("t", "r", "r2")
    for table in tables:
        rconn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    registry.create_log(rconn, "a")
    with connect(dsn) as c:
        registry.add_source(c, "a", "t")
        registry.add_source(c, "a", "r", mode="replication")
        registry.add_source(c, "a", "r2", mode="replication")
    _log_three_rows_each(rconn, tables)
    rconn.execute("INSERT INTO t VALUES (4, 'queued at the dump')")  # in outbox_1, not in the log
    dump = _dump(dsn, tmp_path)
    rconn.execute("SELECT pg_drop_replication_slot('merkle_a')")  # as on a new server

    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {restored_name} TEMPLATE template0")
    new = pg_server.dsn(restored_name)
    cli("init", dsn=new, check=True)
    with connect(new, autocommit=True) as c:
        for table in tables:
            c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    # The outboxes' COPY fails (no such table): the rest is restored.
    _restore(dump, new, "--data-only", "--disable-triggers", on_error_stop=False)
    with connect(new, autocommit=True) as c:
        assert c.execute("SELECT source_id FROM merkle.sources WHERE table_name = 't'").fetchone() == (1,)
        assert c.execute("SELECT to_regclass('merkle.outbox_1')").fetchone() == (None,)

    init = cli("init", dsn=new, check=True)
    assert "the outbox of source public.t, merkle.outbox_1, does not exist" in init.stderr, init.stderr
    for table in ("r", "r2"):
        assert f"publication merkle_a, through which the changes of source public.{table} come" in init.stderr
    assert init.stderr.count("remove the source and add it again") == 3, init.stderr
    status = cli("status", dsn=new)
    assert status.returncode == 3, status.stdout + status.stderr
    errors = {line.split("`merkle-listener source remove a ")[1].split("`")[0]: line
              for line in status.stdout.splitlines() if "does not exist (restored with pg_restore --data-only?" in line}
    assert sorted(errors) == ["public.r", "public.r2", "public.t"], status.stdout
    assert all(e.startswith("  error: ") for e in errors.values())
    assert "no longer exists (dropped)" not in status.stdout  # the tables are there, by name
    adds = {table: line.split("then `")[1].rstrip("`") for table, line in errors.items()}
    assert adds["public.t"] == "merkle-listener source add a public.t --key id --columns id,v --backfill"
    shown = json.loads(cli("status", "--json", dsn=new).stdout)["logs"][0]["sources"]
    assert [s["error"] for s in shown] == [errors[s["table"]][len("  error: "):] for s in shown]

    # The listener logs the log's other sources (a trigger source added since, here) and says
    # why it leaves public.t out, rather than fail every batch on its outbox.
    with connect(new, autocommit=True) as c:
        c.execute("CREATE TABLE u (id int PRIMARY KEY)")
    cli("source", "add", "a", "u", dsn=new, check=True)
    with connect(new, autocommit=True) as c:
        c.execute("INSERT INTO u VALUES (1), (2)")
        listener = start_listener(new)
        try:
            wait_for_size(c, "a", 11, listener=listener)
        finally:
            said = listener.stop()
    logged = [json.loads(line) for line in said.splitlines() if line.startswith("{")]
    assert [(e["source"], e["msg"]) for e in logged if e["level"] == "error" and "outbox" in e["msg"]] == [
        ("public.t", errors["public.t"][len("  error: "):])], said
    assert "writer stopped on error" not in said, said

    # On a new server a source's old OID may name another relation there (an index, a table of
    # the schema): that is neither refused (`init` cannot find such a source's table) nor touched.
    with connect(new) as c:  # as the restore wrote them: past the guard's copy of the sources
        c.execute("ALTER TABLE merkle.sources DISABLE TRIGGER ALL")
        c.execute("UPDATE merkle.sources SET table_oid = 'merkle.logs_pkey'::regclass WHERE table_name = 't'")
        c.execute("UPDATE merkle.sources SET table_oid = 'merkle.tiles'::regclass WHERE table_name = 'r2'")
        c.execute("ALTER TABLE merkle.sources ENABLE TRIGGER ALL")
        c.commit()

    def remove(table):
        removed = cli("source", "remove", "a", table, dsn=new)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        gone = "its outbox merkle.outbox_1" if table == "public.t" else "its log's publication merkle_a"
        assert f"{table} removed from log 'a'; {gone} did not exist" in removed.stdout, removed.stdout
        assert removed.stdout.rstrip().endswith(adds[table]), removed.stdout

    for table in ("public.t", "public.r"):
        remove(table)
        added = cli(*shlex.split(adds[table])[1:], dsn=new)
        assert added.returncode == (0 if table == "public.t" else 2), added.stdout + added.stderr
    # A publication made for r now would list r2 too, which would then look captured.
    assert "its replication sources public.r2 are registered without it" in added.stderr, added.stderr
    assert "`merkle-listener source remove a public.r2`" in added.stderr
    remove("public.r2")
    for table in ("public.r", "public.r2"):
        cli(*shlex.split(adds[table])[1:], dsn=new, check=True)
    status = cli("status", dsn=new)
    assert status.returncode == 0, status.stdout
    with connect(new, autocommit=True) as c:
        listener = start_listener(new)
        try:
            # each table's rows again, t's one queued at the dump too
            wait_for_size(c, "a", 11 + 4 + 3 + 3, listener=listener)
        finally:
            listener.stop()
        rows = check_log(c, "a")[11:]
    keys = [f'{{"id":"{i}"}}' for i in (1, 2, 3, 4, 1, 2, 3, 1, 2, 3)]
    assert sorted((r[3], r[2]) for r in rows) == sorted(("backfill", k) for k in keys)


def test_a_log_whose_sources_lost_their_capture_objects_can_be_dropped(rconn):
    """As after a data-only restore on a new server: the outbox, capture function and trigger are
    gone, and the source's old OID names an index there."""
    rconn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    registry.create_log(rconn, "a")
    with connect(rconn.info.dsn) as c:
        source, _ = registry.add_source(c, "a", "t")
    with rconn.transaction():  # past the DDL guard, as merkle-listener itself drops them
        rconn.execute("SELECT merkle.mark_own_ddl('drop_triggers')")
        rconn.execute(f"DROP TRIGGER merkle_capture_{source.source_id} ON t")
        rconn.execute(f"DROP FUNCTION merkle.capture_{source.source_id}()")
        rconn.execute(f"DROP TABLE merkle.outbox_{source.source_id}")
    rconn.execute("ALTER TABLE merkle.sources DISABLE TRIGGER ALL")  # as a restore writes it
    rconn.execute("UPDATE merkle.sources SET table_oid = 'merkle.logs_pkey'::regclass")
    rconn.execute("ALTER TABLE merkle.sources ENABLE TRIGGER ALL")
    dropped = cli("log", "drop", "a", "--yes", dsn=rconn.info.dsn)
    assert dropped.returncode == 0 and "dropped log 'a'" in dropped.stdout, dropped.stdout + dropped.stderr
    assert rconn.execute("SELECT count(*) FROM merkle.logs").fetchone() == (0,)
