"""Replication mode end to end: registration checks, slot lifecycle, events, backfill, restart."""

from __future__ import annotations

import contextlib
import signal
import time

import psycopg
import pytest

from listener import canonical, registry
from listener.errors import ConfigurationError, SourceTableError
from listener.runner import connect
from listener.sources.replication_feed import IDLE_CONFIRM_MIN_BYTES
from tests.helpers import check_log, cli, slots, start_listener


def wait_for_size(conn, log: str, size: int, timeout: float = 30.0, listener=None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = conn.execute("SELECT tree_size FROM merkle.logs WHERE name = %s", (log,)).fetchone()[0]
        if got >= size:
            assert got == size, f"log {log} grew to {got}, expected {size}"
            return
        if time.monotonic() > deadline:
            said = listener.stop()[-3000:] if listener is not None else ""
            raise AssertionError(f"log {log} reached size {got} within {timeout} s, expected {size}\n{said}")
        time.sleep(0.05)


def confirmed_flush(conn, slot: str) -> str:
    return conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,)).fetchone()[0]


def test_both_modes_on_one_log(rconn):
    conn = rconn
    conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text)")
    conn.execute("CREATE TABLE payments (id bigint PRIMARY KEY, amount numeric)")
    registry.create_log(conn, "audit")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "audit", "orders", mode="replication")
        registry.add_source(c, "audit", "payments")
    assert slots(conn) == ["merkle_audit"]
    assert conn.execute("SELECT pubname FROM pg_publication").fetchall() == [("merkle_audit",)]
    listed = cli("source", "list", "audit", dsn=conn.info.dsn, check=True).stdout
    assert "public.orders\t" in listed and "mode replication" in listed and "events insert,truncate" in listed
    listener = start_listener(conn.info.dsn)
    try:
        for i in range(1, 21):
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES (%s, %s), (%s, 'second')", (2 * i, f"o{i}", 2 * i + 1))
                conn.execute("INSERT INTO payments VALUES (%s, %s)", (i, i * 1.5))
        wait_for_size(conn, "audit", 60, listener=listener)
        rows = check_log(conn, "audit")
        orders_id = conn.execute("SELECT source_id FROM merkle.sources WHERE table_name = 'orders'").fetchone()[0]
        repl = [r for r in rows if r[1] == orders_id]
        # One transaction's changes are contiguous among the source's leaves and keep their order.
        assert [r[2] for r in repl] == [canonical.key_json({"id": str(k)}) for k in range(2, 42)]
        assert [r[6] for r in repl] == [1, 2] * 20
        assert len({r[5] for r in repl}) == 20
        entry = canonical.entry_v1("insert", "public.orders", {"id": "2", "note": "o1"})
        assert bytes(repl[0][4]) == canonical.leaf_hash_of_entry(entry)
        # Acknowledged after commit: the slot confirms at least the last transaction's end.
        end = conn.execute("SELECT end_lsn FROM merkle.replication_progress").fetchone()[0]
        deadline = time.monotonic() + 10
        while conn.execute("SELECT confirmed_flush_lsn < %s FROM pg_replication_slots", (end,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the stored end_lsn was never acknowledged"
            time.sleep(0.05)
        conn.execute("INSERT INTO orders VALUES (1000, 'last')")
        # While the listener streams, `source remove` waits for it to log what was committed.
        out = cli("source", "remove", "audit", "orders", dsn=conn.info.dsn)
        assert out.returncode == 0, out.stderr + out.stdout + listener.stop()
        # The last replication source took the slot with it: the listener says so, calmly.
        listener.wait_for("replication stream closed: the log has no replication source left")
    finally:
        said = listener.stop()
    assert "replication stream interrupted" not in said
    assert conn.execute("SELECT tree_size FROM merkle.logs").fetchone()[0] == 61
    assert slots(conn) == []
    assert conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0


def test_updates_deletes_truncate_and_toast(rconn):
    conn = rconn
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, rev int)")
    conn.execute("ALTER TABLE docs ALTER body SET STORAGE EXTERNAL")
    registry.create_log(conn, "docs")
    with connect(conn.info.dsn) as c, pytest.raises(SourceTableError, match="REPLICA IDENTITY FULL"):
        registry.add_source(c, "docs", "docs", mode="replication", events=["insert", "update", "delete"])
    conn.execute("ALTER TABLE docs REPLICA IDENTITY FULL")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "docs", "docs", mode="replication", events=["insert", "update", "delete"])
    big = "".join(f"{i:08x}" for i in range(20_000))  # out of line, so an update not touching it sends 'u'
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO docs VALUES (1, %s, 1), (2, 'short', 1)", (big,))
        conn.execute("UPDATE docs SET rev = 2 WHERE id = 1")
        conn.execute("DELETE FROM docs WHERE id = 2")
        conn.execute("TRUNCATE docs")
        wait_for_size(conn, "docs", 5, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "docs")
    h = lambda op, row: canonical.leaf_hash_of_entry(canonical.entry_v1(op, "public.docs", row))  # noqa: E731
    assert [(r[3], bytes(r[4])) for r in rows] == [
        ("insert", h("insert", {"id": "1", "body": big, "rev": "1"})),
        ("insert", h("insert", {"id": "2", "body": "short", "rev": "1"})),
        ("update", h("update", {"id": "1", "body": big, "rev": "2"})),
        ("delete", h("delete", {"id": "2"})),
        ("truncate", h("truncate", {})),
    ]


def test_refusals_say_how_to_fix(rconn):
    conn = rconn
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    registry.create_log(conn, "l")
    with connect(conn.info.dsn) as c:
        with pytest.raises(ConfigurationError, match="append-only"):
            registry.add_source(c, "l", "t", mode="replication", events=["insert", "delete"], append_only=True)
        with pytest.raises(ConfigurationError, match="--events"):
            registry.add_source(c, "l", "t", mode="replication", events=["upsert"])
    role = f"plain_{conn.info.dbname}"  # roles are cluster-wide: one per test database
    conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        conn.execute(f"GRANT ALL ON SCHEMA public, merkle TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public, merkle TO {role}")
        out = cli("source", "add", "l", "t", "--mode", "replication", dsn=conn.info.dsn + f" user={role}")
    finally:
        conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
    assert out.returncode == 2
    assert "REPLICATION privilege" in out.stderr and f'ALTER ROLE "{role}" REPLICATION' in out.stderr
    assert slots(conn) == []
    # A second source logging updates would make PostgreSQL refuse UPDATE on "Keyless" (its
    # unique key is no replica identity): refused at registration instead.
    conn.execute('CREATE TABLE "Keyless" (code text NOT NULL UNIQUE)')
    conn.execute("CREATE TABLE upd (id int PRIMARY KEY)")
    conn.execute("ALTER TABLE upd REPLICA IDENTITY FULL")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "l", '"Keyless"', mode="replication", key=["code"])
        with pytest.raises(SourceTableError, match='ALTER TABLE "public"."Keyless" REPLICA IDENTITY FULL'):
            registry.add_source(c, "l", "upd", mode="replication", events=["insert", "update"])
    conn.execute('UPDATE "Keyless" SET code = code')  # still allowed: nothing was changed
    # Without a listener to confirm the stream, removal stays pending (nothing is dropped unlogged).
    with connect(conn.info.dsn) as c:
        assert registry.remove_source(c, "l", "public.Keyless", wait=0) == -1
    # Truncate refused by policy: a guard trigger, no leaf.
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "l", "t", mode="replication", truncate="refuse")
    with pytest.raises(psycopg.DatabaseError, match="TRUNCATE on public.t is refused") as refused:
        conn.execute("TRUNCATE t")
    assert refused.value.sqlstate == "ML100"
    # The refusal names the policy, not append-only (the source is not append-only).
    assert "--truncate refuse" in str(refused.value) and "append-only" not in str(refused.value)
    assert "--truncate log" in refused.value.diag.message_hint


def test_guard_keeps_the_replica_identity_the_log_publication_needs(rconn):
    """An insert-only source with a row filter, on a log where another source logs updates:
    its replica identity had to be FULL to register (the publication publishes updates for
    every table); lowering it afterwards would make PostgreSQL refuse the application's
    UPDATEs, so the DDL guard refuses it."""
    conn = rconn
    conn.execute("CREATE TABLE pay (id int PRIMARY KEY, amount int NOT NULL)")
    conn.execute("CREATE TABLE acct (id int PRIMARY KEY, owner text)")
    conn.execute("ALTER TABLE pay REPLICA IDENTITY FULL")
    conn.execute("ALTER TABLE acct REPLICA IDENTITY FULL")
    registry.create_log(conn, "ri")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "ri", "pay", mode="replication", where="amount > 0")
        registry.add_source(c, "ri", "acct", mode="replication", events=["insert", "update"])
    with pytest.raises(psycopg.DatabaseError, match="replica identity must cover its key and row filter") as refused:
        conn.execute("ALTER TABLE pay REPLICA IDENTITY DEFAULT")
    assert refused.value.sqlstate == "ML101"
    assert "REPLICA IDENTITY FULL is allowed" in refused.value.diag.message_hint
    conn.execute("INSERT INTO pay VALUES (1, 5)")
    conn.execute("UPDATE pay SET amount = 6")  # still allowed
    # Without a source logging updates, the publication publishes inserts only: allowed.
    with connect(conn.info.dsn) as c:
        registry.remove_source(c, "ri", "acct", wait=0)
    conn.execute("DELETE FROM merkle.sources WHERE table_name = 'acct'")  # no listener to confirm the removal
    conn.execute("ALTER TABLE pay REPLICA IDENTITY DEFAULT")
    conn.execute("UPDATE pay SET amount = 7")


def test_source_add_refuses_a_table_whose_updates_postgresql_would_then_refuse(rconn):
    """On a log whose publication publishes updates, each table added needs a replica
    identity PostgreSQL accepts for its UPDATEs; the refusal says which table lacks what,
    registers nothing, and the application's UPDATEs keep working."""
    conn = rconn
    conn.execute("CREATE TABLE acct (id int PRIMARY KEY, owner text)")
    conn.execute("ALTER TABLE acct REPLICA IDENTITY FULL")
    conn.execute("CREATE TABLE pay (id int PRIMARY KEY, amount int NOT NULL)")
    conn.execute("CREATE TABLE nokey (id int NOT NULL UNIQUE, amount int)")  # a key, not the identity
    conn.execute("CREATE TABLE nothing (id int PRIMARY KEY, amount int)")
    conn.execute("ALTER TABLE nothing REPLICA IDENTITY NOTHING")
    conn.execute("CREATE TABLE plain (id int PRIMARY KEY, amount int)")
    registry.create_log(conn, "ri")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "ri", "acct", mode="replication", events=["insert", "update"])
    before = _replication_footprint(conn)
    for table, where, key, why in [
            ("pay", "id > 0", None, "it has a row filter, which needs REPLICA IDENTITY FULL here"),
            ("nokey", None, "id", "it has no primary key or replica identity index"),
            ("nothing", None, None, "its replica identity is NOTHING")]:
        with connect(conn.info.dsn) as c, pytest.raises(SourceTableError) as refused:
            registry.add_source(c, "ri", table, mode="replication", where=where,
                                key=[key] if key else None)
        assert f'"public"."{table}": {why}: run ALTER TABLE "public"."{table}" REPLICA IDENTITY FULL;' in str(
            refused.value), refused.value
        # A table without a filter is not told that its identity fails to cover one.
        assert ("row filter" in str(refused.value)) == (where is not None), refused.value
        assert _replication_footprint(conn) == before
        conn.execute(f"INSERT INTO {table} VALUES (1, 5)")
        conn.execute(f"UPDATE {table} SET amount = 6")  # not in the publication: still allowed
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "ri", "plain", mode="replication")  # its primary key is its identity
    conn.execute("INSERT INTO plain VALUES (1, 5)")
    conn.execute("UPDATE plain SET amount = 6")
    # Sources already there that would break: all named at once, not one per retry.
    conn.execute("CREATE TABLE k1 (id int NOT NULL UNIQUE)")
    conn.execute("CREATE TABLE k2 (id int NOT NULL UNIQUE)")
    conn.execute("CREATE TABLE upd (id int PRIMARY KEY)")
    conn.execute("ALTER TABLE upd REPLICA IDENTITY FULL")
    registry.create_log(conn, "ri2")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "ri2", "k1", mode="replication", key=["id"])
        registry.add_source(c, "ri2", "k2", mode="replication", key=["id"])
        with pytest.raises(SourceTableError) as refused:
            registry.add_source(c, "ri2", "upd", mode="replication", events=["insert", "update"])
    for table in ("k1", "k2"):
        assert f'run ALTER TABLE "public"."{table}" REPLICA IDENTITY FULL;' in str(refused.value), refused.value


def _replication_footprint(conn) -> tuple:
    return conn.execute(
        "SELECT (SELECT count(*) FROM merkle.sources), (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal), "
        "(SELECT count(*) FROM merkle.replication_progress), "
        "(SELECT array_agg(pubname || ':' || tablename || ':' || coalesce(rowfilter, '') ORDER BY 1) "
        " FROM pg_publication_tables), (SELECT array_agg(pubname || pubinsert || pubupdate || pubdelete || pubtruncate "
        " ORDER BY 1) FROM pg_publication)").fetchone() + (tuple(slots(conn)),)


@pytest.mark.parametrize("existing", [False, True], ids=["new-publication", "existing-publication"])
def test_a_filter_postgresql_refuses_in_a_publication_is_refused_clearly(rconn, existing):
    """The project's filter check admits what a trigger evaluates; a publication's row filter
    is narrower (immutable only). PostgreSQL's own refusal is reported, nothing written."""
    conn = rconn
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, ts timestamptz, amount numeric)")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    registry.create_log(conn, "audit")
    if existing:  # the log's publication and slot exist: ALTER PUBLICATION, not CREATE
        cli("source", "add", "audit", "other", "--mode", "replication", dsn=conn.info.dsn, check=True)
    before = _replication_footprint(conn)
    out = cli("source", "add", "audit", "orders", "--mode", "replication", "--where", "ts::date > '2020-01-01'",
              dsn=conn.info.dsn)
    assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr
    assert "database error" not in out.stderr
    for needle in ("--where \"ts::date > '2020-01-01'\"", "mutable functions are not allowed",
                   "immutable built-in functions", "replica identity", "use --mode trigger"):
        assert needle in out.stderr, out.stderr
    assert _replication_footprint(conn) == before
    # Trigger mode evaluates that filter under pinned settings: accepted there.
    cli("source", "add", "audit", "orders", "--where", "ts::date > '2020-01-01'", dsn=conn.info.dsn, check=True)


@pytest.mark.parametrize("events, message", [
    ("", "--events is empty: give a comma-separated list of insert, update, delete"),
    ("insert,insert", "--events names 'insert' twice; list each event once"),
    ("truncate", "--events: 'truncate' is not an event here; TRUNCATE is logged or refused with "
                 "--truncate log|refuse"),
    ("insert,upsert", "--events: 'upsert' is not an event; give a comma-separated list of insert, update, delete"),
    ("insert,,update", "with no empty item"),
])
def test_events_have_their_own_messages(rconn, events, message):
    conn = rconn
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "l")
    before = _replication_footprint(conn)
    out = cli("source", "add", "l", "t", "--mode", "replication", "--events", events, dsn=conn.info.dsn)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "column" not in out.stderr
    assert _replication_footprint(conn) == before
    # Case and spaces are forgiven, as they were.
    conn.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    out = cli("source", "add", "l", "t", "--mode", "replication", "--events", " INSERT, update", dsn=conn.info.dsn)
    assert out.returncode == 0 and "events insert, update, truncate" in out.stdout, out.stderr
    # ... in trigger mode too, where inserts are the only event.
    conn.execute("CREATE TABLE u (id int PRIMARY KEY)")
    out = cli("source", "add", "l", "u", "--events", "INSERT ", dsn=conn.info.dsn)
    assert out.returncode == 0, out.stderr


def test_source_add_warns_of_what_leaves_no_leaf(rconn):
    """Replication mode logs inserts only unless --events says more, as trigger mode does: a
    source that neither logs nor refuses UPDATE and DELETE is told so; and on a partitioned
    table, an UPDATE that moves a row to another partition arrives as a DELETE and an INSERT."""
    conn = rconn
    dsn = conn.info.dsn
    conn.execute("CREATE TABLE plain (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE logged (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE parts (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    conn.execute("CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu')")
    conn.execute("CREATE TABLE parts_us PARTITION OF parts FOR VALUES IN ('us')")
    for t in ("logged", "parts", "parts_eu", "parts_us"):
        conn.execute(f"ALTER TABLE {t} REPLICA IDENTITY FULL")
    registry.create_log(conn, "w")
    out = cli("source", "add", "w", "plain", "--mode", "replication", dsn=dsn, check=True)
    assert "warning: UPDATE and DELETE on public.plain leave no leaf (this source logs insert, truncate)" in out.stderr
    out = cli("source", "add", "w", "kept", "--mode", "replication", "--append-only", dsn=dsn, check=True)
    assert "warning" not in out.stderr
    out = cli("source", "add", "w", "logged", "--mode", "replication", "--events", "insert,update,delete", dsn=dsn,
              check=True)
    assert "warning" not in out.stderr
    out = cli("source", "add", "w", "parts", "--mode", "replication", "--events", "update", dsn=dsn, check=True)
    assert "warning: DELETE on public.parts leaves no leaf" in out.stderr
    assert "moves a row of public.parts to another partition" in out.stderr
    # What the warning says: such an UPDATE leaves nothing for a source that logs updates only.
    conn.execute("INSERT INTO parts VALUES (1, 'eu')")
    listener = start_listener(dsn)
    try:
        conn.execute("UPDATE parts SET region = 'us'")  # moves the row
        conn.execute("UPDATE parts SET id = 2")  # stays in its partition: an update
        wait_for_size(conn, "w", 1, listener=listener)
    finally:
        listener.stop()
    assert [r[3] for r in check_log(conn, "w")] == ["update"]


def test_backfill_meets_the_stream(rconn):
    """Existing rows and the stream: no gap, no duplicate, backfill first — for a new slot
    (exported snapshot) and for a log whose slot exists (SHARE lock)."""
    conn = rconn
    conn.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO a SELECT g, 'old' FROM generate_series(1, 50) g")
    conn.execute("INSERT INTO b SELECT g, 'old' FROM generate_series(1, 30) g")
    registry.create_log(conn, "bf")
    listener = start_listener(conn.info.dsn)
    try:
        out = cli("source", "add", "bf", "a", "--mode", "replication", "--backfill", dsn=conn.info.dsn)
        assert out.returncode == 0, out.stderr
        assert "50 existing rows queued" in out.stdout
        conn.execute("INSERT INTO a SELECT g, 'new' FROM generate_series(51, 60) g")
        conn.execute("INSERT INTO b VALUES (100, 'before')")  # not yet a source: not logged
        with connect(conn.info.dsn) as c:
            _, queued = registry.add_source(c, "bf", "b", mode="replication", backfill=True)
        assert queued == 31
        conn.execute("INSERT INTO b VALUES (101, 'after')")
        wait_for_size(conn, "bf", 50 + 10 + 31 + 1, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "bf")
    keys = {}
    for r in rows:
        keys.setdefault(r[1], []).append((r[3], int(orjson_id(r[2]))))
    a_id, b_id = sorted(keys)
    assert keys[a_id] == [("backfill", i) for i in range(1, 51)] + [("insert", i) for i in range(51, 61)]
    assert keys[b_id] == [("backfill", i) for i in [*range(1, 31), 100]] + [("insert", 101)]


def test_a_large_backfill_is_spread_over_batches_before_its_sources_changes(rconn, monkeypatch):
    """A batch takes at most BACKFILL_ROWS_PER_BATCH backfill rows (lowered here to 100), so
    its memory does not grow with the table; a transaction of a source whose backfill still
    has rows waits for the batches that take them, and then follows them."""
    from listener.sequencer import Sequencer
    from listener.sources import replication_apply
    from listener.sources.replication_apply import ReplicationBatch

    monkeypatch.setattr(replication_apply, "BACKFILL_ROWS_PER_BATCH", 100)
    conn = rconn
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    conn.execute("INSERT INTO a SELECT generate_series(1, 250)")
    conn.execute("INSERT INTO b SELECT generate_series(1, 30)")
    log = registry.create_log(conn, "big")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "big", "a", mode="replication", backfill=True)
        registry.add_source(c, "big", "b", mode="replication", backfill=True)
    conn.execute("INSERT INTO a VALUES (251)")
    (txn,) = _receive(conn.info.dsn, "merkle_big", 0, 1)
    # With statistics, as autovacuum soon has them: the ranges stay bounded (found by review:
    # a plan over every row left made each batch slower than the last).
    conn.execute("ANALYZE merkle.replication_backfill")
    next_ords = "SELECT array_agg(next_ord ORDER BY source_id) FROM merkle.replication_backfill_state"
    with connect(conn.info.dsn) as w:
        seq = Sequencer(w, "big")
        taken, pending, positions = [], [txn], []
        while (result := seq.append_changes(batch := ReplicationBatch(log.log_id, pending))) is not None:
            taken.append((result.count, batch.consumed, batch.backfill_left))
            positions.append(conn.execute(next_ords).fetchone()[0])
            del pending[:batch.consumed]
            assert len(taken) < 10
    assert positions == [[101, 1], [201, 1], None]
    # 100 + 100 of a; a's last 50 and b's 30, and a's transaction after them.
    assert taken == [(100, 0, True), (100, 0, True), (81, 1, False)]
    assert conn.execute("SELECT count(*) FROM merkle.replication_backfill_state").fetchone()[0] == 0
    rows = check_log(conn, "big")
    a_id, b_id = sorted({r[1] for r in rows})
    assert [(r[1], r[3], int(orjson_id(r[2]))) for r in rows] == (
        [(a_id, "backfill", i) for i in range(1, 251)] + [(b_id, "backfill", i) for i in range(1, 31)]
        + [(a_id, "insert", 251)])


def test_a_source_is_not_removed_while_its_backfill_is_being_appended(rconn, monkeypatch):
    """Found by review: `source remove` deleted a source whose backfill was partly appended,
    and with it the rows not appended yet, leaving part of the table in the log. It now waits
    for the rest, as for changes still streaming."""
    from listener.sequencer import Sequencer
    from listener.sources import replication_apply
    from listener.sources.replication_apply import ReplicationBatch

    monkeypatch.setattr(replication_apply, "BACKFILL_ROWS_PER_BATCH", 100)
    conn = rconn
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("INSERT INTO a SELECT generate_series(1, 250)")
    log = registry.create_log(conn, "rmbf")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "rmbf", "a", mode="replication", backfill=True)
    with connect(conn.info.dsn) as w:
        seq = Sequencer(w, "rmbf")
        assert seq.append_changes(ReplicationBatch(log.log_id, [])).count == 100
        with connect(conn.info.dsn) as c:
            assert registry.remove_source(c, "rmbf", "a", wait=0) == -1  # out of the publication
            # The slot has passed the removal (as a listener that caught up stores the position,
            # then confirms it); the backfill has not.
            c.execute("UPDATE merkle.replication_progress SET end_lsn = pg_current_wal_lsn()")
            c.commit()
            c.execute("SELECT pg_replication_slot_advance('merkle_rmbf', "
                      "(SELECT end_lsn FROM merkle.replication_progress))")
            assert c.execute("SELECT confirmed_flush_lsn >= (SELECT until_lsn FROM merkle.replication_retired) "
                             "FROM pg_replication_slots WHERE slot_name = 'merkle_rmbf'").fetchone()[0]
            assert registry.remove_source(c, "rmbf", "a", wait=0) == -1
        out = cli("source", "remove", "rmbf", "a", "--wait", "0", dsn=conn.info.dsn)
        assert out.returncode == 3 and ("150 rows of its backfill may still be on their way, and no listener "
                                        "streams log 'rmbf' now: run `merkle-listener run`") in out.stdout, out.stdout
        assert conn.execute("SELECT count(*) FROM merkle.replication_backfill").fetchone()[0] == 150
        while seq.append_changes(ReplicationBatch(log.log_id, [])) is not None:
            pass
        with connect(conn.info.dsn) as c:
            assert registry.remove_source(c, "rmbf", "a", wait=0) == 0
    rows = check_log(conn, "rmbf")
    assert [int(orjson_id(r[2])) for r in rows] == list(range(1, 251))
    assert conn.execute("SELECT count(*) FROM merkle.sources").fetchone()[0] == 0


def orjson_id(key: str) -> str:
    import orjson

    return orjson.loads(key)["id"]


def test_restart_resumes_from_stored_position(rconn):
    conn = rconn
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "r")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "r", "t", mode="replication")
    listener = start_listener(conn.info.dsn)
    conn.execute("INSERT INTO t SELECT generate_series(1, 300)")
    wait_for_size(conn, "r", 300, listener=listener)
    listener.stop(signal.SIGKILL)
    conn.execute("INSERT INTO t SELECT generate_series(301, 350)")
    # The slot's position may be behind the log's (acknowledged later): replay is skipped.
    listener = start_listener(conn.info.dsn)
    try:
        wait_for_size(conn, "r", 350, listener=listener)
        conn.execute("INSERT INTO t VALUES (351)")
        wait_for_size(conn, "r", 351, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "r")
    assert [orjson_id(r[2]) for r in rows] == [str(i) for i in range(1, 352)]


def test_status_reports_slot_health(rconn):
    conn = rconn
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "st")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "st", "t", mode="replication")
    conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
    out = cli("status", "--json", dsn=conn.info.dsn, check=True)
    import orjson

    slot = orjson.loads(out.stdout)["logs"][0]["slot"]
    assert slot["wal_status"] == "reserved" and slot["level"] == "ok"
    assert slot["lag_bytes"] > 0 and not slot["active"]
    assert orjson.loads(out.stdout)["logs"][0]["sources"][0]["capturing"] is True
    listener = start_listener(conn.info.dsn)
    try:
        wait_for_size(conn, "st", 10, listener=listener)
        deadline = time.monotonic() + 10
        while True:  # idle: the slot is confirmed to within IDLE_CONFIRM_MIN_BYTES of the server's WAL
            slot = orjson.loads(cli("status", "--json", dsn=conn.info.dsn, check=True).stdout)["logs"][0]["slot"]
            if slot["active"] and slot["lag_bytes"] < IDLE_CONFIRM_MIN_BYTES:
                break
            assert time.monotonic() < deadline, slot
            time.sleep(0.2)
        assert slot["lag_seconds"] < 1
        # A paused log falls behind: status says it is paused, and the lag in seconds grows
        # from the last progress the log stored.
        cli("log", "pause", "st", dsn=conn.info.dsn, check=True)
        conn.execute("INSERT INTO t SELECT generate_series(11, 3000)")
        time.sleep(2)
        report = orjson.loads(cli("status", "--json", dsn=conn.info.dsn, check=True).stdout)["logs"][0]
        assert report["paused"] and report["slot"]["lag_seconds"] >= 1.5, report
        text = cli("status", dsn=conn.info.dsn, check=True).stdout
        assert "PAUSED: nothing is appended until `merkle-listener log resume st`" in text
        cli("log", "resume", "st", dsn=conn.info.dsn, check=True)
        wait_for_size(conn, "st", 3000, listener=listener)
    finally:
        listener.stop()
    text = cli("status", dsn=conn.info.dsn, check=True).stdout
    assert "slot merkle_st: wal_status reserved" in text
    assert "source public.t (replication, capturing, events insert, truncate): its changes come through the slot" \
        in text, text
    assert "PAUSED" not in text


def _receive(dsn: str, slot: str, start_lsn: int, count: int) -> list:
    """Open a stream at start_lsn, collect `count` committed transactions, close it
    without confirming anything."""
    import anyio

    from listener.sources.replication import ReplicationStream

    got = []

    async def main():
        stream = ReplicationStream(dsn, slot, slot, start_lsn, on_transaction=got.append,
                                   may_confirm_idle=lambda: False)
        await stream.open()
        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stream.run)
                    while len(got) < count:
                        await anyio.sleep(0.02)
                    tg.cancel_scope.cancel()
        finally:
            stream.close()

    anyio.run(main)
    return got


def _inserted_and_received(conn, log_name: str, count: int):
    """A log with replication source t, `count` one-row inserts into t, and the transactions
    the slot sends for them (nothing confirmed)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    log = registry.create_log(conn, log_name)
    with connect(conn.info.dsn) as c:
        registry.add_source(c, log_name, "t", mode="replication")
    for i in range(count):
        conn.execute("INSERT INTO t VALUES (%s)", (i,))
    return log, _receive(conn.info.dsn, f"merkle_{log_name}", 0, count)


def test_replayed_transactions_are_skipped(rconn):
    """The slot's position can lag the log's (an acknowledgement lost in a crash): what the
    server sends again is skipped by the stored end_lsn, in the batch's own transaction."""
    from listener.sequencer import Sequencer
    from listener.sources.replication_apply import ReplicationBatch

    conn = rconn
    log, first = _inserted_and_received(conn, "rp", 3)
    with connect(conn.info.dsn) as c:
        seq = Sequencer(c, "rp")
        batch = ReplicationBatch(log.log_id, first[:2])
        assert seq.append_changes(batch).count == 2
        assert (batch.consumed, batch.end_lsn) == (2, first[1].end_lsn)
        # Nothing was confirmed: the server sends all three again; two are skipped.
        again = _receive(conn.info.dsn, "merkle_rp", 0, 3)
        assert [t.end_lsn for t in again] == [t.end_lsn for t in first]
        batch = ReplicationBatch(log.log_id, again)
        assert seq.append_changes(batch).count == 1
        assert batch.consumed == 3
        # Resuming at the stored position, the server itself starts after it.
        after = _receive(conn.info.dsn, "merkle_rp", first[1].end_lsn, 1)
        assert [t.end_lsn for t in after] == [first[2].end_lsn]
    rows = check_log(conn, "rp")
    assert [orjson_id(r[2]) for r in rows] == ["0", "1", "2"]


def test_row_filter_entry_column_and_log_drop(rconn):
    conn = rconn
    conn.execute("CREATE TABLE f (id int PRIMARY KEY, kind text NOT NULL, v text)")
    conn.execute("CREATE TABLE e (id int PRIMARY KEY, entry bytea NOT NULL)")
    registry.create_log(conn, "fx")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "fx", "f", mode="replication", where="kind = 'audit'")
        registry.add_source(c, "fx", "e", mode="replication", entry_column="entry")
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO f VALUES (1, 'audit', 'a'), (2, 'noise', 'b'), (3, 'audit', NULL)")
        conn.execute("INSERT INTO e VALUES (1, '\\x00ff7b'::bytea)")
        wait_for_size(conn, "fx", 3, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "fx")
    h = canonical.leaf_hash_of_entry
    assert [bytes(r[4]) for r in rows] == [
        h(canonical.entry_v1("insert", "public.f", {"id": "1", "kind": "audit", "v": "a"})),
        h(canonical.entry_v1("insert", "public.f", {"id": "3", "kind": "audit", "v": None})),
        h(b"\x00\xff\x7b"),
    ]
    refused = cli("log", "drop", "fx", dsn=conn.info.dsn)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    out = cli("log", "drop", "fx", "--yes", dsn=conn.info.dsn)
    assert out.returncode == 0, out.stderr
    assert slots(conn) == []
    assert conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM merkle.processed_log").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM merkle.logs").fetchone()[0] == 0


def test_batch_prepares_again_for_changed_sources(rconn):
    """A transaction prepared on arrival with sources that are no longer the log's (here:
    none, as before a source was added) is prepared again under the log's lock, so its
    changes are not lost; one prepared with the current sources is used as it is."""
    from listener.sequencer import Sequencer
    from listener.sources.replication_apply import ReplicationBatch, prepare

    conn = rconn
    log, txns = _inserted_and_received(conn, "pa", 2)
    stale = prepare(txns[0], {}, log.log_id)
    assert stale.rows == [] and stale.hashes == []
    txns[0].prepared = stale
    with connect(conn.info.dsn) as c:
        seq = Sequencer(c, "pa")
        batch = ReplicationBatch(log.log_id, txns[:1])
        assert seq.append_changes(batch).count == 1
        assert txns[0].prepared is not stale and len(txns[0].prepared.hashes) == 1
        current = prepare(txns[1], batch.sources, log.log_id)
        txns[1].prepared = current
        assert seq.append_changes(ReplicationBatch(log.log_id, txns[1:])).count == 1
        assert txns[1].prepared is current
    rows = check_log(conn, "pa")
    assert [orjson_id(r[2]) for r in rows] == ["0", "1"]


def test_failed_copy_leaves_nothing_and_the_retry_appends_all(rconn):
    """The rows go out through a writer thread while the tree is hashed: when the server
    refuses one of them, the whole batch is rolled back (no leaf, no progress, no tile), the
    in-memory tree is reloaded, and the next attempt appends every change once."""
    from listener.sequencer import Sequencer
    from listener.sources.replication_apply import ReplicationBatch

    conn = rconn
    log, txns = _inserted_and_received(conn, "fc", 3)
    conn.execute("ALTER TABLE merkle.processed_log ADD CONSTRAINT refuse_seq_1 CHECK (seq <> 1) NOT VALID")
    stored = conn.execute("SELECT end_lsn::text FROM merkle.replication_progress").fetchone()[0]  # the slot's start
    with connect(conn.info.dsn) as c:
        seq = Sequencer(c, "fc")
        with pytest.raises(psycopg.errors.CheckViolation):
            seq.append_changes(ReplicationBatch(log.log_id, txns))
        assert seq.tree is None  # reloaded from what is durable before the next batch
        assert conn.execute("SELECT (SELECT count(*) FROM merkle.processed_log WHERE log_id = %(l)s), "
                            "(SELECT count(*) FROM merkle.tiles WHERE log_id = %(l)s)",
                            {"l": log.log_id}).fetchone() == (0, 0)
        assert conn.execute("SELECT tree_size, end_lsn::text FROM merkle.logs JOIN merkle.replication_progress "
                            "USING (log_id) WHERE name = 'fc'").fetchone() == (0, stored)
        conn.execute("ALTER TABLE merkle.processed_log DROP CONSTRAINT refuse_seq_1")
        batch = ReplicationBatch(log.log_id, txns)
        assert seq.append_changes(batch).count == 3 and batch.end_lsn == txns[-1].end_lsn
    rows = check_log(conn, "fc")
    assert [orjson_id(r[2]) for r in rows] == ["0", "1", "2"]


def test_a_missing_slot_is_an_error_in_the_listeners_log_and_recovery_works(rconn):
    """A slot dropped (or absent after a failover to a standby without it) stops capture: the
    running listener says so, with the recovery steps, and they work."""
    conn = rconn
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    registry.create_log(conn, "gone")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "gone", "t", mode="replication")
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        wait_for_size(conn, "gone", 1, listener=listener)
        for _ in range(100):
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE slot_name = 'merkle_gone' AND active_pid IS NOT NULL")
            try:
                conn.execute("SELECT pg_drop_replication_slot('merkle_gone')")
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.05)
        conn.execute("INSERT INTO t VALUES (2)")  # committed while there is no slot: not capturable
        listener.wait_for("slot merkle_gone is missing", timeout=30)
        listener.wait_for("`merkle-listener source remove gone public.t`", timeout=5)
        status = cli("status", dsn=conn.info.dsn)
        assert "slot merkle_gone: MISSING" in status.stdout
        assert status.returncode == 3, "an error a monitoring script sees"
        cli("source", "remove", "gone", "t", dsn=conn.info.dsn, check=True)
        out = cli("source", "add", "gone", "t", "--mode", "replication", "--backfill", dsn=conn.info.dsn, check=True)
        assert "2 existing rows queued" in out.stdout
        conn.execute("INSERT INTO t VALUES (3)")
        wait_for_size(conn, "gone", 4, listener=listener)
    finally:
        said = listener.stop()
    assert said.count("slot merkle_gone is missing") == 1, "reported once, then every minute while it lasts"
    rows = check_log(conn, "gone")
    assert [(r[3], orjson_id(r[2])) for r in rows] == [("insert", "1"), ("backfill", "1"), ("backfill", "2"),
                                                       ("insert", "3")]


def test_columns_named_like_the_internal_aliases(rconn):
    """A source may have columns called "n" or "o" (the aliases of the backfill and the outbox
    drain): read as ("n")."id" they were taken for the column, and the backfill failed
    ("column notation .id applied to type integer") and the drain stopped the log for good."""
    conn = rconn
    conn.execute("CREATE TABLE counts (id int PRIMARY KEY, n int, o int)")
    conn.execute("CREATE TABLE tallies (id int PRIMARY KEY, n int, o int)")
    conn.execute("INSERT INTO counts VALUES (1, 10, 100)")
    conn.execute("INSERT INTO tallies VALUES (1, 20, 200)")
    registry.create_log(conn, "al")
    with connect(conn.info.dsn) as c:
        _, queued = registry.add_source(c, "al", "counts", mode="replication", backfill=True)
        assert queued == 1
        _, queued = registry.add_source(c, "al", "tallies", backfill=True)
        assert queued == 1
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO counts VALUES (2, 11, 101)")
        wait_for_size(conn, "al", 3, listener=listener)
        conn.execute("INSERT INTO tallies VALUES (2, 21, 201)")
        wait_for_size(conn, "al", 4, listener=listener)
    finally:
        listener.stop()
    rows = check_log(conn, "al")
    h, e = canonical.leaf_hash_of_entry, canonical.entry_v1
    assert sorted(bytes(r[4]) for r in rows) == sorted([
        h(e("backfill", "public.counts", {"id": "1", "n": "10", "o": "100"})),
        h(e("insert", "public.counts", {"id": "2", "n": "11", "o": "101"})),
        h(e("backfill", "public.tallies", {"id": "1", "n": "20", "o": "200"})),
        h(e("insert", "public.tallies", {"id": "2", "n": "21", "o": "201"})),
    ])


def test_a_log_of_the_same_name_in_another_database_leaves_the_slot_alone(rconn, pg_server):
    """Slot names are per server: log "dup" of another database of the same server must not
    take over, or drop, this database's slot merkle_dup."""
    conn = rconn
    conn.execute("CREATE TABLE mine (id int PRIMARY KEY)")
    registry.create_log(conn, "dup")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "dup", "mine", mode="replication")
    other_db = conn.info.dbname + "_other"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {other_db} TEMPLATE merkle_template STRATEGY FILE_COPY")
    other = pg_server.dsn(other_db)
    try:
        with psycopg.connect(other, autocommit=True) as oc:
            oc.execute("CREATE TABLE theirs (id int PRIMARY KEY)")
        assert cli("log", "create", "dup", dsn=other).returncode == 0
        out = cli("source", "add", "dup", "theirs", "--mode", "replication", dsn=other)
        assert out.returncode == 2, out.stdout
        assert f"exists already for database {conn.info.dbname}" in out.stderr
        with psycopg.connect(other, autocommit=True) as oc:
            assert oc.execute("SELECT count(*) FROM merkle.sources").fetchone()[0] == 0
            assert oc.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0
        out = cli("log", "drop", "dup", "--yes", dsn=other)
        assert out.returncode == 0, out.stderr
        assert slots(conn) == ["merkle_dup"]
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {other_db} WITH (FORCE)")


def test_log_drop_while_running_stops_its_writer_only(rconn):
    """A log dropped under a running listener: its writer stops (no error loop), the other
    logs go on, and a log created again under that name is picked up."""
    conn = rconn
    conn.execute("CREATE TABLE gone (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    for name, table, mode in (("gone", "gone", "replication"), ("kept", "kept", "trigger")):
        registry.create_log(conn, name)
        with connect(conn.info.dsn) as c:
            registry.add_source(c, name, table, mode=mode)
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO gone VALUES (1)")
        wait_for_size(conn, "gone", 1, listener=listener)
        out = cli("log", "drop", "gone", "--yes", dsn=conn.info.dsn)
        assert out.returncode == 0, out.stderr
        listener.wait_for("log dropped; its writer stops")
        conn.execute("INSERT INTO kept VALUES (1)")
        wait_for_size(conn, "kept", 1, listener=listener)
        # The same name again, now in trigger mode: the running listener finds it.
        registry.create_log(conn, "gone")
        with connect(conn.info.dsn) as c:
            registry.add_source(c, "gone", "gone")
        conn.execute("INSERT INTO gone VALUES (2)")
        wait_for_size(conn, "gone", 1, timeout=30, listener=listener)
    finally:
        said = listener.stop()
    assert "writer stopped on error" not in said, said[-3000:]
    assert slots(conn) == []


@contextlib.contextmanager
def _role_that_may_drop(conn: psycopg.Connection, log_name: str, table: str, *, replication: bool):
    """The DSN of a new role that may do all of `log drop` itself but (perhaps) the slot's part."""
    role = f"dropper_{conn.info.backend_pid}"
    conn.execute(f"CREATE ROLE {role} LOGIN" + (" REPLICATION" if replication else ""))
    try:
        conn.execute(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {role}")
        conn.execute(f"GRANT USAGE ON SCHEMA merkle TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA merkle TO {role}")
        conn.execute(f"ALTER TABLE {table} OWNER TO {role}")
        conn.execute(f"ALTER PUBLICATION merkle_{log_name} OWNER TO {role}")
        yield psycopg.conninfo.make_conninfo(conn.info.dsn, user=role)
    finally:
        conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_log_drop_that_cannot_drop_the_slot_drops_nothing(rconn):
    """The slot is dropped last, inside the transaction that holds the log's lock: a `log drop`
    that may not end the walsender streaming it (a role that cannot terminate a superuser's
    process) rolls back, leaving the log, its sources and its slot."""
    conn = rconn
    conn.execute("CREATE TABLE held (id int PRIMARY KEY)")
    registry.create_log(conn, "held")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "held", "held", mode="replication")
    listener = start_listener(conn.info.dsn)
    try:
        with _role_that_may_drop(conn, "held", "held", replication=True) as dsn:
            conn.execute("INSERT INTO held VALUES (1)")
            wait_for_size(conn, "held", 1, listener=listener)
            out = cli("log", "drop", "held", "--yes", dsn=dsn)
            assert out.returncode != 0
            assert slots(conn) == ["merkle_held"]
            assert conn.execute("SELECT count(*) FROM merkle.sources s JOIN merkle.logs l USING (log_id) "
                                "WHERE l.name = 'held'").fetchone()[0] == 1, out.stderr
            assert "cannot drop replication slot merkle_held (nothing was dropped)" in out.stderr, out.stderr
            assert "pg_drop_replication_slot('merkle_held')" in out.stderr
            # Capture goes on.
            conn.execute("INSERT INTO held VALUES (2)")
            wait_for_size(conn, "held", 2, listener=listener)
    finally:
        listener.stop()


def test_log_drop_by_a_role_without_replication_says_how_to_grant_it(rconn):
    """Dropping the slot needs the REPLICATION attribute: the refusal rolls the whole drop back
    and says how to get it, not to stop a process that streams (found by review: it said so, as
    for any failure to drop the slot)."""
    conn = rconn
    conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    registry.create_log(conn, "keep")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "keep", "kept", mode="replication")
    with _role_that_may_drop(conn, "keep", "kept", replication=False) as dsn:
        role = psycopg.conninfo.conninfo_to_dict(dsn)["user"]
        out = cli("log", "drop", "keep", "--yes", dsn=dsn)
        assert out.returncode != 0
        assert ("cannot drop replication slot merkle_keep (nothing was dropped): role "
                f"{role} lacks the REPLICATION attribute") in out.stderr, out.stderr
        assert out.stderr.rstrip().endswith(f'ALTER ROLE "{role}" REPLICATION'), out.stderr
        assert slots(conn) == ["merkle_keep"]
        assert conn.execute("SELECT count(*) FROM merkle.logs WHERE name = 'keep'").fetchone()[0] == 1
        # Found by review: with a superuser's listener streaming the slot, REPLICATION alone is not
        # enough (ending its walsender is refused): the message says both steps.
        listener = start_listener(conn.info.dsn)
        try:
            conn.execute("INSERT INTO kept VALUES (1)")
            wait_for_size(conn, "keep", 1, listener=listener)
            out = cli("log", "drop", "keep", "--yes", dsn=dsn)
            assert out.returncode != 0 and f'ALTER ROLE "{role}" REPLICATION; and stop the `merkle-listener run` ' \
                "that streams from it first" in out.stderr, out.stderr
        finally:
            listener.stop()
        conn.execute(f'ALTER ROLE "{role}" REPLICATION')
        cli("log", "drop", "keep", "--yes", dsn=dsn, check=True)
        assert slots(conn) == []


def test_source_remove_says_what_it_waits_for(rconn):
    """`source remove` of a replication source exits 3 while what was committed before it
    took the table out of the publication is not logged yet, and says why: a running
    listener still at work, or a paused log."""
    conn = rconn
    dsn = conn.info.dsn
    for name in ("busy", "held"):
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text)")
        registry.create_log(conn, name)
        with connect(dsn) as c:
            registry.add_source(c, name, name, mode="replication")
    listener = start_listener(dsn)
    try:
        listener.wait_for("replication stream open")
        # That line may be held's: busy's stream must be open too before the listener is held.
        deadline = time.monotonic() + 30
        while not conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'merkle_busy'").fetchone()[0]:
            assert time.monotonic() < deadline, "busy's stream did not open"
            time.sleep(0.05)
        # The listener is held (its stream stays open) while a large transaction commits, so
        # that `source remove` surely finds it behind; once let go, it spills the transaction
        # to a file and appends it.
        listener.proc.send_signal(signal.SIGSTOP)
        conn.execute("INSERT INTO busy SELECT i, repeat(md5(i::text), 40) FROM generate_series(1, 30000) i")
        out = cli("source", "remove", "busy", "busy", "--wait", "0", dsn=dsn)
        assert out.returncode == 3, out.stdout + out.stderr
        assert "the running listener is still logging the changes committed before that (" in out.stdout, out.stdout
        assert "MB of WAL to go" in out.stdout
        listener.proc.send_signal(signal.SIGCONT)
        out = cli("source", "remove", "busy", "busy", "--wait", "60", dsn=dsn)
        assert out.returncode == 0 and "removed" in out.stdout, out.stdout + out.stderr

        cli("log", "pause", "held", dsn=dsn, check=True)
        conn.execute("INSERT INTO held VALUES (1, 'paused')")
        started = time.monotonic()
        out = cli("source", "remove", "held", "held", "--wait", "60", dsn=dsn)
        assert time.monotonic() - started < 30, "a paused log logs nothing: no use waiting for it"
        assert out.returncode == 3 and "log 'held' is paused" in out.stdout and "log resume held" in out.stdout, \
            out.stdout
        cli("log", "resume", "held", dsn=dsn, check=True)
        out = cli("source", "remove", "held", "held", "--wait", "60", dsn=dsn)
        assert out.returncode == 0 and "removed" in out.stdout, out.stdout + out.stderr
    finally:
        listener.proc.send_signal(signal.SIGCONT)
        listener.stop()
    assert [r[6] for r in check_log(conn, "busy")] == list(range(1, 30001))
    assert [r[2] for r in check_log(conn, "held")] == ['{"id":"1"}']
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with connect(dsn) as c:
        registry.add_source(c, "held", "t", mode="replication")
    out = cli("source", "remove", "held", "t", "--wait", "-1", dsn=dsn)
    assert out.returncode == 2 and "--wait must be >= 0" in out.stderr


def test_a_paused_log_keeps_its_stream(rconn):
    """A paused log stops reading once its buffer is full, so the server's keepalives wait
    unread: the listener still replies often enough that the walsender does not end the
    stream at wal_sender_timeout (here 3 s), and nothing is lost when the log resumes."""
    conn = rconn
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET wal_sender_timeout = '3s'")
    conn.execute("CREATE TABLE held (id int PRIMARY KEY)")
    registry.create_log(conn, "held")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "held", "held", mode="replication")
    rows = 70_000  # more than the feed buffers (MAX_BUFFERED_CHANGES)
    for lo in range(0, rows, 10_000):
        conn.execute("INSERT INTO held SELECT g FROM generate_series(%s::int, %s::int) g", (lo + 1, lo + 10_000))
    cli("log", "pause", "held", dsn=conn.info.dsn, check=True)
    listener = start_listener(conn.info.dsn)
    try:
        listener.wait_for("replication stream open")
        time.sleep(1)
        pid = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'merkle_held'").fetchone()[0]
        assert pid is not None
        time.sleep(8)  # well past the timeout
        assert conn.execute("SELECT active_pid FROM pg_replication_slots "
                            "WHERE slot_name = 'merkle_held'").fetchone()[0] == pid
        cli("log", "resume", "held", dsn=conn.info.dsn, check=True)
        wait_for_size(conn, "held", rows, timeout=60, listener=listener)
    finally:
        said = listener.stop()
        conn.execute(f"ALTER DATABASE {conn.info.dbname} RESET wal_sender_timeout")
    assert "replication stream interrupted" not in said, said[-2000:]
    check_log(conn, "held")


def test_two_adds_of_one_table_to_two_logs_queue_instead_of_deadlocking(rconn):
    """Both logs' slots exist and a writer holds the table: the two `source add`s wait for it
    (not for ever), then one registers the table and the other is told it is taken, instead of
    one of them dying in a deadlock between their lock upgrades."""
    import threading

    conn = rconn
    conn.execute("CREATE TABLE shared (id int PRIMARY KEY)")
    for log_name in ("la", "lb"):
        conn.execute(f"CREATE TABLE seed_{log_name} (id int PRIMARY KEY)")
        registry.create_log(conn, log_name)
        with connect(conn.info.dsn) as c:
            registry.add_source(c, log_name, f"seed_{log_name}", mode="replication")
    outcomes: dict[str, str] = {}

    def add(log_name: str) -> None:
        with connect(conn.info.dsn) as c:
            try:
                registry.add_source(c, log_name, "shared", mode="replication", append_only=True)
                outcomes[log_name] = "added"
            except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
                outcomes[log_name] = f"{type(exc).__name__}: {exc}"

    with psycopg.connect(conn.info.dsn) as writer:
        writer.execute("INSERT INTO shared VALUES (1)")  # holds the table until it commits
        threads = [threading.Thread(target=add, args=(n,)) for n in ("la", "lb")]
        for t in threads:
            t.start()
        time.sleep(1.0)
        writer.commit()
    for t in threads:
        t.join(timeout=60)
    assert sorted(v.split(":")[0] for v in outcomes.values()) == ["SourceTableError", "added"], outcomes
    assert "Deadlock" not in str(outcomes)
