"""A database restored from pg_dump: its tables come back under new OIDs.

Sources name their tables by OID; `status` reports a table back under a new OID, `init`
points the source at it again (by its capture trigger, or by its registered name among its
publication's tables), and then capture, the DDL guard, `source remove` and the recovery of
the replication slot (which no dump carries) work as before. The log itself (leaves, tree,
root) comes back byte for byte.
"""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from listener import registry, relink
from listener.embedded import bin_dir
from listener.runner import connect
from tests.helpers import check_log, cli, start_listener
from tests.test_replication import wait_for_size


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}: {done.stderr}"


def _restore(dump, dsn: str) -> None:
    """pg_restore of `dump` into `dsn`, through a script: the tools are the wheel's (18), whose
    scripts set transaction_timeout, which servers before 17 do not know."""
    script = dump.with_suffix(".sql")
    _run(str(bin_dir() / "pg_restore"), "-f", str(script), str(dump))
    script.write_text("".join(line for line in script.read_text().splitlines(keepends=True)
                              if not line.startswith("SET transaction_timeout")))
    _run(str(bin_dir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(script))


def _restored_copy(pg_server, dsn: str, name: str, tmp_path) -> str:
    """pg_dump of `dsn` restored into a new database `name` of the same server (as a superuser,
    as restoring the DDL guard's event triggers needs); the old database's slots are dropped, as
    on a new server."""
    dump = tmp_path / "backup.dump"
    _run(str(bin_dir() / "pg_dump"), "-Fc", "-f", str(dump), "-d", dsn)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        old = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        for (slot,) in admin.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (old,)).fetchall():
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    new = pg_server.dsn(name)
    _restore(dump, new)
    return new


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
    for i in range(1, 4):
        for table in ("t", "ao", "r"):
            rconn.execute(f"INSERT INTO {table} (id, v) VALUES (%s, 'before')", (i,))
    listener = start_listener(dsn)
    try:
        wait_for_size(rconn, "a", 9, listener=listener)
    finally:
        listener.stop()
    before = check_log(rconn, "a")

    new = _restored_copy(pg_server, dsn, restored_name, tmp_path)

    with connect(new, autocommit=True) as c:
        assert [r[1:] for r in check_log(c, "a")] == [r[1:] for r in before]  # the log came back as it was
        moved = relink.moved_sources(c)
        assert sorted(m.qualified for m in moved) == ["public.ao", "public.r", "public.t"]
        assert all(m.new_oid == c.execute("SELECT %s::regclass::oid", (m.qualified,)).fetchone()[0] for m in moved)
        # Under the old OIDs, the DDL guard takes the publication for changed: it refuses all DDL.
        with pytest.raises(psycopg.DatabaseError, match="publication merkle_a"):
            c.execute("CREATE TABLE scratch (i int); DROP TABLE scratch")
    status = cli("status", dsn=new)
    assert status.returncode == 3, status.stdout + status.stderr
    for table in ("t", "ao", "r"):
        assert f"table public.{table} came back under a new OID" in status.stdout
    assert "run `merkle-listener init`" in status.stdout
    # Until then the sources are not changed: an add would not see t as a source already.
    for args in (("source", "add", "a", "t"), ("source", "remove", "a", "t"), ("source", "remove", "a", "r")):
        refused = cli(*args, dsn=new)
        assert refused.returncode == 2 and "run `merkle-listener init` first" in refused.stderr, refused.stderr

    init = cli("init", dsn=new, check=True)
    for table in ("t", "ao", "r"):
        assert f"source public.{table} now names its table by OID" in init.stdout, init.stdout
    with connect(new, autocommit=True) as c:
        assert relink.moved_sources(c) == []
    assert "now names its table" not in cli("init", dsn=new, check=True).stdout  # done once

    with connect(new, autocommit=True) as c:
        c.execute("CREATE TABLE scratch (i int); DROP TABLE scratch")  # the guard's record is of the new OIDs
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
    dump = tmp_path / "backup.dump"
    _run(str(bin_dir() / "pg_dump"), "-Fc", "-f", str(dump), "-d", dsn)

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
