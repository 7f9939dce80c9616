"""A replication log that cannot go on: what `status` says, and that the way out it gives works.

A stream that lost a value the leaf needs, a slot gone while a backfill waited, and
walsenders used up.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import anyio
import psycopg
import pytest

from listener import canonical, registry
from listener.errors import ProcessingError
from listener.embedded import EmbeddedPostgres
from listener.runner import ERROR_FORGOTTEN_AFTER, _WriterErrors
from listener.store import migrate
from listener.store.connect import open_replication
from tests.helpers import check_log, cli, drop_slot, slots, start_listener
from tests.test_replication import orjson_id, wait_for_size

# Messages and recovery paths, alike on every version between the ends.
pytestmark = pytest.mark.oldest_and_newest


def _without_the_guard(conn: psycopg.Connection, statement: str) -> None:
    """Run `statement` as in a database where the DDL guard is not installed."""
    guard = conn.execute("SELECT evtname, evtenabled FROM pg_event_trigger WHERE evtname LIKE 'merkle%'").fetchall()
    assert guard, "the test databases have the guard"
    for name, _ in guard:
        conn.execute(f'ALTER EVENT TRIGGER "{name}" DISABLE')
    try:
        conn.execute(statement)
    finally:
        for name, enabled in guard:
            how = {"O": "ENABLE", "A": "ENABLE ALWAYS", "R": "ENABLE REPLICA"}[enabled]
            conn.execute(f'ALTER EVENT TRIGGER "{name}" {how}')


def _status(dsn: str, want_code: int, want_text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = cli("status", dsn=dsn)
        if out.returncode == want_code and want_text in out.stdout:
            return out.stdout
        assert time.monotonic() < deadline, f"status never said {want_text!r} (exit {out.returncode}):\n{out.stdout}"
        time.sleep(0.3)


def test_a_change_the_stream_cannot_log_stops_the_log_and_status_says_so(rconn):
    """An UPDATE whose unchanged TOASTed value the WAL lacks (the table's identity lowered from
    FULL with the DDL guard out of the way) cannot be logged: the log stops there, `status` exits
    3 with the listener's reason, and the recovery the message gives (FULL again, drop the slot,
    remove and re-add with --backfill) logs the rows as they are and clears the error."""
    conn, dsn = rconn, rconn.info.dsn
    conn.execute("CREATE TABLE tt (id int PRIMARY KEY, big text, n int)")
    conn.execute("ALTER TABLE tt ALTER big SET STORAGE EXTERNAL")  # out of line: "unchanged" on update
    conn.execute("ALTER TABLE tt REPLICA IDENTITY FULL")
    registry.create_log(conn, "stuck")
    cli("source", "add", "stuck", "tt", "--mode", "replication", "--events", "insert,update,delete",
        dsn=dsn, check=True)
    listener = start_listener(dsn)
    try:
        conn.execute("INSERT INTO tt VALUES (1, repeat('x', 5000), 0)")
        wait_for_size(conn, "stuck", 1, listener=listener)
        _without_the_guard(conn, "ALTER TABLE tt REPLICA IDENTITY DEFAULT")
        conn.execute("UPDATE tt SET n = 1 WHERE id = 1")
        conn.execute("INSERT INTO tt VALUES (2, 'small', 0)")
        listener.wait_for("without the value of column big", timeout=30)
        shown = _status(dsn, 3, "the listener cannot append to this log")
        assert 'ALTER TABLE "public"."tt" REPLICA IDENTITY FULL' in shown and "drop the log's slot" in shown, shown
        assert conn.execute("SELECT tree_size FROM merkle.logs WHERE name = 'stuck'").fetchone()[0] == 1
    finally:
        listener.stop()
    # The recovery, as the message gives it.
    conn.execute("ALTER TABLE tt REPLICA IDENTITY FULL")
    drop_slot(conn, "merkle_stuck")
    cli("source", "remove", "stuck", "tt", dsn=dsn, check=True)
    out = cli("source", "add", "stuck", "tt", "--mode", "replication", "--events", "insert,update,delete",
              "--backfill", dsn=dsn, check=True)
    assert "2 existing rows queued" in out.stdout, out.stdout
    # Found by review: the error outlived its recovery, until a listener ran for a while.
    shown = _status(dsn, 0, "log stuck", timeout=0)
    assert "cannot append" not in shown, shown
    listener = start_listener(dsn)
    try:
        wait_for_size(conn, "stuck", 3, listener=listener)
        conn.execute("UPDATE tt SET n = 2 WHERE id = 1")  # carried whole again
        wait_for_size(conn, "stuck", 4, listener=listener)
        shown = _status(dsn, 0, "log stuck")
        assert "cannot append" not in shown, shown
    finally:
        said = listener.stop()
    assert "writer stopped on error" not in said, said[-3000:]
    h, e = canonical.leaf_hash_of_entry, canonical.entry_v1
    rows = check_log(conn, "stuck")
    assert [bytes(r[4]) for r in rows] == [
        h(e("insert", "public.tt", {"id": "1", "big": "x" * 5000, "n": "0"})),
        h(e("backfill", "public.tt", {"id": "1", "big": "x" * 5000, "n": "1"})),
        h(e("backfill", "public.tt", {"id": "2", "big": "small", "n": "0"})),
        h(e("update", "public.tt", {"id": "1", "big": "x" * 5000, "n": "2"})),
    ]


def test_source_remove_finishes_when_the_slot_is_gone_before_its_backfill_was_appended(rconn):
    """A backfill is appended only while the log's slot streams: with the slot dropped first,
    `source remove` used to wait for it for ever (exit 3, "run `merkle-listener run`"), and the
    re-add that `status` asks for was refused. It now removes the source, saying which rows of
    the backfill are not in the log, and the re-add logs them."""
    conn, dsn = rconn, rconn.info.dsn
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    conn.execute("INSERT INTO b SELECT generate_series(1, 3)")
    registry.create_log(conn, "bf")
    out = cli("source", "add", "bf", "b", "--mode", "replication", "--backfill", dsn=dsn, check=True)
    assert "3 existing rows queued" in out.stdout
    drop_slot(conn, "merkle_bf")
    assert _status(dsn, 3, "slot merkle_bf: MISSING")
    out = cli("source", "remove", "bf", "b", "--wait", "0", dsn=dsn)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"the log's slot is missing: changes of public\.b committed after [0-9A-F]+/[0-9A-F]+, the "
                     r"position the log is logged up to, are not in the log, nor are the last 3 rows of its "
                     r"backfill\. Adding the table again with --backfill", out.stderr), out.stderr
    assert conn.execute("SELECT count(*) FROM merkle.replication_backfill").fetchone()[0] == 0
    # Found by review: the command given to add it back left out the --backfill the warning asks for.
    (readd,) = [line for line in out.stdout.splitlines() if "source add" in line]
    assert readd.startswith("to add it again as it was, logging its rows as they are now:") and readd.endswith(
        "--backfill"), out.stdout
    conn.execute("INSERT INTO b VALUES (4)")
    out = cli("source", "add", "bf", "b", "--mode", "replication", "--backfill", dsn=dsn, check=True)
    assert "4 existing rows queued" in out.stdout
    listener = start_listener(dsn)
    try:
        conn.execute("INSERT INTO b VALUES (5)")
        wait_for_size(conn, "bf", 5, listener=listener)
    finally:
        listener.stop()
    assert [(r[3], orjson_id(r[2])) for r in check_log(conn, "bf")] == [
        ("backfill", "1"), ("backfill", "2"), ("backfill", "3"), ("backfill", "4"), ("insert", "5")]
    _status(dsn, 0, "log bf")


def test_source_remove_still_waits_for_a_backfill_the_slot_can_append(rconn):
    """With the slot in place the backfill is still on its way: `source remove` keeps waiting
    (exit 3) rather than leave part of the table's rows in the log."""
    conn, dsn = rconn, rconn.info.dsn
    conn.execute("CREATE TABLE w (id int PRIMARY KEY)")
    conn.execute("INSERT INTO w VALUES (1)")
    registry.create_log(conn, "bw")
    cli("source", "add", "bw", "w", "--mode", "replication", "--backfill", dsn=dsn, check=True)
    out = cli("source", "remove", "bw", "w", "--wait", "0", dsn=dsn)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "1 rows of its backfill may still be on their way" in out.stdout, out.stdout
    assert conn.execute("SELECT count(*) FROM merkle.replication_backfill").fetchone()[0] == 1


def test_walsenders_used_up_are_reported_with_the_fix(pg_server):
    """Each streaming log holds a walsender and `source add` needs one more to create a slot:
    with none free, the refusal names max_wal_senders and what holds them, and nothing is
    registered."""
    base = Path(tempfile.mkdtemp(prefix="ml-senders-"))
    server = EmbeddedPostgres(base, settings={"max_wal_senders": "1"}, bin_dir=pg_server.bin_dir)
    server.start(owned=True)
    try:
        dsn = server.dsn()
        with psycopg.connect(dsn) as conn:
            migrate.apply(conn)
            conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
            conn.commit()
            registry.create_log(conn, "sa")
            conn.commit()
        held = open_replication(dsn)  # the one walsender, as a streaming listener holds it
        try:
            out = cli("source", "add", "sa", "a", "--mode", "replication", dsn=dsn)
        finally:
            held.finish()
        assert out.returncode != 0
        assert "max_wal_senders" in out.stderr and "every log a listener streams holds a walsender" in out.stderr, \
            out.stderr
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM merkle.sources").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0
        # With the walsender free again, the same command works.
        cli("source", "add", "sa", "a", "--mode", "replication", dsn=dsn, check=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('merkle_sa')")
    finally:
        server.destroy()


def test_source_remove_with_the_slot_moved_past_the_log_says_so(rconn):
    """A slot moved past the log is not streamed until the user chooses how to go on: `source
    remove` keeps the backfill waiting (the user may accept the gap, and it is then appended) and
    says why, not "run `merkle-listener run`"."""
    conn, dsn = rconn, rconn.info.dsn
    conn.execute("CREATE TABLE m (id int PRIMARY KEY)")
    conn.execute("INSERT INTO m VALUES (1)")
    registry.create_log(conn, "mv")
    cli("source", "add", "mv", "m", "--mode", "replication", "--backfill", dsn=dsn, check=True)
    conn.execute("CREATE TABLE elsewhere (id int)")
    conn.execute("INSERT INTO elsewhere VALUES (1)")  # WAL to move the slot over
    conn.execute("SELECT pg_replication_slot_advance('merkle_mv', pg_current_wal_lsn())")
    assert _status(dsn, 3, "something other than merkle-listener moved it")
    out = cli("source", "remove", "mv", "m", "--wait", "0", dsn=dsn)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "log 'mv''s slot was moved past the log, and no listener streams it until you choose" in out.stdout, \
        out.stdout
    assert conn.execute("SELECT count(*) FROM merkle.replication_backfill").fetchone()[0] == 1


def test_an_error_not_kept_while_the_logs_row_was_locked_is_kept_at_a_later_stop(rconn):
    """Found by review: the writer's error was saved only at its second stop, and a save that
    waited too long for the log's row (held by a `source add`, say) was never tried again."""
    conn, dsn = rconn, rconn.info.dsn
    registry.create_log(conn, "w")
    errors = _WriterErrors(dsn, "w")
    stuck = ProcessingError("public.tt: a change arrived without the value of column big")
    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT 1 FROM merkle.logs WHERE name = 'w' FOR UPDATE")
    try:
        anyio.run(errors.stopped, stuck)
        anyio.run(errors.stopped, stuck)  # its save gives up after the lock timeout
    finally:
        blocker.rollback()
        blocker.close()
    assert conn.execute("SELECT writer_error FROM merkle.logs WHERE name = 'w'").fetchone()[0] is None
    anyio.run(errors.stopped, stuck)
    assert conn.execute("SELECT writer_error FROM merkle.logs WHERE name = 'w'").fetchone()[0] == str(stuck)
    # Cleared by a change of the log's sources, and kept again at the next stop.
    conn.execute("CREATE TABLE s (id int PRIMARY KEY)")
    cli("source", "add", "w", "s", dsn=dsn, check=True)
    assert conn.execute("SELECT writer_error FROM merkle.logs WHERE name = 'w'").fetchone()[0] is None
    anyio.run(errors.stopped, stuck)
    assert conn.execute("SELECT writer_error FROM merkle.logs WHERE name = 'w'").fetchone()[0] == str(stuck)


def _lose_the_slot(conn: psycopg.Connection, slot: str) -> None:
    """Have PostgreSQL remove WAL the slot needs (max_slot_wal_keep_size, then checkpoints)."""
    conn.execute("CREATE TABLE filler (id int)")
    conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    conn.execute("SELECT pg_reload_conf()")
    try:
        for _ in range(10):
            conn.execute("INSERT INTO filler SELECT generate_series(1, 1000)")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            wal_status = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                                      (slot,)).fetchone()[0]
            if wal_status == "lost":
                return
        raise AssertionError(f"slot {slot} is {wal_status}, not lost")
    finally:
        conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        conn.execute("SELECT pg_reload_conf()")


def test_source_remove_with_a_lost_slot_says_which_changes_are_not_in_the_log(rconn):
    """Found by review: with the slot lost before it had streamed the table's last changes,
    `source remove` removed the source (and the log's last slot) without a word about them."""
    conn, dsn = rconn, rconn.info.dsn
    conn.execute("CREATE TABLE lossy (id int PRIMARY KEY)")
    registry.create_log(conn, "lossy")
    cli("source", "add", "lossy", "lossy", "--mode", "replication", dsn=dsn, check=True)
    conn.execute("INSERT INTO lossy SELECT generate_series(1, 5)")  # streamed by no listener
    _lose_the_slot(conn, "merkle_lossy")
    out = cli("source", "remove", "lossy", "lossy", "--wait", "0", dsn=dsn)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"the log's slot is lost: changes of public\.lossy committed after [0-9A-F]+/[0-9A-F]+, the "
                     r"position the log is logged up to, are not in the log\. Adding the table again with "
                     r"--backfill", out.stderr), out.stderr
    assert "--backfill" in [line for line in out.stdout.splitlines() if "source add" in line][0], out.stdout
    assert conn.execute("SELECT tree_size FROM merkle.logs WHERE name = 'lossy'").fetchone()[0] == 0
    assert slots(conn) == []


def test_an_error_that_a_slow_retry_takes_minutes_to_reach_is_still_kept(rconn):
    """Each retry decodes the stuck transaction again before it fails: if that takes longer
    than ERROR_FORGOTTEN_AFTER, the error was forgotten between stops and never shown. An
    attempt that appended nothing before it stopped now tells how long to remember it."""
    conn, dsn = rconn, rconn.info.dsn
    registry.create_log(conn, "slow")
    now = [0.0]
    errors = _WriterErrors(dsn, "slow", clock=lambda: now[0])
    stuck = ProcessingError("public.tt: a change arrived without the value of column big")

    def kept() -> str | None:
        return conn.execute("SELECT writer_error FROM merkle.logs WHERE name = 'slow'").fetchone()[0]

    def attempt_that_stops_after(seconds: float) -> None:
        errors.attempt()
        for _ in range(int(seconds // 10)):  # its rounds while the stream decodes
            now[0] += 10
            anyio.run(errors.running, conn)
        anyio.run(errors.stopped, stuck)

    attempt_that_stops_after(ERROR_FORGOTTEN_AFTER * 2.5)
    attempt_that_stops_after(ERROR_FORGOTTEN_AFTER * 2.5)
    assert kept() == str(stuck)
    attempt_that_stops_after(ERROR_FORGOTTEN_AFTER * 2.5)
    assert kept() == str(stuck)

    # An attempt that appends is past the error: forgotten after the usual time, not twice the
    # stopped attempt's.
    errors.attempt()
    now[0] += ERROR_FORGOTTEN_AFTER - 2
    errors.progressed()
    anyio.run(errors.running, conn)
    assert kept() == str(stuck)
    now[0] += 3
    anyio.run(errors.running, conn)
    assert kept() is None


def test_an_error_after_progress_is_forgotten_after_the_usual_time(rconn):
    """A writer that appended for hours, then stopped twice on a passing error: the length of
    its last attempt says nothing of a retry, so the error is not remembered for twice that."""
    conn, dsn = rconn, rconn.info.dsn
    registry.create_log(conn, "busy")
    now = [0.0]
    errors = _WriterErrors(dsn, "busy", clock=lambda: now[0])
    passing = ProcessingError("canceling statement due to lock timeout")
    errors.attempt()
    errors.progressed()
    now[0] += 3 * 3600
    anyio.run(errors.stopped, passing)
    errors.attempt()
    now[0] += 1
    anyio.run(errors.stopped, passing)
    assert conn.execute("SELECT writer_error FROM merkle.logs WHERE name = 'busy'").fetchone()[0] == str(passing)
    errors.attempt()
    errors.progressed()
    now[0] += ERROR_FORGOTTEN_AFTER + 1
    anyio.run(errors.running, conn)
    assert conn.execute("SELECT writer_error FROM merkle.logs WHERE name = 'busy'").fetchone()[0] is None
