"""Large replication transactions: past spill.SPILL_BYTES their changes go to a temporary file
while they arrive, and the batch prepares and writes them a chunk at a time, in its one
transaction. The leaves, their order and the tiles are those of a transaction held in memory;
a batch that fails halfway leaves nothing and its retry reads the file again."""

from __future__ import annotations

import os
import re
import time

import orjson
import psycopg
import pytest

from listener import canonical, registry
from listener.runner import connect
from listener.sequencer import Sequencer
from listener.sources import pgoutput as po
from listener.sources import replication_apply, spill
from listener.sources.replication_apply import ReplicationBatch, prepare
from tests.helpers import Listener, check_log, start_listener
from tests.naive_tree import naive_tiles
from tests.test_replication import _receive, wait_for_size
from tests.test_replication_transactions import _replication_log
from tests.test_sql_vs_python import stored_tiles

# A spill file that cannot grow: the same decoding to disk on every version between the ends.
pytestmark = pytest.mark.oldest_and_newest


def _relation(oid: int, name: str) -> po.Relation:
    return po.Relation(oid, "public", name, "f", (po.Column("id", 23, -1, True),))


def test_the_spill_file_gives_back_every_change_in_order(monkeypatch):
    """Records straddle read blocks, one payload is larger than a block, two Relations of one
    table (an ALTER between changes) stay two, and a Truncate and a change sent before its
    Relation come back as they went in, in chunks of any size, read any number of times."""
    monkeypatch.setattr(spill, "READ_BLOCK", 64)
    first, altered, other = _relation(10, "a"), _relation(10, "a"), _relation(11, "b")
    changes = [(first, b"I\x00\x00\x00\x0a" + bytes([i]) * (i % 50)) for i in range(40)]
    changes += [(None, po.Truncate(1, (10, 11))), (altered, b"U" + b"x" * 500), (None, b"I\x00\x00\x00\x0c"),
                (other, b"D\x00\x00\x00\x0b")]
    spilled = spill.SpilledChanges()
    try:
        spilled.write(changes[:17])
        spilled.write(changes[17:])
        assert spilled.count == len(changes)
        assert spilled.table_oids == {10, 11, 12}
        for size in (1, 7, 44, 1000):
            got = [c for chunk in spilled.chunks(size) for c in chunk]
            assert got == changes
            assert [len(chunk) for chunk in spilled.chunks(size)][:-1] == [size] * ((len(changes) - 1) // size)
        got = [c for chunk in spilled.chunks(10) for c in chunk]
        assert got[41][0] is altered and got[0][0] is first
        # A chunk also ends once its records reach max_bytes: the 501-byte Update ends one.
        by_bytes = list(spilled.chunks(1000, max_bytes=300))
        assert [c for chunk in by_bytes for c in chunk] == changes
        assert by_bytes[-2][-1] == changes[41] and by_bytes[-1] == changes[42:]
        assert all(sum(len(p) + 8 if type(p) is bytes else 12 for _, p in chunk[:-1]) < 300 for chunk in by_bytes)
    finally:
        spilled.close()


def _two_table_log(conn: psycopg.Connection, log: str) -> None:
    for table in ("a", "b"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
        conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    registry.create_log(conn, log)
    with connect(conn.info.dsn) as c:
        for table in ("a", "b"):
            registry.add_source(c, log, table, mode="replication", events=("insert", "update", "delete"))


def _write_transactions(conn: psycopg.Connection) -> None:
    """A small transaction, a large one touching both tables with every kind of change, a small one."""
    conn.execute("INSERT INTO a VALUES (0, 'before')")
    with conn.transaction():
        conn.execute("INSERT INTO a SELECT i, repeat('x', i % 40) FROM generate_series(1, 2500) i")
        conn.execute("INSERT INTO b SELECT i, 'b' || i FROM generate_series(1, 1200) i")
        conn.execute("UPDATE a SET note = 'updated' WHERE id % 100 = 0")
        conn.execute("DELETE FROM b WHERE id % 3 = 0")
        conn.execute("TRUNCATE b")
        conn.execute("INSERT INTO b VALUES (5000, 'after the truncate')")
        conn.execute("INSERT INTO a SELECT i, NULL FROM generate_series(2501, 3000) i")
    conn.execute("INSERT INTO a VALUES (9999, 'after')")


def test_a_spilled_transaction_is_received_as_it_was_sent(rconn, monkeypatch, caplog):
    conn = rconn
    _two_table_log(conn, "sp")
    _write_transactions(conn)
    held = _receive(conn.info.dsn, "merkle_sp", 0, 3)
    assert [t.spilled for t in held] == [None, None, None]
    monkeypatch.setattr(spill, "SPILL_BYTES", 50_000)
    with caplog.at_level("INFO", logger="listener.replication"):
        got = _receive(conn.info.dsn, "merkle_sp", 0, 3)
    small, large, after = got
    try:
        assert small.spilled is None and after.spilled is None
        assert large.spilled is not None and large.changes, "the test wants changes both in the file and in memory"
        assert large.count == held[1].count == 2500 + 1200 + 26 + 400 + 1 + 1 + 500  # 26 updates: id 0 too
        assert [c for chunk in large.chunks(999) for c in chunk] == held[1].changes
        oids = {r[0] for r in conn.execute("SELECT oid::int FROM pg_class WHERE relname IN ('a', 'b')")}
        assert large.table_oids() == held[1].table_oids() == oids
        said = [r for r in caplog.records if r.getMessage().startswith("large transaction")]
        assert [r.getMessage() for r in said] == [
            "large transaction: its changes go to a temporary file until its leaves are appended",
            "large transaction received"]
        assert said[1].changes == large.count and said[0].commit_lsn == po.int_to_lsn(large.commit_lsn)
    finally:
        for txn in got + held:
            txn.close()


def _append_all(seq: Sequencer, log_id: int, txns: list) -> list[int]:
    """Append the way the feed does, batch after batch; returns each batch's leaf count."""
    counts = []
    while txns:
        batch = ReplicationBatch(log_id, txns)
        result = seq.append_changes(batch)
        counts.append(result.count if result is not None else 0)
        txns = txns[batch.consumed:]
    return counts


@pytest.fixture
def spilling(monkeypatch):
    """Spill past 50 kB, prepare 700 changes at a time, write tiles every 1,500 rows."""
    monkeypatch.setattr(spill, "SPILL_BYTES", 50_000)
    monkeypatch.setattr(replication_apply, "APPEND_CHUNK", 700)
    monkeypatch.setattr(replication_apply, "COPY_STATEMENT_ROWS", 1500)


def test_a_spilled_transaction_gets_the_leaves_and_tiles_of_one_held_in_memory(rconn, spilling):
    conn = rconn
    _two_table_log(conn, "sp")
    _write_transactions(conn)
    txns = _receive(conn.info.dsn, "merkle_sp", 0, 3)
    assert txns[1].spilled is not None
    log = registry.get_log(conn, "sp")
    sources = {s.table_oid: s for s in registry.list_sources(conn, log.log_id)}
    # What the path for transactions held in memory (tests/test_replication_leaves.py) gives.
    whole = [t.changes if t.spilled is None else [c for chunk in t.chunks(10 ** 6) for c in chunk] for t in txns]
    expected = [prepare(t, sources, log.log_id, changes) for t, changes in zip(txns, whole)]
    with connect(conn.info.dsn) as c:
        # The large one ends its batch: the one after it waits for the next.
        assert _append_all(Sequencer(c, "sp"), log.log_id, txns) == [1 + len(expected[1].hashes), 1]
    rows = check_log(conn, "sp")
    assert [bytes(r[4]) for r in rows] == [h for p in expected for h in p.hashes]
    assert [(r[5], r[6]) for r in rows] == [(t.end_lsn, i) for t, p in zip(txns, expected)
                                            for i in range(1, len(p.hashes) + 1)]
    assert {r[3] for r in rows} == {"insert", "update", "delete", "truncate"}
    assert stored_tiles(conn, log.log_id) == naive_tiles([bytes(r[4]) for r in rows])
    assert conn.execute("SELECT end_lsn FROM merkle.replication_progress").fetchone()[0] == po.int_to_lsn(
        txns[2].end_lsn)
    entry = canonical.entry_v1("insert", "public.b", {"id": "5000", "note": "after the truncate"})
    assert canonical.leaf_hash_of_entry(entry) in {bytes(r[4]) for r in rows}
    for txn in txns:
        txn.close()


def test_a_spilled_transaction_that_fails_halfway_leaves_nothing_and_is_appended_whole_again(rconn, spilling):
    """The server refuses a row of the transaction's second COPY statement, after the first
    one's rows and tiles were written: all of it is rolled back, and the retry reads the file
    again from its start."""
    conn = rconn
    _two_table_log(conn, "sp")
    _write_transactions(conn)
    txns = _receive(conn.info.dsn, "merkle_sp", 0, 3)[:2]
    log = registry.get_log(conn, "sp")
    conn.execute("ALTER TABLE merkle.processed_log ADD CONSTRAINT refuse_seq_3000 CHECK (seq <> 3000) NOT VALID")
    stored = conn.execute("SELECT end_lsn::text FROM merkle.replication_progress").fetchone()[0]
    with connect(conn.info.dsn) as c:
        seq = Sequencer(c, "sp")
        with pytest.raises(psycopg.errors.CheckViolation):
            seq.append_changes(ReplicationBatch(log.log_id, txns))
        assert conn.execute("SELECT (SELECT count(*) FROM merkle.processed_log), (SELECT count(*) FROM merkle.tiles), "
                            "(SELECT end_lsn::text FROM merkle.replication_progress)").fetchone() == (0, 0, stored)
        conn.execute("ALTER TABLE merkle.processed_log DROP CONSTRAINT refuse_seq_3000")
        assert _append_all(seq, log.log_id, txns) == [1 + txns[1].count]  # every change is a leaf
    rows = check_log(conn, "sp")
    assert [r[6] for r in rows[1:]] == list(range(1, len(rows)))
    assert stored_tiles(conn, log.log_id) == naive_tiles([bytes(r[4]) for r in rows])
    for txn in txns:
        txn.close()


def _spill_files(pid: int) -> int:
    """The listener's open spill files (unlinked temporary files keep their name in /proc)."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            count += bool(re.search(r"merkle-listener-txn-", os.readlink(f"{fd_dir}/{fd}")))
        except FileNotFoundError:
            pass
    return count


def test_the_listener_spills_a_large_transaction_and_gives_the_file_back(rconn):
    """With the listener's own sizes: 30,000 rows of 1.3 kB are past SPILL_BYTES."""
    conn = rconn
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, body text)")
    _replication_log(conn, "big", "big")
    listener = start_listener(conn.info.dsn)
    try:
        with conn.transaction():
            conn.execute("INSERT INTO big SELECT i, repeat(md5(i::text), 40) FROM generate_series(1, 30000) i")
        conn.execute("INSERT INTO big VALUES (30001, 'after')")
        wait_for_size(conn, "big", 30001, timeout=120, listener=listener)
        listener.wait_for("large transaction received")
        deadline = time.monotonic() + 10
        while _spill_files(listener.proc.pid):  # closed once its batch has returned
            assert time.monotonic() < deadline, "the spill file was never closed"
            time.sleep(0.05)
    finally:
        said = listener.stop()
    assert "its changes go to a temporary file" in said
    rows = check_log(conn, "big")
    assert [r[6] for r in rows] == list(range(1, 30001)) + [1]
    body = conn.execute("SELECT body FROM big WHERE id = 12345").fetchone()[0]
    entry = canonical.entry_v1("insert", "public.big", {"id": "12345", "body": body})
    assert bytes(rows[12344][4]) == canonical.leaf_hash_of_entry(entry)


def test_a_spilled_transaction_of_few_changes_is_still_appended_from_its_file(rconn, spilling, monkeypatch):
    """Wide rows spill long before APPEND_CHUNK changes: such a transaction takes the chunked
    path all the same (the path for one held in memory cannot read a file)."""
    monkeypatch.setattr(replication_apply, "APPEND_CHUNK", 100_000)
    conn = rconn
    _two_table_log(conn, "sp")
    _write_transactions(conn)
    txns = _receive(conn.info.dsn, "merkle_sp", 0, 3)
    assert txns[1].spilled is not None and txns[1].count < replication_apply.APPEND_CHUNK
    log = registry.get_log(conn, "sp")
    sources = {s.table_oid: s for s in registry.list_sources(conn, log.log_id)}
    whole = [t.changes if t.spilled is None else [c for chunk in t.chunks(10 ** 6) for c in chunk] for t in txns]
    expected = [h for t, changes in zip(txns, whole) for h in prepare(t, sources, log.log_id, changes).hashes]
    with connect(conn.info.dsn) as c:
        assert _append_all(Sequencer(c, "sp"), log.log_id, txns) == [1 + txns[1].count, 1]
    rows = check_log(conn, "sp")
    assert [bytes(r[4]) for r in rows] == expected
    assert stored_tiles(conn, log.log_id) == naive_tiles(expected)
    for txn in txns:
        txn.close()


def test_wide_rows_are_weighed_by_their_bytes_and_read_back_a_few_at_a_time(rconn, monkeypatch):
    """60 rows of 40 kB are far fewer messages than YIELD_EVERY: the stream weighs them every
    WEIGH_BYTES all the same and spills them, and the batch reads them back in chunks of about
    SPILL_BYTES, not APPEND_CHUNK rows."""
    from listener.sources import replication

    monkeypatch.setattr(spill, "SPILL_BYTES", 100_000)
    monkeypatch.setattr(replication, "WEIGH_BYTES", 200_000)
    conn = rconn
    conn.execute("CREATE TABLE wide (id int PRIMARY KEY, body text)")
    _replication_log(conn, "wide", "wide")
    with conn.transaction():
        conn.execute("INSERT INTO wide SELECT i, string_agg(md5(i::text || j::text), '') "
                     "FROM generate_series(1, 60) i, generate_series(1, 1250) j GROUP BY i")
    txns = _receive(conn.info.dsn, "merkle_wide", 0, 1)
    large = txns[0]
    assert large.spilled is not None and large.count == 60
    chunk_sizes = [len(chunk) for chunk in large.spilled.chunks(replication_apply.APPEND_CHUNK, spill.SPILL_BYTES)]
    assert sum(chunk_sizes) == large.spilled.count > 50 and max(chunk_sizes) <= 3, chunk_sizes
    log = registry.get_log(conn, "wide")
    with connect(conn.info.dsn) as c:
        assert _append_all(Sequencer(c, "wide"), log.log_id, txns) == [60]
    rows = check_log(conn, "wide")
    body = conn.execute("SELECT body FROM wide WHERE id = 37").fetchone()[0]
    assert len(body) == 40_000
    entry = canonical.entry_v1("insert", "public.wide", {"id": "37", "body": body})
    assert [bytes(r[4]) for r in rows if orjson.loads(r[2]) == {"id": "37"}] == [canonical.leaf_hash_of_entry(entry)]
    large.close()


def test_a_spill_file_that_cannot_be_written_stops_the_stream_with_what_to_do(rconn, monkeypatch):
    """A full disk (ENOSPC from the file's write) ends the session with a message naming the
    directory and TMPDIR; nothing was acknowledged, so the next session receives it all again."""
    import errno

    from listener.errors import ProcessingError

    conn = rconn
    _two_table_log(conn, "sp")
    _write_transactions(conn)
    monkeypatch.setattr(spill, "SPILL_BYTES", 50_000)

    def full(self, changes):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(spill.SpilledChanges, "write", full)
        with pytest.raises(ExceptionGroup) as raised:  # from _receive's task group
            _receive(conn.info.dsn, "merkle_sp", 0, 3)
    assert raised.group_contains(ProcessingError, match=r"temporary file in /.*No space left on device.*TMPDIR")
    got = _receive(conn.info.dsn, "merkle_sp", 0, 3)
    assert got[1].spilled is not None and got[1].count == 2500 + 1200 + 26 + 400 + 1 + 1 + 500
    for txn in got:
        txn.close()


def test_a_listener_whose_spill_file_cannot_grow_says_so_and_retries_less_and_less_often(rconn):
    """The running listener with a file size limit (as a full disk would): its log names
    TMPDIR, and each new try, which makes the server decode the transaction again, waits
    longer than the one before (0.2 s, 0.4 s, ... up to 5 s), not 0.2 s each time. Once
    the limit is gone (a new listener), the transaction is logged whole."""
    import resource

    conn = rconn
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, body text)")
    _replication_log(conn, "big", "big")
    listener = Listener(conn.info.dsn, preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_FSIZE, (4 << 20, resource.RLIM_INFINITY)))
    try:
        listener.wait_for("replication stream open")
        conn.execute("INSERT INTO big SELECT i, repeat(md5(i::text), 40) FROM generate_series(1, 30000) i")
        listener.wait_for("TMPDIR")
        time.sleep(8)
    finally:
        said = listener.stop()
    tries = said.count("replication stream interrupted")
    # 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s of pauses alone fill 6.2 s: at most 5 tries in 8 s (a
    # pause of 0.2 s each time made 12 or more).
    assert 2 <= tries <= 5, said[-3000:]
    assert "File too large" in said and conn.execute("SELECT tree_size FROM merkle.logs").fetchone()[0] == 0
    listener = start_listener(conn.info.dsn)
    try:
        wait_for_size(conn, "big", 30000, timeout=120, listener=listener)
    finally:
        listener.stop()
    assert [r[6] for r in check_log(conn, "big")] == list(range(1, 30001))


def test_a_spill_write_that_fails_at_its_end_fails_at_once():
    """A file that takes all but the last bytes of a write (a disk, here a file size limit,
    full a few kB before the records' end) must fail the write itself, where the stream turns
    it into a session error naming TMPDIR: Python's buffered file would otherwise keep those
    bytes and fail only the batch's read-back."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import resource, signal
        from listener.sources import spill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead
        spilled = spill.SpilledChanges()
        changes = [(None, b"I\\x00\\x00\\x00\\x0a" + b"x" * 10_000) for _ in range(10)]
        size = sum(8 + len(p) for _, p in changes)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size - 100, resource.RLIM_INFINITY))
        try:
            spilled.write(changes)
        except OSError as exc:
            print("write failed:", exc.errno)
        else:
            print("write passed")
            try:
                list(spilled.chunks(100))
            except OSError as exc:
                print("read-back failed:", exc.errno)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.startswith("write failed:"), out.stdout + out.stderr
