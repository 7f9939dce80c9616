"""Benchmark of replication-mode capture, each figure beside its limit measured in the same run.

    end_to_end  rows/s from a slot backlog to leaves sequenced, tiles committed and the LSN
                acknowledged (`merkle-listener run` in its own process), vs pg_recvlogical
                reading the same transactions with pgoutput to /dev/null (the limit)
    writers     bulk INSERT throughput (1,000-row statements) with no slot, vs with the log's
                slot present, and vs with the listener streaming it (on the same machine)
    latency     commit -> sequenced p50/p99 with a writer paced at --rate single-row commits/s

Runs on a throwaway embedded PostgreSQL unless --dsn names a database (which then needs
wal_level=logical and gets tables repl, paced_r and logs bench_r, paced_r).
    python -m listener.bench.replication [--rows N] [--rate R] [--seconds S] [--dsn DSN]
"""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg

from listener import registry
from listener.bench import capture
from listener.bench.capture import BULK, TABLE, _bulk_rate, bench_database
from listener.embedded import bin_dir
from listener.runner import connect
from listener.sources.publication import drop_slot
from listener.store import migrate

LIMIT_SLOT = "bench_recvlogical"


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


def bench_writers(dsn: str, rows: int) -> dict:
    """Bulk INSERT rate into one table: with no slot, with the log's slot present (not read),
    and with the listener streaming it. The last one shares this machine's cores with the
    listener and the walsender, so it also measures CPU competition, not only capture."""
    with connect(dsn) as conn:
        base = iter(range(0, 10**9, rows))
        without = max(_bulk_rate(conn, "repl", next(base), rows) for _ in range(3))
        registry.create_log(conn, "bench_r")
        registry.add_source(conn, "bench_r", "repl", mode="replication")
        idle_slot = max(_bulk_rate(conn, "repl", next(base), rows) for _ in range(3))
        listener = _listener(dsn, "bench_r")
        try:
            streaming = max(_bulk_rate(conn, "repl", next(base), rows) for _ in range(3))
            # The rows written before the source existed are not captured.
            _wait_size(conn, "bench_r", 6 * rows, timeout=900)
        finally:
            _stop(listener)
    return {"bulk_rows_per_s_without_slot": round(without), "bulk_rows_per_s_with_slot": round(idle_slot),
            "bulk_rows_per_s_with_slot_streaming": round(streaming), "ratio": round(idle_slot / without, 3),
            "ratio_streaming": round(streaming / without, 3)}


def bench_end_to_end(dsn: str, rows: int) -> dict:
    """A backlog of `rows` rows (1,000-row transactions) waits in both slots; each consumer
    is timed from its start until it has everything."""
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (LIMIT_SLOT,))
        try:
            base = _size(conn, "bench_r")
            for lo in range(10_000_000, 10_000_000 + rows, 1000):
                conn.execute(BULK.format(name="repl"), (lo, lo + 999))
            end_lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
            t = time.perf_counter()
            subprocess.run(
                [str(bin_dir() / "pg_recvlogical"), "--dbname", dsn, "--slot", LIMIT_SLOT, "--start",
                 "--endpos", end_lsn, "--no-loop", "-o", "proto_version=1", "-o", "publication_names=merkle_bench_r",
                 "-f", "/dev/null"], check=True, capture_output=True, timeout=600)
            limit_s = time.perf_counter() - t
        finally:
            drop_slot(conn, LIMIT_SLOT)
        listener = _listener(dsn, "bench_r")
        try:
            t = time.perf_counter()
            while (first := _size(conn, "bench_r")) == base:
                time.sleep(0.002)
            t_first = time.perf_counter()
            _wait_size(conn, "bench_r", base + rows, timeout=600)
            ours_s = time.perf_counter() - t
            # Sustained: from the first committed batch on (start-up and the first batch excluded).
            sustained = (base + rows - first) / (time.perf_counter() - t_first)
            # ... and acknowledged: the slot has confirmed the stored end_lsn.
            while conn.execute(
                "SELECT s.confirmed_flush_lsn < p.end_lsn FROM pg_replication_slots s "
                "JOIN merkle.replication_progress p ON p.slot_name = s.slot_name").fetchone()[0]:
                time.sleep(0.005)
            acked_s = time.perf_counter() - t
        finally:
            _stop(listener)
    return {"rows": rows, "pg_recvlogical_rows_per_s": round(rows / limit_s),
            "listener_rows_per_s_with_startup": round(rows / ours_s), "listener_rows_per_s_acked": round(rows / acked_s),
            "listener_rows_per_s_sustained": round(sustained),
            "ratio": round(rows / acked_s / (rows / limit_s), 3),
            "ratio_sustained": round(sustained / (rows / limit_s), 3),
            "note": "ratio counts the listener's start-up (process, connect, START_REPLICATION) and the final ack"}


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


def run(dsn: str | None, rows: int, rate: float, seconds: float) -> dict:
    with bench_database(dsn) as target:
        _setup(target)
        result = {"benchmark": "replication", "rows": rows}
        try:
            # Latency first, on a fresh database: after the bulk phases, autovacuum of millions
            # of new rows would compete for the same cores during the paced run.
            result["latency"] = bench_latency(target, rate, seconds)
            result["writers"] = bench_writers(target, rows)
            result["end_to_end"] = bench_end_to_end(target, rows)
        finally:
            with connect(target, autocommit=True) as conn:
                for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()").fetchall():
                    drop_slot(conn, slot)
    result["targets"] = {"end_to_end_ratio": ">= 0.75", "writers_ratio": ">= 0.95", "latency_ms_p99": "<= 25"}
    return result


def main(argv: list[str] | None = None) -> int:
    return capture.json_bench_main("python -m listener.bench.replication", __doc__, run, 200_000, argv)


if __name__ == "__main__":
    raise SystemExit(main())
