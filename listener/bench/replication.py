"""Benchmark of replication-mode capture, each figure beside its limit measured in the same run.

    ceiling     rows/s at which the listener's own code reads the same backlog and computes its
                leaves and tree (stream, decode, canonical entry, SHA-256, interior nodes) with
                nothing written: no consumer built on this Python code can be faster than this
    end_to_end  rows/s from a slot backlog to leaves sequenced, tiles committed and the LSN
                acknowledged (`merkle-listener run` in its own process), vs pg_recvlogical
                reading the same transactions with pgoutput to /dev/null (the limit); with
                the CPU seconds per row of the listener's processes (Linux /proc)
    floor       rows/s at which PostgreSQL alone writes the same processed_log rows (COPY of
                rows computed beforehand, 20,000 per transaction, the schema's indexes): no
                consumer that writes the log can be faster than this; again with random keys
                (a UUID key's spread) instead of the source's growing ids
    paced_writers  the same statements paced at --writer-rate rows/s for --seconds, slot not
                read and listener streaming: the rate the writers keep, each commit's time
    writers     bulk INSERT throughput (1,000-row statements) with no slot, then in
                alternating rounds with the log's slot present but not read, with the
                listener streaming it, and with pg_recvlogical streaming it (on the same
                machine): medians of paired ratios;
                --writers-synchronous-commit off shows how much of the cost is the writers'
                commits waiting for WAL flushes that also carry the log's own WAL
    latency     commit -> sequenced p50/p99 with a writer paced at --rate single-row commits/s

Runs on a throwaway embedded PostgreSQL unless --dsn names a database (which then needs
wal_level=logical and gets tables repl, paced_r and logs bench_r, paced_r).
    python -m listener.bench.replication [--rows N] [--rate R] [--seconds S] [--dsn DSN]
                                         [--writers-synchronous-commit on|off] [--writer-rate W]
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psycopg

from listener import registry
from listener.bench import capture
from listener.bench.capture import BULK, TABLE, _bulk_rate, bench_database
from listener.embedded import bin_dir
from listener.merkle.memory import MemoryTree
from listener.runner import connect
from listener.sources.publication import drop_slot
from listener.sources.replication import ReplicationStream, Transaction
from listener.sources.replication_apply import COPY_COLUMNS, prepare
from listener.store import migrate

LIMIT_SLOT = "bench_recvlogical"
CEILING_SLOT = "bench_ceiling"
WRITER_ROUNDS = 5


def _setup(dsn: str) -> None:
    with connect(dsn) as conn:
        migrate.apply(conn)
        conn.commit()
        for name in ("repl", "paced_r"):
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(TABLE.format(name=name))
        conn.commit()


def _listener(dsn: str, log: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "listener", "--dsn", dsn, "--log-level", "warning", "run", "--log", log],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def _size(conn: psycopg.Connection, log: str) -> int:
    return conn.execute("SELECT tree_size FROM merkle.logs WHERE name = %s", (log,)).fetchone()[0]


def bench_writers(dsn: str, rows: int, synchronous_commit: str = "on", rounds: int = WRITER_ROUNDS) -> dict:
    """Bulk INSERT rate into one table: with no slot, then in `rounds` alternations of three
    rounds: the log's slot present but not read (listener stopped), the listener streaming it
    (caught up before the round), and pg_recvlogical streaming the same publication to
    /dev/null instead (what any logical consumer costs the writers here).

    This VM's speed drifts between rounds by as much as the effect measured, and the table
    grows, so each streaming round is compared with a not-read round next to it (the
    listener's with the one before, pg_recvlogical's with the one after) and the median of
    those paired ratios is reported, with their range. The streaming rounds share
    this machine's cores and disk with the consumer, its walsender and the log's own writes."""
    with connect(dsn) as conn:
        conn.execute("SELECT set_config('synchronous_commit', %s, false)", (synchronous_commit,))
        conn.commit()
        base = iter(range(0, 10**9, rows))
        _bulk_rate(conn, "repl", next(base), rows)  # warm-up: the first round into a new table is slower
        without = [_bulk_rate(conn, "repl", next(base), rows) for _ in range(3)]
        registry.create_log(conn, "bench_r")
        registry.add_source(conn, "bench_r", "repl", mode="replication")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (LIMIT_SLOT,))
        conn.commit()
        idle, streaming, recvlogical, captured = [], [], [], 0
        try:
            for _ in range(rounds):
                idle.append(_bulk_rate(conn, "repl", next(base), rows))
                captured += rows
                listener = _listener(dsn, "bench_r")
                try:
                    _wait_size(conn, "bench_r", captured, timeout=900)
                    streaming.append(_bulk_rate(conn, "repl", next(base), rows))
                    captured += rows
                    _wait_size(conn, "bench_r", captured, timeout=900)
                finally:
                    _stop(listener)
                other = _pg_recvlogical(dsn)
                try:
                    _wait_confirmed(conn, LIMIT_SLOT)
                    recvlogical.append(_bulk_rate(conn, "repl", next(base), rows))
                    captured += rows  # the listener takes these when it runs again
                    _wait_confirmed(conn, LIMIT_SLOT)
                finally:
                    _stop(other)
            idle.append(_bulk_rate(conn, "repl", next(base), rows))  # after the last pg_recvlogical round
            captured += rows
            listener = _listener(dsn, "bench_r")
            try:
                _wait_size(conn, "bench_r", captured, timeout=900)
            finally:
                _stop(listener)
        finally:
            conn.rollback()
            with connect(dsn, autocommit=True) as admin:
                drop_slot(admin, LIMIT_SLOT)
    listener_ratios = [s / i for s, i in zip(streaming, idle)]
    recvlogical_ratios = [r / i for r, i in zip(recvlogical, idle[1:])]
    return {"bulk_rows_per_s_without_slot": round(statistics.median(without)),
            "bulk_rows_per_s_with_slot": round(statistics.median(idle)),
            "bulk_rows_per_s_with_slot_streaming": round(statistics.median(streaming)),
            "bulk_rows_per_s_with_pg_recvlogical_streaming": round(statistics.median(recvlogical)),
            "ratio": round(statistics.median(idle) / statistics.median(without), 3),
            "ratio_streaming_vs_idle": round(statistics.median(listener_ratios), 3),
            "ratio_streaming_vs_idle_range": [round(min(listener_ratios), 3), round(max(listener_ratios), 3)],
            "ratio_pg_recvlogical_streaming_vs_idle": round(statistics.median(recvlogical_ratios), 3),
            "ratio_pg_recvlogical_streaming_vs_idle_range": [round(min(recvlogical_ratios), 3),
                                                             round(max(recvlogical_ratios), 3)],
            "writers_synchronous_commit": synchronous_commit,
            "note": f"medians of {rounds} rounds; each streaming round against a slot-not-read round next to it"}


def bench_paced_writers(dsn: str, rate: float, seconds: float, per_stmt: int = 1000) -> dict:
    """Writers at a load the machine can carry: 1,000-row INSERT statements, each committed,
    paced at `rate` rows/s for `seconds`, with the log's slot not read (listener stopped) and
    then with the listener streaming it. The saturated `writers` figure measures who gets the
    two cores when the writers want all of them; this one, what capture costs writers that
    leave room: the rate they keep and how long each commit takes."""
    base = iter(range(50_000_000, 10**9, 10_000_000))
    result = {"rate_rows_per_s": rate, "seconds": seconds, "rows_per_statement": per_stmt}
    with connect(dsn) as conn:
        result["slot_not_read"] = _paced_round(conn, next(base), rate, seconds, per_stmt)
        target = _size(conn, "bench_r") + int(rate * seconds) // per_stmt * per_stmt
        conn.commit()
        listener = _listener(dsn, "bench_r")
        try:
            _wait_size(conn, "bench_r", target, timeout=900)
            result["listener_streaming"] = _paced_round(conn, next(base), rate, seconds, per_stmt)
            conn.commit()
            _wait_size(conn, "bench_r", target + int(rate * seconds) // per_stmt * per_stmt, timeout=900)
        finally:
            _stop(listener)
    idle, streaming = result["slot_not_read"], result["listener_streaming"]
    result["ratio_achieved"] = round(streaming["achieved_rows_per_s"] / idle["achieved_rows_per_s"], 3)
    return result


def _paced_round(conn: psycopg.Connection, start: int, rate: float, seconds: float, per_stmt: int) -> dict:
    statements = int(rate * seconds) // per_stmt
    took = []
    t0 = time.perf_counter()
    for i in range(statements):
        due = t0 + i * per_stmt / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(due - now, 0.0005))
        lo = start + i * per_stmt
        conn.execute(BULK.format(name="repl"), (lo, lo + per_stmt - 1))
        conn.commit()
        took.append((time.perf_counter() - now) * 1000)
    # Over the paced window, or longer when the writers fell behind it.
    achieved = statements * per_stmt / max(time.perf_counter() - t0, statements * per_stmt / rate)
    q = statistics.quantiles(took, n=100)
    return {"achieved_rows_per_s": round(achieved), "statement_ms_p50": round(q[49], 2),
            "statement_ms_p99": round(q[98], 2)}


def _pg_recvlogical(dsn: str) -> subprocess.Popen:
    """pg_recvlogical streaming the log's publication from LIMIT_SLOT to /dev/null, reporting
    its position every second."""
    return subprocess.Popen(
        [str(bin_dir() / "pg_recvlogical"), "--dbname", dsn, "--slot", LIMIT_SLOT, "--start", "-s", "1", "-F", "1",
         "-o", "proto_version=1", "-o", "publication_names=merkle_bench_r", "-f", "/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_confirmed(conn: psycopg.Connection, slot: str, timeout: float = 60) -> None:
    """Until the slot has confirmed the WAL written so far (or timeout: then go on anyway)."""
    target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    conn.commit()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = conn.execute("SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots WHERE slot_name = %s",
                            (target, slot)).fetchone()[0]
        conn.commit()
        if done:
            return
        time.sleep(0.05)


def bench_end_to_end(dsn: str, rows: int, *, cpu: bool = True) -> dict:
    """A backlog of `rows` rows (1,000-row transactions) waits in both slots; each consumer
    is timed from its start until it has everything. `cpu`: the server runs on this machine,
    so its processes' CPU time can be read from /proc."""
    with connect(dsn, autocommit=True) as conn:
        for slot in (LIMIT_SLOT, CEILING_SLOT):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            base = _size(conn, "bench_r")
            # Left to autovacuum, the earlier phases' millions of rows would be vacuumed (and
            # their pages' visibility written to the WAL) while the listener runs.
            for table in ("repl", "merkle.processed_log", "merkle.tiles"):
                conn.execute(f"VACUUM {table}")
            wal_before = _wal_lsn(conn)
            for lo in range(10_000_000, 10_000_000 + rows, 1000):
                conn.execute(BULK.format(name="repl"), (lo, lo + 999))
            end_lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
            source_wal = _wal_lsn(conn) - wal_before
            t = time.perf_counter()
            subprocess.run(
                [str(bin_dir() / "pg_recvlogical"), "--dbname", dsn, "--slot", LIMIT_SLOT, "--start",
                 "--endpos", end_lsn, "--no-loop", "-o", "proto_version=1", "-o", "publication_names=merkle_bench_r",
                 "-f", "/dev/null"], check=True, capture_output=True, timeout=600)
            limit_s = time.perf_counter() - t
            ceiling = bench_ceiling(dsn, conn, rows, cpu=cpu)
        finally:
            drop_slot(conn, LIMIT_SLOT)
            drop_slot(conn, CEILING_SLOT)
        # WAL the walsender decodes again before it reaches the backlog (restart_lsn lags the
        # confirmed position): start-up work that pg_recvlogical's fresh slot does not have.
        replay_bytes = conn.execute(
            "SELECT (confirmed_flush_lsn - restart_lsn)::bigint FROM pg_replication_slots "
            "WHERE slot_name = 'merkle_bench_r'").fetchone()[0]
        wal_before, fpi_before = _wal_lsn(conn), _full_page_images(conn)
        listener = _listener(dsn, "bench_r")
        try:
            t = time.perf_counter()
            while (first := _size(conn, "bench_r")) == base:
                time.sleep(0.002)
            t_first = time.perf_counter()
            pids = {"listener (Python)": [listener.pid]}
            for kind, pid in conn.execute(
                    "SELECT CASE WHEN backend_type = 'walsender' THEN 'walsender' ELSE 'listener sessions' END, pid "
                    "FROM pg_stat_activity WHERE application_name = 'merkle-listener' AND pid <> pg_backend_pid()"):
                pids.setdefault(kind, []).append(pid)
            if not cpu:
                pids = {}
            cpu_before = {kind: _cpu_seconds(p) for kind, p in pids.items()}
            _wait_size(conn, "bench_r", base + rows, timeout=600)
            ours_s = time.perf_counter() - t
            # Sustained: from the first committed batch on (start-up and the first batch excluded);
            # not measured when the first batch took the whole (small) backlog.
            after_first = base + rows - first
            cpu_us_per_row = {kind: round((_cpu_seconds(p) - cpu_before[kind]) / after_first * 1e6, 1)
                              for kind, p in pids.items()} if after_first else {}
            sustained = after_first / (time.perf_counter() - t_first) if after_first else None
            # ... and acknowledged: the slot has confirmed the stored end_lsn.
            while conn.execute(
                "SELECT s.confirmed_flush_lsn < p.end_lsn FROM pg_replication_slots s "
                "JOIN merkle.replication_progress p ON p.slot_name = s.slot_name").fetchone()[0]:
                time.sleep(0.005)
            acked_s = time.perf_counter() - t
            log_wal = _wal_lsn(conn) - wal_before
        finally:
            _stop(listener)
        time.sleep(0.5)  # the listener's sessions report their statistics as they exit
        log_fpi = _full_page_images(conn) - fpi_before
    return {"rows": rows, "pg_recvlogical_rows_per_s": round(rows / limit_s),
            "listener_rows_per_s_with_startup": round(rows / ours_s), "listener_rows_per_s_acked": round(rows / acked_s),
            "listener_rows_per_s_sustained": sustained and round(sustained),
            "listener_first_leaf_after_s": round(t_first - t, 2), "slot_wal_decoded_again_bytes": replay_bytes,
            "cpu_us_per_row_sustained": cpu_us_per_row or "not measured (server not on this machine, or no batch after the first)",
            # WAL the log writes per leaf (processed_log, its indexes, tiles, progress) against
            # the WAL of the source rows themselves: what a writer's commit must also flush
            # while the listener streams.
            "wal_bytes_per_source_row": round(source_wal / rows),
            "wal_bytes_per_leaf": round(log_wal / rows),
            # Pages written whole to the WAL on their first change after a checkpoint: the
            # indexes' random pages (leaf hash, change identity) make most of them.
            "wal_full_page_images_per_1000_leaves": round(log_fpi / rows * 1000, 1),
            "ratio": round(rows / acked_s / (rows / limit_s), 3),
            "ratio_sustained": sustained and round(sustained / (rows / limit_s), 3),
            "ceiling": ceiling | {"ratio": round(ceiling["rows_per_s"] / (rows / limit_s), 3)},
            "note": "ratio counts the listener's start-up (process, connect, START_REPLICATION) and the final ack"}


def bench_ceiling(dsn: str, conn: psycopg.Connection, rows: int, *, cpu: bool = True) -> dict:
    """The listener's stream and leaf computation alone, in this process, on the backlog that
    waits in CEILING_SLOT: every transaction is received, decoded, turned into entries and leaf
    hashes (replication_apply.prepare), its leaves added to an in-memory tree, and confirmed at
    once; nothing is written. The time runs from START_REPLICATION to the last leaf."""
    log_id = registry.get_log(conn, "bench_r").log_id
    sources = {s.table_oid: s for s in registry.list_sources(conn, log_id) if s.mode == "replication"}
    tree = MemoryTree()
    pids = {"python": [os.getpid()]}

    async def read() -> tuple[float, dict[str, float], dict[str, float]]:
        done = anyio.Event()

        def received(txn: Transaction) -> None:
            tree.append(prepare(txn, sources, log_id).hashes)
            stream.confirm(txn.end_lsn)
            if tree.size >= rows:
                done.set()

        stream = ReplicationStream(dsn, CEILING_SLOT, "merkle_bench_r", 0, on_transaction=received,
                                   may_confirm_idle=lambda: False)
        try:
            await stream.open()
            if cpu:
                for _ in range(100):  # the slot shows its walsender a moment after START_REPLICATION
                    pids["walsender"] = [pid for (pid,) in conn.execute(
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s AND active_pid IS NOT NULL",
                        (CEILING_SLOT,))]
                    if pids["walsender"]:
                        break
                    await anyio.sleep(0.01)
            cpu_before = {kind: _cpu_seconds(p) for kind, p in pids.items()} if cpu else {}
            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream.run)
                with anyio.fail_after(600):
                    await done.wait()
                tg.cancel_scope.cancel()
            elapsed = time.perf_counter() - t
            # Before the stream closes: its walsender exits then, and /proc forgets it.
            cpu_after = {kind: _cpu_seconds(p) for kind, p in pids.items()} if cpu else {}
            return elapsed, cpu_before, cpu_after
        finally:
            stream.close()

    elapsed, cpu_before, cpu_after = anyio.run(read)
    # The root lets a caller check that this computed the leaves the listener commits.
    result = {"rows_per_s": round(rows / elapsed), "tree_size": tree.size, "tree_root": tree.root().hex()}
    if cpu:
        result["cpu_us_per_row"] = {kind: round((cpu_after[kind] - cpu_before[kind]) / rows * 1e6, 1)
                                    for kind in pids}
    return result


def _wal_lsn(conn: psycopg.Connection) -> int:
    """The server's current WAL insert position, in bytes."""
    return conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0]


def _full_page_images(conn: psycopg.Connection) -> int:
    """Full-page images written to the WAL so far, by the whole server (pg_stat_wal)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute("SELECT wal_fpi FROM pg_stat_wal").fetchone()[0]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (0 where /proc cannot tell)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def bench_floor(dsn: str, rows: int, per_txn: int = 20_000, *, random_keys: bool = False) -> dict:
    """PostgreSQL alone writing processed_log rows shaped like the listener's (one source,
    JSON key, insert, random leaf hash, commit LSNs), in a log of its own. The keys are the
    source's growing ids, or with `random_keys` 32 hex digits each (a UUID key's spread)."""
    with connect(dsn) as conn:
        log_id = registry.create_log(conn, f"bench_floor_{os.getpid()}").log_id
        try:
            def key(i: int) -> bytes:
                return hashlib.sha256(b"key %d" % i).hexdigest()[:32].encode() if random_keys else b"%d" % i

            lines = [b'%d\t1\t{"id":"%b"}\tinsert\t\\\\x%b\t%d\t%d\t0/1\t%d\n'
                     % (log_id, key(i), hashlib.sha256(b"%d" % i).hexdigest().encode(), 1000 + i // 1000,
                        i % 1000 + 1, i)
                     for i in range(rows)]
            t = time.perf_counter()
            for lo in range(0, rows, per_txn):
                with conn.cursor().copy(f"COPY merkle.processed_log ({COPY_COLUMNS}) FROM STDIN") as copy:
                    copy.write(b"".join(lines[lo:lo + per_txn]))
                conn.commit()
            elapsed = time.perf_counter() - t
        finally:
            # Rows without a tree: remove them with their log.
            conn.rollback()
            conn.execute("DELETE FROM merkle.processed_log WHERE log_id = %s", (log_id,))
            conn.execute("DELETE FROM merkle.logs WHERE log_id = %s", (log_id,))
            conn.commit()
    return {"rows": rows, "processed_log_rows_per_s": round(rows / elapsed)}


def bench_latency(dsn: str, rate: float, seconds: float) -> dict:
    with connect(dsn) as conn:
        registry.create_log(conn, "paced_r")
        registry.add_source(conn, "paced_r", "paced_r", mode="replication")
    with connect(dsn, autocommit=True) as conn:
        # Start from a clean slate: the earlier phases wrote much WAL, and a checkpoint's
        # flush in the middle of the paced run would be measured as latency.
        conn.execute("CHECKPOINT")
    return capture.bench_latency(dsn, rate, seconds, log="paced_r", table="paced_r")


def _wait_size(conn: psycopg.Connection, log: str, size: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _size(conn, log) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"log {log} did not reach {size} leaves in {timeout} s")
        time.sleep(0.005)


def run(dsn: str | None, rows: int, rate: float, seconds: float, writers_synchronous_commit: str = "on",
        writer_rate: float = 100_000) -> dict:
    with bench_database(dsn) as target:
        _setup(target)
        result = {"benchmark": "replication", "rows": rows}
        with connect(target) as conn:
            result["server_version"] = conn.execute("SHOW server_version").fetchone()[0]
        try:
            # Latency first, on a fresh database: after the bulk phases, autovacuum of millions
            # of new rows would compete for the same cores during the paced run.
            result["latency"] = bench_latency(target, rate, seconds)
            result["writers"] = bench_writers(target, rows, writers_synchronous_commit)
            result["paced_writers"] = bench_paced_writers(target, writer_rate, seconds)
            result["end_to_end"] = e2e = bench_end_to_end(target, rows, cpu=dsn is None)
            result["floor"] = floor = bench_floor(target, rows)
            floor["listener_sustained_vs_floor"] = round(e2e["listener_rows_per_s_sustained"]
                                                         / floor["processed_log_rows_per_s"], 3)
            floor["floor_vs_pg_recvlogical"] = round(floor["processed_log_rows_per_s"]
                                                     / e2e["pg_recvlogical_rows_per_s"], 3)
            floor["processed_log_rows_per_s_random_keys"] = bench_floor(
                target, rows, random_keys=True)["processed_log_rows_per_s"]
        finally:
            with connect(target, autocommit=True) as conn:
                for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()").fetchall():
                    drop_slot(conn, slot)
    result["targets"] = {"end_to_end_ratio": ">= 0.75", "writers_ratio": ">= 0.95", "latency_ms_p99": "<= 25"}
    return result


def main(argv: list[str] | None = None) -> int:
    def add_options(p):
        p.add_argument("--writers-synchronous-commit", choices=["on", "off"], default="on",
                       help="the writers' synchronous_commit in the writers phase (default on; off: their commits "
                            "no longer wait for WAL flushes, which also flush the log's own WAL)")
        p.add_argument("--writer-rate", type=float, default=100_000,
                       help="rows/s of the paced writers phase, 1,000-row statements (default 100000: about a "
                            "quarter of what they reach saturating this 2-core machine)")

    return capture.json_bench_main("python -m listener.bench.replication", __doc__, run, 400_000, argv, add_options)


if __name__ == "__main__":
    raise SystemExit(main())
