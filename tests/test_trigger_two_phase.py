"""Trigger mode and two-phase commit. PostgreSQL refuses PREPARE TRANSACTION after a NOTIFY,
which the capture trigger sends as its doorbell; a source without the doorbell lets writers
prepare, and the listener polls its outbox instead. (The test cluster allows prepared
transactions: conftest sets max_prepared_transactions.)"""

from __future__ import annotations

import psycopg
import pytest

from listener import canonical, registry
from listener.errors import ConfigurationError
from listener.runner import connect
from tests.helpers import check_log, cli, start_listener
from tests.test_replication import orjson_id, wait_for_size


def _prepare_insert(dsn: str, gid: str, *ids: int) -> None:
    with psycopg.connect(dsn) as w:
        w.execute("INSERT INTO t SELECT unnest(%s::int[])", (list(ids),))
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

    out = cli("source", "doorbell", "tp", "t", "off", dsn=dsn, check=True)
    assert "doorbell off" in out.stdout
    assert "doorbell off" in cli("source", "list", "tp", dsn=dsn, check=True).stdout

    # The safety poll is 30 s: only the poll of a source without the doorbell logs these in time.
    listener = start_listener(dsn, "--poll", "30")
    try:
        _prepare_insert(dsn, "p1", 1, 2)
        conn.execute("INSERT INTO t VALUES (3)")
        _prepare_insert(dsn, "p2", 4)
        conn.execute("COMMIT PREPARED 'p1'")
        conn.execute("ROLLBACK PREPARED 'p2'")
        wait_for_size(conn, "tp", 3, timeout=10, listener=listener)
        conn.execute("INSERT INTO t VALUES (5)")
        wait_for_size(conn, "tp", 4, timeout=10, listener=listener)

        # On again: nothing captured in between is lost, and the doorbell wakes the listener.
        cli("source", "doorbell", "tp", "t", "on", dsn=dsn, check=True)
        conn.execute("INSERT INTO t VALUES (6)")
        wait_for_size(conn, "tp", 5, timeout=10, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "tp")
    ids = [int(orjson_id(r[2])) for r in rows]
    assert sorted(ids) == [1, 2, 3, 5, 6] and ids[-2:] == [5, 6]
    assert ids.index(2) == ids.index(1) + 1, "a prepared transaction's rows are contiguous"
    assert bytes(rows[ids.index(1)][4]) == canonical.leaf_hash_of_entry(canonical.entry_v1("insert", "public.t", {"id": "1"}))


def test_no_doorbell_at_registration_and_what_is_refused(rconn, dsn):
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
