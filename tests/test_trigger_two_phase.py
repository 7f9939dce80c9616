"""Trigger mode and two-phase commit. PostgreSQL refuses PREPARE TRANSACTION after a NOTIFY,
which the capture trigger sends as its doorbell; a source without the doorbell lets writers
prepare, and the listener polls its outbox instead. (The test cluster allows prepared
transactions: conftest sets max_prepared_transactions.)"""

from __future__ import annotations

import time

import psycopg
import pytest

from listener import canonical, registry
from listener.errors import ConfigurationError, SourceTableError
from listener.runner import connect
from listener.sources import trigger
from tests.helpers import check_log, cli, start_listener
from tests.test_replication import orjson_id, wait_for_size

# Prepared transactions and the doorbell, which no version between the ends changes.
pytestmark = pytest.mark.oldest_and_newest


def _prepare_insert(dsn: str, gid: str, *ids: int) -> None:
    """One prepared transaction inserting `ids`, one statement each."""
    with psycopg.connect(dsn) as w:
        for i in ids:
            w.execute("INSERT INTO t VALUES (%s)", (i,))
        w.execute("PREPARE TRANSACTION %s" % psycopg.sql.Literal(gid).as_string(w))
        w.commit()


def test_without_the_doorbell_prepared_transactions_are_logged_when_committed(conn, dsn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "tp")
    out = cli("source", "add", "tp", "t", dsn=dsn, check=True)
    assert "max_prepared_transactions = 10" in out.stderr and "source doorbell tp public.t off" in out.stderr

    # With the doorbell, PostgreSQL refuses to prepare: what the option is for.
    with psycopg.connect(dsn) as w:
        w.execute("INSERT INTO t VALUES (100)")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="NOTIFY"):
            w.execute("PREPARE TRANSACTION 'refused'")
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0

    # The safety poll is 30 s: only the poll of a source without the doorbell logs these in time,
    # and turning the doorbell off tells the running listener at once.
    listener = start_listener(dsn, "--poll", "30")
    try:
        listener.wait_for("writer for log")
        out = cli("source", "doorbell", "tp", "t", "off", dsn=dsn, check=True)
        assert "doorbell off" in out.stdout
        assert "doorbell off" in cli("source", "list", "tp", dsn=dsn, check=True).stdout
        assert "source public.t (trigger, capturing, no doorbell: polled every 0.1 s)" in cli(
            "status", dsn=dsn, check=True).stdout
        _prepare_insert(dsn, "p1", 1, 2)
        conn.execute("INSERT INTO t VALUES (3)")
        _prepare_insert(dsn, "p2", 4)
        conn.execute("COMMIT PREPARED 'p1'")
        conn.execute("ROLLBACK PREPARED 'p2'")
        wait_for_size(conn, "tp", 3, timeout=10, listener=listener)
        conn.execute("INSERT INTO t VALUES (5)")
        wait_for_size(conn, "tp", 4, timeout=10, listener=listener)

        # Polling an empty outbox looks before it locks: no transaction id. Seen on the log's row,
        # which every batch locks (its xmax) or updates (its xmin): transaction ids are counted
        # for the whole cluster, where other databases' work takes them too.
        log_row = "SELECT xmin::text, xmax::text FROM merkle.logs WHERE name = 'tp'"
        before = conn.execute(log_row).fetchone()
        time.sleep(2)
        assert conn.execute(log_row).fetchone() == before, "quiet polls of an empty outbox locked the log"

        # On again: nothing captured in between is lost, and the doorbell wakes the listener (the
        # pause lets it take in the change first, so that no quiet poll is what finds the row).
        cli("source", "doorbell", "tp", "t", "on", dsn=dsn, check=True)
        time.sleep(1)
        conn.execute("INSERT INTO t VALUES (6)")
        wait_for_size(conn, "tp", 5, timeout=10, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "tp")
    ids = [int(orjson_id(r[2])) for r in rows]
    assert sorted(ids) == [1, 2, 3, 5, 6] and ids[-2:] == [5, 6]
    assert ids.index(2) == ids.index(1) + 1, "a prepared transaction's rows are contiguous"
    assert bytes(rows[ids.index(1)][4]) == canonical.leaf_hash_of_entry(canonical.entry_v1("insert", "public.t", {"id": "1"}))


def test_no_doorbell_at_registration_and_what_is_refused(rconn, dsn, monkeypatch):
    conn = rconn
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE r (id int PRIMARY KEY)")
    registry.create_log(conn, "nd")
    out = cli("source", "add", "nd", "t", "--no-doorbell", "--append-only", dsn=dsn, check=True)
    assert "no doorbell" in out.stdout and "max_prepared_transactions" not in out.stderr
    _prepare_insert(dsn, "ok", 1)
    conn.execute("COMMIT PREPARED 'ok'")
    assert conn.execute("SELECT count(*) FROM merkle.outbox_%s" % registry.list_sources(conn)[0].source_id).fetchone()[0] == 1

    before = conn.execute("SELECT count(*) FROM merkle.sources").fetchone()[0]
    refused = cli("source", "add", "nd", "r", "--mode", "replication", "--no-doorbell", dsn=dsn)
    assert refused.returncode != 0 and "--no-doorbell is for trigger mode" in refused.stderr
    assert conn.execute("SELECT count(*) FROM merkle.sources").fetchone()[0] == before
    with connect(dsn) as c:
        registry.add_source(c, "nd", "r", mode="replication")
    with connect(dsn) as c, pytest.raises(ConfigurationError, match="replication mode has no doorbell"):
        registry.set_doorbell(c, "nd", "r", False)
    with connect(dsn) as c, pytest.raises(ConfigurationError, match="is not a source of log"):
        registry.set_doorbell(c, "nd", "nope", False)

    # A prepared transaction holds its locks until it is resolved: `source remove` gives up
    # (rather than stall the table's writers behind it), says why, and changes nothing.
    monkeypatch.setattr(trigger, "WRITER_LOCK_TIMEOUT", "300ms")
    _prepare_insert(dsn, "pending", 2)
    with connect(dsn) as c, pytest.raises(SourceTableError, match=r"pg_prepared_xacts.*Nothing was changed"):
        registry.remove_source(c, "nd", "t")
    assert [s.table_name for s in registry.list_sources(conn)] == ["t", "r"]
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'merkle_capture_%'").fetchone()[0] == 1
    conn.execute("ROLLBACK PREPARED 'pending'")
    with connect(dsn) as c, c.transaction():
        c.execute("SET LOCAL lock_timeout = '42s'")
        assert registry.remove_source(c, "nd", "t") == 1  # the committed row is still queued
        assert c.execute("SHOW lock_timeout").fetchone()[0] == "42s", "the caller's lock_timeout was not restored"


def test_a_source_without_doorbell_added_to_a_running_replication_log_is_polled_at_once(rconn, dsn):
    """The listener of a log without trigger sources skips looking for outboxes for a second
    at a time; the ring of `source add` ends that at once."""
    conn = rconn
    conn.execute("CREATE TABLE r (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "mixed")
    with connect(dsn) as c:
        registry.add_source(c, "mixed", "r", mode="replication")
    listener = start_listener(dsn, "--poll", "30")
    try:
        conn.execute("INSERT INTO r VALUES (1)")
        wait_for_size(conn, "mixed", 1, listener=listener)
        for i in range(2, 6):  # keep the stream busy, so the writer wakes up often
            conn.execute("INSERT INTO r VALUES (%s)", (i,))
        cli("source", "add", "mixed", "t", "--no-doorbell", dsn=dsn, check=True)
        _prepare_insert(dsn, "late", 10, 11)
        conn.execute("COMMIT PREPARED 'late'")
        wait_for_size(conn, "mixed", 7, timeout=10, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "mixed")
    assert sorted(int(orjson_id(r[2])) for r in rows) == [1, 2, 3, 4, 5, 10, 11]
