"""The slot's confirmed position against the log's stored one (merkle.replication_progress).

The listener stores a position before it confirms it to the slot, the idle one included, so
the slot never passes the stored end_lsn by the listener's doing. A slot found past it was
moved by something else (pg_replication_slot_advance, another client streaming it): resuming
would skip the transactions in between without a word, so the listener says so and waits."""

from __future__ import annotations

import re
import signal
import threading
import time
from datetime import datetime, timezone

import orjson
import psycopg

from listener import registry
from listener.runner import connect
from listener.sources import slot_health
from listener.sources.replication_feed import IDLE_CONFIRM_MIN_BYTES
from tests.helpers import check_log, cli, start_listener
from tests.test_replication import orjson_id, wait_for_size


def _source(conn, log_name: str) -> None:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE other (id int, pad text)")  # not a source: WAL the slot passes
    registry.create_log(conn, log_name)
    with connect(conn.info.dsn) as c:
        registry.add_source(c, log_name, "t", mode="replication")


def _log_rows(conn, log_name: str, first: int, last: int) -> None:
    """Insert ids first..last into t and run a listener until they are leaves."""
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO t SELECT generate_series(%s::int, %s::int)", (first, last))
        wait_for_size(conn, log_name, last, listener=listener)
    finally:
        listener.stop()


def _positions(conn, slot: str) -> tuple[int, int]:
    """(slot's confirmed position, stored end_lsn) as byte offsets; the slot read first, so a
    confirmation that follows a store can only make the pair look safer, never worse."""
    confirmed = conn.execute("SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = %s",
                             (slot,)).fetchone()[0]
    stored = conn.execute("SELECT end_lsn - '0/0' FROM merkle.replication_progress").fetchone()[0]
    return int(confirmed), int(stored)


def test_a_slot_moved_past_the_log_is_not_streamed_and_the_user_is_told(rconn):
    conn = rconn
    _source(conn, "mv")
    _log_rows(conn, "mv", 1, 5)
    stored = conn.execute("SELECT end_lsn::text FROM merkle.replication_progress").fetchone()[0]
    conn.execute("INSERT INTO t SELECT generate_series(6, 8)")  # committed; the slot is moved past it
    moved = conn.execute("SELECT end_lsn::text FROM pg_replication_slot_advance('merkle_mv', pg_current_wal_lsn())"
                         ).fetchone()[0]
    listener = start_listener(conn.info.dsn)
    try:
        listener.wait_for(f"slot merkle_mv has confirmed {moved}, past {stored}", timeout=30)
        assert conn.execute("SELECT tree_size FROM merkle.logs").fetchone()[0] == 5
        out = cli("status", "--json", dsn=conn.info.dsn)
        assert out.returncode == 3
        slot = orjson.loads(out.stdout)["logs"][0]["slot"]
        assert slot["level"] == "error", slot
        assert f"between {stored} and {moved}" in slot["message"]
        assert "pg_replication_slot_advance" in cli("status", dsn=conn.info.dsn).stdout
        # The user accepts the gap with the statement the message names; streaming resumes.
        accept = re.search(r"UPDATE merkle\.replication_progress .*? WHERE slot_name = '\w+'", slot["message"]).group(0)
        conn.execute(accept)
        conn.execute("INSERT INTO t VALUES (9)")
        wait_for_size(conn, "mv", 6, listener=listener)
    finally:
        listener.stop()
    assert [orjson_id(r[2]) for r in check_log(conn, "mv")] == ["1", "2", "3", "4", "5", "9"]


def test_a_slot_created_anew_by_source_add_starts_the_log_there_and_names_the_gap(rconn):
    """The slot was dropped (or lost) and `source add` of another table created a new one:
    the changes committed meanwhile are nowhere. `source add` says so, naming the sources
    and how to log their rows as they are now, and the listener streams the new slot."""
    conn = rconn
    _source(conn, "re")
    _log_rows(conn, "re", 1, 3)
    conn.execute("INSERT INTO t VALUES (4)")
    conn.execute("SELECT pg_drop_replication_slot('merkle_re')")
    conn.execute("CREATE TABLE u (id int PRIMARY KEY)")
    out = cli("source", "add", "re", "u", "--mode", "replication", dsn=conn.info.dsn, check=True)
    assert "warning: log 're' had no replication slot" in out.stderr
    assert "changes of public.t committed after" in out.stderr and "--backfill" in out.stderr
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO u VALUES (1)")
        conn.execute("INSERT INTO t VALUES (5)")
        wait_for_size(conn, "re", 5, listener=listener)
    finally:
        said = listener.stop()
    assert "has confirmed" not in said
    assert [orjson_id(r[2]) for r in check_log(conn, "re")] == ["1", "2", "3", "1", "5"]


def test_the_documented_recovery_with_two_sources_needs_no_accepted_gap(rconn):
    """The lost-slot recovery, source by source, while another source is still registered:
    re-adding the first creates the new slot, the listener streams it, and the second one's
    `source remove` (which waits for the slot to pass its position) finishes."""
    conn = rconn
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    registry.create_log(conn, "rec")
    with connect(conn.info.dsn) as c:
        registry.add_source(c, "rec", "a", mode="replication")
        registry.add_source(c, "rec", "b", mode="replication")
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO a SELECT generate_series(1, 3)")
        conn.execute("INSERT INTO b SELECT generate_series(1, 3)")
        wait_for_size(conn, "rec", 6, listener=listener)
    finally:
        listener.stop()
    dsn = conn.info.dsn
    conn.execute("SELECT pg_drop_replication_slot('merkle_rec')")
    cli("source", "remove", "rec", "a", dsn=dsn, check=True)
    cli("source", "add", "rec", "a", "--mode", "replication", "--backfill", dsn=dsn, check=True)
    listener = start_listener(dsn)
    try:
        listener.wait_for("replication stream open")  # `source remove` waits for a streaming listener only
        cli("source", "remove", "rec", "b", dsn=dsn, check=True)
        cli("source", "add", "rec", "b", "--mode", "replication", "--backfill", dsn=dsn, check=True)
        conn.execute("INSERT INTO a VALUES (4)")
        wait_for_size(conn, "rec", 6 + 3 + 3 + 1, listener=listener)
    finally:
        said = listener.stop()
    assert "has confirmed" not in said
    check_log(conn, "rec")


def test_status_never_sees_a_running_listeners_slot_past_the_log(rconn):
    """`status` reads the slot before the stored position, as the listener does: a batch
    stored and confirmed between the two reads cannot make a healthy slot look moved."""
    conn = rconn
    _source(conn, "st")
    log_id = conn.execute("SELECT log_id FROM merkle.logs WHERE name = 'st'").fetchone()[0]
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(conn.info.dsn, autocommit=True) as w:
            i = 0
            while not stop.is_set():
                i += 1
                w.execute("INSERT INTO t VALUES (%s)", (i,))

    listener = start_listener(conn.info.dsn)
    writer = threading.Thread(target=write)
    reports = 0
    try:
        listener.wait_for("replication stream open")
        writer.start()
        deadline = time.monotonic() + 5
        with psycopg.connect(conn.info.dsn, autocommit=True) as probe:
            while time.monotonic() < deadline:
                report = slot_health.collect(probe, log_id, "st")
                assert report["level"] != "error", report["message"]
                reports += 1
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        said = listener.stop()
    assert reports > 100 and conn.execute("SELECT tree_size > 100 FROM merkle.logs").fetchone()[0]
    assert "has confirmed" not in said


def test_an_idle_listener_stores_its_position_only_as_others_write(rconn):
    """The idle position is stored only once it is IDLE_CONFIRM_MIN_BYTES past the confirmed
    one: the WAL the store itself writes, and the background writer's running-transactions
    record that follows it within 15 s, never add up to another store (an earlier version
    stored every half second on an idle server), and the listener's rechecks write none. The
    server is shared with the rest of the test suite, whose WAL may take a store or two."""
    conn = rconn
    _source(conn, "quiet")
    _log_rows(conn, "quiet", 1, 3)
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO t VALUES (4)")
        conn.execute("INSERT INTO other SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g")
        wait_for_size(conn, "quiet", 4, listener=listener)
        time.sleep(2)  # the last batch, the idle store past the others' WAL
        first_wal = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        stores = set()
        deadline = time.monotonic() + 8  # a loop stores every half second
        while time.monotonic() < deadline:
            stores.add(conn.execute("SELECT updated_at FROM merkle.replication_progress").fetchone()[0])
            time.sleep(0.1)
        written = int(conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (first_wal,)).fetchone()[0])
        confirmed, stored_end = _positions(conn, "merkle_quiet")
        lag = int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0]) - confirmed
    finally:
        listener.stop()
    assert len(stores) - 1 <= written // (64 * 1024) + 1, \
        f"the idle listener stored its position {len(stores) - 1} times in 8 s while {written} bytes of WAL were written"
    assert confirmed <= stored_end
    assert lag < IDLE_CONFIRM_MIN_BYTES + written


def test_an_idle_slot_is_confirmed_only_up_to_a_stored_position(rconn):
    """Idle, the listener confirms the WAL the slot has passed (others' writes), so the slot
    pins none of it; the stored end_lsn is raised first, so after a kill -9 the restart finds
    the slot at or behind it and streams on."""
    conn = rconn
    _source(conn, "idle")
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO t SELECT generate_series(1, 3)")
        wait_for_size(conn, "idle", 3, listener=listener)
        passed = False
        deadline = time.monotonic() + 20
        while not passed:
            assert time.monotonic() < deadline, "the idle slot was never confirmed past the others' WAL"
            conn.execute("INSERT INTO other SELECT g, repeat('x', 100) FROM generate_series(1, 200) g")
            written = int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])
            for _ in range(20):
                confirmed, stored = _positions(conn, "merkle_idle")
                assert confirmed <= stored, "the slot was confirmed past the stored position"
                if confirmed >= written:
                    passed = True
                    break
                time.sleep(0.05)
        listener.stop(signal.SIGKILL)
        listener = start_listener(conn.info.dsn)
        conn.execute("INSERT INTO t VALUES (4)")
        wait_for_size(conn, "idle", 4, listener=listener)
    finally:
        said = listener.stop()
    assert "has confirmed" not in said
    assert [orjson_id(r[2]) for r in check_log(conn, "idle")] == ["1", "2", "3", "4"]


def test_a_log_from_an_earlier_version_takes_its_slots_position_once(rconn):
    """An earlier version confirmed idle positions without storing them: its slot may be past
    end_lsn with nothing missing. The first stream start takes the slot's position; from then
    on the check holds."""
    conn = rconn
    _source(conn, "up")
    _log_rows(conn, "up", 1, 3)
    conn.execute("INSERT INTO other VALUES (1, 'not a source')")
    moved = conn.execute("SELECT end_lsn FROM pg_replication_slot_advance('merkle_up', pg_current_wal_lsn())"
                         ).fetchone()[0]
    conn.execute("UPDATE merkle.replication_progress SET slot_checked = false")  # as sql/013 leaves it
    listener = start_listener(conn.info.dsn)
    try:
        conn.execute("INSERT INTO t VALUES (4)")
        wait_for_size(conn, "up", 4, listener=listener)
    finally:
        said = listener.stop()
    assert "has confirmed" not in said and "replication position taken from the slot" in said
    checked, taken = conn.execute("SELECT slot_checked, end_lsn >= %s FROM merkle.replication_progress",
                                  (moved,)).fetchone()
    assert checked and taken
    assert [orjson_id(r[2]) for r in check_log(conn, "up")] == ["1", "2", "3", "4"]


def test_the_listener_commits_durably_whatever_the_database_sets(conn):
    """A batch's COMMIT must be on disk before its end_lsn is confirmed or a checkpoint is
    signed over it: synchronous_commit = off in the database must not reach the listener."""
    database = conn.info.dbname
    conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    with psycopg.connect(conn.info.dsn, options="") as plain:  # the DSN carries the listener's options
        assert plain.execute("SHOW synchronous_commit").fetchone()[0] == "off"
    with connect(conn.info.dsn) as listener_session:
        assert listener_session.execute("SHOW synchronous_commit").fetchone()[0] == "on"



def test_timeouts_the_database_sets_do_not_wedge_the_log(rconn):
    """A large replication transaction is appended in one batch transaction, its COPY open
    while rows are hashed: a statement or transaction timeout of the database would cancel it
    at every retry, and the log would never pass it. The listener's sessions set none."""
    conn = rconn
    database = conn.info.dbname
    timeouts = {"statement_timeout": "100ms", "lock_timeout": "100ms", "idle_in_transaction_session_timeout": "100ms",
                "idle_session_timeout": "100ms"}
    if conn.info.server_version >= 170000:
        timeouts["transaction_timeout"] = "50ms"
    _source(conn, "slow")
    for name, value in timeouts.items():
        conn.execute(f'ALTER DATABASE "{database}" SET {name} = {value!r}')
    with connect(conn.info.dsn) as session:
        assert {name: session.execute(f"SHOW {name}").fetchone()[0] for name in timeouts} == dict.fromkeys(timeouts, "0")
    conn.execute("INSERT INTO t SELECT generate_series(1, 150000)")  # this session was opened before: no timeout
    # The test's DSN carries the pinned settings as options: the listener must set them itself.
    bare = {k: v for k, v in psycopg.conninfo.conninfo_to_dict(conn.info.dsn).items() if k != "options"}
    listener = start_listener(psycopg.conninfo.make_conninfo(**bare), "--http", "127.0.0.1:0")
    try:
        wait_for_size(conn, "slow", 150000, timeout=120, listener=listener)
        listener.http_url()
        time.sleep(1.0)  # its LISTEN connections idle meanwhile
    finally:
        stopped_at = datetime.now(timezone.utc)
        said = listener.stop()
    # What it said while it ran: stopping cancels the queries of its pool's connections.
    while_running = "\n".join(line for line in said.splitlines() if line.startswith("{")
                              and datetime.fromisoformat(orjson.loads(line)["ts"].replace("Z", "+00:00")) < stopped_at)
    assert "batch sequenced" in while_running
    for trouble in ("cancel", "timeout", "connection lost", "no LISTEN", "interrupted"):
        assert trouble not in while_running, while_running[-3000:]
    check_log(conn, "slow")
