"""Benchmark: latency of merkle.inclusion_proof / merkle.consistency_proof from SQL at N leaves.

    python -m listener.bench.sqlproof --leaves 1000000 [--samples 2000] [--dsn DSN] [--write-tiles]

How the log is built quickly: leaf i is hash_leaf(i as 8 bytes); TileBuilder turns them into
tiles 65,536 leaves at a time; every full tile is streamed straight into merkle.tiles with one
binary COPY (the table is new, so nothing is upserted) and the last partial tile of each level
is written at the end. Only merkle.logs and merkle.tiles are filled: proofs read nothing else,
so processed_log stays empty (merkle.leaf_hash is not measured). 10M leaves take a few
minutes, almost all of it SHA-256 in Python and the 640 MB of tile data.

Without --dsn a throwaway embedded PostgreSQL is started in a temporary directory under /tmp
and destroyed afterwards. With --dsn, the database must be empty of merkle objects or hold
the merkle schema; a log named `bench_<N>` is created in it (and dropped at the end).

Latency is measured at the client (prepared statement, Unix socket), for random arguments
at the full size N: inclusion_proof(i, N) and consistency_proof(m, N) with uniform i, m. The
round trip of `SELECT 1` is printed alongside, and every p50 as a ratio to the 1 ms target.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from listener.embedded import EmbeddedPostgres
from listener.merkle import (
    TileBuilder, consistency_proof, hash_leaf, inclusion_proof, verify_consistency, verify_inclusion,
)
from listener.store import migrate
from listener.store.tiles import TileNodeReader, write_tiles

TARGET_P50_MS = 1.0
BUILD_BATCH = 1 << 16


def build_log(conn: psycopg.Connection, name: str, leaves: int) -> tuple[int, bytes]:
    """Create log `name` with `leaves` leaves (tiles only). Returns (log_id, root)."""
    log_id = conn.execute(
        "INSERT INTO merkle.logs (name, origin) VALUES (%s, %s) RETURNING log_id", (name, f"bench.test/{name}")
    ).fetchone()[0]
    builder = TileBuilder()
    partial = {}
    with conn.cursor() as cur, cur.copy("COPY merkle.tiles (log_id, level, idx, width, nodes) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "int2", "int8", "int2", "bytea"])
        for start in range(0, leaves, BUILD_BATCH):
            batch = [hash_leaf(i.to_bytes(8, "big")) for i in range(start, min(leaves, start + BUILD_BATCH))]
            for tile in builder.append(batch):
                if tile.width == 256:
                    partial.pop((tile.level, tile.index), None)
                    copy.write_row((log_id, tile.level, tile.index, tile.width, tile.nodes))
                else:
                    partial[(tile.level, tile.index)] = tile
        for tile in partial.values():
            copy.write_row((log_id, tile.level, tile.index, tile.width, tile.nodes))
    conn.execute(
        "UPDATE merkle.logs SET tree_size = %s, root = %s WHERE log_id = %s", (builder.size, builder.root, log_id)
    )
    conn.execute("ANALYZE merkle.tiles")
    return log_id, builder.root


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds of samples in seconds."""
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def timed(conn: psycopg.Connection, sql: str, args_list: list[tuple]) -> tuple[list[float], list]:
    times, results = [], []
    # Binary results: parsing a text bytea[] in Python costs more than the proof itself.
    with conn.cursor(binary=True) as cur:
        for args in args_list:
            t0 = time.perf_counter()
            cur.execute(sql, args, prepare=True)
            row = cur.fetchone()
            times.append(time.perf_counter() - t0)
            results.append(row[0])
    return times, results


# Server-side timing of the same calls, without the client's round trip and array parsing.
SERVER_TIMER = """
CREATE FUNCTION pg_temp.time_proofs(log text, kind text, firsts bigint[], n bigint) RETURNS float8[]
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    times float8[] := '{}';
    proof bytea[];
    a bigint;
BEGIN
    FOREACH a IN ARRAY firsts LOOP
        t0 := clock_timestamp();
        IF kind = 'inclusion' THEN
            proof := merkle.inclusion_proof(log, a, n);
        ELSE
            proof := merkle.consistency_proof(log, a, n);
        END IF;
        times := times || extract(epoch FROM clock_timestamp() - t0)::float8;
    END LOOP;
    RETURN times;
END $$
"""


def server_times(conn: psycopg.Connection, name: str, kind: str, args: list[tuple]) -> list[float]:
    if not conn.execute("SELECT to_regproc('pg_temp.time_proofs') IS NOT NULL").fetchone()[0]:
        conn.execute(SERVER_TIMER)
    return conn.execute(
        "SELECT pg_temp.time_proofs(%s, %s, %s, %s)", (name, kind, [a[1] for a in args], args[0][2])
    ).fetchone()[0]


def measure(conn: psycopg.Connection, name: str, leaves: int, root: bytes, samples: int, seed: int) -> None:
    rnd = random.Random(seed)
    n = leaves
    inc_args = [(name, rnd.randrange(n), n) for _ in range(samples)]
    con_args = [(name, rnd.randrange(1, n + 1), n) for _ in range(samples)]
    # Warm up plans and caches with arguments that are not measured.
    timed(conn, "SELECT merkle.inclusion_proof(%s, %s, %s)", [(name, rnd.randrange(n), n) for _ in range(200)])
    timed(conn, "SELECT merkle.consistency_proof(%s, %s, %s)", [(name, rnd.randrange(1, n + 1), n) for _ in range(200)])
    base, _ = timed(conn, "SELECT %s::text, %s::bigint, %s::bigint", inc_args)
    inc, inc_proofs = timed(conn, "SELECT merkle.inclusion_proof(%s, %s, %s)", inc_args)
    con, con_proofs = timed(conn, "SELECT merkle.consistency_proof(%s, %s, %s)", con_args)

    # Spot-check answers: a benchmark of wrong proofs would be worthless.
    for (_, i, size), proof in list(zip(inc_args, inc_proofs))[:20]:
        verify_inclusion(hash_leaf(i.to_bytes(8, "big")), i, size, proof, root)
    for (_, m, size), proof in list(zip(con_args, con_proofs))[:5]:
        old_root = conn.execute("SELECT merkle.root(%s, %s)", (name, m)).fetchone()[0]
        verify_consistency(m, size, proof, old_root, root)

    inc_server = server_times(conn, name, "inclusion", inc_args)
    con_server = server_times(conn, name, "consistency", con_args)

    print(f"leaves {leaves:,}, {samples} random calls each at tree_size {n:,}")
    print("  client side (psycopg, Unix socket, prepared statement, binary results):")
    for label, times in (("SELECT 1-row round trip", base), ("inclusion_proof", inc), ("consistency_proof", con)):
        p50, p99 = percentiles(times)
        ratio = "" if label.startswith("SELECT") else f"   p50/target {p50 / TARGET_P50_MS:.2f}"
        print(f"  {label:<24} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms{ratio}")
    print("  server side (clock_timestamp() around each call, in one plpgsql loop):")
    for label, times in (("inclusion_proof", inc_server), ("consistency_proof", con_server)):
        p50, p99 = percentiles(times)
        ratio = "" if label.startswith("SELECT") else f"   p50/target {p50 / TARGET_P50_MS:.2f}"
        print(f"  {label:<24} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms{ratio}")


def measure_python(conn: psycopg.Connection, log_id: int, leaves: int, root: bytes, samples: int, seed: int) -> None:
    """The same proofs from the Python engine over TileNodeReader (one query per proof, LRU of
    full tiles shared across calls, as `prove` and a server would use it)."""
    rnd = random.Random(seed + 1)
    n = leaves
    reader = TileNodeReader(conn, log_id)
    for _ in range(200):  # warm-up, not measured
        inclusion_proof(reader, rnd.randrange(n), n)
    inc, con = [], []
    for _ in range(samples):
        i = rnd.randrange(n)
        t0 = time.perf_counter()
        proof = inclusion_proof(reader, i, n)
        inc.append(time.perf_counter() - t0)
        if len(inc) <= 20:
            verify_inclusion(hash_leaf(i.to_bytes(8, "big")), i, n, proof, root)
    for _ in range(samples):
        m = rnd.randrange(1, n + 1)
        t0 = time.perf_counter()
        consistency_proof(reader, m, n)
        con.append(time.perf_counter() - t0)
    print("  Python engine (listener.merkle over TileNodeReader, same connection):")
    for label, times in (("inclusion_proof", inc), ("consistency_proof", con)):
        p50, p99 = percentiles(times)
        print(f"  {label:<24} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")


# Run in a fresh interpreter so that RSS growth is the loaded state's alone.
LOAD_CHILD = """
import sys, time, psycopg
from listener.merkle import TileBuilder
from listener.store.tiles import load_partial_tiles
def rss_kb():
    return int(open('/proc/self/statm').read().split()[1]) * 4
dsn, log_id, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = psycopg.connect(dsn)
conn.execute('SELECT 1')
before = rss_kb()
t0 = time.perf_counter()
tree = TileBuilder(size, load_partial_tiles(conn, log_id, size))
seconds = time.perf_counter() - t0
root = conn.execute('SELECT root FROM merkle.logs WHERE log_id = %s', (log_id,)).fetchone()[0]
assert tree.root == root, 'loaded state does not give the stored root'
print(seconds, (rss_kb() - before) / 1024)
"""


def measure_load(dsn: str, log_id: int, leaves: int) -> None:
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, dsn, str(log_id), str(leaves)],
                         capture_output=True, text=True, check=True).stdout.split()
    seconds, rss_mb = float(out[0]), float(out[1])
    print(f"  load the log's state (right-most partial tiles -> TileBuilder, root checked): "
          f"{seconds * 1e3:.1f} ms (target <= 1000, ratio {seconds:.3f}), RSS growth {rss_mb:.1f} MB (target <= 50)")


def copy_tiles(conn: psycopg.Connection, log_id: int, tiles: list) -> None:
    """Plain binary COPY of new tiles: the floor that write_tiles' upsert is compared with."""
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy("COPY merkle.tiles (log_id, level, idx, width, nodes) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int2", "int8", "int2", "bytea"])
            for t in tiles:
                copy.write_row((log_id, t.level, t.index, t.width, t.nodes))


def measure_write_tiles(conn: psycopg.Connection) -> None:
    """write_tiles (pipelined upsert) against a plain COPY of the same new tiles, by tile count."""
    print("write_tiles of new full tiles, ms per call: write_tiles / plain COPY (no upsert):")
    for count in (1, 8, 50, 200, 2000):
        tiles = TileBuilder().append([hash_leaf(i.to_bytes(8, "big")) for i in range(256 * count)])
        tiles = [t for t in tiles if t.level == 0][:count]
        row = []
        for writer in (write_tiles, copy_tiles):
            log_id = conn.execute(
                "INSERT INTO merkle.logs (name, origin) VALUES (%s, 'bench.test') RETURNING log_id",
                (f"wt_{count}_{writer.__name__}",),
            ).fetchone()[0]
            t0 = time.perf_counter()
            writer(conn, log_id, tiles)
            row.append((time.perf_counter() - t0) * 1e3)
            conn.execute("DELETE FROM merkle.logs WHERE log_id = %s", (log_id,))
        print(f"  {count:5d} tiles: {row[0]:8.2f} / {row[1]:8.2f}   ratio {row[0] / row[1]:.2f}")


def run(dsn: str, leaves: int, samples: int, seed: int, write_test: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with psycopg.connect(dsn) as mconn:
            migrate.apply(mconn)
        name = f"bench_{leaves}"
        conn.execute("DELETE FROM merkle.logs WHERE name = %s", (name,))
        t0 = time.perf_counter()
        _, root = build_log(conn, name, leaves)
        size_mb = conn.execute("SELECT pg_total_relation_size('merkle.tiles') / 1e6").fetchone()[0]
        print(f"built {leaves:,} leaves in {time.perf_counter() - t0:.1f} s (merkle.tiles: {size_mb:.0f} MB)")
        log_id = conn.execute("SELECT log_id FROM merkle.logs WHERE name = %s", (name,)).fetchone()[0]
        try:
            measure(conn, name, leaves, root, samples, seed)
            measure_python(conn, log_id, leaves, root, samples, seed)
            measure_load(conn.info.dsn, log_id, leaves)
            if write_test:
                measure_write_tiles(conn)
        finally:
            conn.execute("DELETE FROM merkle.logs WHERE name = %s", (name,))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m listener.bench.sqlproof", description=__doc__.split("\n")[0])
    ap.add_argument("--leaves", type=int, required=True, help="log size N")
    ap.add_argument("--samples", type=int, default=2000, help="calls measured per function")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dsn", help="use this database instead of a throwaway embedded cluster")
    ap.add_argument("--write-tiles", action="store_true", help="also time write_tiles against a plain COPY")
    args = ap.parse_args(argv)
    if args.leaves < 2:
        ap.error("--leaves must be at least 2")
    if args.dsn:
        run(args.dsn, args.leaves, args.samples, args.seed, args.write_tiles)
        return 0
    server = EmbeddedPostgres(
        Path(tempfile.mkdtemp(prefix="ml-bench-", dir="/tmp")),
        settings={"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off", "shared_buffers": "256MB"},
    )
    server.start(owned=True)
    try:
        run(server.dsn(), args.leaves, args.samples, args.seed, args.write_tiles)
    finally:
        server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
