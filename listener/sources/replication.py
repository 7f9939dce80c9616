"""The pgoutput stream of one log's slot, read with psycopg's libpq wrapper and anyio.

    START_REPLICATION SLOT merkle_<log> LOGICAL <lsn> (proto_version '1', publication_names ...)

puts the walsender connection in COPY BOTH mode. CopyData payloads are read with
`pgconn.get_copy_data(async_=True)` while anyio waits for the socket; they are decoded by
listener/sources/pgoutput.py and assembled into committed transactions: a transaction is
handed on only when its Commit arrives, so an aborted or half-received one never is. A large
one moves its changes to a temporary file while it arrives (listener/sources/spill.py).

Acknowledgement (Standby Status Update, flush LSN) is the owner's decision: `confirm(lsn)`
after the transaction's leaves are durably committed. A keepalive that arrives while nothing
received is waiting (`may_confirm_idle`) sets `idle_end` to its walEnd and calls `on_idle`:
the owner may store that position and then confirm it, so that an idle slot does not pin WAL.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import psycopg
from psycopg import pq

from listener.errors import DatabaseError, ProcessingError
from listener.sources import pgoutput as po
from listener.sources import spill
from listener.store.connect import open_replication, replication_refusal

if TYPE_CHECKING:
    from listener.sources.replication_apply import Prepared

log = logging.getLogger("listener.replication")

# Send a status update at least this often: well inside wal_sender_timeout (default 60 s).
STATUS_INTERVAL = 10.0
# ... and this often while reading is paused, when the keepalives that ask for a reply (sent
# at half of wal_sender_timeout, whatever the server sets it to) wait unread in the socket.
BACKLOG_STATUS_INTERVAL = 1.0
# Messages decoded between two yields to the event loop; also how often a transaction being
# received is weighed, and spilled to a file once it holds spill.SPILL_BYTES.
YIELD_EVERY = 500
# ... or every this many bytes of messages, whichever comes first: 500 wide rows could
# otherwise pass SPILL_BYTES many times over before they are weighed.
WEIGH_BYTES = 1024 * 1024


@dataclass
class Transaction:
    """A committed source transaction: its changes in order, each with the Relation in effect
    when it was sent. An Insert, Update or Delete stays its undecoded pgoutput message (bytes):
    the consumer decodes only the tables it logs, straight into leaves
    (listener/sources/replication_apply.py); a Truncate is decoded (po.Truncate).
    A large one keeps its first changes in `spilled` (a temporary file) and the rest in
    `changes`: read them all with chunks(). `prepared` is for the consumer: the transaction's
    leaves, when computed ahead of its batch."""

    commit_lsn: int
    end_lsn: int
    commit_time: int  # microseconds since 2000-01-01 UTC
    changes: list[spill.Change] = field(default_factory=list)
    prepared: Prepared | None = None
    spilled: spill.SpilledChanges | None = None

    @property
    def count(self) -> int:
        return len(self.changes) + (self.spilled.count if self.spilled is not None else 0)

    def chunks(self, size: int, max_bytes: int | None = None) -> Iterator[list[spill.Change]]:
        """All the changes in order, `size` at a time, or fewer where those read back from
        the file reach `max_bytes` (see SpilledChanges.chunks)."""
        if self.spilled is not None:
            yield from self.spilled.chunks(size, max_bytes)
        for lo in range(0, len(self.changes), size):
            yield self.changes[lo:lo + size]

    def table_oids(self) -> set[int]:
        """The OIDs of the tables it changes or truncates."""
        oids = set(self.spilled.table_oids) if self.spilled is not None else set()
        for relation, payload in self.changes:
            if type(payload) is po.Truncate:
                oids.update(payload.relation_oids)
            else:
                oids.add(relation.oid if relation is not None else po.relation_oid_of_change(payload))
        return oids

    def spill(self) -> None:
        """Move the changes held in memory to the end of the temporary file."""
        if self.spilled is None:
            self.spilled = spill.SpilledChanges()
        self.spilled.write(self.changes)
        self.changes = []

    def close(self) -> None:
        """Give back the temporary file, if any (once the transaction is appended or dropped)."""
        if self.spilled is not None:
            self.spilled.close()


class ReplicationStream:
    """One START_REPLICATION session. Not reusable: after an error, open a new one.

    Requires the slot and publication to exist. `start_lsn` is the durable position (the
    stored end_lsn); transactions whose end_lsn <= skip_lsn are dropped on arrival.
    """

    def __init__(self, dsn: str, slot: str, publication: str, start_lsn: int, *,
                 on_transaction: Callable[[Transaction], None], may_confirm_idle: Callable[[], bool],
                 on_idle: Callable[[], None] = lambda: None, backlogged: Callable[[], bool] = lambda: False):
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.start_lsn = start_lsn
        self.on_transaction = on_transaction
        self.may_confirm_idle = may_confirm_idle
        self.on_idle = on_idle
        self.backlogged = backlogged
        self.pgconn: pq.PGconn | None = None
        self.confirmed = start_lsn  # highest LSN sent as flushed
        self.received = start_lsn  # highest end_lsn of a transaction handed on
        self.idle_end = start_lsn  # highest walEnd of a keepalive that found nothing waiting
        self._relations: dict[int, po.Relation] = {}
        self._current: Transaction | None = None
        self._weighed = 0  # changes of _current held in memory and already counted in _held
        self._held = 0  # bytes those changes take (see spill.held_bytes)
        self._last_status = 0.0

    # -- connection ----------------------------------------------------------------------

    async def open(self) -> None:
        self.pgconn = await anyio.to_thread.run_sync(self._connect)
        self.pgconn.nonblocking = 1
        lsn = po.int_to_lsn(self.start_lsn)
        pub = self.publication.replace("'", "''")
        query = (f'START_REPLICATION SLOT "{self.slot}" LOGICAL {lsn} '
                 f"(proto_version '1', publication_names '\"{pub}\"')")
        self.pgconn.send_query(query.encode())  # raises psycopg.OperationalError on failure
        await self._flush()
        while True:
            while self.pgconn.is_busy():
                await anyio.wait_readable(self.pgconn.socket)
                self.pgconn.consume_input()
            res = self.pgconn.get_result()
            if res is None:
                raise DatabaseError("START_REPLICATION returned no result")
            if res.status == pq.ExecStatus.COPY_BOTH:
                return
            raise DatabaseError(f"START_REPLICATION on slot {self.slot} failed: {res.get_error_message().strip()}")

    def _connect(self) -> pq.PGconn:
        # The pinned settings make pgoutput's text values the ones trigger mode hashes.
        pgconn = open_replication(self.dsn)
        if pgconn.status != pq.ConnStatus.OK:
            message = replication_refusal(pgconn)
            pgconn.finish()
            raise psycopg.OperationalError(f"replication connection failed: {message}")
        return pgconn

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        if self.pgconn is not None:
            self.pgconn.finish()
            self.pgconn = None

    # -- reading -------------------------------------------------------------------------

    async def run(self) -> None:
        """Read until cancelled or the connection fails (raises psycopg.OperationalError).

        Yields to the event loop every YIELD_EVERY messages or WEIGH_BYTES (the writer
        appends while this decodes) and pauses reading while `backlogged()` (the buffer
        waiting to be appended is full: the server keeps the rest)."""
        pgconn = self.pgconn
        handle = self._handle
        handled = taken = 0  # messages and bytes since the last yield
        drained = False  # the last get_copy_data found libpq's buffer empty
        while True:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                handle(data)
                handled += 1
                taken += nbytes
                drained = False
                if handled >= YIELD_EVERY or taken >= WEIGH_BYTES:
                    handled = taken = 0
                    if self._current is not None:
                        self._weigh()
                    await anyio.lowlevel.checkpoint()
                    while self.backlogged():
                        if time.monotonic() - self._last_status > BACKLOG_STATUS_INTERVAL:
                            await self._send_status(self.confirmed)  # or the server ends the stream
                        await anyio.sleep(0.002)
                continue
            if nbytes == 0 and not drained:
                # Read what the socket already holds before waiting on it: under load it
                # nearly always holds more, and a wait costs two epoll changes and a loop turn.
                pgconn.consume_input()
                drained = True
                continue
            if nbytes == 0:
                drained = False
                await self._flush()
                if time.monotonic() - self._last_status > STATUS_INTERVAL:
                    await self._send_status(self.confirmed)
                with anyio.move_on_after(STATUS_INTERVAL):
                    await anyio.wait_readable(pgconn.socket)
                pgconn.consume_input()  # raises psycopg.OperationalError when the connection is lost
                continue
            res = pgconn.get_result()
            message = res.get_error_message().strip() if res is not None else pgconn.get_error_message().strip()
            raise psycopg.OperationalError(f"replication stream ended: {message or 'server closed the stream'}")

    def _handle(self, data: memoryview) -> None:
        if data[0] == 119:  # 'w' XLogData: the pgoutput message follows its 24-byte header
            payload = bytes(data[25:])
            kind = payload[0]
            if kind == 73 or kind == 85 or kind == 68:  # 'I' / 'U' / 'D': kept undecoded (see Transaction)
                if self._current is None:
                    raise ProcessingError("replication stream: a change outside a transaction; restart the listener")
                self._current.changes.append((self._relations.get(po.relation_oid_of_change(payload)), payload))
            else:
                self._message(po.decode(payload, raw=True))
            return
        frame = po.decode_copy_data(bytes(data))
        if isinstance(frame, po.Keepalive):
            if self._current is None and frame.wal_end > self.idle_end and self.may_confirm_idle():
                self.idle_end = frame.wal_end  # nothing received is waiting: the owner may confirm it
                self.on_idle()
            if frame.reply_requested:
                self._queue_status(self.confirmed)
            return
        self._message(po.decode(frame.payload, raw=True))

    def _weigh(self) -> None:
        """Spill the transaction being received once what it holds in memory reaches SPILL_BYTES."""
        txn = self._current
        self._held += spill.held_bytes(txn.changes, self._weighed)
        self._weighed = len(txn.changes)
        if self._held < spill.SPILL_BYTES:
            return
        if txn.spilled is None:
            log.info("large transaction: its changes go to a temporary file until its leaves are appended",
                     extra={"slot": self.slot, "commit_lsn": po.int_to_lsn(txn.commit_lsn),
                            "changes_so_far": txn.count})
        try:
            txn.spill()
        except OSError as exc:
            # The stream is reopened and the transaction received again from the slot.
            raise ProcessingError(
                f"cannot hold a large transaction's changes in a temporary file in {tempfile.gettempdir()} "
                f"({exc}): free space there, or point TMPDIR at a disk with room for it, and the "
                "listener, which retries, takes it") from exc
        self._weighed = self._held = 0

    def _message(self, msg: po.PgoutputMessage) -> None:
        if isinstance(msg, po.Begin):
            if self._current is not None:
                self._current.close()  # never the case with pgoutput's whole transactions
            self._current = Transaction(msg.final_lsn, 0, msg.commit_time)
            self._weighed = self._held = 0
        elif isinstance(msg, po.Commit):
            txn, self._current = self._current, None
            if txn is None:
                raise ProcessingError("replication stream: Commit without Begin; restart the listener")
            txn.end_lsn = msg.end_lsn
            if msg.end_lsn > self.start_lsn and txn.count:
                self.received = max(self.received, msg.end_lsn)
                if txn.spilled is not None:
                    log.info("large transaction received", extra={
                        "slot": self.slot, "commit_lsn": po.int_to_lsn(txn.commit_lsn), "changes": txn.count,
                        "spilled_mb": round(txn.spilled.size / 1e6)})
                self.on_transaction(txn)
            else:
                txn.close()
        elif isinstance(msg, po.Relation):
            self._relations[msg.oid] = msg
        elif isinstance(msg, po.Truncate):
            self._current.changes.append((None, msg))
        # Type, Origin and Message carry nothing to log.

    # -- acknowledging -------------------------------------------------------------------

    def confirm(self, lsn: int) -> None:
        """Report `lsn` as written and flushed (call only once it is durable in the log)."""
        if self.pgconn is not None and lsn > self.confirmed:
            self._queue_status(lsn)

    def _queue_status(self, lsn: int) -> None:
        lsn = max(lsn, self.confirmed)
        self.pgconn.put_copy_data(po.standby_status(lsn, lsn, lsn, time.time_ns() // 1000))
        self.confirmed = lsn
        self._last_status = time.monotonic()
        # Nonblocking: flush what the socket takes now; run() and _send_status flush the rest.
        if self.pgconn.flush() < 0:
            raise psycopg.OperationalError(f"replication stream lost: {self.pgconn.get_error_message().strip()}")

    async def _send_status(self, lsn: int) -> None:
        self._queue_status(lsn)
        await self._flush()

    async def _flush(self) -> None:
        while (rv := self.pgconn.flush()) == 1:
            await anyio.wait_writable(self.pgconn.socket)
        if rv < 0:
            raise psycopg.OperationalError(f"replication stream lost: {self.pgconn.get_error_message().strip()}")
