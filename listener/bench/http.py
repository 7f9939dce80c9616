"""Benchmark of the HTTP API: inclusion proofs per second and p50/p99 latency at 10M leaves.

    python -m listener.bench.http [--leaves 10000000] [--seconds 10] [--connections 32] [--dsn DSN]

Builds a log of `leaves` random-looking leaves straight into merkle.tiles (the sequencer is
not measured here), signs a checkpoint, starts `merkle-listener serve` in its own process and
drives it with a small keep-alive HTTP/1.1 load generator (asyncio, raw sockets) asking for
inclusion proofs of uniformly random leaves at the checkpoint's size. In the same run it
measures /healthz (the server and load generator with no proof work) as the ceiling, and
prints the ratios to the issue's targets: >= 5,000 proofs/s and p99 <= 10 ms.

Without --dsn an embedded PostgreSQL is created in a temporary directory and removed after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from listener.bench.sqlproof import build_log
from listener.note import Signer
from listener.store import migrate
from listener.store.checkpoints import publish
from listener.store.connect import options_string

TARGET_RATE = 5000.0
TARGET_P99_MS = 10.0


async def _load(port: int, make_path, seconds: float, connections: int) -> tuple[int, list[float], int]:
    """Keep `connections` keep-alive connections busy for `seconds`; returns (requests, latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                writer.write(f"GET {make_path()} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return len(latencies), latencies, errors


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its running child processes (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:13]) / os.sysconf("SC_CLK_TCK")
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += _cpu_seconds(int(child))
        except OSError:
            pass
    return total


def _measure(port: int, make_path, seconds: float, connections: int, server_pid: int) -> dict:
    cpu0, own0 = _cpu_seconds(server_pid), time.process_time()
    n, lat, errors = asyncio.run(_load(port, make_path, seconds, connections))
    cpu, own = _cpu_seconds(server_pid) - cpu0, time.process_time() - own0
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"rate": n / seconds, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "errors": errors, "requests": n,
            "server_us": cpu / n * 1e6, "client_us": own / n * 1e6}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_workers(port: int, workers: int, timeout: float = 300) -> None:
    """Until `workers` distinct server processes have answered /healthz (each listens only
    once its cache is preloaded)."""
    import orjson

    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(seen)} of {workers} server processes came up within {timeout}s")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            seen.add(orjson.loads(data.split(b"\r\n\r\n", 1)[1])["pid"])
        except OSError:
            time.sleep(0.2)


def run(dsn: str, leaves: int, seconds: float, connections: int, cache_mb: int, workers: int = 1,
        preload: bool = False) -> dict:
    with psycopg.connect(dsn, options=options_string()) as conn:
        migrate.apply(conn)
        conn.commit()
        conn.autocommit = True
        have = conn.execute("SELECT tree_size FROM merkle.logs WHERE name = 'bench'").fetchone()
        if have is None or have[0] != leaves:
            conn.execute("DELETE FROM merkle.logs WHERE name = 'bench'")
            t0 = time.perf_counter()
            build_log(conn, "bench", leaves)
            print(f"built a log of {leaves:,} leaves in {time.perf_counter() - t0:.1f} s", flush=True)
        conn.autocommit = False
        publish(conn, "bench", Signer.generate("bench.test/bench"), None)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "listener", "--dsn", dsn, "serve", "--http", f"127.0.0.1:{port}", "--cache-mb", str(cache_mb),
         "--workers", str(workers), *(["--preload"] if preload else [])],
        stdout=subprocess.DEVNULL,
    )
    try:
        t0 = time.perf_counter()
        _wait_for_workers(port, workers)
        print(f"{workers} server process(es) up in {time.perf_counter() - t0:.1f} s", flush=True)
        rnd = random.Random(1)
        proof = lambda: f"/v1/logs/bench/proof/inclusion?index={rnd.randrange(leaves)}"  # noqa: E731
        _measure(port, proof, min(3.0, seconds), connections, server.pid)  # warm-up: connections, caches
        ceiling = _measure(port, lambda: "/healthz", seconds / 2, connections, server.pid)
        proofs = _measure(port, proof, seconds, connections, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"ceiling": ceiling, "proofs": proofs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m listener.bench.http", description=__doc__.split("\n\n")[0])
    p.add_argument("--leaves", type=int, default=10_000_000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--cache-mb", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="`serve --workers` (server processes)")
    p.add_argument("--preload", action="store_true", help="`serve --preload` (fill the tile cache first)")
    p.add_argument("--dsn", help="an existing database (its log 'bench' is reused when it has --leaves leaves)")
    args = p.parse_args(argv)
    if args.dsn:
        result = run(args.dsn, args.leaves, args.seconds, args.connections, args.cache_mb, args.workers, args.preload)
    else:
        from listener.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="ml-bench-")), settings={"fsync": "off"})
        server.start(owned=True)
        try:
            result = run(server.dsn(), args.leaves, args.seconds, args.connections, args.cache_mb, args.workers, args.preload)
        finally:
            server.destroy()
    c, r = result["ceiling"], result["proofs"]
    print("load average (1, 5, 15 min) at the end: %.2f %.2f %.2f (the machine may be shared)" % os.getloadavg())
    print(f"cpus: {os.cpu_count()}  leaves: {args.leaves:,}  connections: {args.connections}  "
          f"workers: {args.workers}  cache: {args.cache_mb} MB per worker{' (preloaded)' if args.preload else ''}")
    for what, m in (("/healthz (ceiling)", c), ("inclusion proofs", r)):
        print(f"{what:22s} {m['rate']:8.0f} /s   p50 {m['p50_ms']:6.2f} ms   p99 {m['p99_ms']:6.2f} ms   "
              f"CPU per request: server {m['server_us']:5.0f} us, load generator {m['client_us']:4.0f} us   "
              f"errors {m['errors']}")
    print(f"ratios: proofs/ceiling {r['rate'] / c['rate']:.2f}   rate/target {r['rate'] / TARGET_RATE:.2f} "
          f"(target {TARGET_RATE:.0f}/s)   p99/target {r['p99_ms'] / TARGET_P99_MS:.2f} (target {TARGET_P99_MS:.0f} ms)")
    return 0 if r["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
