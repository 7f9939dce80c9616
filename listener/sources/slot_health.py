"""Health of a log's replication slot for `merkle-listener status`.

The slot pins WAL from its restart_lsn on; if the listener falls too far behind (or is not
running) PostgreSQL may mark it `extended` or `unreserved` (WAL beyond max_wal_size is kept
only while it can) and finally `lost`: WAL it needed is gone and the changes in it can no
longer be streamed. Lag in bytes is measured from the slot's confirmed position (it counts
all the server's WAL, the listener's own writes included). Lag in seconds is the age of the
last stored progress while the slot is more than IDLE_LAG_BYTES behind (a listener at work
stores it at every batch, so it grows while a large transaction is appended, or while nobody
streams), else the walsender's flush_lag.
"""

from __future__ import annotations

import shlex

import psycopg

from listener.registry import Source, add_command, list_sources, named_now
from listener.sources.pgoutput import lsn_to_int
from listener.sources import publication
from listener.sources.publication import publication_name, slot_name

# Within this much of the server's WAL, a slot counts as caught up: an idle listener confirms
# the stream's position only once it is this far past (replication_feed.IDLE_CONFIRM_MIN_BYTES).
IDLE_LAG_BYTES = 64 * 1024


def collect(conn: psycopg.Connection, log_id: int, log_name: str) -> dict | None:
    """None when the log has no replication progress (never had a replication source)."""
    slot = slot_name(log_name)
    # The slot before the stored progress: a running listener stores a position before it
    # confirms it, so read in this order the slot is never seen past the log by its doing.
    row = conn.execute(
        "SELECT s.wal_status, s.active, s.confirmed_flush_lsn::text, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, "
        "extract(epoch FROM r.flush_lag)::float8 "
        "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "
        "WHERE s.slot_name = %s AND s.database = current_database()", (slot,)).fetchone()
    progress = conn.execute(
        "SELECT end_lsn::text, extract(epoch FROM now() - updated_at)::float8, slot_checked "
        "FROM merkle.replication_progress WHERE log_id = %s", (log_id,)).fetchone()
    if progress is None:
        return None
    end_lsn, progress_age, slot_checked = progress
    report = {"slot": slot, "stored_end_lsn": end_lsn, "exists": row is not None}
    sources = named_now(conn, [s for s in list_sources(conn, log_id) if s.mode == "replication"])
    drift = publication.drift(conn, log_name, log_id)
    report["publication_problem"] = publication_message(log_name, drift, sources) if drift else None
    if row is None:
        report.update(level="error", message=absent_message(conn, log_name, sources))
        return report
    wal_status, active, confirmed, lag_bytes, retained, flush_lag = row
    ahead = end_lsn != "0/0" and confirmed is not None and lsn_to_int(confirmed) > lsn_to_int(end_lsn)
    if lag_bytes is not None and lag_bytes > IDLE_LAG_BYTES:
        lag_seconds = progress_age
    else:
        lag_seconds = flush_lag if flush_lag is not None and active else 0.0
    report.update(wal_status=wal_status, active=active, confirmed_flush_lsn=confirmed, lag_bytes=lag_bytes,
                  retained_bytes=retained, lag_seconds=round(lag_seconds, 3))
    if wal_status == "lost":
        report.update(level="error", message=lost_message(log_name, end_lsn, sources))
    elif ahead and slot_checked:
        report.update(level="error", message=ahead_message(log_name, end_lsn, confirmed, sources))
    elif wal_status in ("extended", "unreserved"):
        report.update(level="warning", message=(
            f"slot {slot} holds {retained} bytes of WAL (wal_status {wal_status}): "
            + ("PostgreSQL may remove it at the next checkpoint and the slot would be lost; " if wal_status == "unreserved" else "")
            + ("start `merkle-listener run` so it catches up" if not active else "the listener is behind; check its log")))
    else:
        report.update(level="ok", message=None)
    return report


def stream_state(conn: psycopg.Connection, log_id: int, log_name: str) -> str | None:
    """"missing", "lost" or "moved" (past the log, as collect() reports them), or None: the
    few columns of collect() that decide whether the listener can stream the log's slot."""
    row = conn.execute(
        "SELECT s.slot_name IS NULL, s.wal_status = 'lost', "
        "       p.slot_checked AND p.end_lsn <> '0/0' AND s.confirmed_flush_lsn > p.end_lsn "
        "FROM merkle.replication_progress p LEFT JOIN pg_replication_slots s "
        "ON s.slot_name = %s AND s.database = current_database() WHERE p.log_id = %s",
        (slot_name(log_name), log_id)).fetchone()
    if row is None:
        return None
    missing, lost, moved = row
    return "missing" if missing else "lost" if lost else "moved" if moved else None


def publication_message(log_name: str, problems: list[str], sources: list[Source]) -> str:
    pub = publication_name(log_name)
    return (f"publication {pub} was changed by hand ({'; '.join(problems)}): changes of the log's replication "
            "sources that it let through since are not in the log, and cannot be streamed again, even once it is "
            "put back (the DDL guard, `merkle-listener guard install`, refuses such changes). Recover by "
            + readd_steps(log_name, sources))


def absent_message(conn: psycopg.Connection, log_name: str, sources: list[Source]) -> str:
    """What to do about a log whose slot this database does not have."""
    elsewhere = conn.execute("SELECT database FROM pg_replication_slots WHERE slot_name = %s "
                             "AND database IS DISTINCT FROM current_database()", (slot_name(log_name),)).fetchone()
    if elsewhere is not None:
        return elsewhere_message(log_name, elsewhere[0] or "(none: a physical slot)", sources)
    return missing_message(log_name, sources)


def missing_message(log_name: str, sources: list[Source]) -> str:
    slot = slot_name(log_name)
    return (f"slot {slot} is missing (dropped, or this server was promoted from a standby that did not have it): "
            f"changes of the log's replication sources are not being captured. Recreate it by "
            + readd_steps(log_name, sources))


def elsewhere_message(log_name: str, database: str, sources: list[Source]) -> str:
    """This database is a copy (pg_restore, CREATE DATABASE ... TEMPLATE) of one whose log of the
    same name still has the slot: slot names are the server's, so `source add` cannot make one here."""
    slot = slot_name(log_name)
    return (f"slot {slot} is not this database's but database {database}'s (is this database a copy of that "
            "one? slot names are shared by all the databases of a server): changes of the log's replication "
            f"sources are not being captured here, and no slot can be made for them under the name {slot} while "
            f"that one is there. Drop that database's log {log_name} (or remove its replication sources) if it is "
            "no longer used, then recover here by " + readd_steps(log_name, sources)
            + "; or keep both and register these tables in a log of another name here")


def lost_message(log_name: str, end_lsn: str, sources: list[Source]) -> str:
    slot = slot_name(log_name)
    return (f"slot {slot} is lost: PostgreSQL removed WAL it still needed, so changes committed after "
            f"{end_lsn} (the last one logged) can no longer be streamed and are not in the log. To recover: "
            + _recovery_steps(log_name, sources)
            + "; 4. raise max_slot_wal_keep_size (or keep the listener running) so it does not recur")


def _recovery_steps(log_name: str, sources: list[Source]) -> str:
    return (f"1. stop `merkle-listener run`; 2. SELECT pg_drop_replication_slot('{slot_name(log_name)}'); "
            "3. " + readd_steps(log_name, sources))


def readd_steps(log_name: str, sources: list[Source]) -> str:
    """Remove each replication source, then add it again with its own options and --backfill
    (which logs its rows as they are now): the last removal drops the slot, the first add
    creates a new one."""
    if not sources:
        return (f"removing each replication source (`merkle-listener source remove {log_name} TABLE`) and adding it "
                "again with the options it had and --backfill (logs the rows as they are now)")
    removes = "; ".join(
        f"`{shlex.join(['merkle-listener', 'source', 'remove', log_name, s.qualified])}`" for s in sources)
    adds = "; ".join(f"`{add_command(log_name, s, backfill=True)}`" for s in sources)
    return (f"removing each replication source: {removes}; then adding each again as it was, with --backfill "
            f"(logs the rows as they are now): {adds}")


def ahead_message(log_name: str, end_lsn: str, confirmed: str, sources: list[Source]) -> str:
    slot = slot_name(log_name)
    return (f"slot {slot} has confirmed {confirmed}, past {end_lsn}, the last position the log stored: something "
            "other than merkle-listener moved it (pg_replication_slot_advance, another client streaming the "
            "slot, or the slot dropped and created anew), so "
            f"changes committed between {end_lsn} and {confirmed} will not be streamed again and may be missing "
            "from the log. The listener does not stream this slot until you choose: either recover as for a lost "
            "slot (" + _recovery_steps(log_name, sources) + "), or accept the gap and go on from the slot's position: "
            f"UPDATE merkle.replication_progress SET end_lsn = greatest(end_lsn, '{confirmed}') "
            f"WHERE slot_name = '{slot}' (the changes in between then stay out of the log)")


def source_status(conn: psycopg.Connection, log_name: str, s: Source) -> dict:
    # By OID: the table may have been renamed since it was registered.
    published = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_publication_tables p JOIN pg_namespace n ON n.nspname = p.schemaname "
        "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename WHERE p.pubname = %s AND c.oid = %s)",
        (publication_name(log_name), s.table_oid)).fetchone()[0]
    backfill = conn.execute("SELECT count(*) FROM merkle.replication_backfill WHERE source_id = %s",
                            (s.source_id,)).fetchone()[0]
    # Changes on their way through the slot are not counted (that would mean decoding them):
    # the slot's lag says how far behind the log is. `queued` is the backfill left to append.
    return {"table": s.qualified, "mode": s.mode, "capturing": published, "append_only": s.append_only,
            "events": s.events, "queued": backfill, "oldest_queued_seconds": None}


def render(report: dict) -> list[str]:
    problem = [f"  error: {report['publication_problem']}"] if report.get("publication_problem") else []
    if not report["exists"]:
        return [f"  slot {report['slot']}: MISSING", f"  error: {report['message']}"] + problem
    lines = [f"  slot {report['slot']}: wal_status {report['wal_status']}, "
             f"{'streaming' if report['active'] else 'no listener streaming'}, lag {report['lag_bytes']} bytes / "
             f"{report['lag_seconds']:.3f} s, logged up to {report['stored_end_lsn']}"]
    if report["level"] != "ok":
        lines.append(f"  {report['level']}: {report['message']}")
    return lines + problem
