"""Shared test helpers: running the CLI as a user would, and checking a log end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from listener import merkle

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, dsn: str | None = None, env: dict | None = None, check: bool = False, timeout: float = 120,
        input: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "listener"]
    if dsn:
        cmd += ["--dsn", dsn]
    proc = subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd + list(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_listener(dsn: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "listener", "--dsn", dsn, "run", "--poll", "0.2", *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def check_log(conn: psycopg.Connection, log_name: str) -> list[tuple]:
    """The invariants a user checks: seq gap-free from 0, each change once, the stored root is
    the root of all leaf hashes in seq order. Returns the processed_log rows."""
    log_id, size, root = conn.execute(
        "SELECT log_id, tree_size, root FROM merkle.logs WHERE name = %s", (log_name,)).fetchone()
    rows = conn.execute(
        "SELECT seq, source_id, source_key, op, leaf_hash, change_id, change_ord "
        "FROM merkle.processed_log WHERE log_id = %s ORDER BY seq", (log_id,)).fetchall()
    assert [r[0] for r in rows] == list(range(size)), "seq must run 0..size-1 with no gap"
    assert len({(r[1], r[5], r[6]) for r in rows}) == len(rows), "a change was appended twice"
    tree = merkle.MemoryTree()
    tree.append([bytes(r[4]) for r in rows])
    assert merkle.root_at(tree, size) == bytes(root), "stored root differs from the root of the leaves"
    return rows
