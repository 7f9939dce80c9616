"""`merkle-listener run`: one sequencer task per log, woken by the outbox doorbell.

Task layout (one anyio task group):

    doorbell   LISTEN merkle_outbox; a NOTIFY with a log's name wakes that log's task
    supervisor finds logs (at start and every few seconds) and starts a writer task for each
    writer[L]  takes log L's advisory lock (else waits as a hot standby), then drains on the
               doorbell, at start-up and on a periodic safety poll (every 0.1 s while a
               source of the log rings no doorbell)

Batches run in worker threads on the writer's own synchronous connection; a batch is never
abandoned halfway (cancellation waits for it). Correctness never depends on the doorbell.
Connection failures are retried with backoff; the advisory lock is retaken after reconnecting.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import anyio
import psycopg

from listener.errors import ConfigurationError, MerkleListenerError, ProcessingError
from listener.registry import forget_writer_error
from listener.sequencer import DEFAULT_MAX_BATCH, QUIET_POLL_INTERVAL, Sequencer
from listener.sources.replication_feed import ReplicationFeed
from listener.sources.trigger import DOORBELL_CHANNEL
from listener.store.connect import RUN_SEARCH_PATH, KeptConnection, open_session, options_string

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
    max_batch: int = DEFAULT_MAX_BATCH
    # Deleted outbox rows are dead tuples that every drain's scan reads until a VACUUM; autovacuum
    # wakes up only once a minute, so the janitor vacuums after this many drained rows.
    vacuum_every_rows: int = 5_000
    janitor_interval: float = 1.0
    # -- checkpoints (listener/store/checkpoints.py); no signer: none are published
    signer: object | None = None  # listener.note.Signer
    state_dir: object | None = None  # pathlib.Path: the signer's memory of what it published
    checkpoint_interval: float = 1.0  # seconds: at most one checkpoint per log per interval
    # -- HTTP API served next to the writers (listener/api), "host:port"
    http: str | None = None


@dataclass
class _Drained:
    """Rows drained per log since its outboxes were last vacuumed (the writer adds, the janitor resets)."""
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class _Wakeups:
    events: dict[str, anyio.Event] = field(default_factory=dict)
    # Logs whose outbox doorbell rang (not the replication feed's wake-up) since last taken.
    outbox_rung: set[str] = field(default_factory=set)

    def arm(self, name: str) -> anyio.Event:
        ev = self.events[name] = anyio.Event()
        return ev

    def ring(self, name: str | None = None, *, outbox: bool = False) -> None:
        for key, ev in self.events.items():
            if name is None or key == name:
                ev.set()
                if outbox:
                    self.outbox_rung.add(key)

    def take_outbox_ring(self, name: str) -> bool:
        if name in self.outbox_rung:
            self.outbox_rung.discard(name)
            return True
        return False


def connect(dsn: str, *, autocommit: bool = False, search_path: str | None = None) -> psycopg.Connection:
    return open_session(dsn, autocommit=autocommit, search_path=search_path)


# The interpreter's thread switch interval while running. A writer's batch runs in a worker
# thread and needs the interpreter lock back after every database round trip, while the event
# loop's thread decodes and hashes the replication stream without pause: at the default 5 ms,
# each of a batch's ~10 round trips waited up to that long (measured: BEGIN + fence 23 ms per
# batch, 3-5 ms at 1 ms; end to end +9 to +29 % in alternating runs).
SWITCH_INTERVAL = 0.001


async def run(opts: RunOptions, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    """Run until cancelled."""
    wakeups = _Wakeups()
    drained = _Drained()
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_doorbell, opts, wakeups)
            await tg.start(_supervise, opts, wakeups, drained, tg)
            tg.start_soon(_summarizer, opts)
            if opts.http:
                from listener.api.server import serve_http

                await tg.start(serve_http, opts.dsn, opts.http)
            task_status.started()
    finally:
        sys.setswitchinterval(previous)


async def _doorbell(opts: RunOptions, wakeups: _Wakeups, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    started = False
    backoff = _Backoff()
    while True:
        try:
            aconn = await psycopg.AsyncConnection.connect(opts.dsn, autocommit=True, options=options_string(),
                                                          application_name="merkle-listener")
            async with aconn:
                await aconn.execute(f"LISTEN {DOORBELL_CHANNEL}")
                backoff.reset()
                wakeups.ring(outbox=True)  # anything missed while not listening is drained now
                if not started:
                    started = True
                    task_status.started()
                async for note in aconn.notifies():
                    wakeups.ring(note.payload, outbox=True)
        except psycopg.OperationalError as exc:
            log.warning("doorbell connection lost; writers keep polling", extra={"error": str(exc)})
            if not started:
                started = True
                task_status.started()
            await backoff.sleep()


async def _supervise(opts: RunOptions, wakeups: _Wakeups, drained: _Drained, tg, *,
                     task_status=anyio.TASK_STATUS_IGNORED) -> None:
    running: set[str] = set()
    backoff = _Backoff()
    first = True
    probe = KeptConnection(opts.dsn)
    while True:
        try:
            names = await anyio.to_thread.run_sync(_log_names, probe)
            backoff.reset()
        except psycopg.OperationalError as exc:
            log.warning("cannot list logs; retrying", extra={"error": str(exc)})
            await backoff.sleep()
            continue
        if opts.logs is not None:
            missing = set(opts.logs) - set(names)
            if missing and first:
                raise ConfigurationError(f"no such log(s): {', '.join(sorted(missing))} (see `merkle-listener log list`)")
            names = [n for n in names if n in opts.logs]
        for name in names:
            if name not in running:
                running.add(name)
                tg.start_soon(_serve_log, opts, wakeups, drained, name, running)
        if first:
            first = False
            if not names:  # else a newcomer's first `run` sits silent
                log.info("no logs yet: create one with `merkle-listener log create NAME`; it is picked up "
                         "within seconds", extra={"rescan_interval": opts.rescan_interval})
            task_status.started()
        await anyio.sleep(opts.rescan_interval)


def _log_names(probe: KeptConnection) -> list[str]:
    try:
        return [r[0] for r in probe.get().execute("SELECT name FROM merkle.logs ORDER BY name")]
    except psycopg.OperationalError:
        probe.close()
        raise


async def _serve_log(opts: RunOptions, wakeups: _Wakeups, drained: _Drained, name: str, running: set[str]) -> None:
    """The log's writer and janitor, until the log is dropped (a log created again under the
    same name is found by the next rescan)."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_janitor, opts, drained, name)
            await _writer(opts, wakeups, drained, name)
            tg.cancel_scope.cancel()
    finally:
        running.discard(name)


async def _writer(opts: RunOptions, wakeups: _Wakeups, drained: _Drained, name: str) -> None:
    """Write the log until it is dropped; every other trouble is retried."""
    backoff = _Backoff()
    errors = _WriterErrors(opts.dsn, name)
    while True:
        conn = None
        errors.attempt()
        try:
            conn = await anyio.to_thread.run_sync(partial(connect, opts.dsn, search_path=RUN_SEARCH_PATH))
            await _become_writer(conn, name, opts)
            errors.attempt()  # again: a wait for another listener's writer lock is not the retry's time
            seq = Sequencer(conn, name, max_batch=opts.max_batch)
            await anyio.to_thread.run_sync(seq.load)
            log.info("writer for log", extra={"log": name, "tree_size": seq.tree.size,
                                              "root": b64encode(seq.tree.root).decode()})
            cps = _Checkpoints(opts, conn, name)
            # Replication-mode sources of the log stream through this feed (idle without them).
            async with ReplicationFeed(opts.dsn, name, lambda: wakeups.ring(name),
                                       recheck_interval=opts.poll_interval) as feed:
                look_first = False
                last_drain = anyio.current_time()
                while True:
                    # Armed before draining: a doorbell that rings during the batch wakes us at once.
                    wake = wakeups.arm(name)
                    # Alternate one batch of each capture path, so neither starves the other.
                    if wakeups.take_outbox_ring(name):
                        seq.expect_outboxes()  # a source may have been added: look now, not in a second
                        look_first = False
                    while True:
                        if look_first and not await anyio.to_thread.run_sync(seq.outboxes_have_rows):
                            drained_batch = None
                        else:
                            drained_batch = await anyio.to_thread.run_sync(seq.drain_once)
                            last_drain = anyio.current_time()
                        look_first = False
                        if drained_batch is not None:
                            _log_batch(name, drained_batch)
                            drained.rows[name] = drained.rows.get(name, 0) + drained_batch.count
                            await cps.maybe_publish()
                        streamed_batch = await feed.apply(seq)  # at most one appended batch
                        if streamed_batch is not None:
                            _log_batch(name, streamed_batch)
                            await cps.maybe_publish()
                        if drained_batch is not None or streamed_batch is not None:
                            errors.progressed()
                            backoff.reset()  # only progress resets it: a wedged log keeps backing off
                        if streamed_batch is None and (drained_batch is None or not drained_batch.more):
                            break
                    await errors.running(conn)
                    await cps.maybe_publish()
                    poll = min(opts.poll_interval, QUIET_POLL_INTERVAL) if seq.quiet_sources else opts.poll_interval
                    with anyio.move_on_after(cps.wait_limit(poll)):
                        await wake.wait()
                    # Between safety polls, a quiet poll that nothing rang for looks before it locks.
                    look_first = (not wake.is_set() and seq.quiet_sources
                                  and anyio.current_time() - last_drain < opts.poll_interval)
        except psycopg.errors.QueryCanceled as exc:  # an OperationalError, but the connection is fine
            log.warning("a statement of the writer was cancelled (pg_cancel_backend, or a timeout set in the "
                        "statement); retrying", extra={"log": name, "error": str(exc).strip()})
        except psycopg.OperationalError as exc:
            if exc.sqlstate and not exc.sqlstate.startswith(("08", "57")):
                # The server refused a statement: the connection is fine, and retrying helps only
                # once the cause is gone.
                log.error("writer stopped on error; retrying", extra={"log": name, "error": str(exc).strip()})
                await errors.stopped(exc)
            else:
                log.warning("database connection lost; reconnecting", extra={"log": name, "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one log's trouble must not stop the others
            if await anyio.to_thread.run_sync(_log_dropped, opts.dsn, name):
                log.warning("log dropped; its writer stops", extra={"log": name})
                return
            # The batch was rolled back and the state will be reloaded: nothing is lost by retrying.
            log.error("writer stopped on error; retrying", exc_info=not isinstance(exc, (MerkleListenerError, psycopg.Error)),
                      extra={"log": name, "error": str(exc).strip()})
            await errors.stopped(exc)
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(conn.close)
        await backoff.sleep()


def _log_dropped(dsn: str, name: str) -> bool:
    """Whether the log is known to be gone (False when the database cannot tell now)."""
    try:
        with connect(dsn) as conn:
            return conn.execute("SELECT NOT EXISTS (SELECT 1 FROM merkle.logs WHERE name = %s)",
                                (name,)).fetchone()[0]
    except psycopg.Error:
        return False


async def _summarizer(opts: RunOptions) -> None:
    """Summarize processed_log's page ranges in the leaf lookup index (shared by every log) as
    the table leaves them behind, on a connection of its own; stops where the role may not."""
    kept = KeptConnection(opts.dsn)
    summarized: int | None = 0  # processed_log's first block whose range may not be summarized
    while summarized is not None:
        await anyio.sleep(opts.janitor_interval)
        summarized = await anyio.to_thread.run_sync(_summarize_leaf_lookup, kept, summarized)
    await anyio.to_thread.run_sync(kept.close)


async def _janitor(opts: RunOptions, drained: _Drained, name: str) -> None:
    """Vacuum the log's outboxes after enough drained rows, on a connection of its own."""
    kept = KeptConnection(opts.dsn)
    while True:
        await anyio.sleep(opts.janitor_interval)
        if drained.rows.get(name, 0) < opts.vacuum_every_rows:
            continue
        drained.rows[name] = 0
        try:
            await anyio.to_thread.run_sync(_vacuum_outboxes, kept, name)
        except psycopg.Error as exc:
            kept.close()
            log.warning("could not vacuum the outboxes; autovacuum will", extra={"log": name, "error": str(exc)})


def _summarize_leaf_lookup(kept: KeptConnection, from_block: int) -> int | None:
    """Summarize the leaf lookup index's complete ranges (sql/016, 017) from from_block on; returns
    the next from_block, or None when this role may not (autovacuum does it then)."""
    try:
        return kept.get().execute("SELECT merkle.summarize_leaf_lookup(%s)", (from_block,)).fetchone()[0]
    except psycopg.errors.InsufficientPrivilege as exc:
        log.info("processed_log's leaf lookup index is left to autovacuum to summarize", extra={"error": str(exc).strip()})
        return None
    except psycopg.Error as exc:
        kept.close()  # the writer reports a lost database; this is retried in a second
        log.debug("could not summarize processed_log's leaf lookup index", extra={"error": str(exc).strip()})
        return from_block


def _vacuum_outboxes(kept: KeptConnection, name: str) -> None:
    conn = kept.get()
    tables = conn.execute(
        "SELECT format('merkle.outbox_%%s', s.source_id) FROM merkle.sources s JOIN merkle.logs l USING (log_id) "
        "WHERE l.name = %s AND s.mode = 'trigger'", (name,)).fetchall()
    for (table,) in tables:
        if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]:
            conn.execute(f"VACUUM (SKIP_LOCKED) {table}")  # name built by format() from an integer id


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


_ORIGINS_TOLD: set[tuple[str, str]] = set()  # (log, origin) said to differ from the signer key's name


class _Checkpoints:
    """The writer's checkpoint step: after batches, at most once per checkpoint_interval,
    publish a signed checkpoint in its own transaction (listener/store/checkpoints.py).

    A refusal to sign (the tree does not extend what was published) does not stop the writer:
    appending unsigned shows no one a second history, while waiting would pin the slot's WAL
    and grow the outboxes until the operator decides. It is logged when it is news, kept on the
    log's row for `status`, and tried again every interval."""

    def __init__(self, opts: RunOptions, conn: psycopg.Connection, name: str):
        self.opts, self.conn, self.name = opts, conn, name
        self.last = float("-inf")
        self.pending = opts.signer is not None  # a first checkpoint at start-up if none is current
        self.refused: str | None = None  # the refusal last logged

    def wait_limit(self, poll: float) -> float:
        if not self.pending:
            return poll
        return max(0.0, min(poll, self.last + self.opts.checkpoint_interval - anyio.current_time()))

    async def maybe_publish(self) -> None:
        if self.opts.signer is None:
            return
        self.pending = True
        if anyio.current_time() < self.last + self.opts.checkpoint_interval:
            return
        from listener.store.checkpoints import SigningRefused, publish, record_refusal

        try:
            cp = await anyio.to_thread.run_sync(publish, self.conn, self.name, self.opts.signer, self.opts.state_dir)
        except SigningRefused as exc:
            self.last, self.pending = anyio.current_time(), False
            if str(exc) != self.refused:  # news to this process: a restarted listener says it again
                log.error("signing refused; appending goes on unsigned", extra={"log": self.name, "error": str(exc)})
                self.refused = str(exc)
            await anyio.to_thread.run_sync(record_refusal, self.conn, self.name, exc)
            return
        self.last, self.pending, self.refused = anyio.current_time(), False, None
        if cp is not None:
            log.info("checkpoint signed", extra={"log": self.name, "origin": cp.origin, "tree_size": cp.size,
                                                 "root": b64encode(cp.root).decode()})
            if cp.origin != self.opts.signer.name and (self.name, cp.origin) not in _ORIGINS_TOLD:
                # C2SP tlog-checkpoint: the key name SHOULD match the origin. Said once per origin
                # and process, not at each of the writer's restarts.
                log.warning("the log's origin is not the signer key's name: verifiers must pin the origin "
                            "(`monitor --origin`); for a key named by each log's origin, run a listener per log "
                            "(`run --log NAME --key KEY`)",
                            extra={"log": self.name, "origin": cp.origin, "key_name": self.opts.signer.name})
                _ORIGINS_TOLD.add((self.name, cp.origin))


# A writer that has not stopped on an error for this long is taken to be past it: well over
# the retries' longest wait (_Backoff), and the time a retry takes to get back to a change. A
# retry seen to take longer (a huge transaction decoded again) stretches it: see _WriterErrors.
ERROR_FORGOTTEN_AFTER = 120.0


class _WriterErrors:
    """The error that stops the log's writer, kept on the log's row for `status`
    (merkle.logs.writer_error) from its second stop running on, so that one a retry gets past
    is not reported; forgotten, and cleared there, once the writer has gone
    ERROR_FORGOTTEN_AFTER seconds without stopping; while the attempt after a stop has appended
    nothing, twice as long as the stopped attempt took when it appended nothing either (so a
    retry that needs minutes to reach the change it is stuck on still finds the error
    remembered). `source add` and `source remove` clear it too: a writer still stopped keeps
    it again at its next stop."""

    def __init__(self, dsn: str, name: str, clock: Callable[[], float] = time.monotonic):
        self.dsn, self.name, self.clock = dsn, name, clock
        self.last: str | None = None  # the last error, and how many times running it stopped the writer
        self.repeats = 0
        # From start-up: an error kept by an earlier listener stands until this one is past it.
        self.last_stop = self.attempt_start = clock()
        self.forget_after = ERROR_FORGOTTEN_AFTER
        self.appended = False  # whether the writer's current attempt has appended a batch
        self.kept = True  # unknown at start

    def attempt(self) -> None:
        """At each (re)start of the writer."""
        self.attempt_start, self.appended = self.clock(), False

    def progressed(self) -> None:
        """When the writer appended a batch."""
        self.appended = True

    async def stopped(self, exc: BaseException) -> None:
        text = str(exc).strip() or type(exc).__name__
        self.repeats = self.repeats + 1 if text == self.last else 1
        self.last, self.last_stop = text, self.clock()
        took = 0.0 if self.appended else self.last_stop - self.attempt_start
        self.forget_after = max(ERROR_FORGOTTEN_AFTER, 2 * took)
        if self.repeats >= 2:
            # At every stop, not once: a save that failed (a lock held too long), or an error
            # cleared by a `source add` meanwhile, is put back.
            self.kept = True
            await anyio.to_thread.run_sync(self._keep, text)

    def _keep(self, text: str) -> None:
        # On a connection of its own: the writer's may be what failed.
        try:
            with connect(self.dsn) as conn:
                conn.execute("SET LOCAL lock_timeout = '2s'")  # not behind a `log drop` or `source add`
                conn.execute("UPDATE merkle.logs SET writer_error = %(e)s, writer_error_at = now() "
                             "WHERE name = %(n)s AND writer_error IS DISTINCT FROM %(e)s", {"e": text, "n": self.name})
        except psycopg.Error as exc:
            log.warning("could not keep the writer's error for `status`", extra={"log": self.name, "error": str(exc)})

    async def running(self, conn: psycopg.Connection) -> None:
        """After each round of the writer that did not stop."""
        # Once this attempt has appended, it is past what stopped the last one.
        if self.clock() - self.last_stop < (ERROR_FORGOTTEN_AFTER if self.appended else self.forget_after):
            return
        self.last, self.repeats = None, 0
        if self.kept:
            await anyio.to_thread.run_sync(forget_writer_error, conn, self.name)
            self.kept = False


class _Backoff:
    def __init__(self, first: float = 0.2, cap: float = 10.0):
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await anyio.sleep(self.delay * (0.5 + random.random()))
        self.delay = min(self.cap, self.delay * 2)
