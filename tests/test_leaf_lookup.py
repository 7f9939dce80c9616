"""The leaf-hash index (sql/016): a BRIN bloom index whose page ranges are summarized once the
table has left them behind, by merkle.summarize_leaf_lookup, which `run` calls each second; a
lookup by hash then reads the range holding the leaf and the tail not summarized yet."""

from __future__ import annotations

import hashlib
import time

import psycopg
import pytest

from listener import registry
from tests.helpers import check_log, start_listener
from tests.naive_tree import insert_log

PER_RANGE, MARGIN = 16, 128


def leaf(i: int) -> bytes:
    return hashlib.sha256(b"leaf %d" % i).digest()


def heap_blocks(conn) -> int:
    return conn.execute("SELECT pg_relation_size('merkle.processed_log') / current_setting('block_size')::int"
                        ).fetchone()[0]


def lookup(conn, log_id: int, leaf_hash: bytes) -> tuple[int | None, int]:
    """(the leaf's index by merkle.leaf_index, heap pages its query reads)."""
    found = conn.execute("SELECT merkle.leaf_index(%s, %s, %s)", (log_id, leaf_hash, 2**63 - 1)).fetchone()[0]
    with conn.transaction():
        # Its query, with its settings (a function's own plan cannot be EXPLAINed from here).
        body, config = conn.execute(
            "SELECT prosrc, proconfig FROM pg_proc WHERE oid = 'merkle.leaf_index(integer, bytea, bigint)'::regprocedure"
        ).fetchone()
        for setting in config:
            name, value = setting.split("=", 1)
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        conn.execute("PREPARE leaf_index_body(integer, bytea, bigint) AS " + body)
        try:
            plan = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE leaf_index_body("
                                f"{log_id:d}, '\\x{leaf_hash.hex()}', {2**63 - 1:d})").fetchone()[0][0]["Plan"]
        finally:
            conn.execute("DEALLOCATE leaf_index_body")
    scans = []

    def walk(node):
        if node["Node Type"] == "Bitmap Heap Scan":
            scans.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    assert [s["Relation Name"] for s in scans] == ["processed_log"], plan
    assert scans[0]["Plans"][0]["Index Name"] == "processed_log_leaf_lookup", plan
    return found, scans[0]["Lossy Heap Blocks"] + scans[0].get("Exact Heap Blocks", 0)


def test_summarized_ranges_narrow_a_lookup_to_the_leafs_range(conn):
    conn.execute("ALTER TABLE merkle.processed_log SET (autovacuum_enabled = off)")  # summaries are ours only
    leaves = [leaf(i) for i in range(20_000)]
    log_id = insert_log(conn, "big", leaves, tiles=False)
    blocks = heap_blocks(conn)
    assert blocks > 2 * MARGIN

    # Nothing summarized yet: every range may hold the leaf.
    assert lookup(conn, log_id, leaves[100]) == (100, blocks)

    done = conn.execute("SELECT merkle.summarize_leaf_lookup(0)").fetchone()[0]
    # Every range that ends 128 pages or more before the table's end, and no other.
    assert done % PER_RANGE == 0 and done + MARGIN <= blocks < done + PER_RANGE + MARGIN
    assert conn.execute("SELECT merkle.summarize_leaf_lookup(%s)", (done,)).fetchone()[0] == done
    assert conn.execute("SELECT merkle.summarize_leaf_lookup(0)").fetchone()[0] == done

    tail = blocks - done
    for i in (0, 100, 9_999):
        found, read = lookup(conn, log_id, leaves[i])
        assert found == i
        assert read <= PER_RANGE + tail + PER_RANGE, f"leaf {i}: {read} of {blocks} pages read"
    # A hash that is not there: the tail, and a false positive at most.
    assert lookup(conn, log_id, leaf(-1))[0] is None
    check_log(conn, "big")


def test_only_the_schemas_owner_summarizes(conn):
    conn.execute("CREATE ROLE lookup_stranger")
    try:
        conn.execute("GRANT USAGE ON SCHEMA merkle TO lookup_stranger")
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL ROLE lookup_stranger")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT merkle.summarize_leaf_lookup(0)")
    finally:
        conn.execute("REVOKE USAGE ON SCHEMA merkle FROM lookup_stranger")
        conn.execute("DROP ROLE lookup_stranger")


def test_the_listener_summarizes_what_it_appended(conn, dsn):
    # Autosummarize and autovacuum off: only the listener can summarize here.
    conn.execute("ALTER TABLE merkle.processed_log SET (autovacuum_enabled = off)")
    conn.execute("ALTER INDEX merkle.processed_log_leaf_lookup SET (autosummarize = off)")
    conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text)")
    registry.create_log(conn, "audit")
    registry.add_source(conn, "audit", "orders")
    conn.execute("INSERT INTO orders SELECT g, 'note ' || g FROM generate_series(1, 20000) g")
    listener = start_listener(dsn)
    try:
        deadline = time.monotonic() + 60
        while conn.execute("SELECT tree_size FROM merkle.logs WHERE name = 'audit'").fetchone()[0] < 20_000:
            assert time.monotonic() < deadline, listener.stop()[-2000:]
            time.sleep(0.1)
        rows = check_log(conn, "audit")
        log_id = registry.get_log(conn, "audit").log_id
        blocks = heap_blocks(conn)
        assert blocks > 2 * MARGIN
        deadline = time.monotonic() + 10
        while (read := lookup(conn, log_id, bytes(rows[50][4])))[1] > PER_RANGE + MARGIN + 2 * PER_RANGE:
            assert time.monotonic() < deadline, f"not summarized: {read[1]} of {blocks} pages read"
            time.sleep(0.2)
        assert read[0] == 50
    finally:
        listener.stop()


def test_a_block_past_a_shrunk_table_starts_again(conn):
    """Found by review: after VACUUM FULL merkle.processed_log (docs/design.md advises it after
    a large log drop) the listener's block lay past the table's end, and the ranges refilled
    below it were never summarized by it: every lookup read them all."""
    conn.execute("ALTER TABLE merkle.processed_log SET (autovacuum_enabled = off)")
    conn.execute("ALTER INDEX merkle.processed_log_leaf_lookup SET (autosummarize = off)")
    insert_log(conn, "dropped", [leaf(-i) for i in range(1, 20_001)], tiles=False)
    reached = conn.execute("SELECT merkle.summarize_leaf_lookup(0)").fetchone()[0]
    assert reached > MARGIN
    conn.execute("DELETE FROM merkle.processed_log")
    conn.execute("VACUUM FULL merkle.processed_log")
    reached = conn.execute("SELECT merkle.summarize_leaf_lookup(%s)", (reached,)).fetchone()[0]  # the next tick
    leaves = [leaf(i) for i in range(20_000)]
    log_id = insert_log(conn, "big", leaves, tiles=False)
    blocks = heap_blocks(conn)
    assert blocks > reached + MARGIN or reached == 0
    reached = conn.execute("SELECT merkle.summarize_leaf_lookup(%s)", (reached,)).fetchone()[0]
    assert reached + MARGIN <= blocks < reached + PER_RANGE + MARGIN
    found, read = lookup(conn, log_id, leaves[100])
    assert found == 100 and read <= PER_RANGE + (blocks - reached) + PER_RANGE, f"{read} of {blocks} pages read"
