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

import hashlib
from typing import NamedTuple

import psycopg

from listener import canonical
from listener.errors import ProcessingError
from listener.registry import Source, list_sources
from listener.sources import pgoutput as po
from listener.sources.pgoutput import int_to_lsn, lsn_to_int
from listener.sources.replication import Transaction


class Leaf(NamedTuple):
    source_id: int
    op: str
    source_key: str
    leaf_hash: bytes
    change_ord: int


class _Plan:
    """How to turn one relation's tuples into one source's entries: the column positions in
    the canonical (sorted) order and the templates. Built once per source and Relation."""

    __slots__ = ("source", "relation", "entry_idx", "key_idx", "key", "entries", "entry_column_idx")

    def __init__(self, s: Source, relation: po.Relation):
        self.source, self.relation = s, relation
        pos = {c.name: i for i, c in enumerate(relation.columns)}
        needed = set(s.columns) | set(s.key_columns) | ({s.entry_column} if s.entry_column else set())
        missing = needed - pos.keys()
        if missing:
            raise ProcessingError(
                f"{s.qualified}: the stream has no column(s) {', '.join(sorted(missing))} (dropped or renamed?); "
                "the source's hashed columns are fixed at registration: remove the source and add it again"
            )
        self.key = canonical.ObjectTemplate(s.key_columns)
        self.key_idx = [pos[c] for c in self.key.columns]
        self.entries = {op: canonical.entry_template(op, s.qualified, s.columns) for op in ("insert", "update")}
        self.entries["delete"] = canonical.entry_template("delete", s.qualified, s.key_columns)
        self.entry_idx = [pos[c] for c in self.entries["insert"].columns]
        self.entry_column_idx = pos[s.entry_column] if s.entry_column else None


_plans: dict[tuple[int, int], _Plan] = {}


def _plan_for(s: Source, relation: po.Relation) -> _Plan:
    plan = _plans.get((s.source_id, id(relation)))
    if plan is None or plan.source is not s or plan.relation is not relation:
        if len(_plans) > 1000:
            _plans.clear()
        plan = _plans[(s.source_id, id(relation))] = _Plan(s, relation)
    return plan


def leaves_of(txn: Transaction, sources: dict[int, Source]) -> list[Leaf]:
    """The leaves of one committed transaction, in its order. `sources` maps table OID to the
    replication source; changes of other tables and of events a source does not log are
    skipped. Tuple values are pgoutput's text output as UTF-8 bytes (pgoutput.decode with
    raw=True), or None. Raises ProcessingError for a value the stream did not send (an
    unchanged TOASTed value without REPLICA IDENTITY FULL): it is never hashed as a placeholder."""
    out: list[Leaf] = []
    sha256 = hashlib.sha256
    last_plan = None
    for relation, msg in txn.changes:
        if type(msg) is po.Truncate:
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
        kind = type(msg)
        if kind is po.Insert:
            op, values = "insert", msg.new
        elif kind is po.Update:
            op, values = "update", msg.new
        else:
            op, values = "delete", msg.old
        if op not in s.events:
            continue
        if last_plan is not None and last_plan.relation is relation and last_plan.source is s:
            plan = last_plan
        else:
            plan = last_plan = _plan_for(s, relation)
        if po.UNCHANGED in values:
            values = _fill_unchanged(s, relation, values, msg.old if kind is po.Update else None, plan)
        if op == "delete" and msg.old_kind == "K" and not all(relation.columns[i].part_of_key for i in plan.key_idx):
            # Only the replica identity was sent: the source's key would be hashed as nulls.
            raise ProcessingError(
                f"{s.qualified}: a DELETE arrived with REPLICA IDENTITY columns only, which do not include the "
                f"source's key ({', '.join(s.key_columns)}); deletes are logged with REPLICA IDENTITY FULL only. "
                "Recover as for a lost slot (docs/replication.md) after ALTER TABLE ... REPLICA IDENTITY FULL"
            )
        key_values = [values[i] for i in plan.key_idx]
        if op == "delete":
            entry = plan.entries["delete"].encode(key_values)
        elif plan.entry_column_idx is not None:
            entry = _entry_column_bytes(s, values[plan.entry_column_idx])
        else:
            entry = plan.entries[op].encode([values[i] for i in plan.entry_idx])
        out.append(Leaf(s.source_id, op, plan.key.encode(key_values).decode("utf-8"),
                        sha256(canonical.LEAF_PREFIX + entry).digest(), len(out) + 1))
    return out


def _fill_unchanged(s: Source, relation: po.Relation, values: tuple, old: tuple | None, plan: _Plan) -> tuple:
    if old is not None:
        # REPLICA IDENTITY FULL: the old row carries the unchanged value.
        values = tuple(o if v is po.UNCHANGED else v for v, o in zip(values, old))
    used = set(plan.entry_idx) | set(plan.key_idx) | ({plan.entry_column_idx} - {None})
    for i in sorted(used):
        if values[i] is po.UNCHANGED:
            raise ProcessingError(
                f"{s.qualified}: the stream did not send column {relation.columns[i].name} (an unchanged TOASTed "
                f"value); run ALTER TABLE {s.qualified} REPLICA IDENTITY FULL so updates carry every value, then restart"
            )
    return values


def _entry_column_bytes(s: Source, text: bytes | None) -> bytes:
    if text is None or not text.startswith(b"\\x"):
        raise ProcessingError(f"{s.qualified}: entry column {s.entry_column} is not hex bytea text ({text!r:.40})")
    return bytes.fromhex(text[2:].decode("ascii"))


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
        stored_text, has_backfill = conn.execute(
            "SELECT end_lsn::text, EXISTS (SELECT 1 FROM merkle.replication_backfill_state b JOIN merkle.sources s "
            "USING (source_id) WHERE s.log_id = p.log_id) FROM merkle.replication_progress p WHERE log_id = %s",
            (self.log_id,)).fetchone() or ("0/0", False)
        stored = lsn_to_int(stored_text)
        by_oid = {s.table_oid: s for s in list_sources(conn, self.log_id) if s.mode == "replication"}
        waiting = set()
        if has_backfill:
            waiting = {sid for sid, ready in conn.execute(
                "SELECT b.source_id, b.ready FROM merkle.replication_backfill_state b "
                "JOIN merkle.sources s USING (source_id) WHERE s.log_id = %s", (self.log_id,)) if not ready}
        hashes: list[bytes] = []
        lines: list[bytes] = []  # COPY text rows of processed_log
        log_id = self.log_id
        if has_backfill:
            for source_id, ord_, key, leaf in self._take_backfills(conn):
                leaf = bytes(leaf)
                lines.append(_COPY_ROW % (log_id, base + len(hashes), source_id, _copy_text(key), b"backfill",
                                          leaf.hex().encode(), 0, ord_, b"\\N"))
                hashes.append(leaf)
        last = stored
        for txn in self.txns:
            if txn.end_lsn <= stored:
                self.consumed += 1  # already in the log (a replay after a restart)
                continue
            leaves = leaves_of(txn, by_oid)
            if waiting and any(leaf.source_id in waiting for leaf in leaves):
                break  # its source's backfill is not written yet: keep it for a later batch
            commit = int_to_lsn(txn.commit_lsn).encode()
            end = txn.end_lsn
            for source_id, op, key, leaf, ord_ in leaves:
                lines.append(_COPY_ROW % (log_id, base + len(hashes), source_id, _copy_text(key), op.encode(),
                                          leaf.hex().encode(), end, ord_, commit))
                hashes.append(leaf)
            last = end
            self.consumed += 1
        if lines:
            with conn.cursor().copy(
                "COPY merkle.processed_log (log_id, seq, source_id, source_key, op, leaf_hash, change_id, "
                "change_ord, commit_lsn) FROM STDIN"
            ) as copy:
                copy.write(b"".join(lines))
        if last > stored:
            conn.execute("UPDATE merkle.replication_progress SET end_lsn = %s::pg_lsn, updated_at = now() "
                         "WHERE log_id = %s", (int_to_lsn(last), self.log_id))
        self.end_lsn = last
        return hashes

    def _take_backfills(self, conn: psycopg.Connection) -> list[tuple]:
        """Delete and return the rows of every ready backfill of the log, in (source, ord) order."""
        rows = conn.execute(
            "DELETE FROM merkle.replication_backfill b USING merkle.replication_backfill_state st, merkle.sources s "
            "WHERE st.ready AND b.source_id = st.source_id AND s.source_id = st.source_id AND s.log_id = %s "
            "RETURNING b.source_id, b.ord, b.source_key, b.leaf_hash", (self.log_id,)).fetchall()
        conn.execute("DELETE FROM merkle.replication_backfill_state st USING merkle.sources s "
                     "WHERE st.ready AND s.source_id = st.source_id AND s.log_id = %s", (self.log_id,))
        return sorted(rows, key=lambda r: (r[0], r[1]))


# One processed_log row in COPY text format; bytea as \x<hex> with its backslash escaped.
_COPY_ROW = b"%d\t%d\t%d\t%b\t%b\t\\\\x%b\t%d\t%d\t%b\n"


def _copy_text(text: str) -> bytes:
    """A text field for COPY: the key is canonical JSON, whose only byte needing COPY's escape
    is the backslash (control characters are JSON-escaped already)."""
    return text.encode("utf-8").replace(b"\\", b"\\\\")
