"""Replication-mode lifecycle: checks, the log's publication and its pgoutput slot, backfill.

A log with replication-mode sources has one publication and one logical slot, both named
merkle_<log>. The publication lists every replication source of the log (with its row
filter) and publishes the union of their events; the stream consumer
(listener/sources/replication.py) drops what a source did not ask for. Each replication
source either logs TRUNCATE (event 'truncate') or refuses it with a guard trigger.

Backfill (`source add --backfill`), so that existing rows and the stream meet with no gap
and no duplicate:

    slot created now   commit the publication, CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export'),
                       read the table in that snapshot: it holds exactly the transactions the
                       slot will not stream. Until that read commits, the source's backfill
                       state is not ready and the sequencer holds its streamed changes back.
    slot exists        LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE, add the table to the publication and read
                       it in one transaction: writers wait, so every change before is in the
                       read and every change after is streamed.

The backfilled leaves are computed in SQL with listener.canonical_sql (op 'backfill'), as
trigger mode does.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import psycopg
from psycopg import pq, sql

from listener import canonical_sql
from listener.errors import ConfigurationError, DatabaseError, SourceTableError
from listener.sources import trigger
from listener.sources.validate import SourceSpec
from listener.store.connect import open_replication, replication_refusal

REPLICATION_EVENTS = ("insert", "update", "delete", "truncate")


def slot_name(log_name: str) -> str:
    return f"merkle_{log_name}"


def publication_name(log_name: str) -> str:
    return f"merkle_{log_name}"


# -- checks ------------------------------------------------------------------------------


def preflight(conn: psycopg.Connection, spec: SourceSpec, events: list[str], *, log_name: str) -> None:
    """Refuse, with the fix, what would make replication capture fail or be incomplete."""
    wal_level = conn.execute("SELECT current_setting('wal_level')").fetchone()[0]
    if wal_level != "logical":
        raise ConfigurationError(
            f"wal_level is {wal_level!r}; replication mode needs 'logical': run "
            "ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL (or use --mode trigger)"
        )
    if conn.execute("SELECT relpersistence = 'u' FROM pg_class WHERE oid = %s", (spec.oid,)).fetchone()[0]:
        # PostgreSQL refuses it in a publication; say why and what to do instead of its bare error.
        raise SourceTableError(
            f"{spec.qualified} is UNLOGGED: its rows write no WAL, so logical replication never sends them; run "
            f"ALTER TABLE {spec.ident().as_string(conn)} SET LOGGED; first, or use --mode trigger"
        )
    slots_max, senders_max = conn.execute(
        "SELECT current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int"
    ).fetchone()
    slot_exists, slots_used = conn.execute(
        "SELECT bool_or(slot_name = %s), count(*) FROM pg_replication_slots", (slot_name(log_name),)
    ).fetchone()
    elsewhere = conn.execute(
        "SELECT coalesce(database, '(none: a physical slot)') FROM pg_replication_slots "
        "WHERE slot_name = %s AND database IS DISTINCT FROM current_database()", (slot_name(log_name),)).fetchone()
    if elsewhere is not None:
        # Slot names are per server, not per database: that slot is another database's.
        raise ConfigurationError(
            f"replication slot {slot_name(log_name)} exists already for database {elsewhere[0]} (slot names are "
            f"shared by every database of the server, so a log named {log_name!r} there uses it): create this "
            "log under another name for its replication sources, or use --mode trigger"
        )
    if not slot_exists and slots_used >= slots_max:
        raise ConfigurationError(
            f"all {slots_max} replication slots are in use (max_replication_slots); raise "
            "max_replication_slots and restart PostgreSQL, or drop an unused slot "
            "(SELECT slot_name, active FROM pg_replication_slots; SELECT pg_drop_replication_slot('name'))"
        )
    if senders_max < 1:
        raise ConfigurationError("max_wal_senders is 0; set it to at least 1 and restart PostgreSQL")
    check_privileges(conn, spec, log_name)
    identity = _replica_identity(conn, spec.oid)
    if ("update" in events or "delete" in events) and identity != "f":
        # Without FULL, an UPDATE that leaves a TOASTed column alone sends no value for it
        # (and no old row to take it from), and a DELETE sends only the replica identity key.
        raise SourceTableError(
            f"logging updates/deletes of {spec.qualified} needs REPLICA IDENTITY FULL (so that every "
            f"hashed value, TOASTed or not, is in the stream): run ALTER TABLE {spec.ident().as_string(conn)} "
            "REPLICA IDENTITY FULL; or log inserts only"
        )
    if "update" in events or "delete" in events:
        # The old row comes from the partition that holds it, under that partition's own
        # identity (a new partition starts at DEFAULT; partitions created or attached later
        # are set to FULL by the guard of sql/011_partitions_and_generated.sql).
        lacking = [r[0] for r in conn.execute(
            "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_partition_tree(%s) t "
            "JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE t.level > 0 AND c.relkind = 'r' AND c.relreplident <> 'f' ORDER BY 1", (spec.oid,))]
        if lacking:
            raise SourceTableError(
                f"logging updates/deletes of {spec.qualified} needs REPLICA IDENTITY FULL on each of its partitions "
                "too (an update or delete carries the old row as the partition holding it is set): run "
                + " ".join(f"ALTER TABLE {name} REPLICA IDENTITY FULL;" for name in lacking) + " or log inserts only")


def check_privileges(conn: psycopg.Connection, spec: SourceSpec, log_name: str) -> None:
    """Refuse a role that could not make the slot, the publication or the table's triggers,
    naming every privilege it lacks and what to run for each."""
    role, database, can_replicate, may_create, pub_owner, owns_pub = conn.execute(
        "SELECT current_user, current_database(), (SELECT rolreplication OR rolsuper FROM pg_roles "
        "WHERE rolname = current_user), has_database_privilege(current_database(), 'CREATE'), "
        "p.pubowner::regrole::text, pg_has_role(p.pubowner, 'USAGE') "
        "FROM (SELECT) one LEFT JOIN pg_publication p ON p.pubname = %s", (publication_name(log_name),)).fetchone()
    quoted = sql.Identifier(role).as_string(conn)
    pub = sql.Identifier(publication_name(log_name)).as_string(conn)
    missing = []
    if not can_replicate:
        missing.append(f"the REPLICATION privilege that a logical slot needs: run ALTER ROLE {quoted} REPLICATION; "
                       "as a superuser")
    if pub_owner is None and not may_create:
        missing.append(f"CREATE on database {database} (for the log's publication {pub}): run GRANT CREATE ON "
                       f"DATABASE {sql.Identifier(database).as_string(conn)} TO {quoted}; as its owner or a superuser")
    elif pub_owner is not None and not owns_pub:
        missing.append(f"ownership of the log's publication {pub} (role {pub_owner} owns it): run ALTER PUBLICATION "
                       f"{pub} OWNER TO {quoted}; as {pub_owner} or a superuser")
    owner_too = trigger.missing_privileges(conn, spec, outbox=False)
    if missing or owner_too:
        # Trigger mode needs the table's ownership too: suggest it only where that is not what lacks.
        raise ConfigurationError(
            f"role {role!r} lacks what replication mode needs{'' if owner_too else ' (or use --mode trigger)'}:"
            + "\n  - " + "\n  - ".join(missing + owner_too))


def check_publication_identities(conn: psycopg.Connection, tables: list[tuple[str, int, bool]],
                                 publish: set[str]) -> None:
    """When the publication publishes updates or deletes, PostgreSQL refuses UPDATE/DELETE on
    any of its tables without a usable replica identity: refuse to register rather than break
    the application's writes. `tables` is (qualified name, oid, has a row filter)."""
    if not publish & {"update", "delete"}:
        return
    problems: dict[str, list[str]] = {}  # the rule broken -> each table that breaks it, and why
    for name, oid, has_filter in tables:
        identity = _replica_identity(conn, oid)
        has_pk = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = %s AND indisprimary)", (oid,)
        ).fetchone()[0]
        if identity == "f" or (identity == "d" and has_pk and not has_filter) or (identity == "i" and not has_filter):
            continue
        # A filter on identity columns only would do for PostgreSQL; FULL is asked for any filter
        # because the DDL guard (sql/010) keeps exactly this rule, without parsing filters.
        # The rule named is the one that applies: a table without a filter has none to cover.
        if has_filter:
            rule, why = ("whose replica identity does not cover its row filter's columns",
                         "it has a row filter, which needs REPLICA IDENTITY FULL here")
        else:
            rule, why = ("without a replica identity", "its replica identity is NOTHING" if identity == "n"
                         else "it has no primary key or replica identity index")
        problems.setdefault(rule, []).append(f"{name}: {why}: run ALTER TABLE {name} REPLICA IDENTITY FULL;")
    if problems:
        # Every table at once: fixing one and retrying should not reveal the next.
        raise SourceTableError(
            "the log's publication would publish updates/deletes, and then PostgreSQL refuses UPDATE and DELETE on "
            + "; and on ".join(f"a table {rule}; " + " ".join(each) for rule, each in problems.items())
            + " first")


def _replica_identity(conn: psycopg.Connection, oid: int) -> str:
    return conn.execute("SELECT relreplident FROM pg_class WHERE oid = %s", (oid,)).fetchone()[0]


# -- publication -------------------------------------------------------------------------


def sync_publication(conn: psycopg.Connection, log_name: str, log_id: int, *, create: bool = True) -> set[str]:
    """Make publication merkle_<log> list exactly the log's replication sources (with their row
    filters) and publish the union of their events; drop it when there are none. Runs in the
    caller's transaction. Returns what it publishes. Without `create`, a publication that does
    not exist is left so (a data-only restore): made for the sources left, it would have them
    look captured, and be found by `init` (listener/relink.py), with what they missed not logged."""
    with own_publication_ddl(conn):
        return _sync_publication(conn, log_name, log_id, create)


@contextmanager
def own_publication_ddl(conn: psycopg.Connection):
    """Mark merkle-listener's own change of a log's publication, which the DDL guard refuses
    otherwise (sql/021_publication_mark.sql); in the caller's transaction."""
    conn.execute("SELECT merkle.mark_own_ddl('publication')")
    yield
    conn.execute("SELECT merkle.unmark_own_ddl('publication')")


def _sync_publication(conn: psycopg.Connection, log_name: str, log_id: int, create: bool) -> set[str]:
    rows = conn.execute(
        "SELECT table_schema, table_name, table_oid, row_filter, events FROM merkle.sources s "
        "WHERE log_id = %s AND mode = 'replication' "
        "AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id) "
        "ORDER BY source_id", (log_id,)).fetchall()
    pub = sql.Identifier(publication_name(log_name))
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication_name(log_name),)).fetchone()
    if not exists and not create:
        return set()
    if not rows:
        # Emptied, not dropped: the stream names it until the slot goes too (drop_log,
        # replication_setup._drop_slot_if_unused).
        listed = conn.execute(
            "SELECT r.prrelid::regclass::text FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
            "WHERE p.pubname = %s", (publication_name(log_name),)).fetchall()
        if listed:
            conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                pub, sql.SQL(", ").join(sql.SQL(t) for (t,) in listed)))
        return set()
    publish = {"insert"}
    for *_, events in rows:
        publish.update(e for e in events if e in REPLICATION_EVENTS)
    check_publication_identities(
        conn, [(sql.Identifier(s, t).as_string(conn), oid, f is not None) for s, t, oid, f, _ in rows], publish)
    tables = sql.SQL(", ").join(
        sql.SQL("TABLE {}{}").format(
            sql.Identifier(schema, name), sql.SQL(" WHERE ({})").format(sql.SQL(flt)) if flt else sql.SQL(""))
        for schema, name, _, flt, _ in rows
    )
    options = sql.SQL("publish = {}, publish_via_partition_root = true").format(
        sql.Literal(", ".join(e for e in REPLICATION_EVENTS if e in publish)))
    if exists:
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET {}").format(pub, tables))
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET ({})").format(pub, options))
    else:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR {} WITH ({})").format(pub, tables, options))
    return publish


def drift(conn: psycopg.Connection, log_name: str, log_id: int) -> list[str]:
    """How the log's publication differs from what sync_publication makes of it: changed by hand
    (the DDL guard refuses that where it is installed), it let changes of the sources through
    uncaptured, which are never streamed, even once it is put back. A row filter is checked
    for being there, not for its text (the DDL guard checks that too). One statement: one
    snapshot, never half of a change."""
    sources, pub, listed = conn.execute(
        "SELECT (SELECT coalesce(json_agg(json_build_array(s.table_oid, s.table_schema || '.' || s.table_name, "
        "                                                  s.row_filter IS NOT NULL, s.events) ORDER BY s.source_id), '[]')"
        "          FROM merkle.sources s JOIN pg_class c ON c.oid = s.table_oid "
        "         WHERE s.log_id = %(log)s AND s.mode = 'replication' AND NOT EXISTS "
        "               (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id)), "
        "       (SELECT json_build_array(pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot, puballtables, "
        "                                EXISTS (SELECT 1 FROM pg_publication_namespace n WHERE n.pnpubid = p.oid)) "
        "          FROM pg_publication p WHERE pubname = %(pub)s), "
        "       (SELECT coalesce(json_object_agg(r.prrelid, json_build_array(r.prqual IS NOT NULL, "
        "                                                                     r.prattrs IS NOT NULL)), '{}') "
        "          FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid WHERE p.pubname = %(pub)s)",
        {"log": log_id, "pub": publication_name(log_name)}).fetchone()
    if not sources:
        return []
    if pub is None:
        return [f"publication {publication_name(log_name)} is gone"]
    problems = []
    for oid, table, filtered, _ in sources:
        if str(oid) not in listed:
            problems.append(f"{table} is not in it")
            continue
        has_filter, has_columns = listed[str(oid)]
        if has_filter != filtered:
            problems.append(f"{table}'s row filter was {'dropped' if filtered else 'added'}")
        if has_columns:
            problems.append(f"{table} is published with a column list")
    published = dict(zip(REPLICATION_EVENTS, pub[:4]))
    wanted = {"insert"} | {e for *_, events in sources for e in events}
    problems += [f"it does not publish {e}" for e in REPLICATION_EVENTS if e in wanted and not published[e]]
    if not pub[4]:
        problems.append("publish_via_partition_root is off")
    if pub[5] or pub[6]:
        # A table it publishes through FOR ALL TABLES or a schema is sent without its row filter.
        problems.append("it publishes all tables" if pub[5] else "it publishes whole schemas")
    # What the DDL guard recorded of it, where the guard is installed (a function name that does
    # not exist fails the statement that names it, so first look).
    if not problems and conn.execute(
            "SELECT to_regprocedure('merkle_guard.log_publication_changed(text)') IS NOT NULL").fetchone()[0]:
        if conn.execute("SELECT merkle_guard.log_publication_changed(%s)", (log_name,)).fetchone()[0]:
            problems.append("it is not as merkle-listener made it (a row filter's text, say), says the DDL guard")
    return problems


# -- slot --------------------------------------------------------------------------------


class ReplicationCommandConnection:
    """A walsender connection (replication=database) for replication commands.

    Replication commands need the simple query protocol, so this uses psycopg's libpq
    wrapper directly. An exported snapshot lives until the next command or close().
    """

    def __init__(self, dsn: str):
        self.pgconn = open_replication(dsn)
        if self.pgconn.status != pq.ConnStatus.OK:
            message = replication_refusal(self.pgconn)
            self.pgconn.finish()
            raise DatabaseError(f"cannot open a replication connection: {message}")

    def command(self, text: str) -> list[tuple[str | None, ...]]:
        res = self.pgconn.exec_(text.encode())
        if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            raise DatabaseError(f"{text.split()[0]} failed: {res.get_error_message().strip()}")
        return [
            tuple(None if (v := res.get_value(r, c)) is None else bytes(v).decode() for c in range(res.nfields))
            for r in range(res.ntuples)
        ]

    def close(self) -> None:
        self.pgconn.finish()


def create_slot(dsn: str, name: str, *, export_snapshot: bool) -> tuple[ReplicationCommandConnection, str, str | None]:
    """CREATE_REPLICATION_SLOT name LOGICAL pgoutput. Returns the open connection (close it
    when done with the snapshot), the consistent point LSN and the exported snapshot name."""
    rc = ReplicationCommandConnection(dsn)
    try:
        snapshot = "export" if export_snapshot else "nothing"
        row = rc.command(f'CREATE_REPLICATION_SLOT "{name}" LOGICAL pgoutput (SNAPSHOT \'{snapshot}\')')[0]
    except BaseException:
        rc.close()
        raise
    return rc, row[1], row[2]


def slot_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
                        (name,)).fetchone() is not None


def drop_slot(conn: psycopg.Connection, name: str, *, timeout: float = 10.0) -> bool:
    """Drop the slot if it exists in the connection's database, ending the walsender that streams
    from it (a listener reconnects and finds no slot); a slot of that name in another database
    is that database's and stays. Requires `conn` in autocommit mode. Returns whether it existed."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots "
                           "WHERE slot_name = %s AND database = current_database()", (name,)).fetchone()
        if row is None:
            return False
        if row[0] is not None:
            conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            return True
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise DatabaseError(f"slot {name} stays in use; stop the process streaming from it and retry") from None
            time.sleep(0.1)


# -- backfill ----------------------------------------------------------------------------


def queue_backfill(conn: psycopg.Connection, source_id: int, spec: SourceSpec) -> int:
    """Insert the leaves of the table's rows (op 'backfill', key order) into the backfill
    queue and mark it ready, in the caller's transaction and snapshot. Returns the count."""
    types = dict(conn.execute(
        "SELECT attname, atttypid::integer FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
        (spec.oid,)).fetchall())
    if spec.entry_column:
        leaf = canonical_sql.leaf_hash_of_bytes_sql(sql.Identifier("n", spec.entry_column))
    else:
        leaf = canonical_sql.leaf_hash_sql(canonical_sql.entry_sql("n", spec.qualified, spec.columns, "backfill", types))
    key_order = sql.SQL(", ").join(sql.Identifier("n", c) for c in spec.key_columns)
    where = sql.SQL("WHERE ({})").format(sql.SQL(spec.row_filter)) if spec.row_filter else sql.SQL("")
    cur = conn.execute(sql.SQL(
        "INSERT INTO merkle.replication_backfill (source_id, ord, source_key, leaf_hash) "
        "SELECT {sid}, row_number() OVER (ORDER BY {order}), {key}, {leaf} FROM {table} n {where}"
    ).format(sid=sql.Literal(source_id), order=key_order, key=canonical_sql.key_sql("n", spec.key_columns, types),
             leaf=leaf, table=spec.ident(), where=where))
    conn.execute("UPDATE merkle.replication_backfill_state SET ready = true WHERE source_id = %s", (source_id,))
    return cur.rowcount
