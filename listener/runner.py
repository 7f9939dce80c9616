"""`merkle-listener run`: one sequencer task per log, woken by the outbox doorbell.

Task layout (one anyio task group):

    doorbell   LISTEN merkle_outbox; a NOTIFY with a log's name wakes that log's task
    supervisor finds logs (at start and every few seconds) and starts a writer task for each
    writer[L]  takes log L's advisory lock (else waits as a hot standby), then drains on the
               doorbell, at start-up and on a periodic safety poll

Batches run in worker threads on the writer's own synchronous connection; a batch is never
abandoned halfway (cancellation waits for it). Correctness never depends on the doorbell.
Connection failures are retried with backoff; the advisory lock is retaken after reconnecting.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import anyio
import psycopg

from listener.errors import MerkleListenerError, ProcessingError
from listener.sequencer import Sequencer
from listener.sources.replication_feed import ReplicationFeed
from listener.sources.trigger import DOORBELL_CHANNEL
from listener.store.connect import options_string

log = logging.getLogger("listener.run")

# Advisory lock namespace of log writers: pg_try_advisory_lock(WRITER_LOCK_CLASS, log_id).
WRITER_LOCK_CLASS = 0x4D4C


@dataclass
class RunOptions:
    dsn: str
    logs: list[str] | None = None  # None: every log
    poll_interval: float = 1.0
    standby_interval: float = 0.5
    rescan_interval: float = 5.0
    max_batch: int = 20_000


@dataclass
class _Wakeups:
    events: dict[str, anyio.Event] = field(default_factory=dict)

    def arm(self, name: str) -> anyio.Event:
        ev = self.events[name] = anyio.Event()
        return ev

    def ring(self, name: str | None = None) -> None:
        for key, ev in self.events.items():
            if name is None or key == name:
                ev.set()


def connect(dsn: str, *, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=autocommit, options=options_string(), application_name="merkle-listener")


async def run(opts: RunOptions, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    """Run until cancelled."""
    wakeups = _Wakeups()
    async with anyio.create_task_group() as tg:
        await tg.start(_doorbell, opts, wakeups)
        await tg.start(_supervise, opts, wakeups, tg)
        task_status.started()


async def _doorbell(opts: RunOptions, wakeups: _Wakeups, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    started = False
    backoff = _Backoff()
    while True:
        try:
            aconn = await psycopg.AsyncConnection.connect(opts.dsn, autocommit=True, application_name="merkle-listener")
            async with aconn:
                await aconn.execute(f"LISTEN {DOORBELL_CHANNEL}")
                backoff.reset()
                wakeups.ring()  # anything missed while not listening is drained now
                if not started:
                    started = True
                    task_status.started()
                async for note in aconn.notifies():
                    wakeups.ring(note.payload)
        except psycopg.OperationalError as exc:
            log.warning("doorbell connection lost; writers keep polling", extra={"error": str(exc)})
            if not started:
                started = True
                task_status.started()
            await backoff.sleep()


async def _supervise(opts: RunOptions, wakeups: _Wakeups, tg, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    running: set[str] = set()
    backoff = _Backoff()
    first = True
    while True:
        try:
            names = await anyio.to_thread.run_sync(_log_names, opts.dsn)
            backoff.reset()
        except psycopg.OperationalError as exc:
            log.warning("cannot list logs; retrying", extra={"error": str(exc)})
            await backoff.sleep()
            continue
        if opts.logs is not None:
            missing = set(opts.logs) - set(names)
            if missing and first:
                raise ProcessingError(f"no such log(s): {', '.join(sorted(missing))} (see `merkle-listener status`)")
            names = [n for n in names if n in opts.logs]
        for name in names:
            if name not in running:
                running.add(name)
                tg.start_soon(_writer, opts, wakeups, name)
        if first:
            first = False
            task_status.started()
        await anyio.sleep(opts.rescan_interval)


def _log_names(dsn: str) -> list[str]:
    with connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM merkle.logs ORDER BY name")]


async def _writer(opts: RunOptions, wakeups: _Wakeups, name: str) -> None:
    backoff = _Backoff()
    while True:
        conn = None
        try:
            conn = await anyio.to_thread.run_sync(connect, opts.dsn)
            await _become_writer(conn, name, opts)
            seq = Sequencer(conn, name, max_batch=opts.max_batch)
            await anyio.to_thread.run_sync(seq.load)
            log.info("writer for log", extra={"log": name, "tree_size": seq.tree.size, "root": seq.tree.root.hex()})
            backoff.reset()
            # Replication-mode sources of the log stream through this feed (idle without them).
            async with ReplicationFeed(opts.dsn, name, lambda: wakeups.ring(name),
                                       recheck_interval=opts.poll_interval) as feed:
                while True:
                    wake = wakeups.arm(name)
                    while (batch := await anyio.to_thread.run_sync(seq.drain_once)) is not None:
                        _log_batch(name, batch)
                    while (batch := await feed.apply(seq)) is not None:
                        _log_batch(name, batch)
                    with anyio.move_on_after(opts.poll_interval):
                        await wake.wait()
        except psycopg.OperationalError as exc:
            log.warning("database connection lost; reconnecting", extra={"log": name, "error": str(exc)})
        except MerkleListenerError as exc:
            log.error("writer stopped on error; retrying", extra={"log": name, "error": str(exc)})
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(conn.close)
        await backoff.sleep()


def _log_batch(name: str, batch) -> None:
    log.info(
        "batch sequenced",
        extra={"log": name, "seq_first": batch.first_seq, "seq_last": batch.first_seq + batch.count - 1,
               "tree_size": batch.tree_size, "ms": round(batch.seconds * 1000, 2)},
    )


async def _become_writer(conn: psycopg.Connection, name: str, opts: RunOptions) -> None:
    announced = False
    while not await anyio.to_thread.run_sync(_try_lock, conn, name):
        if not announced:
            log.info("another listener writes this log; waiting as hot standby", extra={"log": name})
            announced = True
        await anyio.sleep(opts.standby_interval)


def _try_lock(conn: psycopg.Connection, name: str) -> bool:
    with conn.transaction():
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, log_id) FROM merkle.logs WHERE name = %s", (WRITER_LOCK_CLASS, name)
        ).fetchone()
    if row is None:
        raise ProcessingError(f"log {name!r} does not exist")
    return row[0]


class _Backoff:
    def __init__(self, first: float = 0.2, cap: float = 10.0):
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await anyio.sleep(self.delay * (0.5 + random.random()))
        self.delay = min(self.cap, self.delay * 2)
