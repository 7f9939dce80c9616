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
        with pytest.raises(ConfigurationError, match="merkle-listener init"):
            migrate.check_version(c)
        applied = migrate.apply(c)
        assert [m.version for m in applied] == [m.version for m in migrate.migrations()]
        assert c.execute("SELECT root FROM merkle.logs LIMIT 0").fetchall() == []


def test_a_migration_missing_from_the_database_is_reported(conn):
    last = migrate.migrations()[-1]
    conn.execute("DELETE FROM merkle.schema_version WHERE version = %s", (last.version,))
    with pytest.raises(ConfigurationError, match=rf"lacks migration\(s\) \[{last.version}\]"):
        migrate.check_version(conn)
