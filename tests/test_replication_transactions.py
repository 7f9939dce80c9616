"""Replication mode and the shapes a committed transaction can take: savepoints rolled back
and released, two-phase commit, interleaved and aborted transactions, a transaction too large
for the walsender's memory, and a partitioned source. Each change that committed is logged
once, in commit order, its transaction's changes contiguous; nothing else is logged."""

from __future__ import annotations

import psycopg

from listener import canonical, registry
from listener.runner import connect
from tests.helpers import check_log, start_listener
from tests.test_replication import orjson_id, wait_for_size


def _replication_log(conn: psycopg.Connection, log: str, table: str) -> None:
    registry.create_log(conn, log)
    with connect(conn.info.dsn) as c:
        registry.add_source(c, log, table, mode="replication")


def _transactions(rows: list[tuple]) -> list[list[int]]:
    """The logged ids grouped by transaction (change_id), in log order; asserts each group is
    contiguous and numbered 1..n."""
    groups: list[list[int]] = []
    seen: set[int] = set()
    last = None
    for _seq, _source, key, _op, _leaf, change_id, change_ord in rows:
        if change_id != last:
            assert change_id not in seen, f"transaction {change_id} is split in the log"
            seen.add(change_id)
            groups.append([])
            last = change_id
        assert change_ord == len(groups[-1]) + 1
        groups[-1].append(int(orjson_id(key)))
    return groups


def test_savepoints_two_phase_commit_interleaved_and_aborted_transactions(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
    _replication_log(conn, "tx", "t")
    listener = start_listener(conn.info.dsn)
    try:
        with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
            # Savepoints: what was rolled back to is gone, what was released stays.
            a.execute("INSERT INTO t VALUES (1, 'kept')")
            a.execute("SAVEPOINT s1")
            a.execute("INSERT INTO t VALUES (2, 'rolled back')")
            a.execute("ROLLBACK TO SAVEPOINT s1")
            a.execute("INSERT INTO t VALUES (3, 'after rollback')")
            a.execute("SAVEPOINT s2")
            a.execute("INSERT INTO t VALUES (4, 'released')")
            a.execute("RELEASE SAVEPOINT s2")
            a.commit()

            # Two-phase commit: logged when COMMIT PREPARED commits it, after what committed
            # in between; a prepared transaction rolled back is never logged.
            a.execute("INSERT INTO t VALUES (10, 'prepared'), (11, 'prepared')")
            a.execute("PREPARE TRANSACTION 'p1'")
            a.commit()
            b.execute("INSERT INTO t VALUES (12, 'committed while p1 was prepared')")
            b.commit()
            a.execute("INSERT INTO t VALUES (20, 'prepared, then rolled back')")
            a.execute("PREPARE TRANSACTION 'p2'")
            a.commit()
            conn.execute("COMMIT PREPARED 'p1'")
            conn.execute("ROLLBACK PREPARED 'p2'")

            # Interleaved: the log follows commit order, not start order.
            a.execute("INSERT INTO t VALUES (30, 'began first')")
            b.execute("INSERT INTO t VALUES (31, 'committed first')")
            b.commit()
            a.execute("INSERT INTO t VALUES (32, 'began first, committed second')")
            a.commit()

            # Aborted, and aborted after a savepoint was released.
            a.execute("INSERT INTO t VALUES (40, 'aborted')")
            a.rollback()
            a.execute("SAVEPOINT s3")
            a.execute("INSERT INTO t VALUES (41, 'released, then aborted')")
            a.execute("RELEASE SAVEPOINT s3")
            a.rollback()
            b.execute("INSERT INTO t VALUES (50, 'last')")
            b.commit()
        wait_for_size(conn, "tx", 10, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "tx")
    assert _transactions(rows) == [[1, 3, 4], [12], [10, 11], [31], [30, 32], [50]]
    # The log holds exactly the rows the table holds.
    assert sorted(int(orjson_id(r[2])) for r in rows) == [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]
    entry = canonical.entry_v1("insert", "public.t", {"id": "10", "note": "prepared"})
    assert bytes(rows[4][4]) == canonical.leaf_hash_of_entry(entry)


def test_a_transaction_larger_than_the_walsenders_memory_is_logged_whole(rconn, dsn):
    conn = rconn
    # The walsender reads this database's settings: its decoding spills to disk past 64 kB.
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET logical_decoding_work_mem = '64kB'")
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, body text)")
    _replication_log(conn, "big", "big")
    listener = start_listener(conn.info.dsn)
    try:
        with psycopg.connect(dsn) as c:
            c.execute("INSERT INTO big VALUES (0, 'before')")
            c.commit()
            c.execute("INSERT INTO big SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, 30000) i")
            c.execute("INSERT INTO big VALUES (30001, 'same transaction')")
            c.commit()
            c.execute("INSERT INTO big VALUES (30002, 'after')")
            c.commit()
        wait_for_size(conn, "big", 30003, timeout=120, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "big")
    assert _transactions(rows) == [[0], list(range(1, 30002)), [30002]]
    spilled = conn.execute("SELECT spill_txns FROM pg_stat_replication_slots WHERE slot_name = 'merkle_big'").fetchone()
    assert spilled is not None and spilled[0] >= 1, "the large transaction was not spilled: the test lost its point"
    body = conn.execute("SELECT body FROM big WHERE id = 777").fetchone()[0]
    entry = canonical.entry_v1("insert", "public.big", {"id": "777", "body": body})
    assert bytes(rows[777][4]) == canonical.leaf_hash_of_entry(entry)


def test_partitioned_source_logs_its_partitions_changes_as_its_own(rconn):
    conn = rconn
    conn.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    _replication_log(conn, "parts", "m")
    listener = start_listener(conn.info.dsn)
    try:
        with conn.transaction():
            conn.execute("INSERT INTO m VALUES (1, '2024-03-01', 10), (2, '2025-03-01', 20)")
            conn.execute("INSERT INTO m_2025 VALUES (3, '2025-06-01', 30)")  # into the partition itself
        # A partition attached later is covered too.
        conn.execute("CREATE TABLE m_2023 (id int NOT NULL, at date NOT NULL, v int)")
        conn.execute("ALTER TABLE m ATTACH PARTITION m_2023 FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')")
        conn.execute("INSERT INTO m VALUES (4, '2023-05-01', 40)")
        wait_for_size(conn, "parts", 4, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "parts")
    keys = [r[2] for r in rows]
    assert keys == [canonical.key_json({"id": str(i), "at": at})
                    for i, at in [(1, "2024-03-01"), (2, "2025-03-01"), (3, "2025-06-01"), (4, "2023-05-01")]]
    entry = canonical.entry_v1("insert", "public.m", {"id": "3", "at": "2025-06-01", "v": "30"})
    assert bytes(rows[2][4]) == canonical.leaf_hash_of_entry(entry)
