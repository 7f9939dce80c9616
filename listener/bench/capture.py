"""Benchmark of trigger-mode capture, each figure beside its limit measured in the same run.

    writers   INSERT throughput into a captured table vs an identical table without capture,
              as bulk statements of 1,000 rows and as single-row commits;
    drain     leaves/s appended by the sequencer from a filled outbox, vs the same rows
              hashed by PostgreSQL alone (sha256 over the same entries, no writes);
    latency   commit -> sequenced (visible in merkle.logs.tree_size) p50/p99 with a writer
              paced at --rate single-row commits/s and `merkle-listener run` in its own process.

Runs on a throwaway embedded PostgreSQL (default settings) unless --dsn names a database.
    python -m listener.bench.capture [--rows N] [--rate R] [--seconds S] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import orjson
import psycopg

from listener import registry
from listener.runner import connect
from listener.sequencer import Sequencer
from listener.store import migrate

TABLE = """
CREATE TABLE {name} (
    id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12,2) NOT NULL,
    placed_at timestamptz NOT NULL DEFAULT now(), note text
)"""
BULK = (
    "INSERT INTO {name} (id, customer, amount, note) "
    "SELECT g, 'customer ' || g, (g %% 100000) / 100.0, 'note ' || g FROM generate_series(%s::bigint, %s::bigint) g"
)


@contextlib.contextmanager
def bench_database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from listener.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(tempfile.mkdtemp(prefix="ml-bench-"))
    server.start(owned=True)
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE bench")
        yield server.dsn("bench")
    finally:
        server.destroy()


def _setup(dsn: str) -> None:
    with connect(dsn) as conn:
        migrate.apply(conn)
        conn.commit()
        for name in ("plain", "captured", "paced"):
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(TABLE.format(name=name))
        conn.commit()
        registry.create_log(conn, "bench")
        registry.add_source(conn, "bench", "captured")
        registry.create_log(conn, "paced")
        registry.add_source(conn, "paced", "paced")


def _bulk_rate(conn: psycopg.Connection, table: str, start: int, rows: int, per_stmt: int = 1000) -> float:
    t = time.perf_counter()
    for lo in range(start, start + rows, per_stmt):
        conn.execute(BULK.format(name=table), (lo, lo + per_stmt - 1))
        conn.commit()
    return rows / (time.perf_counter() - t)


def _single_rate(conn: psycopg.Connection, table: str, start: int, rows: int) -> float:
    t = time.perf_counter()
    for i in range(start, start + rows):
        conn.execute(f"INSERT INTO {table} (id, customer, amount) VALUES (%s, 'c', 1.5)", (i,))
        conn.commit()
    return rows / (time.perf_counter() - t)


def bench_writers(dsn: str, rows: int) -> dict:
    """Alternate plain and captured rounds so both see the same machine state."""
    out = {"bulk_plain": [], "bulk_captured": [], "single_plain": [], "single_captured": []}
    with connect(dsn) as conn:
        base = 0
        for _ in range(3):
            for table in ("plain", "captured"):
                out[f"bulk_{table}"].append(_bulk_rate(conn, table, base, rows))
            base += rows
        singles = max(500, rows // 50)
        for _ in range(3):
            for table in ("plain", "captured"):
                out[f"single_{table}"].append(_single_rate(conn, table, base, singles))
            base += singles
    best = {k: max(v) for k, v in out.items()}
    return {
        "bulk_rows_per_s_without_capture": round(best["bulk_plain"]),
        "bulk_rows_per_s_with_capture": round(best["bulk_captured"]),
        "bulk_ratio": round(best["bulk_captured"] / best["bulk_plain"], 3),
        "single_commits_per_s_without_capture": round(best["single_plain"]),
        "single_commits_per_s_with_capture": round(best["single_captured"]),
        "single_ratio": round(best["single_captured"] / best["single_plain"], 3),
    }


def bench_drain(dsn: str) -> dict:
    """Drain what bench_writers left queued, against two limits measured on the same rows:
    PostgreSQL hashing the entries and writing nothing, and PostgreSQL writing the same
    processed_log rows (same columns and indexes) into a plain table, without the outbox's
    delete, the tiles or the fence."""
    from psycopg import sql

    from listener import canonical_sql

    with connect(dsn) as conn:
        queued = conn.execute("SELECT count(*) FROM merkle.outbox_1").fetchone()[0]
        cols = ["amount", "customer", "id", "note", "placed_at"]
        types = dict(conn.execute(
            "SELECT attname, atttypid::integer FROM pg_attribute "
            "WHERE attrelid = 'merkle.outbox_1'::regclass AND attnum > 0"))
        entry = canonical_sql.entry_sql("o", "public.captured", cols, sql.Identifier("o", "op"), types)
        leaf = canonical_sql.leaf_hash_sql(entry)
        key = canonical_sql.key_sql("o", ["id"], types)
        conn.execute("CREATE TABLE bench_log (LIKE merkle.processed_log INCLUDING ALL)")
        conn.commit()
        t = time.perf_counter()
        conn.execute(sql.SQL("SELECT count({}) FROM merkle.outbox_1 o").format(leaf))
        hash_s = time.perf_counter() - t
        conn.commit()
        t = time.perf_counter()
        conn.execute(sql.SQL(
            "INSERT INTO bench_log (log_id, seq, source_id, source_key, op, leaf_hash, change_id, change_ord) "
            "SELECT 1, row_number() OVER (ORDER BY stmt_id, ord) - 1, 1, {key}, op, {leaf}, stmt_id, ord "
            "FROM merkle.outbox_1 o").format(key=key, leaf=leaf))
        conn.commit()
        write_s = time.perf_counter() - t
        conn.execute("DROP TABLE bench_log")
        conn.commit()
        seq = Sequencer(conn, "bench")
        t = time.perf_counter()
        drained = seq.drain_all()
        drain_s = time.perf_counter() - t
    rate = drained / drain_s
    return {
        "drained_leaves": drained,
        "queued_before": queued,
        "drain_leaves_per_s": round(rate),
        "limit_hash_only_leaves_per_s": round(queued / hash_s),
        "limit_write_log_rows_per_s": round(queued / write_s),
        "ratio_to_hash_only": round(rate / (queued / hash_s), 3),
        "ratio_to_write_log_rows": round(rate / (queued / write_s), 3),
    }


# The observer: its own process (no GIL shared with the paced writer), printing the
# CLOCK_MONOTONIC time (time.perf_counter is system-wide on Linux) of every merkle_sequenced
# notification for the log until the log reaches the wanted size.
OBSERVER = """
import sys, time, orjson, psycopg
dsn, log, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with psycopg.connect(dsn, autocommit=True) as ear:
    ear.execute("LISTEN merkle_sequenced")
    print("ready", flush=True)
    # Printed at the end: nobody reads the pipe during the run, and a full pipe would stall
    # this process (and be measured as latency).
    heard = []
    for note in ear.notifies():
        event = orjson.loads(note.payload)
        if event["log"] == log:
            heard.append((time.perf_counter(), event["tree_size"]))
            if event["tree_size"] >= n:
                break
    print("".join(f"{t} {size}\\n" for t, size in heard), end="", flush=True)
"""


def bench_latency(dsn: str, rate: float, seconds: float, *, log: str = "paced", table: str = "paced") -> dict:
    """Single-row commits into `table` (the only source of `log`) paced at `rate`; latency is
    the time from a commit returning to the writer until a client LISTENing on
    merkle_sequenced (notified at each batch's COMMIT) learns that the row is a leaf."""
    n = int(rate * seconds)
    listener = subprocess.Popen(
        [sys.executable, "-m", "listener", "--dsn", dsn, "--log-level", "warning", "run", "--log", log],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    observer = subprocess.Popen([sys.executable, "-c", OBSERVER, dsn, log, str(n)],
                                stdout=subprocess.PIPE, text=True)
    try:
        _wait_writer(dsn)
        assert observer.stdout.readline().strip() == "ready"
        committed: list[float] = []
        with psycopg.connect(dsn, autocommit=True) as w:
            start = time.perf_counter()
            for i in range(n):
                due = start + i / rate
                while time.perf_counter() < due:
                    time.sleep(0.0002)
                w.execute(f"INSERT INTO {table} (id, customer, amount) VALUES (%s, 'c', 1.5)", (i,))
                committed.append(time.perf_counter())
            achieved = n / (time.perf_counter() - start)
        out, _ = observer.communicate(timeout=120)
    finally:
        for proc in (observer, listener):
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=30)
    reached = [(float(t), int(size)) for t, size in (line.split() for line in out.splitlines())]
    latencies = []
    j = 0
    for i, t_commit in enumerate(committed):  # row i is leaf i: one writer, one source
        while reached[j][1] < i + 1:
            j += 1
        latencies.append((reached[j][0] - t_commit) * 1000)
    q = statistics.quantiles(latencies, n=100)
    return {"commits": n, "achieved_commits_per_s": round(achieved), "latency_ms_p50": round(q[49], 2),
            "latency_ms_p99": round(q[98], 2), "latency_ms_max": round(max(latencies), 2)}


def _wait_writer(dsn: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as c:
        while not c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchone()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("the listener did not start")
            time.sleep(0.05)


def run(dsn: str | None, rows: int, rate: float, seconds: float) -> dict:
    with bench_database(dsn) as target:
        _setup(target)
        result = {"benchmark": "capture", "rows": rows}
        with connect(target) as conn:
            result["server_version"] = conn.execute("SHOW server_version").fetchone()[0]
        result["writers"] = bench_writers(target, rows)
        result["drain"] = bench_drain(target)
        with connect(target, autocommit=True) as conn:
            # The drain wrote much WAL: a checkpoint's flush in the middle of the paced run
            # would be measured as latency (seconds of it on this machine).
            conn.execute("CHECKPOINT")
        result["latency"] = bench_latency(target, rate, seconds)
    return result


def json_bench_main(prog: str, doc: str, run_fn, rows_default: int, argv: list[str] | None,
                    add_options=None) -> int:
    """The command line shared by the benchmarks that print one JSON object (capture, replication).
    `add_options(parser)` adds a benchmark's own options, passed to run_fn by keyword."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=rows_default, help=f"rows per round (default {rows_default})")
    p.add_argument("--rate", type=float, default=1000, help="paced single-row commits/s (default 1000)")
    p.add_argument("--seconds", type=float, default=10, help="paced run length (default 10)")
    p.add_argument("--dsn", help="benchmark in this database instead of a throwaway embedded one")
    own = set(vars(p.parse_args([])))
    if add_options is not None:
        add_options(p)
    args = vars(p.parse_args(argv))
    extra = {k: v for k, v in args.items() if k not in own}
    result = run_fn(args["dsn"], args["rows"], args["rate"], args["seconds"], **extra)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    return json_bench_main("python -m listener.bench.capture", __doc__, run, 100_000, argv)


if __name__ == "__main__":
    raise SystemExit(main())
