"""Trigger mode end to end: every committed row is a leaf exactly once, whatever happens."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import psycopg
import pytest

from listener import canonical, merkle, registry
from listener.errors import SourceTableError
from listener.runner import connect
from listener.sequencer import Sequencer
from tests.helpers import check_log, cli, start_listener

# Trigger capture (transition tables, the outbox), unchanged between the ends.
pytestmark = pytest.mark.oldest_and_newest

TABLES = """
CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12,2), placed_at timestamptz);
CREATE TABLE payments (id bigint PRIMARY KEY, order_id bigint NOT NULL, method text);
"""


@pytest.fixture
def two_sources(conn):
    conn.execute(TABLES)
    registry.create_log(conn, "audit")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "audit", "orders")
        registry.add_source(c, "audit", "payments")
    return conn


def _committed_keys(conn) -> set[tuple[str, str]]:
    keys = {("public.orders", canonical.key_json({"id": str(i)})) for (i,) in conn.execute("SELECT id FROM orders")}
    keys |= {("public.payments", canonical.key_json({"id": str(i)})) for (i,) in conn.execute("SELECT id FROM payments")}
    return keys


def _logged_keys(conn, rows) -> list[tuple[str, str]]:
    names = dict(conn.execute("SELECT source_id, table_schema || '.' || table_name FROM merkle.sources"))
    return [(names[r[1]], r[2]) for r in rows]


def _writers(dsn: str, n_writers: int, per_writer: int, stop: threading.Event | None = None) -> None:
    """Writers whose transactions interleave and commit out of id order; ~1 in 5 rolls back."""
    ids = iter(range(1, 10**9))
    id_lock = threading.Lock()

    def next_id() -> int:
        with id_lock:
            return next(ids)

    def work(n: int) -> None:
        rnd = random.Random(n)
        with psycopg.connect(dsn) as c:
            for _ in range(per_writer):
                if stop is not None and stop.is_set():
                    return
                with c.transaction():
                    oid = next_id()
                    batch = [(oid + 10**6 * k, f"c{n}", rnd.randint(1, 9999) / 100) for k in range(rnd.randint(1, 3))]
                    c.cursor().executemany(
                        "INSERT INTO orders (id, customer, amount, placed_at) VALUES (%s, %s, %s, now())", batch)
                    time.sleep(rnd.random() * 0.004)  # hold the transaction open so commits reorder
                    c.execute("INSERT INTO payments (id, order_id, method) VALUES (%s, %s, 'card')", (oid, oid))
                    if rnd.random() < 0.2:
                        raise psycopg.Rollback()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(n_writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_writers_every_committed_row_exactly_once(two_sources, dsn):
    conn = two_sources
    done = threading.Event()
    failures, batches = [], []
    with connect(dsn) as wconn:
        seq = Sequencer(wconn, "audit", max_batch=50)

        def drain_while_writing():
            try:
                while not done.is_set():
                    if (batch := seq.drain_once()) is not None:
                        batches.append(batch)
            except Exception as exc:  # noqa: BLE001 - re-raised in the test's thread below
                failures.append(exc)

        drainer = threading.Thread(target=drain_while_writing)
        drainer.start()
        _writers(dsn, n_writers=8, per_writer=40)
        done.set()
        drainer.join()
        assert not failures, failures
        assert len(batches) > 1, "the drain must have run while the writers were committing"
        seq.drain_all()

    rows = check_log(conn, "audit")
    logged = _logged_keys(conn, rows)
    assert len(logged) == len(set(logged))
    assert set(logged) == _committed_keys(conn)
    assert len(rows) > 200
    # Each leaf is the hash of the canonical entry of the row as inserted.
    by_key = {r[2]: bytes(r[4]) for r in rows if r[1] == 1}
    for id_, customer, amount, placed_at in conn.execute(
            "SELECT id::text, customer, amount::text, placed_at::text FROM orders"):
        entry = canonical.entry_v1("insert", "public.orders",
                                   {"id": id_, "customer": customer, "amount": amount, "placed_at": placed_at})
        assert by_key[canonical.key_json({"id": id_})] == merkle.hash_leaf(entry)


def test_outbox_is_empty_and_order_within_a_transaction_is_kept(two_sources, dsn):
    conn = two_sources
    with conn.transaction():
        conn.execute("INSERT INTO payments (id, order_id) VALUES (3, 3)")
        conn.execute("INSERT INTO orders (id, customer) SELECT g, 'x' FROM generate_series(10, 14) g")
        conn.execute("INSERT INTO payments (id, order_id) VALUES (1, 1), (2, 2)")
    with connect(dsn) as wconn:
        Sequencer(wconn, "audit").drain_all()
    rows = check_log(conn, "audit")
    assert [r[2] for r in rows] == [canonical.key_json({"id": str(i)}) for i in (3, 10, 11, 12, 13, 14, 1, 2)]
    assert conn.execute("SELECT (SELECT count(*) FROM merkle.outbox_1) + (SELECT count(*) FROM merkle.outbox_2)"
                        ).fetchone()[0] == 0


def test_savepoints_rolled_back_leave_nothing_and_released_ones_are_logged(two_sources, dsn):
    conn = two_sources
    with conn.transaction():
        conn.execute("INSERT INTO orders (id, customer) VALUES (1, 'kept')")
        with conn.transaction():  # SAVEPOINT ... ROLLBACK TO (psycopg.Rollback ends only this block)
            conn.execute("INSERT INTO orders (id, customer) VALUES (2, 'rolled back')")
            conn.execute("INSERT INTO payments (id, order_id) VALUES (2, 2)")
            raise psycopg.Rollback()
        with conn.transaction():  # SAVEPOINT ... RELEASE
            conn.execute("INSERT INTO orders (id, customer) VALUES (3, 'released')")
        conn.execute("INSERT INTO payments (id, order_id) VALUES (4, 4)")
    with connect(dsn) as wconn:
        Sequencer(wconn, "audit").drain_all()
    rows = check_log(conn, "audit")
    assert _logged_keys(conn, rows) == [("public.orders", canonical.key_json({"id": "1"})),
                                        ("public.orders", canonical.key_json({"id": "3"})),
                                        ("public.payments", canonical.key_json({"id": "4"}))]


def test_a_statement_larger_than_a_batch_is_spread_over_batches(two_sources, dsn):
    """A batch takes at most max_batch rows, in (statement, row) order, even from one
    statement: the memory a batch needs does not grow with the statement (a whole statement
    of tens of millions of rows would not fit one batch's packed leaf hashes). The rows of
    the large statement and of the ones around it keep their order."""
    conn = two_sources
    conn.execute("INSERT INTO payments VALUES (1, 1, 'before')")
    conn.execute("INSERT INTO orders (id, customer) SELECT g, 'c' || g FROM generate_series(1, 120) g")
    conn.execute("INSERT INTO payments VALUES (2, 1, 'after')")
    with connect(dsn) as wconn:
        seq = Sequencer(wconn, "audit", max_batch=50)
        batches = []
        while (batch := seq.drain_once()) is not None:
            batches.append((batch.count, batch.more))
    assert batches == [(50, True), (50, True), (22, False)]
    rows = check_log(conn, "audit")
    assert _logged_keys(conn, rows) == [("public.payments", '{"id":"1"}')] + [
        ("public.orders", canonical.key_json({"id": str(i)})) for i in range(1, 121)] + [
        ("public.payments", '{"id":"2"}')]
    assert [r[6] for r in rows[1:121]] == list(range(1, 121))  # one statement, its rows numbered in order
    assert len({r[5] for r in rows[1:121]}) == 1


def test_kill_9_listener_mid_batches_loses_and_duplicates_nothing(two_sources, dsn):
    conn = two_sources
    stop = threading.Event()
    writer = threading.Thread(target=_writers, args=(dsn, 4, 10**6, stop))  # until stopped: every round has batches
    writer.start()
    rnd = random.Random(7)
    size = "SELECT tree_size FROM merkle.logs WHERE name = 'audit'"
    try:
        for _ in range(4):
            before = conn.execute(size).fetchone()[0]
            listener = start_listener(dsn, "--max-batch", "7")
            listener.wait_for("batch sequenced")
            time.sleep(rnd.random() * 0.5)  # then kill it at a random point of its batches
            listener.stop(signal.SIGKILL)
            assert conn.execute(size).fetchone()[0] > before
    finally:
        stop.set()
        writer.join()
    listener = start_listener(dsn)
    try:
        deadline = time.monotonic() + 60
        queued = "SELECT (SELECT count(*) FROM merkle.outbox_1) + (SELECT count(*) FROM merkle.outbox_2)"
        while conn.execute(queued).fetchone()[0]:
            assert time.monotonic() < deadline, "the restarted listener did not drain the outbox"
            time.sleep(0.1)
    finally:
        listener.stop()
    rows = check_log(conn, "audit")
    logged = _logged_keys(conn, rows)
    assert set(logged) == _committed_keys(conn) and len(logged) == len(set(logged))


def _wait_size(conn, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while conn.execute("SELECT tree_size FROM merkle.logs WHERE name = 'audit'").fetchone()[0] < n:
        assert time.monotonic() < deadline, f"log did not reach size {n}"
        time.sleep(0.05)


def test_two_listeners_one_writer_and_the_standby_takes_over(two_sources, dsn):
    conn = two_sources
    writers = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s"
    first = start_listener(dsn)
    deadline = time.monotonic() + 30
    while conn.execute(writers, (0x4D4C,)).fetchone()[0] == 0:
        assert time.monotonic() < deadline, "the first listener never became the writer"
        time.sleep(0.05)
    second = start_listener(dsn)
    try:
        conn.execute("INSERT INTO orders (id, customer) SELECT g, 'a' FROM generate_series(1, 50) g")
        _wait_size(conn, 50)
        second.wait_for("hot standby")
        assert conn.execute(writers, (0x4D4C,)).fetchone()[0] == 1
        first.stop(signal.SIGKILL)
        conn.execute("INSERT INTO orders (id, customer) SELECT g, 'b' FROM generate_series(51, 120) g")
        _wait_size(conn, 120)
    finally:
        first.stop(signal.SIGKILL)
        err = second.stop()
    assert "hot standby" in err and "writer for log" in err
    check_log(conn, "audit")


def test_backfill_logs_existing_rows_in_key_order_then_live_rows(conn, dsn):
    conn.execute("CREATE TABLE ledger (k text PRIMARY KEY, v int)")
    conn.execute("INSERT INTO ledger VALUES ('b', 2), ('c', 3), ('a', 1)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        _, queued = registry.add_source(c, "audit", "ledger", backfill=True)
    assert queued == 3
    conn.execute("INSERT INTO ledger VALUES ('0', 0)")
    with connect(dsn) as wconn:
        Sequencer(wconn, "audit").drain_all()
    rows = check_log(conn, "audit")
    assert [(r[2], r[3]) for r in rows] == [
        ('{"k":"a"}', "backfill"), ('{"k":"b"}', "backfill"), ('{"k":"c"}', "backfill"), ('{"k":"0"}', "insert")]


def test_append_only_guard_refuses_update_delete_truncate(conn, dsn):
    conn.execute("CREATE TABLE facts (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO facts VALUES (1, 'x')")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "facts", append_only=True)
    for stmt in ("UPDATE facts SET body = 'y'", "DELETE FROM facts", "TRUNCATE facts"):
        with pytest.raises(psycopg.Error, match="append-only") as exc:
            conn.execute(stmt)
        assert exc.value.sqlstate == "ML100"
    assert conn.execute("SELECT body FROM facts").fetchall() == [("x",)]


def test_partitioned_tables_and_partitions_are_refused(conn, dsn):
    """A statement trigger fires only for the table a statement names: on a partitioned table
    it misses rows inserted into a partition directly, on a partition those inserted through
    its parent. Replication mode captures both."""
    conn.execute("CREATE TABLE m (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    registry.create_log(conn, "parts")
    with connect(dsn) as c:
        with pytest.raises(SourceTableError, match="public.m is a partitioned table: .* use --mode replication"):
            registry.add_source(c, "parts", "m")
        with pytest.raises(SourceTableError, match="public.m_2025 is a partition of public.m: .* use --mode replication"):
            registry.add_source(c, "parts", "m_2025")
    assert registry.list_sources(conn) == []
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal "  # merkle's own tables aside
                        "AND tgrelid NOT IN (SELECT oid FROM pg_class WHERE relnamespace = 'merkle'::regnamespace)"
                        ).fetchone()[0] == 0


def test_a_trigger_source_may_not_become_a_partition(conn, dsn):
    """ATTACH PARTITION of a trigger-mode source would leave rows inserted through the new
    parent uncaptured: the DDL guard refuses it. Where it happened anyway (no guard, or an
    earlier version), `status` says so."""
    conn.execute("CREATE TABLE m_2024 (id int, at date, PRIMARY KEY (id, at))")
    registry.create_log(conn, "parts")
    with connect(dsn) as c:
        registry.add_source(c, "parts", "m_2024")
    conn.execute("CREATE TABLE m (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    attach = "ALTER TABLE m ATTACH PARTITION m_2024 FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
    with pytest.raises(psycopg.DatabaseError, match="may not be a partition: rows inserted through public.m") as e:
        conn.execute(attach)
    assert e.value.sqlstate == "ML101"
    assert cli("status", dsn=dsn, check=True).stdout.count("warning") == 0
    conn.execute("ALTER EVENT TRIGGER merkle_source_partitions DISABLE")  # a superuser passing the guard
    conn.execute(attach)
    conn.execute("ALTER EVENT TRIGGER merkle_source_partitions ENABLE ALWAYS")
    out = cli("status", dsn=dsn, check=True).stdout
    assert "warning: public.m_2024 is partitioned or a partition: trigger mode captures only rows" in out, out


def test_a_publication_for_all_tables_does_not_stop_the_drain(conn, dsn):
    """A CDC tool's publication FOR ALL TABLES publishes the outboxes' deletes, which PostgreSQL
    refuses from a table without a replica identity: the drain stopped for good. The listener
    gives the outbox one when that happens, and not before (it costs the drain WAL)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "cdc")
    with connect(dsn) as c:
        source, _ = registry.add_source(c, "cdc", "t")
    identity = f"SELECT relreplident FROM pg_class WHERE oid = 'merkle.outbox_{source.source_id}'::regclass"
    assert conn.execute(identity).fetchone()[0] == "d"
    conn.execute("CREATE PUBLICATION cdc_everything FOR ALL TABLES")
    listener = start_listener(dsn)
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        deadline = time.monotonic() + 30
        while conn.execute("SELECT tree_size FROM merkle.logs").fetchone()[0] < 1:
            assert time.monotonic() < deadline, listener.stop()[-2000:]
            time.sleep(0.05)
        conn.execute("INSERT INTO t VALUES (2)")
        while conn.execute("SELECT tree_size FROM merkle.logs").fetchone()[0] < 2:
            assert time.monotonic() < deadline, listener.stop()[-2000:]
            time.sleep(0.05)
    finally:
        said = listener.stop()
        conn.execute("DROP PUBLICATION cdc_everything")
    assert conn.execute(identity).fetchone()[0] == "f"
    assert "outboxes given REPLICA IDENTITY FULL" in said and "writer stopped on error" not in said
    check_log(conn, "cdc")


def test_row_filter_only_logs_matching_rows(conn, dsn):
    conn.execute("CREATE TABLE events (id int PRIMARY KEY, kind text, amount int)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "events", where="kind = 'pay' AND amount > 10")
    conn.execute("INSERT INTO events VALUES (1, 'pay', 5), (2, 'pay', 50), (3, 'ref', 50), (4, 'pay', 11)")
    with connect(dsn) as wconn:
        Sequencer(wconn, "audit").drain_all()
    assert [r[2] for r in check_log(conn, "audit")] == ['{"id":"2"}', '{"id":"4"}']


def test_columns_named_like_the_outboxs_own(conn, dsn):
    """A table with columns called like the outbox's own (stmt_id, ord, op, queued_at) and the
    capture function's variable (stmt), one of them in the row filter: registered, backfilled,
    captured and hashed like any other, with `status` reading the outbox."""
    conn.execute("CREATE TABLE ops (id int PRIMARY KEY, op text, ord int, stmt_id bigint, queued_at date, stmt int)")
    conn.execute("INSERT INTO ops VALUES (1, 'open', 1, 10, '2024-01-02', 5)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "ops", where="stmt > 0", backfill=True)
    conn.execute("INSERT INTO ops VALUES (2, 'close', 2, 20, '2024-01-03', 7), (3, 'skip', 3, 30, NULL, 0)")
    status = json.loads(cli("status", "--json", dsn=dsn, check=True).stdout)
    [source] = [s for log in status["logs"] for s in log["sources"]]
    assert source["queued"] == 2 and source["oldest_queued_seconds"] is not None
    with connect(dsn) as wconn:
        Sequencer(wconn, "audit").drain_all()
    rows = check_log(conn, "audit")
    h = canonical.leaf_hash_of_entry
    assert [(r[3], bytes(r[4])) for r in rows] == [
        ("backfill", h(canonical.entry_v1("backfill", "public.ops", {
            "id": "1", "op": "open", "ord": "1", "stmt_id": "10", "queued_at": "2024-01-02", "stmt": "5"}))),
        ("insert", h(canonical.entry_v1("insert", "public.ops", {
            "id": "2", "op": "close", "ord": "2", "stmt_id": "20", "queued_at": "2024-01-03", "stmt": "7"}))),
    ]


def test_source_remove_waits_for_queued_changes(two_sources, dsn):
    conn = two_sources
    conn.execute("INSERT INTO payments (id, order_id) VALUES (1, 1)")
    out = cli("source", "remove", "audit", "payments", dsn=dsn, check=True)
    assert "1 queued changes will still be logged" in out.stdout
    conn.execute("INSERT INTO payments (id, order_id) VALUES (2, 2)")  # no longer captured
    with connect(dsn) as wconn:
        Sequencer(wconn, "audit").drain_all()
    assert [r[2] for r in check_log(conn, "audit")] == ['{"id":"1"}']
    assert "removed" in cli("source", "remove", "audit", "payments", dsn=dsn, check=True).stdout
    assert conn.execute("SELECT to_regclass('merkle.outbox_2')").fetchone()[0] is None


def test_listener_reconnects_when_postgres_restarts(two_sources, dsn, pg_server):
    conn = two_sources
    listener = start_listener(dsn)
    try:
        conn.execute("INSERT INTO orders (id, customer) SELECT g, 'a' FROM generate_series(1, 20) g")
        _wait_size(conn, 20)
        pg_server.stop(mode="fast")
        time.sleep(0.5)  # the listener notices and backs off
        pg_server.start(owned=True)
        with psycopg.connect(dsn, autocommit=True) as again:
            again.execute("INSERT INTO orders (id, customer) SELECT g, 'b' FROM generate_series(21, 40) g")
            _wait_size(again, 40)
            check_log(again, "audit")
    finally:
        log = listener.stop()
    assert "reconnecting" in log or "doorbell connection lost" in log


def test_paused_log_keeps_changes_queued_until_resumed(two_sources, dsn):
    conn = two_sources
    assert "paused" in cli("log", "pause", "audit", dsn=dsn, check=True).stdout
    conn.execute("INSERT INTO orders (id, customer) VALUES (1, 'a')")
    with connect(dsn) as wconn:
        seq = Sequencer(wconn, "audit")
        assert seq.drain_all() == 0
        cli("log", "resume", "audit", dsn=dsn, check=True)
        assert seq.drain_all() == 1


def test_source_removed_while_the_listener_runs(two_sources, dsn):
    conn = two_sources
    listener = start_listener(dsn)
    try:
        conn.execute("INSERT INTO payments (id, order_id) VALUES (1, 1)")
        _wait_size(conn, 1)
        assert "removed" in cli("source", "remove", "audit", "payments", dsn=dsn, check=True).stdout
        conn.execute("INSERT INTO orders (id, customer) VALUES (1, 'a')")
        _wait_size(conn, 2)
    finally:
        log = listener.stop()
    assert "error" not in log, log
    check_log(conn, "audit")


def test_sessions_are_read_committed_whatever_the_database_default(conn, dsn):
    conn.execute("ALTER DATABASE " + conn.info.dbname + " SET default_transaction_isolation = 'repeatable read'")
    with psycopg.connect(dsn) as plain, connect(dsn) as ours:
        assert plain.execute("SHOW transaction_isolation").fetchone()[0] == "repeatable read"
        assert ours.execute("SHOW transaction_isolation").fetchone()[0] == "read committed"
