"""Benchmarks: commands that print measured rates and their ratio to a limit measured in the same run.

    merkle-listener bench tree     TileBuilder.append vs raw hashlib          (listener.bench.tree)
    merkle-listener bench sql      SQL proof latency at N leaves              (listener.bench.sqlproof)
    merkle-listener bench capture  writers with/without capture, drain rate,
                                   commit->sequenced latency                  (listener.bench.capture)
    merkle-listener bench http     inclusion proofs/s over HTTP at N leaves   (listener.bench.http)
    merkle-listener bench replication
                                   pgoutput stream vs pg_recvlogical, writers
                                   with/without the slot, latency             (listener.bench.replication)
"""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    """Entry point of `merkle-listener bench WHAT`; each module also runs as `python -m`."""
    if args.what == "tree":
        from listener.bench import tree

        argv = ["--leaves", str(args.leaves or (30_000 if args.quick else 300_000))]
        if args.quick:
            argv += ["--batch", "10000", "--repeat", "1"]
        return tree.main(argv)
    if args.what == "sql":
        from listener.bench import sqlproof

        argv = ["--leaves", str(args.leaves or (20_000 if args.quick else 1_000_000))]
        if args.quick:
            argv += ["--samples", "200"]
        if args.dsn:
            argv += ["--dsn", args.dsn]
        return sqlproof.main(argv)
    if args.what == "http":
        from listener.bench import http

        argv = ["--leaves", str(args.leaves or (20_000 if args.quick else 10_000_000))]
        argv += ["--seconds", "2"] if args.quick else ["--connections", "16", "--workers", "2", "--cache-mb", "1024", "--preload"]
        return http.main(argv)
    if args.what == "replication":
        from listener.bench import replication

        argv = ["--rows", "5000", "--seconds", "2"] if args.quick else []
        if args.dsn:
            argv += ["--dsn", args.dsn]
        return replication.main(argv)
    from listener.bench import capture

    argv = ["--rows", "5000", "--seconds", "2"] if args.quick else []
    if args.dsn:
        argv += ["--dsn", args.dsn]
    return capture.main(argv)
