"""The leaf lookup index (sql/016, sql/017): a BRIN bloom index on leaf_hash and source_key whose
page ranges are summarized once the table has left them behind, by merkle.summarize_leaf_lookup,
which `run` calls each second; a lookup by hash or by key then reads the ranges holding the
leaves and the tail not summarized yet."""

from __future__ import annotations

import hashlib
import time

import psycopg
import pytest
from psycopg import sql

from listener import registry
from listener.runner import connect
from listener.sequencer import Sequencer
from listener.store import migrate
from tests.helpers import check_log, start_listener
from tests.naive_tree import insert_log
from tests.test_replication import wait_for_size

PER_RANGE, MARGIN = 16, 128


def leaf(i: int) -> bytes:
    return hashlib.sha256(b"leaf %d" % i).digest()


def summarize_only_by_hand(conn) -> None:
    """Leave the summaries to the test's own calls. Autosummarize's requests are run by
    autovacuum workers even for a table whose autovacuum is off, so both are turned off:
    under load a worker summarized ranges between the test's steps."""
    conn.execute("ALTER TABLE merkle.processed_log SET (autovacuum_enabled = off)")
    conn.execute("ALTER INDEX merkle.processed_log_leaf_lookup SET (autosummarize = off)")


def heap_blocks(conn) -> int:
    return conn.execute("SELECT pg_relation_size('merkle.processed_log') / current_setting('block_size')::int"
                        ).fetchone()[0]


def pages_read(conn, function: str, args: tuple) -> int:
    """Heap pages of processed_log that the query of `function` (a regprocedure) reads for
    `args`, checking that it reads them through the BRIN index."""
    with conn.transaction():
        # Its query, with its settings (a function's own plan cannot be EXPLAINed from here).
        body, config = conn.execute(
            "SELECT prosrc, proconfig FROM pg_proc WHERE oid = %s::regprocedure", (function,)).fetchone()
        for setting in config:
            name, value = setting.split("=", 1)
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        types = function[function.index("(") + 1:-1]
        conn.execute(f"PREPARE lookup_body({types}) AS " + body)
        try:
            plan = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE lookup_body({})").format(
                sql.SQL(", ").join(map(sql.Literal, args)))).fetchone()[0][0]["Plan"]
        finally:
            conn.execute("DEALLOCATE lookup_body")
    scans = []

    def walk(node):
        if node["Node Type"] == "Bitmap Heap Scan":
            scans.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    assert [s["Relation Name"] for s in scans] == ["processed_log"], plan
    assert scans[0]["Plans"][0]["Index Name"] == "processed_log_leaf_lookup", plan
    return scans[0]["Lossy Heap Blocks"] + scans[0].get("Exact Heap Blocks", 0)


def lookup(conn, log_id: int, leaf_hash: bytes) -> tuple[int | None, int]:
    """(the leaf's index by merkle.leaf_index, heap pages its query reads)."""
    args = (log_id, leaf_hash, 2**63 - 1)
    found = conn.execute("SELECT merkle.leaf_index(%s, %s, %s)", args).fetchone()[0]
    return found, pages_read(conn, "merkle.leaf_index(integer, bytea, bigint)", args)


def by_key(conn, log_id: int, source: str, key: str, size: int = 2**63 - 1) -> tuple[list[tuple], int]:
    """(the leaves of that row by merkle.leaves_by_key, heap pages its query reads)."""
    args = (log_id, source, key, size)
    found = conn.execute("SELECT seq, op FROM merkle.leaves_by_key(%s, %s, %s, %s)", args).fetchall()
    return found, pages_read(conn, "merkle.leaves_by_key(integer, text, text, bigint)", args)


def test_summarized_ranges_narrow_a_lookup_to_the_leafs_range(conn):
    summarize_only_by_hand(conn)
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
    summarize_only_by_hand(conn)  # and by the listener's
    conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text)")
    registry.create_log(conn, "audit")
    registry.add_source(conn, "audit", "orders")
    conn.execute("INSERT INTO orders SELECT g, 'note ' || g FROM generate_series(1, 20000) g")
    listener = start_listener(dsn)
    try:
        wait_for_size(conn, "audit", 20_000, timeout=60, listener=listener)
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
    summarize_only_by_hand(conn)
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


def test_leaves_of_a_row_are_found_by_key_through_the_summaries(conn):
    """sql/017: the unique change index no longer holds the key, so lookups by key (the HTTP
    API's /lookup) go through the BRIN summaries: every leaf of that row of that source, in log
    order, below the size asked for, and only a few ranges of the table read."""
    summarize_only_by_hand(conn)
    for table in ("orders", "refunds"):
        conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, note text)")
    log_id = registry.create_log(conn, "audit").log_id
    registry.add_source(conn, "audit", "orders")
    registry.add_source(conn, "audit", "refunds")
    conn.execute("INSERT INTO orders SELECT g, 'note ' || g FROM generate_series(1, 20000) g")
    conn.execute("INSERT INTO refunds VALUES (7, 'same key, other source')")
    conn.execute("DELETE FROM orders WHERE id = 7")  # not logged (inserts only) ...
    conn.execute("INSERT INTO orders VALUES (7, 'the same row key again')")  # ... but this is
    with connect(conn.info.dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 20_002
    rows = check_log(conn, "audit")
    key = '{"id":"7"}'
    first, again = [r[0] for r in rows if r[2] == key and r[1] == rows[0][1]]
    assert 0 <= first < again == 20_001

    blocks = heap_blocks(conn)
    reached = conn.execute("SELECT merkle.summarize_leaf_lookup(0)").fetchone()[0]
    assert reached + MARGIN <= blocks < reached + PER_RANGE + MARGIN
    found, read = by_key(conn, log_id, "public.orders", key)
    assert found == [(first, "insert"), (again, "insert")]
    # The range holding the first leaf, the tail (the second), a false positive at most.
    assert read <= PER_RANGE + (blocks - reached) + PER_RANGE, f"{read} of {blocks} pages read"
    assert by_key(conn, log_id, "public.orders", key, again)[0] == [(first, "insert")]
    assert by_key(conn, log_id, "public.refunds", key)[0] == [(20_000, "insert")]
    assert by_key(conn, log_id, "public.orders", '{"id":"20001"}')[0] == []
    assert by_key(conn, log_id, "public.payments", key)[0] == []
    # The same key in another log's source: each log answers for its own.
    conn.execute("CREATE TABLE credits (id bigint PRIMARY KEY, note text)")
    other = registry.create_log(conn, "other").log_id
    registry.add_source(conn, "other", "credits")
    conn.execute("INSERT INTO credits VALUES (7, 'another log')")
    with connect(conn.info.dsn) as w:
        assert Sequencer(w, "other").drain_all() == 1
    assert by_key(conn, other, "public.credits", key)[0] == [(0, "insert")]
    assert by_key(conn, other, "public.orders", key)[0] == []
    assert by_key(conn, log_id, "public.credits", key)[0] == []


def test_a_lookup_by_key_gives_the_first_thousand_leaves(conn):
    """As the HTTP API's /lookup always did: a row with more leaves (one updated that often)
    answers its first 1,000, in log order."""
    conn.execute("CREATE TABLE hot (id int PRIMARY KEY, n int)")
    log_id = registry.create_log(conn, "audit").log_id
    source, _ = registry.add_source(conn, "audit", "hot")
    key = '{"id":"1"}'
    with conn.cursor().copy("COPY merkle.processed_log (log_id, seq, source_id, source_key, op, leaf_hash, "
                            "change_id, change_ord) FROM STDIN") as copy:
        for seq in range(2_400):
            copy.write_row((log_id, seq, source.source_id, key if seq % 2 else '{"id":"2"}', "insert", leaf(seq), seq, 1))
    found, _ = by_key(conn, log_id, "public.hot", key)
    assert found == [(seq, "insert") for seq in range(1, 2_000, 2)]
    assert by_key(conn, log_id, "public.hot", key, 1_199)[0] == [(seq, "insert") for seq in range(1, 1_199, 2)]


def test_a_change_identity_is_unique_without_its_key(conn):
    """sql/017's change index (log, source, change_id, change_ord): a change appended again is
    refused even under another key, and the same identity in another source or log is not."""
    insert_log(conn, "audit", [leaf(0)], tiles=False)
    row = "(%s, %s, 1, %s, 'insert', %s, 0, 0)"
    insert = "INSERT INTO merkle.processed_log (log_id, seq, source_id, source_key, op, leaf_hash, change_id, change_ord) VALUES "
    log_id = registry.get_log(conn, "audit").log_id
    with conn.transaction(force_rollback=True), pytest.raises(psycopg.errors.UniqueViolation) as refused:
        conn.execute(insert + row, (log_id, 1, '{"id":"other"}', leaf(1)))
    assert refused.value.diag.constraint_name == "processed_log_change"
    with conn.transaction(force_rollback=True):
        conn.execute(insert + row.replace(", 1, %s", ", 2, %s"), (log_id, 1, '{"id":"0"}', leaf(1)))
        conn.execute(insert + row, (log_id + 1, 0, '{"id":"0"}', leaf(1)))


def test_the_upgrade_to_017_indexes_a_log_written_before_it(rconn):
    """sql/017 builds its unique index over the leaves that earlier versions wrote: trigger and
    replication inserts, and the backfills of two replication sources (whose change ids are
    all 0). Afterwards the log is whole and every row's leaves are found by key."""
    conn = rconn
    for table in ("counts", "tallies", "notes"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
        conn.execute(f"INSERT INTO {table} SELECT g, '{table} ' || g FROM generate_series(1, 300) g")
    registry.create_log(conn, "old")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "old", "counts", mode="replication", backfill=True)
        registry.add_source(c, "old", "tallies", mode="replication", backfill=True)
        registry.add_source(c, "old", "notes", backfill=True)
    listener = start_listener(conn.info.dsn)
    try:
        for table in ("counts", "tallies", "notes"):
            conn.execute(f"INSERT INTO {table} SELECT g, 'later ' || g FROM generate_series(301, 400) g")
        wait_for_size(conn, "old", 1200, listener=listener)
    finally:
        listener.stop()
    # Back to the indexes of sql/016, as a database of that version has them.
    conn.execute("DROP FUNCTION merkle.leaves_by_key(integer, text, text, bigint)")
    conn.execute("DROP INDEX merkle.processed_log_change")
    conn.execute("CREATE UNIQUE INDEX processed_log_change ON merkle.processed_log "
                 "(log_id, source_id, source_key, change_id, change_ord)")
    conn.execute("DROP INDEX merkle.processed_log_leaf_lookup")
    conn.execute("CREATE INDEX processed_log_leaf_lookup ON merkle.processed_log USING brin (leaf_hash "
                 "bytea_bloom_ops (n_distinct_per_range = 1000, false_positive_rate = 0.001)) "
                 "WITH (pages_per_range = 16, autosummarize = on)")
    conn.execute("DELETE FROM merkle.schema_version WHERE version = 17")

    with connect(conn.info.dsn) as c:
        assert [m.version for m in migrate.apply(c)] == [17]
        c.commit()
    rows = check_log(conn, "old")
    log_id = registry.get_log(conn, "old").log_id
    names = dict(conn.execute("SELECT source_id, table_schema || '.' || table_name FROM merkle.sources"))
    assert sorted(set(names.values())) == ["public.counts", "public.notes", "public.tallies"]
    # The replication backfills' change ids are 0, the trigger one's a statement's id.
    assert sorted(r[5] == 0 for r in rows if r[3] == "backfill") == [False] * 300 + [True] * 600
    for r in rows[::37]:
        found, _ = by_key(conn, log_id, names[r[1]], r[2])
        assert found == [(r[0], r[3])]


def test_a_removed_sources_leaves_keep_its_name(conn, dsn):
    """After `source remove` (sql/019) a proof still names the table a leaf came from, a lookup
    by key still finds the leaf, and once the table is added again it finds the leaves of
    both registrations."""
    import anyio

    from listener import proofs
    from listener.api import entries

    conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
    log_id = registry.create_log(conn, "audit").log_id
    registry.add_source(conn, "audit", "kept")
    conn.execute("INSERT INTO kept VALUES (1, 'one'), (2, 'two')")
    with connect(dsn) as c:
        Sequencer(c, "audit").drain_all()
    assert registry.remove_source(conn, "audit", "kept") == 0
    assert conn.execute("SELECT count(*) FROM merkle.sources").fetchone()[0] == 0
    doc = proofs.inclusion(conn, "audit", 0)
    assert (doc["source"], doc["source_key"], doc["op"]) == ("public.kept", '{"id":"1"}', "insert")
    assert by_key(conn, log_id, "public.kept", '{"id":"2"}')[0] == [(1, "insert")]

    async def read_entries():
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            return await entries.leaves(aconn, log_id, 0, 2)

    got = anyio.run(read_entries)
    assert [(g.source, g.source_key, g.entry) for g in got] == [
        ("public.kept", '{"id":"1"}', None), ("public.kept", '{"id":"2"}', None)]  # nothing to rebuild from

    conn.execute("DELETE FROM kept WHERE id = 2")
    registry.add_source(conn, "audit", "kept")
    conn.execute("INSERT INTO kept VALUES (2, 'two again')")
    with connect(dsn) as c:
        Sequencer(c, "audit").drain_all()
    assert by_key(conn, log_id, "public.kept", '{"id":"2"}')[0] == [(1, "insert"), (2, "insert")]
    assert len({r[1] for r in check_log(conn, "audit")}) == 2  # two source ids, one name
    # A source removed before it had any leaf leaves nothing behind.
    conn.execute("CREATE TABLE unused (id int PRIMARY KEY)")
    registry.add_source(conn, "audit", "unused")
    registry.remove_source(conn, "audit", "unused")
    assert conn.execute("SELECT table_name FROM merkle.retired_sources").fetchall() == [("kept",)]
