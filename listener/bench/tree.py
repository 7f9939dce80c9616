"""Benchmark of the Merkle engine's append path: TileBuilder.append against raw hashlib.

The limit is what hashlib alone can do for a leaf: two SHA-256 calls (the leaf hash over a
realistic canonical entry, and one interior node hash over 64 bytes), as every leaf of a
Merkle tree costs one leaf hash and, amortised, one node hash. Both are measured in the same
run, in the same batch sizes, best of `repeat`, so the ratio holds on a loaded machine too.

    python -m listener.bench.tree [--leaves N] [--batch B] [--repeat R]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import orjson

from listener.merkle import TileBuilder


def _entries(n: int) -> list[bytes]:
    # Shaped like canonical entries v1: ~120 bytes of sorted-key JSON per row.
    return [
        b'{"op":"insert","row":{"amount":"%d.50","id":"%d","name":"customer %d"},"source":"public.orders","v":1}'
        % (i * 7, i, i)
        for i in range(n)
    ]


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_append(n_leaves: int = 300_000, batch: int = 100_000, repeat: int = 3) -> dict:
    """Measure appending `n_leaves` in batches of `batch`; print and return the numbers.

    Returns leaves/s for: the raw hashlib limit (2 SHA-256 per leaf), leaf hashing plus
    TileBuilder.append (the sequencer's work per batch), and append alone; plus the ratios.
    Requires n_leaves >= 2 and batch >= 1.
    """
    if n_leaves < 2 or batch < 1:
        raise ValueError("bench_append needs n_leaves >= 2 and batch >= 1")
    entries = _entries(n_leaves)
    sha = hashlib.sha256
    leaf_hashes = [sha(b"\x00" + e).digest() for e in entries]

    def raw() -> None:
        # Same batch sizes as the append runs, so list sizes (and cache effects) match.
        for start in range(0, n_leaves, batch):
            hashes = [sha(b"\x00" + e).digest() for e in entries[start : start + batch]]
            [sha(b"\x01" + a + b).digest() for a, b in zip(hashes, hashes[1:] + hashes[:1])]

    def hash_and_append() -> None:
        builder = TileBuilder()
        for start in range(0, n_leaves, batch):
            builder.append([sha(b"\x00" + e).digest() for e in entries[start : start + batch]])

    def append_only() -> None:
        builder = TileBuilder()
        for start in range(0, n_leaves, batch):
            builder.append(leaf_hashes[start : start + batch])

    t_raw = _best(raw, repeat)
    t_pipeline = _best(hash_and_append, repeat)
    t_append = _best(append_only, repeat)
    result = {
        "leaves": n_leaves,
        "batch": batch,
        "hashlib_limit_leaves_per_s": round(n_leaves / t_raw),
        "hash_and_append_leaves_per_s": round(n_leaves / t_pipeline),
        "append_only_leaves_per_s": round(n_leaves / t_append),
        "ratio_to_limit": round(t_raw / t_pipeline, 3),
    }
    print(orjson.dumps(result).decode())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m listener.bench.tree", description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", type=int, default=300_000, help="leaves appended per run (default 300000)")
    parser.add_argument("--batch", type=int, default=100_000, help="leaves per TileBuilder.append (default 100000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept (default 3)")
    args = parser.parse_args(argv)
    try:
        bench_append(args.leaves, args.batch, args.repeat)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
