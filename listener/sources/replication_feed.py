"""A log writer's replication feed: the stream session, its buffer, and exactly-once apply.

Owned by the log's writer task (listener/runner.py), which holds the log's advisory lock:

    session task   while the log has replication sources and its slot exists, streams from
                   the durable position (merkle.replication_progress.end_lsn); each committed
                   transaction goes to the buffer and wakes the writer. A slot that is
                   missing or lost is reported as an error (nothing is captured meanwhile)
    apply()        called by the writer: appends buffered transactions in one fenced batch
                   (Sequencer.append_changes), then confirms the stored end_lsn to the server;
                   when nothing is waiting, stores the position the stream has passed (a
                   keepalive's walEnd) and then confirms that, so a quiet slot pins little WAL

The slot's confirmed position therefore never passes the stored end_lsn by the listener's
doing; a session that finds it past (pg_replication_slot_advance, another client streaming the
slot) does not stream, and says why: the transactions in between would be skipped unseen.

A transaction's leaves are computed when it arrives (replication_apply.prepare, with the
sources as last read: at session start or by the last batch), on the event loop while the
writer's thread waits for the database: hashing overlaps the previous batch's writes. The batch checks the sources again
under the log's lock and recomputes what was prepared for others.

Ownership: the buffer, `_in_flight` and `_generation` are touched only from the event loop;
the batch itself runs in a worker thread on the writer's connection. `_sources` and `_log_id`
are replaced whole (a worker thread does so at session start) and only read on arrival: a
stale value costs a second prepare in the batch, never a wrong leaf. A new session (after any
error) clears the buffer and bumps the generation, so a batch that was in flight neither trims
the new buffer nor confirms on the new stream; whatever the new session receives again is
skipped by the end_lsn check inside the batch transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import psycopg

from listener.errors import MerkleListenerError
from listener.registry import Source, list_sources, named_now
from listener.sequencer import BatchResult, Sequencer
from listener.sources import publication, slot_health
from listener.sources.names import quote_ident
from listener.sources.pgoutput import int_to_lsn, lsn_to_int
from listener.sources.replication import ReplicationStream, Transaction
from listener.sources.replication_apply import ReplicationBatch, prepare
from listener.store.connect import KeptConnection

log = logging.getLogger("listener.replication")

MAX_CHANGES_PER_BATCH = 20_000
# The stream stops reading while this many received changes wait to be appended.
MAX_BUFFERED_CHANGES = 3 * MAX_CHANGES_PER_BATCH
# Larger transactions are left for the writer's thread to prepare: hashing them on arrival
# would hold up the event loop for too long.
PREPARE_ON_ARRIVAL_MAX = 5_000
# A slot missing or lost this long (not a registration between its two steps) is reported as
# an error, again every SLOT_PROBLEM_REPEAT seconds while it lasts.
SLOT_PROBLEM_GRACE = 2.0
SLOT_PROBLEM_REPEAT = 60.0
# How often a streaming log checks that its publication is as merkle-listener made it.
PUBLICATION_CHECK_INTERVAL = 10.0
# An idle position is stored (one small UPDATE) at most this often, and only once it is this
# far past the confirmed one (or a `source remove` waits for it): a quiet slot pins less WAL
# than that, and the WAL an idle server writes on its own (the store itself, the background
# writer's running-transactions records, checkpoints) never adds up to a store of its own.
IDLE_CONFIRM_INTERVAL = 0.5
IDLE_CONFIRM_MIN_BYTES = 64 * 1024


class ReplicationFeed:
    def __init__(self, dsn: str, log_name: str, wake: Callable[[], None], *, recheck_interval: float = 1.0):
        self.dsn = dsn
        self.log_name = log_name
        self.wake = wake
        self.recheck_interval = recheck_interval
        self.stream: ReplicationStream | None = None
        self._buffer: list[Transaction] = []
        self._buffered_changes = 0
        self._in_flight = False
        self._batch_txns: list[Transaction] = []  # those of the batch in flight
        self._generation = 0
        self._last_empty_check = 0.0
        self._log_id: int | None = None
        self._sources: dict | None = None  # replication sources as last read (session start or batch)
        self._tg: anyio.abc.TaskGroup | None = None
        self._probe = KeptConnection(dsn)  # for the periodic "is there a slot?" question
        # (message, first seen, last reported) while the log's slot is missing, lost or moved
        self._slot_problem: tuple[str, float, float] | None = None
        self._privilege_reported = -SLOT_PROBLEM_REPEAT  # when a missing REPLICATION privilege was last logged
        self._publication_checked = 0.0
        self._publication_reported = -SLOT_PROBLEM_REPEAT  # when a publication changed by hand was last logged
        self._last_idle_store = 0.0
        self._idle_tried = 0  # the last idle position considered (a new keepalive brings the next)
        self._received_count = 0  # transactions received, in all sessions

    async def __aenter__(self) -> ReplicationFeed:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._sessions)
        return self

    async def __aexit__(self, *exc) -> bool:
        # The session task only ends by this cancellation; the writer's own exception (if
        # any) propagates as is, not wrapped in an exception group.
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._drop_buffer()  # gives back the temporary files of spilled transactions
        await anyio.to_thread.run_sync(self._probe.close)
        return False

    # -- the writer's side -----------------------------------------------------------------

    async def apply(self, seq: Sequencer) -> BatchResult | None:
        """Append what is buffered; None when nothing (more) could be appended now. With an
        empty buffer, about once per recheck interval, appends ready backfills."""
        if self.stream is not None:
            await self._check_publication(seq)
        while True:
            if not self._buffer:
                await self._confirm_idle(seq)
                # No stream (a log without replication sources): nothing to append.
                if self.stream is None or time.monotonic() - self._last_empty_check < self.recheck_interval:
                    return None
                self._last_empty_check = time.monotonic()
                # Looked at without the fenced batch, whose lock on the log's row writes WAL.
                if not await anyio.to_thread.run_sync(_backfill_ready, seq.conn, seq.log.log_id):
                    return None
            txns, count = [], 0
            for txn in self._buffer:
                txns.append(txn)
                count += txn.count
                if count >= MAX_CHANGES_PER_BATCH:
                    break
            generation = self._generation
            self._log_id = seq.log.log_id  # the writer loaded seq before the feed started
            batch = ReplicationBatch(self._log_id, txns)
            self._in_flight = True
            self._batch_txns = txns
            try:
                result = await anyio.to_thread.run_sync(seq.append_changes, batch)
            finally:
                self._in_flight = False
                self._batch_txns = []
                if generation != self._generation:
                    for txn in txns:  # a new session dropped them, but not while this batch read them
                        txn.close()
            if batch.sources is not None:
                self._sources = batch.sources
            if batch.backfill_left:
                self._last_empty_check = 0.0  # the next batch takes more of it at once
            # Durable from here: trim and acknowledge (the server may now recycle that WAL).
            if generation == self._generation:
                for txn in self._buffer[:batch.consumed]:
                    self._buffered_changes -= txn.count
                    txn.close()
                del self._buffer[:batch.consumed]
                if batch.end_lsn and self.stream is not None:
                    self.stream.confirm(batch.end_lsn)
            if result is not None:
                return result
            if batch.consumed == 0 or not self._buffer:
                return None

    async def _check_publication(self, seq: Sequencer) -> None:
        """Every PUBLICATION_CHECK_INTERVAL, whether the log's publication was changed by hand: an
        error (once a minute while it lasts), since what it let through is lost; streaming goes
        on for the sources it still sends."""
        now = time.monotonic()
        if now - self._publication_checked < PUBLICATION_CHECK_INTERVAL:
            return
        self._publication_checked = now
        problems, sources = await anyio.to_thread.run_sync(_publication_drift, seq.conn, self.log_name,
                                                           seq.log.log_id)
        if not problems:
            self._publication_reported = -SLOT_PROBLEM_REPEAT
        elif now - self._publication_reported >= SLOT_PROBLEM_REPEAT:
            log.error(slot_health.publication_message(self.log_name, problems, sources), extra={"log": self.log_name})
            self._publication_reported = now

    async def _confirm_idle(self, seq: Sequencer) -> None:
        """Store, then confirm, the position a keepalive said the stream has passed while
        nothing received was waiting: every transaction ending at or before it is in the log
        or had nothing for it. Only once it is IDLE_CONFIRM_MIN_BYTES past the confirmed
        position, unless a `source remove` waits for the slot to pass its own."""
        stream = self.stream
        if stream is None or stream.idle_end <= max(stream.confirmed, self._idle_tried) or self._in_flight:
            return
        if time.monotonic() - self._last_idle_store < IDLE_CONFIRM_INTERVAL:
            return
        self._last_idle_store = time.monotonic()
        target = self._idle_tried = stream.idle_end
        self._in_flight = True
        try:
            stored = await anyio.to_thread.run_sync(
                _store_idle_position, seq.conn, seq.log.log_id, target,
                target - stream.confirmed >= IDLE_CONFIRM_MIN_BYTES)
        finally:
            self._in_flight = False
        if stored and self.stream is stream:
            stream.confirm(target)

    def _idle(self) -> bool:
        return not self._buffer and not self._in_flight

    def _received(self, txn: Transaction) -> None:
        if self._sources is not None and txn.spilled is None and len(txn.changes) <= PREPARE_ON_ARRIVAL_MAX:
            try:
                txn.prepared = prepare(txn, self._sources, self._log_id)
            except Exception:  # noqa: BLE001 - with sources that may be stale: the batch decides
                pass  # the batch prepares it again and stops the log with any error that remains
        self._buffer.append(txn)
        self._received_count += 1
        self._buffered_changes += txn.count  # a spilled one too: that bounds the disk it takes
        self.wake()

    def _drop_buffer(self) -> None:
        """Forget what was received and not appended (a new session receives it again)."""
        self._generation += 1
        in_flight = {id(t) for t in self._batch_txns}  # closed when their batch ends
        for txn in self._buffer:
            if id(txn) not in in_flight:
                txn.close()
        self._buffer.clear()
        self._buffered_changes = 0

    def _backlogged(self) -> bool:
        return self._buffered_changes >= MAX_BUFFERED_CHANGES

    # -- the session task ------------------------------------------------------------------

    async def _sessions(self) -> None:
        delay = 0.2
        announced = False
        while True:
            try:
                start = await anyio.to_thread.run_sync(self._durable_position)
            except psycopg.OperationalError as exc:
                log.warning("cannot read replication progress; retrying", extra={"log": self.log_name, "error": str(exc)})
                await anyio.sleep(delay)
                continue
            if start is None:
                announced = False
                self._report_slot_problem()
                await anyio.sleep(self.recheck_interval)
                continue
            self._drop_buffer()
            stream = ReplicationStream(
                self.dsn, publication.slot_name(self.log_name), publication.publication_name(self.log_name), start,
                on_transaction=self._received, may_confirm_idle=self._idle, on_idle=self.wake,
                backlogged=self._backlogged)
            interrupted = "the stream ended"
            received, opened = self._received_count, None
            try:
                await stream.open()
                opened = time.monotonic()
                self._privilege_reported = -SLOT_PROBLEM_REPEAT
                self.stream = stream
                if not announced:
                    log.info("replication stream open", extra={"log": self.log_name, "slot": stream.slot,
                                                               "start_lsn": f"{start >> 32:X}/{start & 0xFFFFFFFF:X}"})
                    announced = True
                await stream.run()
            except (psycopg.OperationalError, MerkleListenerError) as exc:
                interrupted = str(exc)
                announced = False
            finally:
                self.stream = None
                stream.close()
            # A session that got somewhere (a transaction, or a long quiet stream) reopens at
            # once, as after a server restart; one that fails again on the same transaction
            # (a full disk under its spill file, say) backs off: each try makes the server
            # decode it again.
            if self._received_count > received or (opened is not None and time.monotonic() - opened > 10.0):
                delay = 0.2
            await anyio.sleep(delay)
            # Looked at after the pause: a `source remove` of the log's last replication source
            # drops the slot (which ends the stream) just before it commits.
            if opened is None and (lacking := await anyio.to_thread.run_sync(self._lacking_privilege)):
                # Retrying cannot help until someone grants it: an error, with the fix, once a
                # minute while it lasts.
                if time.monotonic() - self._privilege_reported >= SLOT_PROBLEM_REPEAT:
                    log.error(lacking, extra={"log": self.log_name})
                    self._privilege_reported = time.monotonic()
            elif await anyio.to_thread.run_sync(self._has_replication_sources):
                log.warning("replication stream interrupted; reopening from the stored position",
                            extra={"log": self.log_name, "error": interrupted})
            else:
                log.info("replication stream closed: the log has no replication source left",
                         extra={"log": self.log_name})
            delay = min(5.0, delay * 2)

    def _lacking_privilege(self) -> str | None:
        """Why the stream cannot open when the listener's role may not stream at all (REPLICATION
        revoked since `source add` checked it), with the fix; else None."""
        try:
            role, allowed = self._probe.get().execute(
                "SELECT current_user, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        except psycopg.Error:
            return None
        if allowed:
            return None
        return (f"role {role!r} lacks the REPLICATION privilege, so the changes of log {self.log_name!r}'s replication "
                f"sources cannot be streamed (they wait in the slot): as a superuser, ALTER ROLE "
                f"{quote_ident(role)} REPLICATION; the listener retries until then")

    def _has_replication_sources(self) -> bool:
        """True also when that cannot be told (the server is down, say)."""
        try:
            conn = self._probe.get()
            return conn.execute(
                "SELECT EXISTS (SELECT 1 FROM merkle.replication_progress p JOIN merkle.logs l USING (log_id) "
                "WHERE l.name = %s)", (self.log_name,)).fetchone()[0]
        except psycopg.Error:
            return True

    def _report_slot_problem(self) -> None:
        """Say it in the listener's log, not only in `status`: nothing is captured meanwhile."""
        if self._slot_problem is None:
            return
        message, since, reported = self._slot_problem
        now = time.monotonic()
        if now - since >= SLOT_PROBLEM_GRACE and now - reported >= SLOT_PROBLEM_REPEAT:
            log.error(message, extra={"log": self.log_name, "slot": publication.slot_name(self.log_name)})
            self._slot_problem = (message, since, now)

    def _durable_position(self) -> int | None:
        """The stored end_lsn, or None when the log has no slot to stream from, or one that
        was moved past it. Also reads the log's replication sources, so that transactions are
        prepared on arrival from the start (the batch checks them again under the log's lock)."""
        conn = self._probe.get()
        # The slot first: no stream is open now, so it cannot move before end_lsn is read.
        slot = conn.execute(
            "SELECT s.wal_status, s.confirmed_flush_lsn::text FROM merkle.replication_progress p "
            "JOIN merkle.logs l USING (log_id) JOIN pg_replication_slots s "
            "ON s.slot_name = p.slot_name AND s.database = current_database() WHERE l.name = %s",
            (self.log_name,)).fetchone()
        row = conn.execute(
            "SELECT p.end_lsn::text, l.log_id, p.slot_checked FROM merkle.replication_progress p "
            "JOIN merkle.logs l USING (log_id) WHERE l.name = %s", (self.log_name,)).fetchone()
        problem = None
        sources = [s for s in list_sources(conn, row[1]) if s.mode == "replication"] if row is not None else []
        named = named_now(conn, sources)  # for messages only: a leaf names the table as registered
        if row is not None and slot is None:
            problem = slot_health.absent_message(conn, self.log_name, named)
        elif row is not None and slot[0] == "lost":
            problem = slot_health.lost_message(self.log_name, row[0], named)
        elif row is not None and slot[1] is not None and lsn_to_int(slot[1]) > lsn_to_int(row[0]):
            if row[2] and row[0] != "0/0":
                problem = slot_health.ahead_message(self.log_name, row[0], slot[1], named)
            else:
                # Never streamed yet, or stored by a version that confirmed idle positions
                # without storing them: the slot's position is the log's own.
                row = (self._take_slot_position(conn, row[1], slot[1]), row[1], True)
        elif row is not None and not row[2]:
            conn.execute("UPDATE merkle.replication_progress SET slot_checked = true WHERE log_id = %s", (row[1],))
        if problem is None:
            self._slot_problem = None
        elif self._slot_problem is None or self._slot_problem[0] != problem:
            self._slot_problem = (problem, time.monotonic(), 0.0)
        if row is None or problem is not None:
            return None
        self._log_id = row[1]
        self._sources = {s.table_oid: s for s in sources}
        return lsn_to_int(row[0])

    def _take_slot_position(self, conn: psycopg.Connection, log_id: int, confirmed: str) -> str:
        with conn.transaction():
            conn.execute("SELECT 1 FROM merkle.logs WHERE log_id = %s FOR UPDATE", (log_id,))  # batches wait
            end_lsn = conn.execute(
                "UPDATE merkle.replication_progress SET end_lsn = greatest(end_lsn, %s::pg_lsn), slot_checked = true "
                "WHERE log_id = %s RETURNING end_lsn::text", (confirmed, log_id)).fetchone()[0]
        log.info("replication position taken from the slot", extra={"log": self.log_name, "end_lsn": end_lsn})
        return end_lsn


def _store_idle_position(conn: psycopg.Connection, log_id: int, lsn: int, far_enough: bool) -> bool:
    """On the writer's connection: raise the stored end_lsn to `lsn` when it is `far_enough`
    past the confirmed position or a retired source waits for the slot to pass its until_lsn
    (a statement that updates nothing writes no WAL). Returns whether it was stored."""
    with conn.transaction():
        return conn.execute(
            "UPDATE merkle.replication_progress p SET end_lsn = %(lsn)s::pg_lsn, updated_at = now() "
            "WHERE log_id = %(log)s AND end_lsn < %(lsn)s::pg_lsn AND (%(far)s OR EXISTS ("
            "SELECT 1 FROM merkle.replication_retired r JOIN merkle.sources s USING (source_id) "
            "WHERE s.log_id = p.log_id AND r.until_lsn > p.end_lsn)) RETURNING 1",
            {"lsn": int_to_lsn(lsn), "log": log_id, "far": far_enough}).fetchone() is not None


def _publication_drift(conn: psycopg.Connection, log_name: str, log_id: int) -> tuple[list[str], list[Source]]:
    """What publication.drift finds, and the log's replication sources under their current names."""
    with conn.transaction():
        problems = publication.drift(conn, log_name, log_id)
        if not problems:
            return problems, []
        return problems, named_now(conn, [s for s in list_sources(conn, log_id) if s.mode == "replication"])


def _backfill_ready(conn: psycopg.Connection, log_id: int) -> bool:
    with conn.transaction():
        return conn.execute(
            "SELECT EXISTS (SELECT 1 FROM merkle.replication_backfill_state b JOIN merkle.sources s USING (source_id) "
            "WHERE s.log_id = %s AND b.ready)", (log_id,)).fetchone()[0]
