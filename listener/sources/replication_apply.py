"""Committed replication transactions -> processed_log rows and the stream's progress.

`prepare` is pure: it turns one transaction's pgoutput changes into its leaves, as COPY rows
of processed_log (all but the seq) and leaf hashes, with listener.canonical (entry_v1 from
pgoutput's text values, which the replication connection's pinned settings make equal to
what trigger mode hashes). Inserts are decoded straight from the message bytes into the
entry: this is the consumer's per-row hot path.

The feed prepares each transaction when it arrives, with the sources it knew then, so the
hashing overlaps the previous batch's database work. `ReplicationBatch.append` runs inside the
sequencer's fenced batch transaction (Sequencer.append_changes), uses a prepared transaction
only if the sources read under the log's lock are the ones it was prepared with (otherwise
it prepares it again), and writes, in that one transaction:

    1. leaves of backfills that are ready (op 'backfill', before any streamed change of their
       source), at most BACKFILL_ROWS_PER_BATCH of them;
    2. leaves of every transaction whose end_lsn > the stored end_lsn, in stream order;
       change_id = its commit end_lsn, change_ord = position in the transaction (1..n);
    3. merkle.replication_progress.end_lsn = the last transaction's end_lsn.

So "the leaves are in the log" and "the stream is past them" commit together; the server is
told (flush LSN) only afterwards. A transaction touching a source whose backfill is still
being written stops the batch there: it and what follows wait for the next batch. A large
transaction (spilled to a file while it arrived: listener/sources/spill.py) ends its batch
and is prepared and written a chunk at a time, still in the batch's one transaction.
"""

from __future__ import annotations

import hashlib
from binascii import hexlify
from operator import itemgetter
from typing import TYPE_CHECKING, NamedTuple

import psycopg
from psycopg.copy import QueuedLibpqWriter

from listener import canonical
from listener.errors import ProcessingError
from listener.registry import Source
from listener.sources import pgoutput as po
from listener.sources import spill
from listener.sources.pgoutput import UNCHANGED, int_to_lsn, lsn_to_int
from listener.sources.replication import Transaction

if TYPE_CHECKING:
    from listener.sequencer import TreeAppend

# processed_log's columns in the order of the COPY rows: seq last, the one field a row's
# position in the batch decides.
COPY_COLUMNS = "log_id, source_id, source_key, op, leaf_hash, change_id, change_ord, commit_lsn, seq"
# Rows formatted per COPY write: the first ones reach the server while the rest are formatted.
COPY_CHUNK = 2_000
# A transaction of more changes than this (not prepared on arrival) is prepared and written this
# many changes at a time, and its tiles written every COPY_STATEMENT_ROWS rows: a batch's memory
# does not grow with the transaction (listener/sources/spill.py keeps it on disk until then).
APPEND_CHUNK = 20_000
COPY_STATEMENT_ROWS = 200_000
# Backfill rows appended per batch: a large backfill is spread over batches, so that a batch's
# memory does not grow with the table (a source's streamed changes wait until all are in).
BACKFILL_ROWS_PER_BATCH = 20_000


_INSERT, _UPDATE, _DELETE = "insert", "update", "delete"
_OPS = {73: _INSERT, 85: _UPDATE, 68: _DELETE}  # pgoutput message type ('I', 'U', 'D') -> op


class Prepared(NamedTuple):
    """One transaction's leaves, in its order."""

    log_id: int
    sources: dict[int, Source]  # table OID -> replication source: what they were computed for
    rows: list[bytes]  # COPY text rows of processed_log without the trailing "seq\n"
    hashes: list[bytes]  # leaf hashes
    source_ids: frozenset[int]  # the sources it has leaves of


def _getter(positions: list[int]):
    """values -> tuple of values[i] for i in positions (itemgetter, always a tuple)."""
    if len(positions) == 1:
        (i,) = positions
        return lambda values: (values[i],)
    return itemgetter(*positions)


class _Plan:
    """How to turn one relation's tuples into one source's entries: the column positions in
    the canonical (sorted) order and the templates. Built once per source and Relation."""

    __slots__ = ("source", "relation", "entry_idx", "key_idx", "key", "entries", "entry_column_idx",
                 "entry_values", "key_values", "used_idx", "hashed_values", "plain")

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
        self.entries = {op: canonical.entry_template(op, s.qualified, s.columns) for op in (_INSERT, _UPDATE)}
        self.entries[_DELETE] = canonical.entry_template(_DELETE, s.qualified, s.key_columns)
        self.entry_idx = [pos[c] for c in self.entries[_INSERT].columns]
        self.entry_column_idx = pos[s.entry_column] if s.entry_column else None
        self.entry_values = _getter(self.entry_idx)
        self.key_values = _getter(self.key_idx)
        self.used_idx = sorted(set(self.entry_idx) | set(self.key_idx) | ({self.entry_column_idx} - {None}))
        # The fast path of an Insert whose entry and key values are all bytes needing no escape:
        # one check for both, then each template's format (None for an entry column source).
        self.hashed_values = _getter(sorted(set(self.entry_idx) | set(self.key_idx)))
        self.plain = None if s.entry_column else (self.entries[_INSERT].plain_format, self.key.plain_format)


_plans: dict[tuple[int, int], _Plan] = {}


def _plan_for(s: Source, relation: po.Relation) -> _Plan:
    plan = _plans.get((s.source_id, id(relation)))
    if plan is None or plan.source is not s or plan.relation is not relation:
        if len(_plans) > 1000:
            _plans.clear()
        plan = _plans[(s.source_id, id(relation))] = _Plan(s, relation)
    return plan


def prepare(txn: Transaction, sources: dict[int, Source], log_id: int, changes: list[spill.Change] | None = None,
            first_ord: int = 1) -> Prepared:
    """The leaves of one committed transaction, in its order. `sources` maps table OID to the
    replication source; changes of other tables and of events a source does not log are
    skipped. Raises ProcessingError for a value the stream did not send (an unchanged
    TOASTed value without REPLICA IDENTITY FULL): it is never hashed as a placeholder.
    Of a spilled transaction, one chunk at a time: `changes`, whose first leaf is the
    transaction's `first_ord`-th."""
    if changes is None:
        if txn.spilled is not None:
            raise ValueError("a spilled transaction is prepared one chunk at a time")
        changes = txn.changes
    rows: list[bytes] = []
    hashes: list[bytes] = []
    source_ids: set[int] = set()
    sha256 = hashlib.sha256
    prefix = canonical.LEAF_PREFIX
    insert_values = po.insert_new_values
    needs_escape, join = canonical.NEEDS_ESCAPE.search, b"".join
    tail = b"\t%d\t%%d\t%b\t" % (txn.end_lsn, int_to_lsn(txn.commit_lsn).encode())
    formats: dict[tuple[int, str], bytes] = {}  # (source, op) -> COPY row format for this transaction
    last_relation = last_source = plan = fmt_plan = fmt_op = None
    ord0 = first_ord
    for relation, payload in changes:
        if type(payload) is po.Truncate:
            for oid in payload.relation_oids:
                s = sources.get(oid)
                if s is not None and "truncate" in s.events:
                    leaf = canonical.leaf_hash_of_entry(canonical.entry_v1("truncate", s.qualified, {}))
                    rows.append(_row_format(formats, log_id, s.source_id, "truncate", tail)
                                % (b"{}", hexlify(leaf), len(rows) + ord0))
                    hashes.append(leaf)
                    source_ids.add(s.source_id)
            continue
        s = sources.get(relation.oid if relation is not None else po.relation_oid_of_change(payload))
        if s is None:
            continue
        if relation is None:
            raise ProcessingError(
                f"replication stream: change of relation {s.table_oid} before its Relation message")
        if relation is not last_relation or s is not last_source:
            last_relation, last_source, plan = relation, s, None
        op = _OPS[payload[0]]
        if op not in s.events:
            continue
        if plan is None:
            plan = _plan_for(s, relation)
            source_ids.add(s.source_id)
        if op is _INSERT:
            values = insert_values(payload)
            if plan.plain is not None:
                try:  # a NULL or an unchanged value among them fails the join: not plain
                    plain = needs_escape(join(plan.hashed_values(values))) is None
                except TypeError:
                    plain = False
            else:
                plain = False
            if not plain and UNCHANGED in values:
                # An UPDATE that moved a row into a row filter is sent as an INSERT and may
                # lack unchanged TOASTed values (without REPLICA IDENTITY FULL).
                values = _fill_unchanged(s, relation, values, None, plan)
        else:
            values = _old_or_new_values(s, relation, plan, op, po.decode(payload, raw=True))
            plain = False
        if plain:
            entry_format, key_format = plan.plain
            entry = entry_format % plan.entry_values(values)
            key = key_format % plan.key_values(values)
        else:
            if op is _DELETE:
                entry = plan.entries[op].encode(plan.key_values(values))
            elif plan.entry_column_idx is not None:
                entry = _entry_column_bytes(s, values[plan.entry_column_idx])
            else:
                entry = plan.entries[op].encode(plan.entry_values(values))
            key = plan.key.encode(plan.key_values(values))
        if b"\\" in key:
            key = key.replace(b"\\", b"\\\\")  # COPY's escape; JSON already escaped control characters
        if plan is not fmt_plan or op is not fmt_op:
            fmt_plan, fmt_op = plan, op
            fmt = formats.get((s.source_id, op)) or _row_format(formats, log_id, s.source_id, op, tail)
        leaf = sha256(prefix + entry).digest()
        rows.append(fmt % (key, hexlify(leaf), len(rows) + ord0))
        hashes.append(leaf)
    return Prepared(log_id, sources, rows, hashes, frozenset(source_ids))


def _row_format(formats: dict, log_id: int, source_id: int, op: str, tail: bytes) -> bytes:
    """COPY row of processed_log without its seq: key, leaf hash (hex) and ordinal to fill."""
    fmt = formats[(source_id, op)] = b"%d\t%d\t%%b\t%b\t\\\\x%%b" % (log_id, source_id, op.encode()) + tail
    return fmt


def _old_or_new_values(s: Source, relation: po.Relation, plan: _Plan, op: str, msg) -> tuple:
    """The values an Update (its new row) or a Delete (its old row) is logged with."""
    if op == "update":
        # Only a whole old row ('O', REPLICA IDENTITY FULL) may fill unchanged values: a key-only
        # one ('K') has NULL in every other column.
        values, old = msg.new, (msg.old if msg.old_kind == "O" else None)
    else:
        values, old = msg.old, None
        if msg.old_kind == "K" and not all(relation.columns[i].part_of_key for i in plan.key_idx):
            # Only the replica identity was sent: the source's key would be hashed as nulls.
            raise ProcessingError(_unloggable(
                s, f"a DELETE arrived with REPLICA IDENTITY columns only, which do not include the source's key "
                   f"({', '.join(s.key_columns)})"))
    if UNCHANGED in values:
        values = _fill_unchanged(s, relation, values, old, plan)
    return values


def _fill_unchanged(s: Source, relation: po.Relation, values, old, plan: _Plan) -> tuple:
    if old is not None:
        # REPLICA IDENTITY FULL: the old row carries the unchanged value.
        values = tuple(o if v is po.UNCHANGED else v for v, o in zip(values, old))
    for i in plan.used_idx:
        if values[i] is po.UNCHANGED:
            raise ProcessingError(_unloggable(
                s, f"a change arrived without the value of column {relation.columns[i].name} (an unchanged "
                   "TOASTed value, which an update carries only under REPLICA IDENTITY FULL)"))
    return values


def _unloggable(s: Source, what: str) -> str:
    """The error for a change whose WAL lacks a value its leaf needs: the table's replica identity
    was lowered from FULL without the DDL guard. Nothing can bring the value back."""
    table = s.ident.as_string(None)
    return (f"{s.qualified}: {what}. The value is not in the WAL, so this transaction cannot be logged as "
            f"written, and the log stops here. Recover as for a lost slot (docs/replication.md, Slot health): "
            f"ALTER TABLE {table} REPLICA IDENTITY FULL (on a partitioned table: on each partition); stop "
            "`merkle-listener run`; drop the log's slot; remove and re-add each of the log's replication sources "
            "with --backfill (`merkle-listener status` gives the commands once the slot is dropped)")


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
        self.sources: dict[int, Source] | None = None  # read under the log's lock: for preparing the next ones
        self.backfill_left = False  # a ready backfill still has rows for the next batch

    def append(self, conn: psycopg.Connection, base: int, by_oid: dict[int, Source], leaves: TreeAppend) -> None:
        """Step 2 of the sequencer's batch, in its transaction (the log row is locked);
        `by_oid` maps table OID to the log's replication sources as of that lock. The rows go
        out through psycopg's queued writer thread while `leaves` hashes them into the tree.
        A transaction of more than APPEND_CHUNK changes that was not prepared ahead, or one
        spilled to a file (however few its changes), ends the batch and is prepared and
        written a chunk at a time (see _append_large)."""
        self.consumed = 0
        stored_text, has_backfill = conn.execute(
            "SELECT end_lsn::text, EXISTS (SELECT 1 FROM merkle.replication_backfill_state b JOIN merkle.sources s "
            "USING (source_id) WHERE s.log_id = p.log_id) FROM merkle.replication_progress p WHERE log_id = %s",
            (self.log_id,)).fetchone() or ("0/0", False)
        stored = lsn_to_int(stored_text)
        waiting = set()
        if has_backfill:
            waiting = {sid for sid, ready in conn.execute(
                "SELECT b.source_id, b.ready FROM merkle.replication_backfill_state b "
                "JOIN merkle.sources s USING (source_id) WHERE s.log_id = %s", (self.log_id,)) if not ready}
        self.sources = by_oid
        hashes: list[bytes] = []
        rows: list[bytes] = []  # COPY rows of processed_log without their seq
        if has_backfill:
            taken, left = self._take_backfills(conn)
            for source_id, ord_, key, leaf in taken:
                leaf = bytes(leaf)
                rows.append(b"%d\t%d\t%b\tbackfill\t\\\\x%b\t0\t%d\t\\N\t"
                            % (self.log_id, source_id, _copy_text(key), hexlify(leaf), ord_))
                hashes.append(leaf)
            waiting |= left
            self.backfill_left = bool(left)
        last = stored
        large = None
        compared: dict[int, bool] = {}
        for txn in self.txns:
            if txn.end_lsn <= stored:
                self.consumed += 1  # already in the log (a replay after a restart)
                continue
            prepared = txn.prepared
            if prepared is None and (txn.count > APPEND_CHUNK or txn.spilled is not None):
                if waiting and not waiting.isdisjoint(
                        by_oid[oid].source_id for oid in txn.table_oids() if oid in by_oid):
                    break
                large = txn
                last = txn.end_lsn
                self.consumed += 1
                break
            if prepared is not None and (prepared.log_id != self.log_id or not (
                    prepared.sources is by_oid or _same(compared, prepared.sources, by_oid))):
                prepared = None
            if prepared is None:
                prepared = txn.prepared = prepare(txn, by_oid, self.log_id)
            if waiting and not waiting.isdisjoint(prepared.source_ids):
                break  # its source's backfill is not written yet: keep it for a later batch
            rows += prepared.rows
            hashes += prepared.hashes
            last = txn.end_lsn
            self.consumed += 1
        if rows:
            _copy(conn, base, [(rows, hashes)], leaves)
        if large is not None:
            self._append_large(conn, base, by_oid, large, leaves)
        if last > stored:
            conn.execute("UPDATE merkle.replication_progress SET end_lsn = %s::pg_lsn, updated_at = now() "
                         "WHERE log_id = %s", (int_to_lsn(last), self.log_id))
        self.end_lsn = last

    def _append_large(self, conn: psycopg.Connection, base: int, by_oid: dict[int, Source], txn: Transaction,
                      leaves: TreeAppend) -> None:
        """Prepare and write `txn` APPEND_CHUNK changes at a time, still in the batch's one
        transaction: a COPY statement takes COPY_STATEMENT_ROWS rows, after which the tiles
        they completed are written. Memory holds a chunk's rows and hashes and the tiles of a
        statement, whatever the transaction's size; its changes may be read from the spill
        file again (a batch that failed is retried whole)."""
        pieces = _prepared_chunks(txn, by_oid, self.log_id)
        exhausted = False

        def statement():
            nonlocal exhausted
            rows = 0
            for piece in pieces:
                yield piece
                rows += len(piece[0])
                if rows >= COPY_STATEMENT_ROWS:
                    return
            exhausted = True

        while not exhausted:
            _copy(conn, base + leaves.count, statement(), leaves)
            leaves.write_tiles()

    def _take_backfills(self, conn: psycopg.Connection) -> tuple[list[tuple], set[int]]:
        """Delete and return the first BACKFILL_ROWS_PER_BATCH rows of the log's ready
        backfills, in (source, ord) order, then the state of each ready backfill with no row
        left; also returns the sources whose ready backfill still has rows."""
        # A backfill's rows are numbered 1..n when queued and taken in that order: its rows left
        # are next_ord up to its largest ord. The ranges are decided here and deleted by
        # constant bounds, a plan that cannot turn into a scan or a sort of every row left.
        spans = conn.execute(
            "SELECT st.source_id, st.next_ord, "
            "(SELECT max(b.ord) FROM merkle.replication_backfill b WHERE b.source_id = st.source_id) "
            "FROM merkle.replication_backfill_state st JOIN merkle.sources s USING (source_id) "
            "WHERE st.ready AND s.log_id = %s ORDER BY st.source_id", (self.log_id,)).fetchall()
        rows: list[tuple] = []
        budget = BACKFILL_ROWS_PER_BATCH
        for source_id, first, last in spans:
            if last is None or last < first or budget <= 0:
                continue
            end = min(last + 1, first + budget)
            rows += conn.execute(
                "DELETE FROM merkle.replication_backfill WHERE source_id = %s AND ord >= %s AND ord < %s "
                "RETURNING source_id, ord, source_key, leaf_hash", (source_id, first, end)).fetchall()
            conn.execute("UPDATE merkle.replication_backfill_state SET next_ord = %s WHERE source_id = %s",
                         (end, source_id))
            budget -= end - first
        # A later statement sees a later snapshot: a backfill that became ready meanwhile (its
        # `ready` commits with its rows, without the log's lock) has rows, so its state stays
        # and its source waits, like one with rows beyond this batch's.
        left = {source_id for (source_id,) in conn.execute(
            "WITH done AS (DELETE FROM merkle.replication_backfill_state st USING merkle.sources s "
            "WHERE st.ready AND s.source_id = st.source_id AND s.log_id = %(log)s "
            "AND NOT EXISTS (SELECT 1 FROM merkle.replication_backfill b WHERE b.source_id = st.source_id) "
            "RETURNING st.source_id) "
            "SELECT st.source_id FROM merkle.replication_backfill_state st JOIN merkle.sources s USING (source_id) "
            "WHERE st.ready AND s.log_id = %(log)s AND st.source_id NOT IN (SELECT source_id FROM done)",
            {"log": self.log_id})}
        return sorted(rows, key=lambda r: (r[0], r[1])), left


def _prepared_chunks(txn: Transaction, by_oid: dict[int, Source], log_id: int):
    """(rows, hashes) of each APPEND_CHUNK changes of `txn`, prepared when asked for."""
    first_ord = 1
    for chunk in txn.chunks(APPEND_CHUNK, spill.SPILL_BYTES):
        prepared = prepare(txn, by_oid, log_id, chunk, first_ord)
        first_ord += len(prepared.rows)
        yield prepared.rows, prepared.hashes


def _copy(conn: psycopg.Connection, first_seq: int, pieces, leaves: TreeAppend) -> None:
    """One COPY of the pieces' rows, numbered from first_seq: psycopg's writer thread sends
    them while leaves.extend hashes each piece into the tree."""
    cur = conn.cursor()
    seq = first_seq
    with cur.copy(f"COPY merkle.processed_log ({COPY_COLUMNS}) FROM STDIN", writer=QueuedLibpqWriter(cur)) as copy:
        for rows, hashes in pieces:
            for lo in range(0, len(rows), COPY_CHUNK):
                chunk = rows[lo:lo + COPY_CHUNK]
                copy.write(b"".join(map(b"%b%d\n".__mod__, zip(chunk, range(seq + lo, seq + lo + len(chunk))))))
            seq += len(rows)
            leaves.extend(hashes)


def _same(known: dict[int, bool], sources: dict[int, Source], by_oid: dict[int, Source]) -> bool:
    """sources == by_oid, compared once per distinct dict (`known` is keyed by its id; the
    transactions keep every compared dict alive meanwhile)."""
    same = known.get(id(sources))
    if same is None:
        same = known[id(sources)] = sources == by_oid
    return same


def _copy_text(text: str) -> bytes:
    """A text field for COPY: the key is canonical JSON, whose only byte needing COPY's escape
    is the backslash (control characters are JSON-escaped already)."""
    return text.encode("utf-8").replace(b"\\", b"\\\\")
