"""Registering and removing replication-mode sources, and dropping a log with its slot.

The registry (listener/registry.py) delegates here for mode 'replication'; the SQL objects
themselves (publication, slot, backfill) are made by listener/sources/publication.py.
"""

from __future__ import annotations

import shlex
import time
import warnings

import psycopg
from psycopg import sql

from listener import registry, relink
from listener.errors import CaptureGapWarning, ConfigurationError, DatabaseError, SourceTableError
from listener.sources import publication, slot_health, trigger
from listener.sources.validate import validate_source
from listener.store.connect import open_session

EVENT_CHOICES = ("insert", "update", "delete")


def normalize_events(events: list[str] | None, truncate: str | None, append_only: bool) -> list[str]:
    """The events column of a replication source: chosen row events plus 'truncate' when
    TRUNCATE is logged (policy 'log', the default unless --append-only) rather than refused."""
    chosen = ["insert"] if events is None else [e.strip().lower() for e in events]
    choices = ", ".join(EVENT_CHOICES)
    if not any(chosen):
        raise ConfigurationError(f"--events is empty: give a comma-separated list of {choices} "
                                 "(for example --events insert,update,delete), or leave it out to log inserts only")
    for e in chosen:
        if e == "truncate":
            raise ConfigurationError("--events: 'truncate' is not an event here; TRUNCATE is logged or refused with "
                                     "--truncate log|refuse (logged by default, refused with --append-only)")
        if e not in EVENT_CHOICES:
            raise ConfigurationError(f"--events: {e!r} is not an event; give a comma-separated list of {choices}"
                                     + (" with no empty item" if not e else ""))
        if chosen.count(e) > 1:
            raise ConfigurationError(f"--events names {e!r} twice; list each event once")
    if truncate not in (None, "log", "refuse"):
        raise ConfigurationError(f"--truncate must be 'log' or 'refuse', got {truncate!r}")
    if append_only and ({"update", "delete"} & set(chosen) or truncate == "log"):
        raise ConfigurationError("--append-only refuses UPDATE, DELETE and TRUNCATE, so they cannot be logged too; "
                                 "drop --append-only or log inserts only")
    policy = truncate or ("refuse" if append_only else "log")
    out = [e for e in EVENT_CHOICES if e in chosen]
    return out + (["truncate"] if policy == "log" else [])


def add_source(conn: psycopg.Connection, log_name: str, table: str, *, key, columns, where, entry_column,
               append_only: bool, backfill: bool, events: list[str] | None, truncate: str | None,
               dsn: str | None) -> tuple[registry.Source, int]:
    events = normalize_events(events, truncate, append_only)
    dsn = dsn if dsn is not None else conn.info.dsn
    slot = publication.slot_name(log_name)
    queued = 0
    with conn.transaction():
        log = registry.get_log(conn, log_name, for_update=True)
        _check_publication_there(conn, log)
        spec = validate_source(conn, table, key=key, columns=columns, where=where, entry_column=entry_column)
        publication.preflight(conn, spec, events, log_name=log_name)  # first: it says when the role may not lock
        # Writers wait from here to COMMIT: every change before is read below (with --backfill
        # and an existing slot), every change after is streamed (the table is in the
        # publication from COMMIT on). Without --backfill too: pgoutput decides per change, so
        # a transaction that wrote the table before this COMMIT and again after it would be
        # logged in half. And a concurrent add of the same table waits, then sees it taken.
        trigger.lock_out_writers(conn, spec.ident(), "to add it to the publication")
        registry._check_entry_column_not_null(conn, spec)
        registry.check_not_a_source(conn, spec)
        registry.check_append_only_parent(conn, spec, append_only)
        registry.check_not_subscribed(conn, spec, trigger_mode=False, append_only=append_only)
        _check_partition_relatives(conn, log, spec)
        _check_not_generated(spec)
        slot_there = publication.slot_exists(conn, slot)
        source = registry._insert_source(conn, log, spec, append_only, "replication", events)
        # Marked as merkle-listener's own DDL (sql/014): the DDL guard would take the partitions
        # not guarded yet, whose rows the source starts with, for ones attached with rows.
        conn.execute("SELECT merkle.mark_own_ddl('install_partition_guards', %s)", (source.source_id,))
        trigger.install_guards(conn, source.source_id, log.name, spec.ident(),
                               update_delete=append_only, truncate="truncate" not in events)
        # Statement triggers on a partitioned table do not fire for a statement naming one of
        # its partitions, and pgoutput does not send a partition's own TRUNCATE: guard each
        # partition (sql/011_partitions_and_generated.sql).
        conn.execute("SELECT merkle.install_partition_guards(%s)", (source.source_id,))
        conn.execute("SELECT merkle.unmark_own_ddl('install_partition_guards', %s)", (source.source_id,))
        conn.execute(
            "INSERT INTO merkle.replication_progress (log_id, slot_name, publication) VALUES (%s, %s, %s) "
            "ON CONFLICT (log_id) DO NOTHING", (log.log_id, slot, publication.publication_name(log_name)))
        if backfill:
            conn.execute("INSERT INTO merkle.replication_backfill_state (source_id) VALUES (%s)", (source.source_id,))
        try:
            publication.sync_publication(conn, log.name, log.log_id)
        except psycopg.errors.FeatureNotSupported as exc:
            # PostgreSQL's row-filter rules are narrower than the trigger's: let it judge the
            # filter (0A000 "invalid publication WHERE expression") rather than copy its rules.
            if not spec.row_filter:
                raise
            raise SourceTableError(
                f"PostgreSQL refuses --where {where!r} (as {spec.row_filter}) as the row filter of a publication: "
                f"{exc.diag.message_primary}{': ' + exc.diag.message_detail if exc.diag.message_detail else ''} "
                "A publication's row filter may use only columns, constants, built-in operators and immutable "
                "built-in functions (so no cast that depends on settings, such as timestamptz to date), and only "
                "the replica identity's columns when updates or deletes are published. Rewrite the filter, or "
                "use --mode trigger, whose filter may use these. Nothing was changed") from None
        if backfill and slot_there:
            queued = publication.queue_backfill(conn, source.source_id, spec)
        prior_end = conn.execute("SELECT end_lsn::text FROM merkle.replication_progress WHERE log_id = %s",
                                 (log.log_id,)).fetchone()[0]
        others = registry.named_now(conn, [s for s in registry.list_sources(conn, log.log_id)
                                           if s.mode == "replication" and s.source_id != source.source_id])
    if slot_there:
        return source, queued
    try:
        rc, point, snapshot = publication.create_slot(dsn, slot, export_snapshot=backfill)
        try:
            # Nothing before the new slot's start can be streamed: that is the log's position
            # now (a session would otherwise take the slot for one moved past the log).
            with conn.transaction():
                conn.execute("UPDATE merkle.replication_progress SET end_lsn = greatest(end_lsn, %s::pg_lsn) "
                             "WHERE log_id = %s", (point, log.log_id))
            if backfill:
                queued = _backfill_in_snapshot(conn, source.source_id, spec, snapshot)
        finally:
            rc.close()
    except BaseException as failed:
        # Undo the registration: without its slot (or backfill) the source would be incomplete.
        try:
            _forget(conn, dsn, log_name, source.source_id, spec.ident())
        except (SourceTableError, DatabaseError) as stuck:
            raise SourceTableError(
                f"adding {spec.qualified} failed ({failed}) and could not be undone: {stuck}. It stays registered: "
                f"run `merkle-listener source remove {log_name} {spec.qualified}` once the cause is gone") from failed
        raise
    _warn_of_a_missing_slots_gap(log, others, prior_end, point)
    return source, queued


def _warn_of_a_missing_slots_gap(log: registry.Log, others: list[registry.Source], prior_end: str,
                                 point: str) -> None:
    """The log had streamed (its position is not 0/0) but its slot was gone: what its other
    replication sources committed between that position and the new slot's start is nowhere."""
    if prior_end == "0/0" or not others:
        return
    warnings.warn(CaptureGapWarning(
        f"log {log.name!r} had no replication slot (it was dropped or lost), and a new one starts at {point}: "
        f"changes of {', '.join(s.qualified for s in others)} committed after {prior_end} (the last one logged) and "
        f"before {point} are not in the log. Log their rows as they are now by "
        + slot_health.readd_steps(log.name, others)), stacklevel=3)


def _check_publication_there(conn: psycopg.Connection, log: registry.Log) -> None:
    """A log whose replication sources are registered without its publication (a data-only
    restore): the publication made for a new source would list them too, and they would look
    captured, with what they missed meanwhile not logged. They are removed first."""
    stranded = registry.missing_publication(conn, log.name, registry.list_sources(conn, log.log_id))
    if stranded:
        removes = "; ".join(f"`{shlex.join(['merkle-listener', 'source', 'remove', log.name, s.qualified])}`"
                            for s in stranded)
        raise ConfigurationError(
            f"log {log.name}'s publication {publication.publication_name(log.name)} does not exist, and its "
            f"replication sources {', '.join(s.qualified for s in stranded)} are registered without it (restored "
            f"with pg_restore --data-only?): remove them first ({removes}), then add each again with --backfill. "
            "Nothing was changed")


def _check_not_generated(spec) -> None:
    """pgoutput never sends a generated column on PostgreSQL 15-17 (18 only with the
    publication's publish_generated_columns): a leaf hashing one could not be computed."""
    if spec.generated:
        names = ", ".join(spec.generated)
        raise SourceTableError(
            f"column {names} of {spec.qualified} is generated, and logical replication does not send generated "
            f"columns: leave {names} out of --columns (or --key, --entry-column); its value follows from the "
            "columns it is computed from. Or use --mode trigger, which captures it"
        )


def _check_partition_relatives(conn: psycopg.Connection, log: registry.Log, spec) -> None:
    """Refuse a table whose partition ancestor or descendant is a replication source of the same
    log: with publish_via_partition_root the publication sends a partition's changes as its
    top-most published ancestor's only, so the lower source would get nothing. (Another log has
    a publication and slot of its own, which sends them as each of its tables'.)"""
    row = conn.execute(
        "SELECT s.table_schema, s.table_name, s.table_oid IN (SELECT relid FROM pg_partition_ancestors(%(oid)s)) "
        "FROM merkle.sources s WHERE s.log_id = %(log)s AND s.mode = 'replication' AND s.table_oid <> %(oid)s "
        "AND (s.table_oid IN (SELECT relid FROM pg_partition_ancestors(%(oid)s)) "
        "OR s.table_oid IN (SELECT relid FROM pg_partition_tree(%(oid)s))) LIMIT 1",
        {"oid": spec.oid, "log": log.log_id}).fetchone()
    if row is None:
        return
    other = f"{row[0]}.{row[1]}"
    upper, lower = (other, spec.qualified) if row[2] else (spec.qualified, other)
    raise SourceTableError(
        f"{lower} is a partition of {upper}, and {other} is a replication source of log {log.name!r} already: "
        f"the log's publication would send {lower}'s changes as {upper}'s only, and the source of {lower} "
        "would get none of them. "
        f"{upper} alone captures every partition's rows; to log {lower} as itself, use another log "
        f"(or remove {other} first)")


def _backfill_in_snapshot(conn: psycopg.Connection, source_id: int, spec, snapshot: str) -> int:
    saved = conn.isolation_level
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            return publication.queue_backfill(conn, source_id, spec)
    finally:
        conn.isolation_level = saved


def _forget(conn: psycopg.Connection, dsn: str, log_name: str, source_id: int, table) -> None:
    with conn.transaction():
        log = registry.get_log(conn, log_name, for_update=True)
        trigger.drop_triggers(conn, source_id, table)
        registry.delete_source(conn, source_id)
        publication.sync_publication(conn, log.name, log.log_id)
        _drop_slot_if_unused(conn, dsn, log.log_id, log_name, "the source stays registered")


def remove_source(conn: psycopg.Connection, log_name: str, table: str, dsn: str | None = None,
                  wait: float = 10.0) -> int:
    """Take the table out of the publication; once the slot has confirmed everything committed
    before that (the listener logged it), and its backfill is all in the log, forget the source.
    Returns -1 while changes may still be pending (run again after the listener caught up),
    else 0."""
    dsn = dsn if dsn is not None else conn.info.dsn
    with conn.transaction():
        log = registry.get_log(conn, log_name, for_update=True)
        source = registry.find_source(conn, log, table)
        retired = conn.execute("SELECT until_lsn FROM merkle.replication_retired WHERE source_id = %s",
                               (source.source_id,)).fetchone()
        if retired is None:
            current = (trigger.current_table(conn, source.table_oid)
                       if relink.in_place(conn, source.source_id) else None)
            if current is not None:
                # Writers wait from here to COMMIT (as at `source add`): a transaction that wrote
                # the table before it and again after would be logged in half.
                trigger.lock_out_writers(conn, current, "to take it out of the publication")
            trigger.drop_triggers(conn, source.source_id, current)
            conn.execute("INSERT INTO merkle.replication_retired VALUES (%s, pg_current_wal_insert_lsn())",
                         (source.source_id,))
            publication.sync_publication(conn, log.name, log.log_id, create=False)
    if retired is None:
        # Every change published for the table committed before this point.
        with conn.transaction():
            conn.execute("UPDATE merkle.replication_retired SET until_lsn = pg_current_wal_insert_lsn() "
                         "WHERE source_id = %s", (source.source_id,))
    deadline = time.monotonic() + wait
    while True:
        with conn.transaction():
            caught_up, streaming = conn.execute(
                "SELECT coalesce(s.confirmed_flush_lsn >= r.until_lsn, true), s.active_pid IS NOT NULL "
                "FROM merkle.replication_retired r LEFT JOIN pg_replication_slots s "
                "ON s.slot_name = %s AND s.database = current_database() "
                "WHERE r.source_id = %s", (publication.slot_name(log_name), source.source_id)).fetchone()
            broken = _stream_broken(conn, log.log_id, log_name)
        if caught_up or broken:
            # A slot that cannot be streamed has nothing more of the table to give.
            break
        # A running listener confirms the stream soon: wait a little rather than ask for a rerun
        # (not for a paused log, which it does not append to).
        if not streaming or log.paused or time.monotonic() > deadline:
            return -1
        time.sleep(0.1)
    with conn.transaction():
        registry.get_log(conn, log_name, for_update=True)
        left, appended = conn.execute(
            "SELECT (SELECT count(*) FROM merkle.replication_backfill WHERE source_id = %(s)s), "
            "(SELECT next_ord - 1 FROM merkle.replication_backfill_state WHERE source_id = %(s)s)",
            {"s": source.source_id}).fetchone()
        broken = _stream_broken(conn, log.log_id, log_name)
        if left and broken is None:
            # A backfill is appended over several batches: deleting the source now would drop
            # the rest of it, leaving part of the table's rows in the log.
            return -1
        if broken is not None:
            # Nothing more of the table can come through the slot, not even the rest of its
            # backfill (appended only while the slot streams): waiting would be for ever.
            end_lsn = conn.execute("SELECT end_lsn::text FROM merkle.replication_progress WHERE log_id = %s",
                                   (log.log_id,)).fetchone()[0]
            before = f" (the {appended} before them in key order are)" if appended else ""
            unappended = f", nor are the last {left} rows of its backfill{before}" if left else ""
            warnings.warn(CaptureGapWarning(
                f"the log's slot {broken}: changes of {source.qualified} committed after {end_lsn}, the position "
                f"the log is logged up to, are not in the log{unappended}. Adding the table again with --backfill "
                "logs its rows as they are now"), stacklevel=2)
        registry.delete_source(conn, source.source_id)
        _drop_slot_if_unused(conn, dsn, log.log_id, log_name, "the source is still registered; run this again")
    return 0


def _stream_broken(conn: psycopg.Connection, log_id: int, log_name: str) -> str | None:
    """Why the log's slot can never be streamed again, or None. A slot moved past the log can:
    the user may yet accept the gap (slot_health.ahead_message)."""
    state = slot_health.stream_state(conn, log_id, log_name)
    return None if state in (None, "moved") else f"is {state}"


def pending_message(conn: psycopg.Connection, log_name: str, table: str) -> str:
    """What a `source remove` that returned -1 waits for, and what to do about it."""
    log = registry.get_log(conn, log_name)
    source = registry.find_source(conn, log, table)
    behind, streaming, backfill = conn.execute(
        "SELECT greatest(r.until_lsn - s.confirmed_flush_lsn, 0)::bigint, s.active_pid IS NOT NULL, "
        "(SELECT count(*) FROM merkle.replication_backfill b WHERE b.source_id = r.source_id) "
        "FROM merkle.replication_retired r LEFT JOIN pg_replication_slots s "
        "ON s.slot_name = %s AND s.database = current_database() WHERE r.source_id = %s",
        (publication.slot_name(log_name), source.source_id)).fetchone() or (None, False, 0)
    moved = slot_health.stream_state(conn, log.log_id, log_name) == "moved"
    conn.commit()
    start = f"{source.qualified} left the log's publication; "
    if moved:
        # The listener does not stream such a slot (slot_health.ahead_message).
        return (start + f"but log {log_name!r}'s slot was moved past the log, and no listener streams it until you "
                "choose how to go on (`merkle-listener status` gives both ways); then run `source remove` again "
                "to finish")
    if log.paused:
        return (start + f"log {log_name!r} is paused, so what was committed before is not logged yet: "
                f"`merkle-listener log resume {log_name}`, then `source remove` again to finish")
    if streaming and backfill:
        return (start + f"the running listener is still appending its backfill ({backfill} rows to go): "
                "run `source remove` again once it is in to finish")
    if streaming and not behind:
        # It confirmed the last of them between remove_source's check and this one.
        return (start + "the running listener has just logged what was committed before that: "
                "run `source remove` again to finish")
    if streaming:
        return (start + "the running listener is still logging the changes committed before that "
                f"({behind / 1e6:.1f} MB of WAL to go): run `source remove` again in a moment to finish "
                "(`status` shows the slot's lag)")
    waiting = f"{backfill} rows of its backfill" if backfill else "changes committed before that"
    return (start + f"{waiting} may still be on their way, and no listener streams log {log_name!r} now: run "
            "`merkle-listener run` until it has caught up, then `source remove` again to finish")


def _drop_slot_if_unused(conn: psycopg.Connection, dsn: str, log_id: int, log_name: str, state: str) -> None:
    """In the caller's transaction, which holds the log's row lock: when the log has no
    replication source left, drop its publication and its slot (a forgotten slot pins WAL
    forever). The slot goes last, while the transaction can still be rolled back: should the
    drop fail, the registry stays as it was (`state` says how that is). The lock keeps a
    concurrent `source add` from reusing the slot meanwhile; it then creates a new one."""
    if _drop_publication_if_unused(conn, log_id, log_name):
        _drop_slot(dsn, publication.slot_name(log_name), state)


def _drop_publication_if_unused(conn: psycopg.Connection, log_id: int, log_name: str) -> bool:
    """In the caller's transaction: with no replication source left, forget the log's stream
    position and drop its publication. Returns whether it did."""
    left = conn.execute("SELECT count(*) FROM merkle.sources WHERE log_id = %s AND mode = 'replication'",
                        (log_id,)).fetchone()[0]
    if left:
        return False
    conn.execute("DELETE FROM merkle.replication_progress WHERE log_id = %s", (log_id,))
    with publication.own_publication_ddl(conn):
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
            sql.Identifier(publication.publication_name(log_name))))
    return True


def _drop_slot(dsn: str, slot: str, state: str) -> None:
    """Drop the slot; on failure say what `state` the registry is in and how to finish."""
    why = f"cannot drop replication slot {slot} ({state})"
    try:
        with open_session(dsn, autocommit=True) as admin:
            role, may_replicate, streamed = admin.execute(
                "SELECT current_user, (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), "
                "(SELECT active_pid IS NOT NULL FROM pg_replication_slots "
                " WHERE slot_name = %s AND database = current_database())", (slot,)).fetchone()
            if streamed is None or may_replicate:  # no slot, or a role that may drop it
                publication.drop_slot(admin, slot)
                return
    except (psycopg.Error, DatabaseError) as exc:
        raise DatabaseError(f"{why}: {str(exc).strip().rstrip('.')}. Stop the process streaming from it "
                            "(pg_stat_replication), or have a superuser do so, then run this again; by hand: "
                            f"SELECT pg_drop_replication_slot('{slot}')") from exc
    # PostgreSQL would refuse the drop; and ending a walsender is a step of its own.
    raise DatabaseError(
        f"{why}: role {role} lacks the REPLICATION attribute that dropping a slot needs. Run this again as a "
        f"superuser, or after one has run ALTER ROLE {sql.Identifier(role).as_string(None)} REPLICATION"
        + ("; and stop the `merkle-listener run` that streams from it first (ending another role's process needs "
           "a superuser or a member of that role)" if streamed else ""))


def drop_log(conn: psycopg.Connection, name: str, dsn: str | None = None) -> dict:
    """Delete the log, its leaves, tiles and sources, their capture triggers and outboxes, its
    publication and slot. Irreversible. Returns what was dropped."""
    dsn = dsn if dsn is not None else conn.info.dsn
    # A table back under a new OID keeps its capture trigger, which the drop would not find.
    relink.refuse_while_moved(conn, name)
    with conn.transaction():
        log = registry.get_log(conn, name, for_update=True)
        sources = registry.list_sources(conn, log.log_id)
        for s in sources:
            # A source whose old OID names another relation (a data-only restore) has no trigger there.
            current = trigger.current_table(conn, s.table_oid) if relink.in_place(conn, s.source_id) else None
            trigger.drop_triggers(conn, s.source_id, current)
            trigger.drop_outbox(conn, s.source_id)
        with publication.own_publication_ddl(conn):
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                sql.Identifier(publication.publication_name(name))))
        conn.execute("DELETE FROM merkle.processed_log WHERE log_id = %s", (log.log_id,))
        # An origin verifiers were shown stays taken: a new log signing under it would be a split view.
        if conn.execute("SELECT EXISTS (SELECT 1 FROM merkle.checkpoints WHERE log_id = %s AND origin = %s) "
                        "OR (SELECT signing_refused FROM merkle.logs WHERE log_id = %s) IS NOT NULL",
                        (log.log_id, log.origin, log.log_id)).fetchone()[0]:
            registry.retire_origin(conn, log)
        conn.execute("DELETE FROM merkle.logs WHERE log_id = %s", (log.log_id,))
        # Last, while this transaction can still be rolled back: should it fail, nothing is
        # dropped, where a slot outliving its log would pin WAL with nothing to point at it.
        _drop_slot(dsn, publication.slot_name(name), "nothing was dropped")
    return {"log": name, "tree_size": log.tree_size, "sources": [s.qualified for s in sources]}
