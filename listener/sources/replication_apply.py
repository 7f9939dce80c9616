"""Committed replication transactions -> processed_log rows and the stream's progress.

`leaves_of` is pure: it turns one transaction's pgoutput changes into leaves with
listener.canonical (entry_v1 from pgoutput's text values, which the replication connection's
pinned settings make equal to what trigger mode hashes). `ReplicationBatch.append` runs inside
the sequencer's fenced batch transaction (Sequencer.append_changes) and writes, in that one
transaction:

    1. leaves of backfills that are ready (op 'backfill', before any streamed change);
    2. leaves of every transaction whose end_lsn > the stored end_lsn, in stream order;
       change_id = its commit end_lsn, change_ord = position in the transaction (1..n);
    3. merkle.replication_progress.end_lsn = the last transaction's end_lsn.

So "the leaves are in the log" and "the stream is past them" commit together; the server is
told (flush LSN) only afterwards. A transaction touching a source whose backfill is still
being written stops the batch there: it and what follows wait for the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from listener import canonical
from listener.errors import ProcessingError
from listener.registry import Source, list_sources
from listener.sources import pgoutput as po
from listener.sources.pgoutput import int_to_lsn, lsn_to_int
from listener.sources.replication import Transaction


@dataclass(frozen=True)
class Leaf:
    source_id: int
    op: str
    source_key: str
    leaf_hash: bytes
    change_ord: int


def leaves_of(txn: Transaction, sources: dict[int, Source]) -> list[Leaf]:
    """The leaves of one committed transaction, in its order. `sources` maps table OID to the
    replication source; changes of other tables and of events a source does not log are
    skipped. Raises ProcessingError for a value the stream did not send (unchanged TOAST
    without REPLICA IDENTITY FULL): it must never be hashed as a placeholder."""
    out: list[Leaf] = []
    for relation, msg in txn.changes:
        if isinstance(msg, po.Truncate):
            for oid in msg.relation_oids:
                s = sources.get(oid)
                if s is not None and "truncate" in s.events:
                    entry = canonical.entry_v1("truncate", s.qualified, {})
                    out.append(Leaf(s.source_id, "truncate", "{}", canonical.leaf_hash_of_entry(entry), len(out) + 1))
            continue
        s = sources.get(msg.relation_oid)
        if s is None:
            continue
        if relation is None:
            raise ProcessingError(f"replication stream: change of relation {msg.relation_oid} before its Relation message")
        if isinstance(msg, po.Insert):
            op, values, old = "insert", msg.new, None
        elif isinstance(msg, po.Update):
            op, values, old = "update", msg.new, msg.old
        else:
            op, values, old = "delete", msg.old, None
        if op not in s.events:
            continue
        row = _named(relation, values, old, s)
        key = {k: row[k] for k in s.key_columns}
        if op == "delete":
            entry = canonical.entry_v1("delete", s.qualified, key)
        elif s.entry_column:
            text = row[s.entry_column]
            if text is None or not text.startswith("\\x"):
                raise ProcessingError(f"{s.qualified}: entry column {s.entry_column} is not hex bytea text ({text!r:.40})")
            entry = bytes.fromhex(text[2:])
        else:
            entry = canonical.entry_v1(op, s.qualified, {c: row[c] for c in s.columns})
        out.append(Leaf(s.source_id, op, canonical.key_json(key), canonical.leaf_hash_of_entry(entry), len(out) + 1))
    return out


def _named(relation: po.Relation, values: tuple, old: tuple | None, s: Source) -> dict[str, str | None]:
    needed = set(s.columns) | set(s.key_columns) | ({s.entry_column} if s.entry_column else set())
    row = {}
    for i, col in enumerate(relation.columns):
        if col.name not in needed:
            continue
        v = values[i]
        if v is po.UNCHANGED and old is not None:
            v = old[i]  # REPLICA IDENTITY FULL: the old row carries the unchanged value
        if v is po.UNCHANGED:
            raise ProcessingError(
                f"{s.qualified}: the stream did not send column {col.name} (an unchanged TOASTed value); run "
                f"ALTER TABLE {s.qualified} REPLICA IDENTITY FULL so updates carry every value, then restart"
            )
        row[col.name] = v
    missing = needed - row.keys()
    if missing:
        raise ProcessingError(
            f"{s.qualified}: the stream has no column(s) {', '.join(sorted(missing))} (dropped or renamed?); "
            "the source's hashed columns are fixed at registration: remove the source and add it again"
        )
    return row


class ReplicationBatch:
    """Transactions to append in one sequencer batch. After Sequencer.append_changes returns,
    `consumed` says how many of them were dealt with (appended or skipped as already in the
    log) and `end_lsn` is the stored progress to acknowledge."""

    def __init__(self, log_id: int, txns: list[Transaction]):
        self.log_id = log_id
        self.txns = txns
        self.consumed = 0
        self.end_lsn: int | None = None

    def append(self, conn: psycopg.Connection, base: int) -> list[bytes]:
        """Step 2 of the sequencer's batch, in its transaction (the log row is locked)."""
        self.consumed = 0
        row = conn.execute("SELECT end_lsn::text FROM merkle.replication_progress WHERE log_id = %s",
                           (self.log_id,)).fetchone()
        stored = lsn_to_int(row[0]) if row else 0
        by_oid = {s.table_oid: s for s in list_sources(conn, self.log_id) if s.mode == "replication"}
        waiting = {sid for sid, ready in conn.execute(
            "SELECT b.source_id, b.ready FROM merkle.replication_backfill_state b "
            "JOIN merkle.sources s USING (source_id) WHERE s.log_id = %s", (self.log_id,)) if not ready}
        rows: list[tuple] = []
        hashes: list[bytes] = []
        for source_id, ord_, key, leaf in conn.execute(
            "DELETE FROM merkle.replication_backfill b USING merkle.replication_backfill_state st, merkle.sources s "
            "WHERE st.ready AND b.source_id = st.source_id AND s.source_id = st.source_id AND s.log_id = %s "
            "RETURNING b.source_id, b.ord, b.source_key, b.leaf_hash", (self.log_id,)).fetchall():
            rows.append((source_id, ord_, key, leaf))
        rows.sort(key=lambda r: (r[0], r[1]))
        conn.execute("DELETE FROM merkle.replication_backfill_state st USING merkle.sources s "
                     "WHERE st.ready AND s.source_id = st.source_id AND s.log_id = %s", (self.log_id,))
        records = [(self.log_id, base + i, sid, key, "backfill", leaf, 0, ord_, None)
                   for i, (sid, ord_, key, leaf) in enumerate(rows)]
        hashes.extend(bytes(r[3]) for r in rows)
        last = stored
        for txn in self.txns:
            if txn.end_lsn <= stored:
                self.consumed += 1  # already in the log (a replay after a restart)
                continue
            leaves = leaves_of(txn, by_oid)
            if any(leaf.source_id in waiting for leaf in leaves):
                break  # its source's backfill is not written yet: keep it for a later batch
            commit = int_to_lsn(txn.commit_lsn)
            for leaf in leaves:
                records.append((self.log_id, base + len(records), leaf.source_id, leaf.source_key, leaf.op,
                                leaf.leaf_hash, txn.end_lsn, leaf.change_ord, commit))
                hashes.append(leaf.leaf_hash)
            last = txn.end_lsn
            self.consumed += 1
        if records:
            with conn.cursor().copy(
                "COPY merkle.processed_log (log_id, seq, source_id, source_key, op, leaf_hash, change_id, "
                "change_ord, commit_lsn) FROM STDIN"
            ) as copy:
                for r in records:
                    copy.write_row(r)
        if last > stored:
            conn.execute("UPDATE merkle.replication_progress SET end_lsn = %s::pg_lsn, updated_at = now() "
                         "WHERE log_id = %s", (int_to_lsn(last), self.log_id))
        self.end_lsn = last
        return hashes
