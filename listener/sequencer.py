"""The single writer of one log: drain captured changes into processed_log and the tree.

One batch is one transaction on the writer's connection:

    1. lock the log's row and check that its persisted (tree_size, root) is the state this
       writer extends (the fence: a writer that lost its advisory lock cannot corrupt the log);
    2. one statement deletes the committed rows of every outbox of the log (oldest statements
       first, at most max_batch rows), computes each canonical entry and leaf hash from the row
       image under the pinned settings, and appends them to processed_log with seq = size, ...;
    3. the leaf hashes go through the in-memory TileBuilder; the changed tiles are upserted;
    4. the log's tree_size and root are advanced; COMMIT.

At COMMIT the batch is durable as a whole: outbox rows gone, leaves and tiles present. A
crash anywhere before leaves the outbox as it was. Nothing is found by "id > last".
The caller owns the connection and holds the log's advisory lock (listener/runner.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from listener import canonical_sql
from listener.errors import ConfigurationError, ProcessingError
from listener.merkle import TileBuilder
from listener.registry import Log, Source, get_log, list_sources, missing_capture_message, missing_outboxes
from listener.sources.replication_apply import ReplicationBatch
from listener.sources.trigger import outbox_columns, outbox_name
from listener.store.tiles import load_partial_tiles, write_tiles

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 50_000
# A log without trigger-mode sources looks for new ones this often (seconds).
NO_OUTBOX_RECHECK = 1.0
# Seconds between drains of a log with a source that rings no doorbell.
QUIET_POLL_INTERVAL = 0.1
# A trigger source whose outbox does not exist is reported this often (seconds) while it lasts.
MISSING_OUTBOX_REPEAT = 60.0


@dataclass(frozen=True)
class BatchResult:
    first_seq: int
    count: int
    tree_size: int
    root: bytes
    seconds: float
    more: bool  # rows were left for the next batch (the batch hit max_batch)


class TreeAppend:
    """A batch's leaves on their way into the tree: extend(hashes) appends them in seq order
    and keeps the tiles they changed, which write_tiles() upserts. The sequencer writes them at
    the end of the batch; a batch whose leaves do not fit in memory writes them on the way,
    between its statements (a COPY in progress holds the connection)."""

    def __init__(self, conn: psycopg.Connection, log_id: int, tree: TileBuilder):
        self.conn = conn
        self.log_id = log_id
        self.tree = tree
        self.count = 0
        self._tiles: list = []

    def extend(self, hashes: list[bytes]) -> None:
        self._tiles += self.tree.append(hashes)
        self.count += len(hashes)

    def write_tiles(self) -> None:
        write_tiles(self.conn, self.log_id, self._tiles)
        self._tiles = []


class Sequencer:
    """Appends one log's captured changes. Not thread-safe: one owner, one connection."""

    def __init__(self, conn: psycopg.Connection, log_name: str, *, max_batch: int = DEFAULT_MAX_BATCH):
        if conn.autocommit:
            raise ValueError("the sequencer needs a connection with autocommit off")
        if max_batch < 1:
            raise ConfigurationError(f"--max-batch must be at least 1 (got {max_batch})")
        self.conn = conn
        self.log_name = log_name
        self.max_batch = max_batch
        self.log: Log | None = None
        self.tree: TileBuilder | None = None
        self._sources_key: tuple[int, ...] = ()
        self._replication_key: tuple[int, ...] | None = None
        self._replication_by_oid: dict[int, Source] = {}
        self._drain: sql.Composed | None = None
        self._more = False  # the last drain left rows behind its cutoff
        self._no_outbox_until = 0.0
        # A trigger source without the doorbell (two-phase commit writers): poll it often.
        self.quiet_sources = False
        self._outbox_ids: tuple[int, ...] = ()  # trigger-mode sources of the drain statement
        self._missing_reported: dict[int, float] = {}  # source id -> when its missing outbox was last reported
        self._recheck_at: float | None = None  # when to look for the missing outboxes again

    def load(self) -> None:
        """Read the log's state: its row and the right-most partial tile of each level."""
        with self.conn.transaction():
            self.log = get_log(self.conn, self.log_name)
            tiles = load_partial_tiles(self.conn, self.log.log_id, self.log.tree_size)
        tree = TileBuilder(self.log.tree_size, tiles)
        if tree.root != self.log.root:
            raise ProcessingError(
                f"log {self.log_name!r}: the stored tiles give root {tree.root.hex()} but the log "
                f"records {self.log.root.hex()} at size {self.log.tree_size}; the tree is damaged, "
                "restore the database from a backup"
            )
        self.tree = tree

    def drain_once(self) -> BatchResult | None:
        """Run one batch; None when nothing was waiting. On any error the transaction is rolled
        back and the in-memory state reloaded, so a retry starts from what is durable."""
        if time.monotonic() < self._no_outbox_until:
            return None  # the log had no trigger-mode source a moment ago (replication only)
        try:
            return self._batch(self._append_leaves)
        except psycopg.errors.UndefinedTable:
            if self._drain is None:
                raise
            # An outbox dropped since the drain statement was made: make it again, without it.
            self._drain = None
            return self._batch(self._append_leaves)
        except psycopg.errors.ObjectNotInPrerequisiteState:
            if not self._give_outboxes_an_identity():
                raise
            return self._batch(self._append_leaves)

    def _give_outboxes_an_identity(self) -> bool:
        """A publication that publishes deletes lists an outbox of the log (FOR ALL TABLES: a CDC
        tool's), and PostgreSQL refuses the drain's DELETE from a published table without a
        replica identity (found by review: the drain stopped for good). Set FULL on those, only
        then: under wal_level = logical it puts each deleted row in the WAL, which cost the
        drain 7 % of its rate here. Returns whether it set any."""
        names = [f"outbox_{i}" for i in self._outbox_ids]
        try:
            with self.conn.transaction():
                boxes = [box for (box,) in self.conn.execute(
                    "SELECT DISTINCT format('merkle.%%I', t.tablename) FROM pg_publication_tables t "
                    "JOIN pg_publication p ON p.pubname = t.pubname "
                    "JOIN pg_class c ON c.relname = t.tablename AND c.relnamespace = 'merkle'::regnamespace "
                    "WHERE t.schemaname = 'merkle' AND t.tablename = ANY(%s) AND p.pubdelete AND c.relreplident = 'd' "
                    "AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)",
                    (names,))]
                for box in boxes:
                    self.conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(sql.SQL(box)))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ProcessingError(
                f"a publication that publishes deletes lists an outbox of log {self.log_name!r}, which then needs a "
                f"replica identity, and this role may not set it ({str(exc).strip()}): as the outbox's owner, run "
                "ALTER TABLE merkle.outbox_<id> REPLICA IDENTITY FULL for each (SELECT pubname, tablename FROM "
                "pg_publication_tables WHERE schemaname = 'merkle')") from exc
        if boxes:
            log.info("outboxes given REPLICA IDENTITY FULL: a publication publishes their deletes",
                     extra={"log": self.log_name, "outboxes": boxes})
        return bool(boxes)

    def expect_outboxes(self) -> None:
        """The doorbell rang: a trigger-mode source may have been added, look at once."""
        self._no_outbox_until = 0.0

    def outboxes_have_rows(self) -> bool:
        """Whether a batch has work: an outbox of the log holds a row, or its sources changed.
        Looked at without the log's lock, so a quiet poll that finds nothing takes no
        transaction id and no lock (a batch's fence takes both and writes WAL). False for a
        paused log; True when unsure, so that the batch looks."""
        if not self._outbox_ids:
            return True
        query = sql.SQL(
            "SELECT l.paused, array(SELECT source_id FROM merkle.sources s WHERE s.log_id = l.log_id "
            "ORDER BY source_id), {queued} FROM merkle.logs l WHERE l.log_id = %s"
        ).format(queued=sql.SQL(" OR ").join(
            sql.SQL("EXISTS (SELECT 1 FROM {})").format(outbox_name(i)) for i in self._outbox_ids))
        try:
            with self.conn.transaction():
                row = self.conn.execute(query, (self.log.log_id,)).fetchone()
        except psycopg.errors.UndefinedTable:
            return True  # a source removed meanwhile: the batch rebuilds its statement
        if row is None:
            return True  # the log was dropped: the batch says so
        paused, source_ids, queued = row
        return not paused and (tuple(source_ids) != self._sources_key or queued)

    def append_changes(self, changes: ReplicationBatch) -> BatchResult | None:
        """One batch of committed replication transactions: their leaves and the stream's
        progress (end_lsn) in the same transaction (listener/sources/replication_apply.py).
        Acknowledge changes.end_lsn to the server only after this returns. A paused log
        appends nothing (and so nothing is acknowledged)."""
        return self._batch(lambda source_ids, leaves: changes.append(
            self.conn, self.tree.size, self._replication_sources(source_ids), leaves))

    def _batch(self, append_leaves: Callable[[tuple[int, ...], TreeAppend], None]) -> BatchResult | None:
        """`append_leaves(source_ids, leaves)` writes the leaves to processed_log and passes
        their hashes, in seq order, to leaves.extend (see TreeAppend)."""
        if self.tree is None:
            self.load()
        started = time.perf_counter()
        self._more = False
        try:
            with self.conn.transaction():
                source_ids = self._fence()
                first = self.tree.size
                leaves = TreeAppend(self.conn, self.log.log_id, self.tree)
                if source_ids is not None:
                    append_leaves(source_ids, leaves)
                if not leaves.count:
                    return None
                leaves.write_tiles()
                # The notification is delivered at COMMIT: LISTEN merkle_sequenced to follow a log.
                self.conn.execute(
                    "UPDATE merkle.logs SET tree_size = %s, root = %s WHERE log_id = %s "
                    "RETURNING pg_notify('merkle_sequenced', %s)",
                    (self.tree.size, self.tree.root, self.log.log_id,
                     f'{{"log":"{self.log.name}","tree_size":{self.tree.size}}}'),
                )
        except BaseException:
            self.tree = None  # reload from what is durable before the next batch
            raise
        self.log = Log(self.log.log_id, self.log.name, self.log.origin, self.tree.size, self.tree.root, self.log.paused)
        return BatchResult(first, leaves.count, self.tree.size, self.tree.root, time.perf_counter() - started,
                           self._more)

    def drain_all(self) -> int:
        """Drain until the outboxes are empty; returns the number of leaves appended."""
        total = 0
        while (batch := self.drain_once()) is not None:
            total += batch.count
        return total

    # -- steps -----------------------------------------------------------------------------

    def _fence(self) -> tuple[int, ...] | None:
        """Lock the log's row and check it; returns the log's source ids, or None if paused."""
        row = self.conn.execute(
            "SELECT tree_size, root, paused FROM merkle.logs WHERE log_id = %s FOR UPDATE", (self.log.log_id,)
        ).fetchone()
        if row is None:
            raise ProcessingError(f"log {self.log_name!r} was dropped while the listener ran")
        size, root, paused = row
        if size != self.tree.size or root != self.tree.root:
            raise ProcessingError(
                f"log {self.log_name!r} moved under this writer: persisted size {size} root "
                f"{root.hex()}, this writer extends size {self.tree.size} root {self.tree.root.hex()}; "
                "another process wrote to it (is a second listener running without its advisory lock?)"
            )
        # A statement of its own, so its snapshot is taken after the lock: a source added or
        # removed (both lock this row) while we waited is seen.
        rows = self.conn.execute(
            "SELECT source_id, NOT doorbell FROM merkle.sources WHERE log_id = %s ORDER BY source_id",
            (self.log.log_id,)).fetchall()
        self.quiet_sources = any(r[1] for r in rows)
        if paused:
            return None
        return tuple(r[0] for r in rows)

    def _replication_sources(self, source_ids: tuple[int, ...]) -> dict[int, Source]:
        """The log's replication sources by table OID, listed again only when the fence's
        source ids change: a source's row never changes and its id is never reused."""
        if source_ids != self._replication_key:
            self._replication_by_oid = {
                s.table_oid: s for s in list_sources(self.conn, self.log.log_id) if s.mode == "replication"}
            self._replication_key = source_ids
        return self._replication_by_oid

    def _append_leaves(self, source_ids: tuple[int, ...], leaves: TreeAppend) -> None:
        if (source_ids != self._sources_key or self._drain is None
                or self._recheck_at is not None and time.monotonic() >= self._recheck_at):
            # Sources changed (rare): rebuild the drain statement. Registration and removal lock
            # the log's row, which this batch holds, so the set cannot change until COMMIT.
            captured = [s for s in list_sources(self.conn, self.log.log_id) if s.mode == "trigger"]
            # A source whose outbox does not exist (a data-only restore) is left out, with an error:
            # an outbox that is not there holds no change to lose, and failing every batch on it
            # would hold up the log's other sources (and its slot's WAL) for nothing. Looked for
            # again every second; `status` exits 3 meanwhile.
            missing = missing_outboxes(self.conn, captured)
            self._report_missing(missing)
            captured = [s for s in captured if s not in missing]
            self._drain = drain_statement(captured, {s.source_id: self._column_types(s) for s in captured})
            self._outbox_ids = tuple(s.source_id for s in captured)
            self._sources_key = source_ids
        if self._drain is None:
            # No outbox to drain: skip the empty batch transactions for a second.
            self._no_outbox_until = time.monotonic() + NO_OUTBOX_RECHECK
            return
        params = {"log_id": self.log.log_id, "base": self.tree.size, "max_batch": self.max_batch}
        # One bytea of 32-byte hashes in seq order: far cheaper to fetch than a row per leaf.
        with self.conn.cursor(binary=True) as cur:
            packed, self._more = cur.execute(self._drain, params).fetchone()
        if packed is not None:
            leaves.extend([packed[i:i + 32] for i in range(0, len(packed), 32)])

    def _report_missing(self, missing: list[Source]) -> None:
        now = time.monotonic()
        self._recheck_at = now + NO_OUTBOX_RECHECK if missing else None
        reported = {s.source_id: self._missing_reported.get(s.source_id, -MISSING_OUTBOX_REPEAT) for s in missing}
        for s in missing:
            if now - reported[s.source_id] >= MISSING_OUTBOX_REPEAT:
                log.error(missing_capture_message(self.log_name, s),
                          extra={"log": self.log_name, "source": s.qualified})
                reported[s.source_id] = now
        self._missing_reported = reported

    def _column_types(self, source: Source) -> dict[str, int]:
        """Type OIDs of the outbox's columns (those of the source), for cheaper entry SQL."""
        rows = self.conn.execute(
            "SELECT attname, atttypid::integer FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (f"merkle.outbox_{source.source_id}",),
        )
        return dict(rows)


def drain_statement(sources: list[Source], types: dict[int, dict[str, int]]) -> sql.Composed | None:
    """The one statement of step 2 for these trigger-mode sources (None without sources).

    The cutoff takes the first max_batch rows in (stmt_id, ord) order, so a transaction's rows
    keep their order, and a statement of more rows is spread over several batches: the
    memory a batch needs, here and in the server, does not grow with the statement.
    """
    if not sources:
        return None
    own = {s.source_id: outbox_columns(s) for s in sources}
    changes_order = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {} AS stmt_id, {} AS ord FROM {}").format(
            sql.Identifier(own[s.source_id].stmt_id), sql.Identifier(own[s.source_id].ord), outbox_name(s.source_id))
        for s in sources
    )
    deletes = []
    for s in sources:
        o = own[s.source_id]
        if s.entry_column:
            leaf = canonical_sql.leaf_hash_of_bytes_sql(sql.Identifier("o", s.entry_column))
        else:
            entry = canonical_sql.entry_sql("o", s.qualified, s.columns, sql.Identifier("o", o.op), types[s.source_id])
            leaf = canonical_sql.leaf_hash_sql(entry)
        deletes.append(sql.SQL(
            "{name} AS (DELETE FROM {outbox} o WHERE o.{stmt_id} <= (SELECT stmt_id FROM cutoff) "
            "AND (o.{stmt_id} < (SELECT stmt_id FROM cutoff) OR o.{ord} < (SELECT ord FROM cutoff)) "
            "RETURNING {sid}::integer AS source_id, o.{stmt_id} AS stmt_id, o.{ord} AS ord, o.{op} AS op, "
            "{key} AS source_key, {leaf} AS leaf_hash)"
        ).format(
            name=sql.Identifier(f"d{s.source_id}"), outbox=outbox_name(s.source_id),
            sid=sql.Literal(s.source_id), key=canonical_sql.key_sql("o", s.key_columns, types[s.source_id]), leaf=leaf,
            stmt_id=sql.Identifier(o.stmt_id), ord=sql.Identifier(o.ord), op=sql.Identifier(o.op),
        ))
    changes = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT * FROM {}").format(sql.Identifier(f"d{s.source_id}")) for s in sources
    )
    return sql.SQL(
        # One bounded top-N sort over the outboxes' rows: the (max_batch+1)-th is the first one
        # left for the next batch (none: every row is taken).
        "WITH next AS (SELECT stmt_id, ord FROM ({changes_order}) ids ORDER BY stmt_id, ord "
        "OFFSET %(max_batch)s LIMIT 1), "
        "cutoff AS (SELECT coalesce((SELECT stmt_id FROM next), 9223372036854775807) AS stmt_id, "
        "coalesce((SELECT ord FROM next), 0) AS ord), "
        "{deletes}, "
        "changes AS ({changes}), "
        "ins AS (INSERT INTO merkle.processed_log "
        "(log_id, seq, source_id, source_key, op, leaf_hash, change_id, change_ord) "
        "SELECT %(log_id)s, %(base)s + row_number() OVER (ORDER BY stmt_id, ord) - 1, "
        "source_id, source_key, op, leaf_hash, stmt_id, ord FROM changes "
        "RETURNING seq, leaf_hash) "
        "SELECT string_agg(leaf_hash, ''::bytea ORDER BY seq), "
        "(SELECT stmt_id FROM cutoff) < 9223372036854775807 FROM ins"
    ).format(changes_order=changes_order, deletes=sql.SQL(", ").join(deletes), changes=changes)

