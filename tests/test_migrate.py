import psycopg
import pytest

from listener.errors import ConfigurationError
from listener.store import migrate
from listener.store.connect import options_string


def test_migrations_are_idempotent_and_recorded(conn):
    assert migrate.current_version(conn) == migrate.latest_version()
    assert migrate.apply(conn) == []
    migrate.check_version(conn)


def test_newer_schema_is_refused_and_nothing_changes(conn):
    conn.execute("INSERT INTO merkle.schema_version (version, name) VALUES (999, 'from_the_future')")
    with pytest.raises(ConfigurationError, match="does not know"):
        migrate.apply(conn)
    with pytest.raises(ConfigurationError, match="upgrade merkle-listener"):
        migrate.check_version(conn)


def test_fresh_database_is_migrated(pg_server):
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS fresh_m")
        admin.execute("CREATE DATABASE fresh_m")
    with psycopg.connect(pg_server.dsn("fresh_m"), options=options_string()) as c:
        assert migrate.current_version(c) == 0
        with pytest.raises(ConfigurationError, match="database fresh_m has no merkle schema: run `merkle-listener init`"):
            migrate.check_version(c)
        applied = migrate.apply(c)
        assert [m.version for m in applied] == [m.version for m in migrate.migrations()]
        assert c.execute("SELECT root FROM merkle.logs LIMIT 0").fetchall() == []


def test_a_role_that_may_not_read_the_schema_is_told_whose_it_is(conn, dsn):
    conn.execute("DROP ROLE IF EXISTS stranger")
    conn.execute("CREATE ROLE stranger LOGIN")
    try:
        with psycopg.connect(dsn, user="stranger", options=options_string()) as c:
            with pytest.raises(ConfigurationError, match=f"role stranger may not read schema merkle in database "
                                                         f"{conn.info.dbname}: connect as the role that ran"):
                migrate.check_version(c)
    finally:
        conn.execute("DROP ROLE stranger")


def test_a_migration_missing_from_the_database_is_reported(conn):
    last = migrate.migrations()[-1]
    conn.execute("DELETE FROM merkle.schema_version WHERE version = %s", (last.version,))
    with pytest.raises(ConfigurationError, match=rf"lacks migration\(s\) \[{last.version}\]"):
        migrate.check_version(conn)


def test_a_server_older_than_supported_is_refused_before_anything_is_written(pg_server, monkeypatch):
    # No older server is at hand: raise the minimum past the real server's version instead.
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS old_m")
        admin.execute("CREATE DATABASE old_m")
    with psycopg.connect(pg_server.dsn("old_m"), options=options_string()) as c:
        monkeypatch.setattr(migrate, "MIN_SERVER_VERSION", c.info.server_version + 1)
        with pytest.raises(ConfigurationError, match="merkle-listener needs PostgreSQL") as refused:
            migrate.apply(c)
        assert f"this PostgreSQL is {c.info.server_version // 10000}." in str(refused.value)
        with pytest.raises(ConfigurationError, match="upgrade the server"):
            migrate.check_version(c)
        assert c.execute("SELECT to_regnamespace('merkle')").fetchone()[0] is None


def test_unsupported_server_message_names_both_versions():
    text = migrate.unsupported_server_message(140011)
    assert text.startswith("this PostgreSQL is 14.11; merkle-listener needs PostgreSQL 15 or later")
    assert "tested on 15, 16, 17, 18" in text
    assert migrate.unsupported_server_message(90624).startswith("this PostgreSQL is 9.6.24;")


def test_upgrade_makes_existing_capture_functions_run_as_their_owner(conn):
    """A trigger source added by an earlier version has a capture function that runs as the
    writer; migration 012 makes it SECURITY DEFINER, so a writer role with privileges on its
    own table only can insert."""
    from listener import registry
    from listener.runner import connect

    conn.execute("CREATE TABLE old_src (id int PRIMARY KEY)")
    registry.create_log(conn, "old")
    with connect(conn.info.dsn) as c:
        source, _ = registry.add_source(c, "old", "old_src")
    capture = f"merkle.capture_{source.source_id}()"
    conn.execute(f"ALTER FUNCTION {capture} SECURITY INVOKER")  # as created before 012
    conn.execute("DELETE FROM merkle.schema_version WHERE version = 12")
    writer = f"w_{conn.info.backend_pid}"
    conn.execute(f"CREATE ROLE {writer} LOGIN")
    conn.execute(f"GRANT INSERT ON old_src TO {writer}")
    conn.commit()
    try:
        with psycopg.connect(conn.info.dsn, user=writer, autocommit=True) as w:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                w.execute("INSERT INTO old_src VALUES (1)")
            assert [m.version for m in migrate.apply(conn)] == [12]
            conn.commit()
            w.execute("INSERT INTO old_src VALUES (2)")
        assert conn.execute(f"SELECT prosecdef FROM pg_proc WHERE oid = '{capture}'::regprocedure").fetchone()[0]
        assert conn.execute(f"SELECT count(*) FROM merkle.outbox_{source.source_id}").fetchone()[0] == 1
    finally:
        conn.rollback()
        conn.execute(f"DROP OWNED BY {writer}")
        conn.execute(f"DROP ROLE {writer}")
        conn.commit()


def test_upgrade_files_existing_checkpoints_under_the_origin_they_name(pg_server, monkeypatch):
    """Migration 022 keys checkpoints by origin, taken from the first line of each signed note."""
    from listener.note import Signer

    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS before_022")
        admin.execute("CREATE DATABASE before_022")
    known = migrate.migrations()
    try:
        with psycopg.connect(pg_server.dsn("before_022"), options=options_string()) as c:
            monkeypatch.setattr(migrate, "migrations", lambda: [m for m in known if m.version < 22])
            migrate.apply(c)
            log_id = c.execute("INSERT INTO merkle.logs (name, origin) VALUES ('old', 'example.com/old') "
                               "RETURNING log_id").fetchone()[0]
            note = Signer.generate("example.com/old").sign(f"example.com/old\n0\n{'A' * 43}=\n")
            c.execute("INSERT INTO merkle.checkpoints (log_id, tree_size, root, note, key_name) "
                      "VALUES (%s, 0, sha256(''), %s, 'example.com/old')", (log_id, note))
            monkeypatch.setattr(migrate, "migrations", lambda: known)
            assert 22 in [m.version for m in migrate.apply(c)]
            assert c.execute("SELECT origin FROM merkle.checkpoints").fetchall() == [("example.com/old",)]
            assert c.execute("SELECT note FROM merkle.latest_checkpoint('old')").fetchone() == (note,)
            c.commit()
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute("DROP DATABASE before_022 WITH (FORCE)")
