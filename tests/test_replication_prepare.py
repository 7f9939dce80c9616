"""The consumer's hot path (replication_apply.prepare and the feed's prepare-on-arrival) on
pgoutput messages that PostgreSQL itself produced, peeked from a slot: the values the stream
did not send are never hashed, whichever message carries them."""

from __future__ import annotations

import pytest

from listener import canonical
from listener.errors import ProcessingError
from listener.registry import Source
from listener.sources import pgoutput as po
from listener.sources.replication import Transaction
from listener.sources.replication_apply import prepare
from listener.sources.replication_feed import ReplicationFeed

BIG = "x" * 300_000  # TOASTed (stored EXTERNAL below), so an UPDATE that leaves it alone omits it


def _transactions(conn, slot: str, publication: str) -> list[Transaction]:
    """The slot's committed transactions, assembled as the stream assembles them."""
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
        "'proto_version', '1', 'publication_names', %s)", (slot, publication)).fetchall()
    relations, txns, current = {}, [], None
    for (data,) in rows:
        payload = bytes(data)
        if payload[:1] in (b"I", b"U", b"D"):
            current.changes.append((relations[po.relation_oid_of_change(payload)], payload))
            continue
        msg = po.decode(payload, raw=True)
        if isinstance(msg, po.Begin):
            current = Transaction(msg.final_lsn, 0, msg.commit_time)
        elif isinstance(msg, po.Commit):
            current.end_lsn = msg.end_lsn
            txns.append(current)
        elif isinstance(msg, po.Relation):
            relations[msg.oid] = msg
        elif isinstance(msg, po.Truncate):
            current.changes.append((None, msg))
    return txns


def _source(conn, table: str, events: list[str], columns=("id", "body", "n")) -> Source:
    oid = conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()[0]
    return Source(1, 1, "public", table, oid, "replication", ["id"], list(columns), events, False, None, None)


@pytest.fixture
def slot(rconn):
    name = f"prep_{rconn.info.dbname}"
    rconn.execute("CREATE TABLE d (id int PRIMARY KEY, body text, n int)")  # REPLICA IDENTITY DEFAULT
    rconn.execute("ALTER TABLE d ALTER body SET STORAGE EXTERNAL")
    rconn.execute("INSERT INTO d VALUES (1, %s, 1)", (BIG,))
    rconn.execute("CREATE PUBLICATION pd FOR TABLE d")
    rconn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    return name


def test_key_only_old_row_never_fills_an_unchanged_value(rconn, slot):
    """An UPDATE that changes the key of a table without REPLICA IDENTITY FULL sends the old
    key ('K', NULL elsewhere) and no value for the untouched TOASTed column: refused, not
    hashed with NULL from the key-only old row."""
    rconn.execute("UPDATE d SET id = 2, n = 5 WHERE id = 1")
    (txn,) = _transactions(rconn, slot, "pd")
    update = po.decode(txn.changes[0][1], raw=True)
    assert update.old_kind == "K" and update.new[1] is po.UNCHANGED
    with pytest.raises(ProcessingError, match="without the value of column body"):
        prepare(txn, {txn.changes[0][0].oid: _source(rconn, "d", ["insert", "update"])}, 1)
    # A source that does not hash the missing column logs the update.
    ok = prepare(txn, {txn.changes[0][0].oid: _source(rconn, "d", ["update"], columns=("id", "n"))}, 1)
    entry = canonical.entry_v1("update", "public.d", {"id": "2", "n": "5"})
    assert ok.hashes == [canonical.leaf_hash_of_entry(entry)]


def test_update_sent_as_insert_without_a_value_is_refused(rconn, slot):
    """With a row filter, an UPDATE that moves a row into the filter is sent as an INSERT; it
    carries the unchanged-TOAST marker when the table is not REPLICA IDENTITY FULL."""
    rconn.execute("CREATE PUBLICATION pf FOR TABLE d WHERE (id > 100)")
    rconn.execute("UPDATE d SET id = 150 WHERE id = 1")
    (txn,) = _transactions(rconn, slot, "pf")
    payload = txn.changes[0][1]
    assert payload[:1] == b"I" and po.UNCHANGED in po.insert_new_values(payload)
    with pytest.raises(ProcessingError, match="without the value of column body"):
        prepare(txn, {txn.changes[0][0].oid: _source(rconn, "d", ["insert"])}, 1)


def test_feed_prepares_on_arrival_and_leaves_errors_to_the_batch(rconn, slot):
    """The feed prepares a transaction when it arrives with the sources it knows; one that
    cannot be prepared is buffered unprepared (the batch prepares it again and stops there)."""
    rconn.execute("INSERT INTO d VALUES (3, 'small', 3)")
    rconn.execute("UPDATE d SET id = 4 WHERE id = 1")
    insert_txn, update_txn = _transactions(rconn, slot, "pd")
    woken = []
    feed = ReplicationFeed(rconn.info.dsn, "pd", lambda: woken.append(1))
    sources = {insert_txn.changes[0][0].oid: _source(rconn, "d", ["insert", "update"])}
    feed._sources, feed._log_id = sources, 7
    feed._received(insert_txn)
    feed._received(update_txn)
    assert feed._buffer == [insert_txn, update_txn] and len(woken) == 2
    assert insert_txn.prepared == prepare(insert_txn, sources, 7)
    entry = canonical.entry_v1("insert", "public.d", {"id": "3", "body": "small", "n": "3"})
    assert insert_txn.prepared.hashes == [canonical.leaf_hash_of_entry(entry)]
    assert insert_txn.prepared.rows[0].startswith(b'7\t1\t{"id":"3"}\tinsert\t\\\\x')
    assert update_txn.prepared is None
    with pytest.raises(ProcessingError, match="without the value of column body"):
        prepare(update_txn, sources, 7)
