"""Shared test helpers: running the CLI as a user would, and checking a log end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from listener import merkle

ROOT = Path(__file__).resolve().parent.parent


def environment(changes: dict | None) -> dict:
    """os.environ with `changes` applied; a value of None removes the variable."""
    env = {**os.environ, **(changes or {})}
    return {k: v for k, v in env.items() if v is not None}


def cli(*args: str, dsn: str | None = None, env: dict | None = None, check: bool = False, timeout: float = 120,
        input: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "listener"]
    if dsn:
        cmd += ["--dsn", dsn]
    proc = subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=environment(env), input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd + list(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Listener:
    """`merkle-listener run` in a subprocess; its JSON log goes to a file (a pipe could fill up
    and stall it)."""

    def __init__(self, dsn: str, *extra: str, preexec_fn=None):
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "listener", "--dsn", dsn, "run", "--poll", "0.2", *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log, text=True, preexec_fn=preexec_fn,
        )

    def _logged(self) -> str:
        """What the listener has logged so far. Read with pread: the listener writes through the
        same open file, and a seek here would move where its next line lands (over older ones)."""
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Wait until the listener has logged `text`."""
        deadline = time.monotonic() + timeout
        while text not in self._logged():
            assert self.proc.poll() is None, f"the listener exited ({self.proc.returncode}) before logging {text!r}"
            assert time.monotonic() < deadline, f"the listener did not log {text!r} within {timeout} s"
            time.sleep(0.05)

    def http_url(self, timeout: float = 60) -> str:
        """The URL of the HTTP API it serves, from its "HTTP API listening" log line (for
        `--http 127.0.0.1:0`: a port no other test can take between choosing and binding it)."""
        deadline = time.monotonic() + timeout
        while True:
            self.wait_for('"HTTP API listening"', max(deadline - time.monotonic(), 0.1))
            lines = [x for x in self._logged().split("\n")[:-1] if '"HTTP API listening"' in x]  # whole lines
            if lines:
                return f"http://{json.loads(lines[0])['address']}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Send `sig`, wait for the exit, return what the listener logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        if not self._log.closed:
            self.text = self._logged()
            self._log.close()
        return self.text


def start_listener(dsn: str, *extra: str) -> Listener:
    return Listener(dsn, *extra)


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


def slots(conn: psycopg.Connection) -> list[str]:
    """Replication slots of the connection's database."""
    return [r[0] for r in conn.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = current_database() ORDER BY 1")]


def drop_slot(conn: psycopg.Connection, name: str) -> None:
    """Drop the slot (an autocommit superuser connection), ending the walsender streaming it."""
    conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                 "WHERE slot_name = %s AND active_pid IS NOT NULL", (name,))
    for _ in range(100):
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            return
        except psycopg.errors.ObjectInUse:  # the walsender has not exited yet
            time.sleep(0.05)
    raise AssertionError(f"slot {name} stayed in use")
