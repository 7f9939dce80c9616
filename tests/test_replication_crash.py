"""Exactly-once under crashes: kill -9 of the listener and `pg_ctl stop -m immediate` of
PostgreSQL at random points while 8 writers commit, on a log with a source in each mode.

Runs on its own throwaway server so that crashing it disturbs no other test.
"""

from __future__ import annotations

import random
import signal
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import orjson
import psycopg
import pytest

from listener import registry
from listener.embedded import EmbeddedPostgres
from listener.runner import connect
from listener.sources import pgoutput as po
from listener.sources.replication_apply import BACKFILL_ROWS_PER_BATCH
from listener.store import migrate
from tests.helpers import check_log, cli, start_listener
from tests.test_replication import wait_for_size

WRITERS = 8
CHAOS_SECONDS = 14


@pytest.fixture(scope="module")
def crash_server(pg_server):
    """A cluster of its own (the tests crash it), from the same installation as pg_server."""
    base = Path(tempfile.mkdtemp(prefix="ml-crash-"))
    server = EmbeddedPostgres(base, settings={"fsync": "off", "full_page_writes": "off", "max_connections": "100"},
                              bin_dir=pg_server.bin_dir)
    server.start(owned=True)
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE crash")
        with psycopg.connect(server.dsn("crash")) as conn:
            migrate.apply(conn)
        yield server
    finally:
        server.destroy()


def _writer(dsn: str, n: int, stop: threading.Event, ids) -> None:
    """Transactions of 1-4 rows into t (replication) and sometimes u (trigger); some roll
    back. Server crashes are ridden out by reconnecting; what committed is in the tables."""
    rnd = random.Random(n)
    conn = None
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(dsn, connect_timeout=2)
            with conn.transaction():
                for _ in range(rnd.randint(1, 4)):
                    conn.execute("INSERT INTO t VALUES (%s, %s, repeat('x', %s))", (next(ids), n, rnd.randint(0, 300)))
                if rnd.random() < 0.3:
                    conn.execute("INSERT INTO u VALUES (%s)", (next(ids),))
                if rnd.random() < 0.15:
                    raise _Rollback
        except _Rollback:
            pass
        except psycopg.Error:
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.1)
    if conn is not None:
        conn.close()


class _Rollback(Exception):
    pass


def test_kill_and_crash_while_writers_commit(crash_server):
    dsn = crash_server.dsn("crash")
    with connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, writer int NOT NULL, pad text)")
        conn.execute("CREATE TABLE u (id bigint PRIMARY KEY)")
        registry.create_log(conn, "chaos")
    with connect(dsn) as c:
        registry.add_source(c, "chaos", "t", mode="replication")
        registry.add_source(c, "chaos", "u")
    ids = _Counter()
    stop = threading.Event()
    threads = [threading.Thread(target=_writer, args=(dsn, n, stop, ids)) for n in range(WRITERS)]
    rnd = random.Random(7)
    listener = start_listener(dsn)
    for th in threads:
        th.start()
    try:
        deadline = time.monotonic() + CHAOS_SECONDS
        crashes = kills = 0
        while time.monotonic() < deadline:
            time.sleep(rnd.uniform(0.8, 2.0))
            if rnd.random() < 0.4 and crashes < 3:
                crash_server.stop(mode="immediate")
                time.sleep(rnd.uniform(0.0, 0.5))
                crash_server.start(owned=True)
                crashes += 1
            else:
                listener.stop(signal.SIGKILL)
                listener = start_listener(dsn)
                kills += 1
        assert crashes >= 1 and kills >= 1
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=30)
    try:
        with connect(dsn, autocommit=True) as conn:
            committed_t = {r[0] for r in conn.execute("SELECT id FROM t")}
            committed_u = {r[0] for r in conn.execute("SELECT id FROM u")}
            assert len(committed_t) > 200, "the writers barely wrote; the test proves nothing"
            wait_for_size(conn, "chaos", len(committed_t) + len(committed_u), timeout=60, listener=listener)
            rows = check_log(conn, "chaos")
            sources = dict(conn.execute("SELECT table_name, source_id FROM merkle.sources"))
    finally:
        listener.stop()
        with connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    logged_t = [int(orjson.loads(r[2])["id"]) for r in rows if r[1] == sources["t"]]
    logged_u = [int(orjson.loads(r[2])["id"]) for r in rows if r[1] == sources["u"]]
    assert sorted(logged_t) == sorted(committed_t), "each committed change exactly once"
    assert sorted(logged_u) == sorted(committed_u)
    # A source transaction's changes are contiguous in the log and in their order.
    by_txn = defaultdict(list)
    for seq, source_id, _key, _op, _leaf, change_id, change_ord in rows:
        if source_id == sources["t"]:
            by_txn[change_id].append((seq, change_ord))
    for change_id, members in by_txn.items():
        seqs = [s for s, _ in members]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"transaction {change_id} is split"
        assert [o for _, o in members] == list(range(1, len(members) + 1))
    # ... and a transaction's rows are in the order it inserted them (ids taken in order).
    for members in by_txn.values():
        ids_in_txn = [int(orjson.loads(rows[s][2])["id"]) for s, _ in members]
        assert ids_in_txn == sorted(ids_in_txn)


def _run_until(conn: psycopg.Connection, log: str, size: int) -> list[tuple]:
    """Run a listener of `log` until the log holds `size` leaves; its checked rows."""
    listener = start_listener(conn.info.dsn, "--log", log)
    try:
        wait_for_size(conn, log, size, timeout=120, listener=listener)
    finally:
        listener.stop()
    return check_log(conn, log)


def test_kill_while_a_large_backfill_is_appended(crash_server):
    """A backfill is appended over several batches (BACKFILL_ROWS_PER_BATCH rows each): a
    kill -9 of the listener between them leaves the rest queued, and the next listener appends
    it, each row once, before the source's own changes."""
    dsn = crash_server.dsn("crash")
    total = 10 * BACKFILL_ROWS_PER_BATCH
    with connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE big_bf (id bigint PRIMARY KEY, pad text)")
        conn.execute("INSERT INTO big_bf SELECT g, 'before' FROM generate_series(1, %s) g", (total,))
        registry.create_log(conn, "bf_crash")
    with connect(dsn) as c:
        registry.add_source(c, "bf_crash", "big_bf", mode="replication", backfill=True)
    queued = "SELECT count(*) FROM merkle.replication_backfill"
    try:
        with connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO big_bf VALUES (%s, 'after'), (%s, 'after')", (total + 1, total + 2))
            killed_midway = 0
            while killed_midway < 2:
                listener = start_listener(dsn, "--log", "bf_crash")
                before = conn.execute(queued).fetchone()[0]
                deadline = time.monotonic() + 60
                while conn.execute(queued).fetchone()[0] == before:  # a batch of it has committed
                    assert time.monotonic() < deadline, listener.stop()[-2000:]
                    time.sleep(0.01)
                listener.stop(signal.SIGKILL)
                left = conn.execute(queued).fetchone()[0]
                assert left < before
                if not left:
                    break
                killed_midway += 1
            assert killed_midway >= 1, "the backfill was appended before any kill: the test lost its point"
            rows = _run_until(conn, "bf_crash", total + 2)
    finally:
        with connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('merkle_bf_crash')")
    assert [(r[3], int(orjson.loads(r[2])["id"])) for r in rows] == (
        [("backfill", i) for i in range(1, total + 1)] + [("insert", total + 1), ("insert", total + 2)])


def test_kill_while_a_spilled_transaction_is_appended(crash_server):
    """A transaction past SPILL_BYTES (60,000 rows of 600 bytes) is read back from its file and
    appended in one batch transaction: a kill -9 while its rows are being copied leaves none
    of them, and the next listener, which receives it again, appends it once and whole."""
    dsn = crash_server.dsn("crash")
    total = 60_000
    with connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE big_txn (id bigint PRIMARY KEY, pad text)")
        registry.create_log(conn, "txn_crash")
    with connect(dsn) as c:
        registry.add_source(c, "txn_crash", "big_txn", mode="replication")
    copying = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'merkle-listener' "
               "AND state = 'active' AND query LIKE 'COPY merkle.processed_log%'")
    try:
        with connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO big_txn VALUES (0, 'before')")
            conn.execute("INSERT INTO big_txn SELECT g, repeat(md5(g::text), 19) FROM generate_series(1, %s) g",
                         (total,))
            conn.execute("INSERT INTO big_txn VALUES (%s, 'after')", (total + 1,))
            size = "SELECT tree_size FROM merkle.logs WHERE name = 'txn_crash'"
            killed_midway = 0
            for _ in range(2):
                listener = start_listener(dsn, "--log", "txn_crash")
                deadline = time.monotonic() + 60
                while not conn.execute(copying).fetchone()[0] or conn.execute(size).fetchone()[0] == 0:
                    assert time.monotonic() < deadline, listener.stop()[-2000:]
                    time.sleep(0.005)
                time.sleep(random.uniform(0, 0.2))
                said = listener.stop(signal.SIGKILL)
                assert "its changes go to a temporary file" in said
                # Its sessions outlive it until the server notices; one still copying would
                # pass for the next listener's.
                _wait_for_no_listener_sessions(conn)
                # The large transaction's batch is rolled back with the process's session.
                left = conn.execute(size).fetchone()[0]
                assert left in (1, total + 1, total + 2)
                killed_midway += left == 1
            assert killed_midway, "the transaction was appended before any kill: the test lost its point"
            rows = _run_until(conn, "txn_crash", total + 2)
    finally:
        with connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('merkle_txn_crash')")
    assert [int(orjson.loads(r[2])["id"]) for r in rows] == list(range(total + 2))
    assert [r[6] for r in rows] == [1] + list(range(1, total + 1)) + [1]
    assert len({r[5] for r in rows[1:total + 1]}) == 1


def _wait_for_no_listener_sessions(conn: psycopg.Connection, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'merkle-listener' "
                       "AND pid <> pg_backend_pid()").fetchone()[0]:
        assert time.monotonic() < deadline, "a killed listener's sessions did not end"
        time.sleep(0.05)


class _Counter:
    def __init__(self):
        self._lock = threading.Lock()
        self._next = 0

    def __next__(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


def test_status_explains_a_lost_slot(crash_server):
    """A slot that PostgreSQL invalidated (WAL beyond max_slot_wal_keep_size) is reported as an
    error naming the recovery steps; removing and re-adding the source recovers."""
    from tests.helpers import cli

    dsn = crash_server.dsn("crash")
    with connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE lossy (id int PRIMARY KEY)")
        registry.create_log(conn, "lossy")
        with connect(dsn) as c:
            registry.add_source(c, "lossy", "lossy", mode="replication")
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            for i in range(6):
                conn.execute("INSERT INTO lossy SELECT g FROM generate_series(%s::int, %s::int) g", (i * 1000, i * 1000 + 999))
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
                status = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'merkle_lossy'").fetchone()[0]
                if status == "lost":
                    break
            assert status == "lost"
        finally:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
        status = cli("status", dsn=dsn)
        assert status.returncode == 3, "an error a monitoring script sees"
        out = status.stdout
        assert "slot merkle_lossy: wal_status lost" in out
        assert "error: slot merkle_lossy is lost" in out and "pg_drop_replication_slot('merkle_lossy')" in out
        # The running listener says it too, as an error with the same steps.
        listener = start_listener(dsn)
        try:
            listener.wait_for("slot merkle_lossy is lost", timeout=30)
        finally:
            said = listener.stop()
        assert '"level":"error"' in said.split("slot merkle_lossy is lost")[0].rsplit("\n", 1)[-1]
        conn.execute("SELECT pg_drop_replication_slot('merkle_lossy')")
        assert cli("source", "remove", "lossy", "lossy", dsn=dsn).returncode == 0
        out = cli("source", "add", "lossy", "lossy", "--mode", "replication", "--backfill", dsn=dsn)
        count = conn.execute("SELECT count(*) FROM lossy").fetchone()[0]
        assert f"{count} existing rows queued" in out.stdout, out.stderr
        conn.execute("SELECT pg_drop_replication_slot('merkle_lossy')")


def test_keepalives_that_ask_for_a_reply_are_answered(crash_server):
    """With wal_sender_timeout = 1 s the server drops a client that does not answer its
    keepalives; the stream stays open across 3 idle seconds and still delivers."""
    import anyio

    from listener.sources.replication import ReplicationStream

    dsn = crash_server.dsn("crash")
    with connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE ka (id int PRIMARY KEY)")
        registry.create_log(conn, "ka")
        with connect(dsn) as c:
            registry.add_source(c, "ka", "ka", mode="replication")
        conn.execute("ALTER SYSTEM SET wal_sender_timeout = '1s'")
        conn.execute("SELECT pg_reload_conf()")
        got = []
        try:
            async def main():
                stream = ReplicationStream(dsn, "merkle_ka", "merkle_ka", 0, on_transaction=got.append,
                                           may_confirm_idle=lambda: not got)
                await stream.open()
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(stream.run)
                        await anyio.sleep(3)
                        await anyio.to_thread.run_sync(conn.execute, "INSERT INTO ka VALUES (1)")
                        with anyio.fail_after(5):
                            while not got:
                                await anyio.sleep(0.02)
                        tg.cancel_scope.cancel()
                finally:
                    stream.close()

            anyio.run(main)
        finally:
            conn.execute("ALTER SYSTEM RESET wal_sender_timeout")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("SELECT pg_drop_replication_slot('merkle_ka')")
        assert len(got) == 1 and po.decode(got[0].changes[0][1], raw=True).new == (b"1",)


def test_run_waits_for_a_server_that_is_not_up_yet(crash_server):
    """A listener started while PostgreSQL is down (a supervisor starting both, or a restart)
    waits for it, as it does once running; what cannot end by itself fails at once."""
    dsn = crash_server.dsn("crash")
    with connect(dsn) as conn:  # committed at the end of the block
        conn.execute("CREATE TABLE early (id int PRIMARY KEY)")
        registry.create_log(conn, "early")
        registry.add_source(conn, "early", "early")
        conn.execute("INSERT INTO early SELECT generate_series(1, 3)")
    crash_server.stop()
    try:
        refused = cli("run", "--connect-wait", "0", dsn=dsn, timeout=30)
        assert refused.returncode == 2 and "error: cannot connect to PostgreSQL" in refused.stderr, refused.stderr
        listener = start_listener(dsn, "--log", "early")
        try:
            listener.wait_for("PostgreSQL cannot be reached yet; retrying")
        finally:
            crash_server.start(owned=True)
        try:
            with connect(dsn, autocommit=True) as conn:
                wait_for_size(conn, "early", 3, timeout=60, listener=listener)
                check_log(conn, "early")
        finally:
            listener.stop()
    finally:
        crash_server.start(owned=True)  # for the tests after this one, whatever happened
    # A database that does not exist is no condition that ends by itself: no wait of 600 s.
    missing = cli("run", "--connect-wait", "600", dsn=crash_server.dsn("no_such_database"), timeout=30)
    assert missing.returncode == 2 and 'database "no_such_database" does not exist' in missing.stderr, missing.stderr
    assert "retrying" not in missing.stderr
