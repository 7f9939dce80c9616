"""Replication mode at its edges: where a committed change of a source could be lost, skipped
or appended twice (a backfill racing a batch, a transaction open across a source's add or
remove, partitions, generated columns), each logged exactly once or refused up front."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from listener import canonical, registry
from listener.errors import SourceTableError
from listener.runner import connect
from listener.sources import publication
from listener.sources.validate import validate_source
from listener.store.connect import options_string
from tests.helpers import check_log, start_listener
from tests.test_replication import orjson_id, wait_for_size


class _HookedConnection(psycopg.Connection):
    """A real connection that runs `after(query)` once each statement has returned: a way to
    put another session's COMMIT between two statements of the code under test."""

    after = None

    def execute(self, query, *args, **kwargs):
        cur = super().execute(query, *args, **kwargs)
        if self.after is not None:
            self.after(str(query))
        return cur


def test_backfill_committing_between_the_batchs_two_deletes_is_not_lost(rconn):
    """A new-slot backfill (`source add --backfill`) commits `ready = true` on its own
    connection, without the log's lock, while the writer runs batches (one per recheck interval
    even when nothing streams). ReplicationBatch._take_backfills takes the ready backfills in
    several READ COMMITTED statements: the first (which rows of ready backfills to take) and the
    last (delete the states of ready backfills with no row left) see different snapshots. When
    the backfill commits in between, the last must not delete its state (cascading to its rows)
    although the first took none of them: the backfill would never be appended, and the
    source's streamed changes would go ahead without it."""
    from listener.sequencer import Sequencer
    from listener.sources.replication_apply import ReplicationBatch

    conn = rconn
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 5) g")
    log = registry.create_log(conn, "bk")
    with connect(conn.info.dsn) as c:
        source, _ = registry.add_source(c, "bk", "t", mode="replication")
    # The state a new-slot backfill is in while it reads the table: registered, not ready.
    conn.execute("INSERT INTO merkle.replication_backfill_state (source_id) VALUES (%s)", (source.source_id,))
    with psycopg.connect(conn.info.dsn, options=options_string()) as backfiller, \
            _HookedConnection.connect(conn.info.dsn, options=options_string()) as writer:
        spec = validate_source(backfiller, "t")
        publication.queue_backfill(backfiller, source.source_id, spec)  # rows + ready, not committed yet

        def commit_backfill_once(query: str) -> None:
            if "FROM merkle.replication_backfill_state st JOIN merkle.sources s" in query:
                writer.after = None
                backfiller.commit()  # the backfill's transaction ends between the two statements

        writer.after = commit_backfill_once
        seq = Sequencer(writer, "bk")
        seq.append_changes(ReplicationBatch(log.log_id, []))  # the writer's periodic empty batch
        writer.after = None
        assert writer.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        seq.append_changes(ReplicationBatch(log.log_id, []))  # and the next one
    rows = check_log(conn, "bk")
    assert [(r[3], orjson_id(r[2])) for r in rows] == [("backfill", str(i)) for i in range(1, 6)], (
        "the backfill was lost: state left = "
        f"{conn.execute('SELECT count(*) FROM merkle.replication_backfill_state').fetchone()[0]}, "
        f"rows left = {conn.execute('SELECT count(*) FROM merkle.replication_backfill').fetchone()[0]}")


def test_truncate_of_a_partition_of_a_partitioned_source_is_logged_or_refused(rconn):
    """A partitioned source logs TRUNCATE (the default policy 'log'). TRUNCATE of one of its
    partitions removes committed rows of the source, but with publish_via_partition_root
    pgoutput does not send it (it sends a partition's TRUNCATE only when the partition is
    published as itself), and no guard refuses it: the rows vanish with no leaf.

    It is refused, saying to TRUNCATE the partitioned table, whose TRUNCATE is logged."""
    conn = rconn
    conn.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    registry.create_log(conn, "pt")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "pt", "m", mode="replication")
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO m VALUES (1, '2024-03-01', 10), (2, '2025-03-01', 20)")
        wait_for_size(conn, "pt", 2, listener=listener)
        with pytest.raises(psycopg.DatabaseError, match="TRUNCATE of public.m_2025 is refused") as refused:
            conn.execute("TRUNCATE m_2025")
        assert refused.value.sqlstate == "ML100"
        assert "TRUNCATE public.m (the partitioned table, logged)" in refused.value.diag.message_hint
        assert conn.execute("SELECT count(*) FROM m").fetchone()[0] == 2
        conn.execute("TRUNCATE m")  # passes its partitions' guards, and is logged
        conn.execute("INSERT INTO m VALUES (3, '2024-04-01', 30)")  # a marker after the TRUNCATE
        wait_for_size(conn, "pt", 4, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "pt")
    assert [r[3] for r in rows] == ["insert", "insert", "truncate", "insert"]


def test_a_transaction_open_across_source_add_is_logged_whole_or_not_at_all(rconn, dsn):
    """`source add` of a replication source to a log whose slot exists, without --backfill,
    takes no lock that waits for the table's writers (trigger mode's CREATE TRIGGER does). A
    transaction that wrote the table before the add's COMMIT and again after it, then
    committed, is decoded with the publication as of each change: only its second half is
    logged. One committed source transaction must be logged whole or not at all."""
    conn = rconn
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "sp")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "sp", "other", mode="replication")  # the log's slot exists from here
    with psycopg.connect(dsn) as w:
        w.execute("INSERT INTO t VALUES (1)")  # before the add

        def add():
            with connect(conn.info.dsn) as c:
                registry.add_source(c, "sp", "t", mode="replication")

        adder = threading.Thread(target=add)
        adder.start()
        adder.join(timeout=2)
        blocked = adder.is_alive()  # waits for w: the transaction is wholly before the add
        if not blocked:
            w.execute("INSERT INTO t VALUES (2)")  # after the add's COMMIT
        w.commit()
        adder.join()
    conn.execute("INSERT INTO t VALUES (3)")  # a marker
    ids = _ids_logged_up_to_marker(conn, "sp")
    # The add waited for the transaction, which therefore committed wholly before it: not logged.
    assert blocked and ids == [3], f"logged {ids} (the add {'waited' if blocked else 'did not wait'})"


def test_a_transaction_open_across_source_remove_is_logged_whole_or_not_at_all(rconn, dsn):
    """The mirror image at `source remove`: the table leaves the publication without waiting
    for its writers. A transaction that wrote it before the removal's COMMIT and again after,
    then committed (before the slot confirmed the removal point, so the source is still
    registered when it arrives), is logged in half."""
    conn = rconn
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "rm")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "rm", "other", mode="replication")
        registry.add_source(c, "rm", "t", mode="replication")
    with psycopg.connect(dsn) as w:
        w.execute("INSERT INTO t VALUES (1)")  # before the removal
        pending = []

        def remove():
            with connect(conn.info.dsn) as c:
                pending.append(registry.remove_source(c, "rm", "t", wait=0))  # no listener: stays pending

        remover = threading.Thread(target=remove)
        remover.start()
        remover.join(timeout=2)
        blocked = remover.is_alive()  # waits for w: the transaction is wholly before the removal
        if not blocked:
            w.execute("INSERT INTO t VALUES (2)")  # after the removal left the publication
        w.commit()
        remover.join()
    assert pending == [-1]
    conn.execute("INSERT INTO other VALUES (3)")  # a marker
    ids = _ids_logged_up_to_marker(conn, "rm")
    # The removal waited for the transaction, which committed wholly while t was published.
    assert blocked and ids == [1, 3], f"logged {ids} (the removal {'waited' if blocked else 'did not wait'})"


def _ids_logged_up_to_marker(conn, log_name: str) -> list[int]:
    """Run the listener until the marker row (id 3) is logged; the ids of the log's rows."""
    listener = start_listener(conn.info.dsn)
    try:
        deadline = time.monotonic() + 30
        while conn.execute("SELECT count(*) FROM merkle.processed_log WHERE source_key = %s",
                           ('{"id":"3"}',)).fetchone()[0] == 0:
            assert time.monotonic() < deadline, listener.stop()[-2000:]
            time.sleep(0.05)
        time.sleep(0.5)  # anything logged after the marker would show
    finally:
        listener.stop()
    return [int(orjson_id(r[2])) for r in check_log(conn, log_name)]


def test_a_source_with_a_generated_column_is_refused_or_logged(rconn):
    """`source add --mode replication` hashes every column by default, generated ones
    included, but pgoutput does not send generated columns (PostgreSQL 15-17 never; 18 only
    with the publication's publish_generated_columns = stored): the first change stops the
    writer with "the stream has no column(s)", forever, and nothing of the log is appended
    after it. Registration should refuse (or not hash) such a column, or publish it.

    The default column set leaves generated columns out (in both modes, so that the same
    registration gives the same leaves), and --columns naming one is refused in replication
    mode, saying why."""
    conn = rconn
    conn.execute("CREATE TABLE g (id int PRIMARY KEY, v int, twice int GENERATED ALWAYS AS (v * 2) STORED)")
    registry.create_log(conn, "gen")
    with connect(conn.info.dsn) as c:
        with pytest.raises(SourceTableError, match="column twice of public.g is generated, and logical "
                                                   "replication does not send generated columns"):
            registry.add_source(c, "gen", "g", mode="replication", columns=["id", "twice"])
        source, _ = registry.add_source(c, "gen", "g", mode="replication")
    assert source.columns == ["id", "v"]
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO g (id, v) VALUES (1, 21)")
        wait_for_size(conn, "gen", 1, timeout=10, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "gen")
    entry = canonical.entry_v1("insert", "public.g", {"id": "1", "v": "21"})
    assert bytes(rows[0][4]) == canonical.leaf_hash_of_entry(entry)


def test_an_unlogged_table_is_refused_in_replication_mode_with_the_fix(rconn):
    """PostgreSQL's own "cannot add relation to publication ... not supported for unlogged
    tables" came through as a bare database error."""
    conn = rconn
    conn.execute("CREATE UNLOGGED TABLE u (id int PRIMARY KEY)")
    registry.create_log(conn, "unl")
    with connect(conn.info.dsn) as c:
        with pytest.raises(SourceTableError, match=r'public.u is UNLOGGED: .* ALTER TABLE "public"."u" SET LOGGED; '
                                                   r"first, or use --mode trigger"):
            registry.add_source(c, "unl", "u", mode="replication")
    assert conn.execute("SELECT count(*) FROM merkle.sources").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0


def test_a_partition_registered_as_a_source_keeps_its_changes_when_its_parent_is_added(rconn):
    """Registration checks only that the same table is not a source twice. A partition that is
    a replication source of a log stops receiving anything once its partitioned parent becomes
    a replication source of the same log: with publish_via_partition_root the publication sends
    the partition's changes as the parent's only. The partition's source silently loses them
    (they should be refused at registration, or logged for both).

    The parent is refused, saying why; the partition's source keeps its changes."""
    conn = rconn
    conn.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    registry.create_log(conn, "pp")
    with connect(conn.info.dsn) as c:
        part, _ = registry.add_source(c, "pp", "m_2025", mode="replication")
        with pytest.raises(SourceTableError, match="public.m_2025 is a partition of public.m, and public.m_2025 "
                                                   "is a replication source of log 'pp' already"):
            registry.add_source(c, "pp", "m", mode="replication")
    assert [s.table_name for s in registry.list_sources(conn)] == ["m_2025"]
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO m_2025 VALUES (1, '2025-03-01', 10)")
        conn.execute("INSERT INTO m VALUES (2, '2025-04-01', 20)")
        wait_for_size(conn, "pp", 2, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "pp")
    assert sorted(int(orjson_id(r[2])) for r in rows if r[1] == part.source_id) == [1, 2], \
        f"source m_2025 got {[(r[1], r[2]) for r in rows]}"


def test_a_partition_under_a_source_of_the_same_log_is_refused_and_another_log_may_have_it(rconn):
    """The other way round, two levels down: a partition of a partitioned replication source is
    refused as a source of the same log; as a source of another log (a publication and slot of
    its own, which sends its changes as its own) it gets them, and so does the parent's log."""
    conn = rconn
    conn.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') "
                 "PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2025a PARTITION OF m_2025 FOR VALUES FROM ('2025-01-01') TO ('2025-07-01')")
    registry.create_log(conn, "up")
    registry.create_log(conn, "down")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "up", "m", mode="replication")
        with pytest.raises(SourceTableError, match="public.m_2025a is a partition of public.m, and public.m is a "
                                                   "replication source of log 'up' already"):
            registry.add_source(c, "up", "m_2025a", mode="replication")
        registry.add_source(c, "down", "m_2025a", mode="replication")
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO m VALUES (1, '2025-03-01', 10)")
        conn.execute("INSERT INTO m_2025a VALUES (2, '2025-04-01', 20)")
        wait_for_size(conn, "up", 2, listener=listener)
        wait_for_size(conn, "down", 2, listener=listener)
    finally:
        listener.stop()
    assert [int(orjson_id(r[2])) for r in check_log(conn, "up")] == [1, 2]
    assert [int(orjson_id(r[2])) for r in check_log(conn, "down")] == [1, 2]


def test_partitions_of_a_source_logging_updates_carry_the_whole_old_row(rconn):
    """An update or delete carries the old row as the partition holding it is set, and a new
    partition starts at REPLICA IDENTITY DEFAULT: an update leaving a TOASTed value alone would
    stop the log. Registration asks for FULL on each partition; one created later is set to
    FULL by the guard; lowering a partition's identity is refused."""
    conn = rconn
    conn.execute("CREATE TABLE m (id int, at date, body text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    conn.execute("ALTER TABLE m REPLICA IDENTITY FULL")
    registry.create_log(conn, "pi")
    events = ["insert", "update", "delete"]
    with connect(conn.info.dsn) as c:
        with pytest.raises(SourceTableError, match=r"ALTER TABLE public\.m_2024 REPLICA IDENTITY FULL;"):
            registry.add_source(c, "pi", "m", mode="replication", events=events)
    conn.execute("ALTER TABLE m_2024 REPLICA IDENTITY FULL")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "pi", "m", mode="replication", events=events)
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    assert conn.execute("SELECT relreplident FROM pg_class WHERE oid = 'm_2025'::regclass").fetchone()[0] == "f"
    with pytest.raises(psycopg.DatabaseError, match="must keep REPLICA IDENTITY FULL") as refused:
        conn.execute("ALTER TABLE m_2025 REPLICA IDENTITY DEFAULT")
    assert refused.value.sqlstate == "ML101"
    conn.execute("ALTER TABLE m_2025 ALTER body SET STORAGE EXTERNAL")  # out of line: "unchanged" on update
    conn.execute("INSERT INTO m VALUES (1, '2024-05-01', repeat('x', 5000)), (2, '2025-05-01', repeat('y', 5000))")
    conn.execute("UPDATE m SET at = at WHERE id = 2")
    conn.execute("DELETE FROM m WHERE id = 1")
    listener = start_listener(conn.info.dsn)
    try:
        wait_for_size(conn, "pi", 4, listener=listener)
    finally:
        listener.stop()
    h = canonical.leaf_hash_of_entry
    rows = check_log(conn, "pi")
    assert [r[3] for r in rows] == ["insert", "insert", "update", "delete"]
    assert bytes(rows[2][4]) == h(canonical.entry_v1(
        "update", "public.m", {"id": "2", "at": "2025-05-01", "body": "y" * 5000}))
