"""The pgoutput decoder on real bytes: PostgreSQL's own pgoutput output, peeked from a slot."""

from __future__ import annotations

import struct

import pytest

from listener.errors import ProcessingError
from listener.sources import pgoutput as po


@pytest.fixture
def peek(conn):
    """A function returning every pgoutput message of the slot so far (as raw bytes)."""
    slot = f"test_peek_{conn.info.dbname}"
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text, n numeric, at timestamptz)")
    conn.execute("ALTER TABLE t REPLICA IDENTITY FULL, ALTER body SET STORAGE EXTERNAL")
    conn.execute("CREATE PUBLICATION p FOR TABLE t")
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))

    def peek() -> list[bytes]:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'p', 'messages', 'true')", (slot,)).fetchall()
        return [bytes(r[0]) for r in rows]

    try:
        yield peek
    finally:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def test_decodes_insert_update_delete_truncate_message(conn, peek):
    big = "x" * 100_000  # stored out of line (TOAST): an UPDATE not touching it sends 'u'
    conn.execute("INSERT INTO t VALUES (1, %s, 1.50, '2024-02-29 12:00:00+02'), (2, NULL, NULL, NULL)", (big,))
    conn.execute("UPDATE t SET n = 2 WHERE id = 1")
    conn.execute("DELETE FROM t WHERE id = 2")
    conn.execute("SELECT pg_logical_emit_message(true, 'app', 'hello')")
    conn.execute("TRUNCATE t")
    msgs = [po.decode(b) for b in peek()]
    kinds = [type(m).__name__ for m in msgs]
    assert kinds == [
        "Begin", "Relation", "Insert", "Insert", "Commit",
        "Begin", "Update", "Commit",
        "Begin", "Delete", "Commit",
        "Begin", "Message", "Commit",
        "Begin", "Relation", "Truncate", "Commit",
    ]  # a Relation precedes a table's first change after its cache entry was invalidated
    rel = msgs[1]
    assert (rel.namespace, rel.name, rel.replica_identity) == ("public", "t", "f")
    assert [c.name for c in rel.columns] == ["id", "body", "n", "at"]
    assert [c.type_oid for c in rel.columns] == [23, 25, 1700, 1184]
    table_oid = conn.execute("SELECT 't'::regclass::oid").fetchone()[0]
    assert rel.oid == table_oid
    # Values are the text output under the connection's pinned settings (TimeZone=UTC).
    assert msgs[2].new == ("1", big, "1.50", "2024-02-29 10:00:00+00")
    assert msgs[3].new == ("2", None, None, None)
    upd = msgs[6]
    assert upd.old_kind == "O" and upd.old == ("1", big, "1.50", "2024-02-29 10:00:00+00")
    assert upd.new == ("1", po.UNCHANGED, "2", "2024-02-29 10:00:00+00")
    assert msgs[9].old_kind == "O" and msgs[9].old == ("2", None, None, None)
    assert msgs[12].transactional and msgs[12].prefix == "app" and msgs[12].content == b"hello"
    assert msgs[16].relation_oids == (table_oid,)
    begin, commit = msgs[0], msgs[4]
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert msgs[5].final_lsn > commit.commit_lsn


def test_type_and_origin_messages_decode(conn, peek):
    conn.execute("CREATE TYPE mood AS ENUM ('ok', 'sad')")
    conn.execute("CREATE TABLE u (id int PRIMARY KEY, m mood)")
    conn.execute("ALTER PUBLICATION p ADD TABLE u")
    conn.execute("SELECT pg_replication_origin_create('elsewhere')")
    with conn.transaction():
        conn.execute("SELECT pg_replication_origin_session_setup('elsewhere')")
        conn.execute("SELECT pg_replication_origin_xact_setup('0/10', now())")
        conn.execute("INSERT INTO u VALUES (1, 'sad')")
    conn.execute("SELECT pg_replication_origin_session_reset()")
    msgs = [po.decode(b) for b in peek()]
    types = [m for m in msgs if isinstance(m, po.TypeInfo)]
    origins = [m for m in msgs if isinstance(m, po.Origin)]
    assert [(t.namespace, t.name) for t in types] == [("public", "mood")]
    assert [o.name for o in origins] == ["elsewhere"]
    assert [m.new for m in msgs if isinstance(m, po.Insert)] == [("1", "sad")]


def test_malformed_messages_are_refused(conn, peek):
    conn.execute("INSERT INTO t VALUES (1, 'a', 1, now())")
    insert = next(b for b in peek() if b[:1] == b"I")
    with pytest.raises(ProcessingError, match="truncated"):
        po.decode(insert[:-3])
    with pytest.raises(ProcessingError, match="unknown message type"):
        po.decode(b"S" + insert[1:])


def test_copy_frames_and_status_round_trip():
    frame = b"w" + struct.pack("!QQq", 5, 9, 77) + b"B..."
    assert po.decode_copy_data(frame) == po.XLogData(5, 9, 77, b"B...")
    assert po.decode_copy_data(b"k" + struct.pack("!Qq?", 12, 3, True)) == po.Keepalive(12, 3, True)
    status = po.standby_status(1, 2, 3, po.PG_EPOCH_OFFSET_US + 4)
    assert status == b"r" + struct.pack("!QQQq?", 1, 2, 3, 4, False)
    assert po.lsn_to_int("16/B374D848") == 0x16B374D848
    assert po.int_to_lsn(0x16B374D848) == "16/B374D848"
    with pytest.raises(ProcessingError):
        po.decode_copy_data(b"x")


def test_raw_mode_keeps_utf8_bytes(conn, peek):
    conn.execute("INSERT INTO t VALUES (7, 'é\"', NULL, NULL)")
    insert = next(b for b in peek() if b[:1] == b"I")
    assert po.decode(insert, raw=True).new == (b"7", 'é"'.encode(), None, None)
    assert po.decode(insert).new == ("7", 'é"', None, None)


def test_fast_insert_decoder_equals_decode(conn, peek):
    """insert_new_values (the consumer's hot path) gives decode's raw values on real Inserts,
    NULLs and a TOASTed value included, and refuses every truncation of the message."""
    conn.execute("INSERT INTO t VALUES (1, 'plain', 1.5, '2026-01-01 00:00:00+00'), (2, NULL, NULL, NULL)")
    conn.execute("INSERT INTO t VALUES (3, repeat('x', 300000), -0.0, now())")
    inserts = [b for b in peek() if b[:1] == b"I"]
    assert len(inserts) == 3
    for insert in inserts:
        assert po.relation_oid_of_change(insert) == po.decode(insert).relation_oid
        assert tuple(po.insert_new_values(insert)) == po.decode(insert, raw=True).new
        for cut in (1, 2, 5, len(insert) - 7):
            with pytest.raises(ProcessingError, match="truncated or malformed"):
                po.insert_new_values(insert[:-cut])
    assert po.insert_new_values(inserts[1])[1:] == [None, None, None]
    assert len(po.insert_new_values(inserts[2])[1]) == 300000
