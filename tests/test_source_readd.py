"""Re-adding a source as it was: `source remove` and the slot recovery messages print each
source's own `source add` command, every option spelled out, since re-adding one with the
defaults would silently log something else."""

from __future__ import annotations

import re
import shlex

import orjson
import psycopg
import pytest

from listener import registry
from tests.helpers import check_log, cli, start_listener
from tests.test_replication import wait_for_size

# Registration's bookkeeping, alike on every version between the ends.
pytestmark = pytest.mark.oldest_and_newest


def _with_guard_off(conn, event_triggers: str, statement: str) -> bool:
    """Run `statement` with the guard's event triggers named LIKE `event_triggers` disabled (as a
    superuser could); whether there were any."""
    names = [name for (name,) in conn.execute("SELECT evtname FROM pg_event_trigger WHERE evtname LIKE %s",
                                              (event_triggers,))]
    for name in names:
        conn.execute(f"ALTER EVENT TRIGGER {name} DISABLE")
    conn.execute(statement)
    for name in names:
        conn.execute(f"ALTER EVENT TRIGGER {name} ENABLE ALWAYS")
    return bool(names)


def _registration(conn, log_name: str) -> list[tuple]:
    """What each source of the log logs, without its id: what a re-add must keep."""
    log_id = registry.get_log(conn, log_name).log_id
    return sorted((s.qualified, s.mode, s.key_columns, s.columns, s.events, s.append_only, s.row_filter,
                   s.entry_column, s.doorbell) for s in registry.list_sources(conn, log_id))


def test_the_recovery_the_user_is_told_adds_each_source_again_as_it_was(rconn):
    """A missing slot's recovery re-adds each source. Re-added with the defaults, a source that
    logged updates, or hashed some columns only, would silently log something else: the
    message spells out each source's own command, and running those commands as printed
    registers the sources as they were (mixed-case names quoted), with their rows backfilled."""
    conn = rconn
    dsn = conn.info.dsn
    conn.execute('CREATE TABLE "Pay" ("Id" int PRIMARY KEY, amount int, note text)')
    conn.execute("CREATE TABLE t2 (id int PRIMARY KEY, v text)")
    conn.execute('ALTER TABLE "Pay" REPLICA IDENTITY FULL')
    conn.execute("ALTER TABLE t2 REPLICA IDENTITY FULL")
    registry.create_log(conn, "rd")
    cli("source", "add", "rd", '"Pay"', "--key", '"Id"', "--columns", '"Id",amount', "--where", "amount > 0",
        "--mode", "replication", "--events", "insert,update", "--truncate", "refuse", dsn=dsn, check=True)
    cli("source", "add", "rd", "t2", "--mode", "replication", "--events", "insert,update,delete", dsn=dsn,
        check=True)
    before = _registration(conn, "rd")
    conn.execute('INSERT INTO "Pay" VALUES (1, 5, \'x\'), (2, -1, \'y\')')
    conn.execute("INSERT INTO t2 VALUES (1, 'a')")
    conn.execute("SELECT pg_drop_replication_slot('merkle_rd')")

    status = cli("status", "--json", dsn=dsn)
    assert status.returncode == 3
    message = orjson.loads(status.stdout)["logs"][0]["slot"]["message"]
    commands = re.findall(r"`(merkle-listener source (?:remove|add) [^`]*)`", message)
    assert [c.split()[2] for c in commands] == ["remove", "remove", "add", "add"], message
    for command in commands:
        cli(*shlex.split(command)[1:], dsn=dsn, check=True)
    assert _registration(conn, "rd") == before
    listener = start_listener(dsn)
    try:
        conn.execute("UPDATE t2 SET v = 'b' WHERE id = 1")  # logged: the re-added source logs updates still
        wait_for_size(conn, "rd", 1 + 1 + 1, listener=listener)  # the two backfills (Pay's filtered) + the update
    finally:
        listener.stop()
    assert [r[3] for r in check_log(conn, "rd")] == ["backfill", "backfill", "update"]


def test_source_remove_says_how_to_add_it_again_as_it_was(conn):
    dsn = conn.info.dsn
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY, a text, b text)")
    registry.create_log(conn, "ra")
    cli("source", "add", "ra", "kept", "--columns", "id,a", "--append-only", "--no-doorbell", dsn=dsn, check=True)
    before = _registration(conn, "ra")
    out = cli("source", "remove", "ra", "kept", dsn=dsn, check=True).stdout
    command = re.search(r"to add it again as it was: (.*)", out).group(1)
    assert command == "merkle-listener source add ra public.kept --key id --columns id,a --append-only --no-doorbell"
    assert _registration(conn, "ra") == []
    cli(*shlex.split(command)[1:], dsn=dsn, check=True)
    assert _registration(conn, "ra") == before


def test_status_says_a_sources_table_was_dropped(conn):
    dsn = conn.info.dsn
    conn.execute("CREATE TABLE doomed (id int PRIMARY KEY)")
    registry.create_log(conn, "dd")
    cli("source", "add", "dd", "doomed", dsn=dsn, check=True)
    conn.execute("DROP TABLE doomed")
    out = cli("status", dsn=dsn, check=True).stdout
    assert "table public.doomed no longer exists (dropped)" in out
    assert "`merkle-listener source remove dd public.doomed` unregisters it" in out
    cli("source", "remove", "dd", "public.doomed", dsn=dsn, check=True)
    assert _registration(conn, "dd") == []


def test_a_publication_changed_by_hand_is_an_error_until_its_sources_are_added_again(rconn):
    """Without the DDL guard, a table taken out of the log's publication by hand loses the
    changes committed meanwhile for good: the listener and `status` say so as an error with the
    recovery, the other source's changes go on being logged, and the recovery clears it."""
    conn = rconn
    dsn = conn.info.dsn
    for table in ("t", "t2"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    registry.create_log(conn, "p")
    cli("source", "add", "p", "t", "--mode", "replication", dsn=dsn, check=True)
    cli("source", "add", "p", "t2", "--mode", "replication", dsn=dsn, check=True)
    guard = _with_guard_off(conn, "merkle_log_publication%", "ALTER PUBLICATION merkle_p DROP TABLE t")
    listener = start_listener(dsn)
    try:
        conn.execute("INSERT INTO t VALUES (1)")  # lost: the publication no longer sends t
        conn.execute("INSERT INTO t2 VALUES (1)")
        wait_for_size(conn, "p", 1, listener=listener)
        listener.wait_for("publication merkle_p was changed by hand (public.t is not in it)", timeout=30)
        status = cli("status", dsn=dsn)
        assert status.returncode == 3 and "error: publication merkle_p was changed by hand" in status.stdout
        commands = re.findall(r"`(merkle-listener source (?:remove|add) [^`]*)`", status.stdout)
        assert len(commands) == 4, status.stdout
        if guard:  # installed again, it refuses DDL that could change publications until the recovery
            with pytest.raises(psycopg.Error, match="publication merkle_p would not be as merkle-listener made it"):
                conn.execute("ALTER TABLE t2 ADD COLUMN note text")
        for command in commands:
            cli(*shlex.split(command)[1:], dsn=dsn, check=True)
        wait_for_size(conn, "p", 3, listener=listener)  # each table's row, backfilled
        assert cli("status", dsn=dsn).returncode == 0
        conn.execute("ALTER TABLE t2 ADD COLUMN note text")
    finally:
        listener.stop()
    assert [(r[3], r[2]) for r in check_log(conn, "p")] == [
        ("insert", '{"id":"1"}'), ("backfill", '{"id":"1"}'), ("backfill", '{"id":"1"}')]


def test_the_command_names_the_entry_column_as_given_and_the_table_as_named_now(conn):
    """--entry-column takes the column's name as written (it is not parsed as SQL); the table is
    named as it is called now, should it have been renamed (with the DDL guard off) since."""
    dsn = conn.info.dsn
    conn.execute('CREATE TABLE "Ent" (id int PRIMARY KEY, "my Entry" bytea NOT NULL)')
    registry.create_log(conn, "en")
    cli("source", "add", "en", '"Ent"', "--entry-column", "my Entry", dsn=dsn, check=True)
    before = _registration(conn, "en")
    _with_guard_off(conn, "merkle_source_ddl", 'ALTER TABLE "Ent" RENAME TO "Ent2"')
    out = cli("source", "remove", "en", '"Ent2"', dsn=dsn, check=True).stdout
    command = re.search(r"to add it again as it was: (.*)", out).group(1)
    assert command == "merkle-listener source add en 'public.\"Ent2\"' --key id --entry-column 'my Entry'", command
    cli(*shlex.split(command)[1:], dsn=dsn, check=True)
    assert [r[1:] for r in _registration(conn, "en")] == [r[1:] for r in before]  # all but the name
