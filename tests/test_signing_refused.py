"""A database restored from a backup older than the last signed checkpoint.

The signer's memory beside its key knows what was published; the restored tree does not extend
it, so the listener refuses to sign (a second history under one origin would be a split view).
It still appends every change, unsigned, and `status` says why and what to do. `log set-origin`
is the way out: the log's checkpoints begin again under a new origin, which verifiers check
with the same tools as before.
"""

from __future__ import annotations

import time
import urllib.request

import psycopg
import pytest

from listener.checkpoint import open_checkpoint
from listener.note import Verifier
from tests.helpers import check_log, cli, start_listener
from tests.test_replication import wait_for_size
from tests.test_restore import _dump, _restore, restored_name  # noqa: F401 - a fixture

# Signing after a restore: pg_dump/pg_restore and plain queries, alike between the ends.
pytestmark = pytest.mark.oldest_and_newest


def _write(dsn: str, ids) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for i in ids:
            c.execute("INSERT INTO t VALUES (%s, 'x')", (i,))


def _signed(dsn: str, size: int, timeout: float = 30) -> str:
    """Wait for the latest checkpoint to be at `size`; its note."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as c:
        while True:
            row = c.execute("SELECT tree_size, note FROM merkle.latest_checkpoint('a')").fetchone()
            if row is not None and row[0] == size:
                return row[1]
            assert time.monotonic() < deadline, f"no checkpoint at size {size} (latest: {row})"
            time.sleep(0.1)


def _served(url: str, note: str, timeout: float = 30) -> None:
    """Wait for the HTTP API to serve `note` as the log's checkpoint (it refreshes on NOTIFY)."""
    deadline = time.monotonic() + timeout
    while urllib.request.urlopen(f"{url}/a/checkpoint").read().decode() != note:
        assert time.monotonic() < deadline, "the HTTP API did not serve the new checkpoint"
        time.sleep(0.05)


def test_an_older_backup_is_appended_unsigned_until_the_log_has_a_new_origin(pg_server, rconn, restored_name,
                                                                             tmp_path):
    dsn = rconn.info.dsn
    rconn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    cli("log", "create", "a", dsn=dsn, check=True)
    cli("source", "add", "a", "t", dsn=dsn, check=True)
    key = tmp_path / "a.key"
    vkey = cli("keygen", "merkle-listener/a", "--out", str(key), check=True).stdout.splitlines()[0]
    signing = ("--key", str(key), "--checkpoint-interval", "100")

    _write(dsn, range(1, 4))
    listener = start_listener(dsn, *signing)
    try:
        _signed(dsn, 3)
    finally:
        listener.stop()
    backup = _dump(dsn, tmp_path)  # taken at size 3
    _write(dsn, range(4, 7))
    listener = start_listener(dsn, *signing)
    try:
        seen = tmp_path / "monitor-state"
        seen.write_text(_signed(dsn, 6))  # published: the world (here, a monitor) has seen size 6
    finally:
        listener.stop()

    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {restored_name} TEMPLATE template0")
    new = pg_server.dsn(restored_name)
    _restore(backup, new)
    cli("init", dsn=new, check=True)  # points the source at its restored table
    _write(new, range(10, 14))  # written after the restore: a different history from size 3 on

    listener = start_listener(new, *signing, "--http", "127.0.0.1:0")
    monitor = ("monitor", "a", "--url", listener.http_url(), "--vkey", vkey, "--once", "--state", str(seen))
    try:
        with psycopg.connect(new, autocommit=True) as c:
            wait_for_size(c, "a", 7, listener=listener)  # appended, although nothing may be signed
            listener.wait_for("signing refused")
            _write(new, range(14, 16))
            wait_for_size(c, "a", 9, listener=listener)
            assert c.execute("SELECT max(tree_size) FROM merkle.checkpoints").fetchone()[0] == 3
        status = cli("status", dsn=new)
        assert status.returncode == 3, status.stdout + status.stderr
        assert "does not extend the checkpoint of origin 'merkle-listener/a' at size 6" in status.stdout
        assert "merkle-listener log set-origin a NEW_ORIGIN" in status.stdout, status.stdout

        shrunk = cli(*monitor)
        assert shrunk.returncode == 1 and "INCONSISTENT" in shrunk.stderr, shrunk.stdout + shrunk.stderr

        moved = cli("log", "set-origin", "a", "merkle-listener/a/2", dsn=new, check=True)
        assert "origin 'merkle-listener/a' retired (its last checkpoint known here is at size 6; the log has 9 " \
            "leaves)" in moved.stdout and "'merkle-listener/a' ended at size 6" in moved.stdout, moved.stdout
        _write(new, range(16, 18))
        note = _signed(new, 11)  # the running listener signs under the new origin
        _served(listener.http_url(), note)
        renamed = cli(*monitor)  # told, not followed: following the new origin is the verifier's call
        assert renamed.returncode == 1 and "the checkpoint is of origin 'merkle-listener/a/2', not 'merkle-listener/a'" in \
            renamed.stderr and "retired the old origin" in renamed.stderr, renamed.stderr
    finally:
        said = listener.stop()
    assert said.count("signing refused") == 1, said  # reported once, not at every attempt
    cp, _ = open_checkpoint(note, [Verifier.parse(vkey)], origin="merkle-listener/a/2")
    assert cp.size == 11
    with psycopg.connect(new, autocommit=True) as c:
        check_log(c, "a")
    status = cli("status", dsn=new)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "retired origin merkle-listener/a (its last checkpoint at size 6;" in status.stdout, status.stdout

    # A newly written row is proved against the new origin's checkpoint, by the standard verifier.
    (tmp_path / "cp.txt").write_text(note)
    proof = cli("prove", "inclusion", "a", "10", "--size", "11", dsn=new, check=True).stdout
    (tmp_path / "proof.json").write_text(proof)
    verified = cli("verify", str(tmp_path / "proof.json"), "--checkpoint", str(tmp_path / "cp.txt"), "--vkey", vkey,
                   check=True)
    assert "merkle-listener/a/2" in verified.stdout, verified.stdout
    # The original database, which never went back, still signs under its first origin.
    assert open_checkpoint(_signed(dsn, 6), [Verifier.parse(vkey)], origin="merkle-listener/a")[0].size == 6
