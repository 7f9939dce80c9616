"""Logs and their sources: creating, listing and removing them in schema merkle.

Every change here locks the log's row first, so it never interleaves with a sequencer
batch (which locks the same row).
"""

from __future__ import annotations

import shlex
import unicodedata
from dataclasses import dataclass, replace

import psycopg
from pglast.stream import maybe_double_quote_name
from psycopg import sql
from psycopg.rows import class_row

from listener.errors import ConfigurationError, SourceTableError
from listener.sources import trigger
from listener.sources.validate import SourceSpec, check_database_encoding, check_log_name, parse_table_name, validate_source


@dataclass(frozen=True)
class Log:
    log_id: int
    name: str
    origin: str
    tree_size: int
    root: bytes
    paused: bool


@dataclass(frozen=True)
class Source:
    source_id: int
    log_id: int
    table_schema: str
    table_name: str
    table_oid: int
    mode: str
    key_columns: list[str]
    columns: list[str]
    events: list[str]
    append_only: bool
    row_filter: str | None
    entry_column: str | None
    doorbell: bool = True  # trigger mode: NOTIFY after each captured statement

    @property
    def qualified(self) -> str:
        return f"{self.table_schema}.{self.table_name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.table_schema, self.table_name)


def add_command(log_name: str, s: Source, *, backfill: bool = False) -> str:
    """The `source add` command that registers `s` again as it is now, every option spelled
    out: re-adding a source (to recover from a lost slot) must log what it logged before, and
    the defaults (inserts only, every column, the primary key) may differ from its options."""
    def names(columns) -> str:
        return ",".join(maybe_double_quote_name(c) for c in columns)

    args = ["merkle-listener", "source", "add", log_name,
            f"{maybe_double_quote_name(s.table_schema)}.{maybe_double_quote_name(s.table_name)}",
            "--key", names(s.key_columns)]
    if s.entry_column:
        args += ["--entry-column", s.entry_column]  # taken as written, not parsed as SQL
    else:
        args += ["--columns", names(s.columns)]
    if s.row_filter:
        args += ["--where", s.row_filter]
    if s.append_only:
        args.append("--append-only")
    if s.mode == "replication":
        args += ["--mode", "replication", "--events", ",".join(e for e in s.events if e != "truncate")]
        if "truncate" not in s.events and not s.append_only:
            args += ["--truncate", "refuse"]
    elif not s.doorbell:
        args.append("--no-doorbell")
    if backfill:
        args.append("--backfill")
    return shlex.join(args)


def missing_outboxes(conn: psycopg.Connection, sources: list[Source]) -> list[Source]:
    """The trigger-mode sources among `sources` whose outbox does not exist. `source remove`
    drops it with the registration, so this is a restore with pg_restore --data-only (or into a
    schema made by `init`): merkle.sources is data, but each source's outbox, capture function
    and trigger (and a log's publication) are schema, and do not come back."""
    ids = [s.source_id for s in sources if s.mode == "trigger"]
    if not ids:
        return []
    gone = {i for (i,) in conn.execute(
        "SELECT i FROM unnest(%s::integer[]) i WHERE to_regclass(format('merkle.outbox_%%s', i)) IS NULL", (ids,))}
    return [s for s in sources if s.source_id in gone]


def missing_publication(conn: psycopg.Connection, log_name: str, sources: list[Source]) -> list[Source]:
    """The replication sources among `sources` (of log `log_name`) not being removed, when the log's
    publication does not exist: it lists them until the last one is gone, so, as for an outbox,
    a data-only restore."""
    from listener.sources.publication import publication_name

    ids = [s.source_id for s in sources if s.mode == "replication"]
    if not ids or conn.execute("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = %s)",
                               (publication_name(log_name),)).fetchone()[0]:
        return []
    retired = {i for (i,) in conn.execute(
        "SELECT source_id FROM merkle.replication_retired WHERE source_id = ANY(%s)", (ids,))}
    return [s for s in sources if s.source_id in ids and s.source_id not in retired]


def missing_capture(conn: psycopg.Connection, log_name: str, sources: list[Source]) -> list[Source]:
    """The sources among `sources` (of log `log_name`) whose outbox or publication does not exist."""
    gone = {s.source_id for s in missing_outboxes(conn, sources) + missing_publication(conn, log_name, sources)}
    return [s for s in sources if s.source_id in gone]


def missing_capture_message(log_name: str, s: Source) -> str:
    if s.mode == "replication":
        missing = (f"the log's publication merkle_{log_name}, through which the changes of source {s.qualified} "
                   "come, does not exist (restored with pg_restore --data-only? merkle.sources is data, but the "
                   "publication is schema): changes of its table are not logged")
    else:
        missing = (f"the outbox of source {s.qualified}, merkle.outbox_{s.source_id}, does not exist (restored with "
                   "pg_restore --data-only? merkle.sources is data, but each source's outbox, capture function and "
                   "trigger are schema): inserts into its table are not logged, nor are the changes queued when the "
                   "dump was made")
    remove = shlex.join(["merkle-listener", "source", "remove", log_name, s.qualified])
    return (f"{missing}: remove the source and add it again, with --backfill (logs the table's rows as they are "
            f"now): `{remove}`, then `{add_command(log_name, s, backfill=True)}`")


def named_now(conn: psycopg.Connection, sources: list[Source]) -> list[Source]:
    """The sources under their tables' current names (a table may have been renamed since it was
    registered): what a command printed for the user must name. A dropped table keeps the
    registered name, as does one whose OID names another relation now (restored from a dump)."""
    from listener import relink

    moved = {m.source_id for m in relink.moved_sources(conn)}
    current = {oid: (schema, name) for oid, schema, name in conn.execute(
        "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = ANY(%s)", ([s.table_oid for s in sources],)).fetchall()}
    return [replace(s, table_schema=current[s.table_oid][0], table_name=current[s.table_oid][1])
            if s.table_oid in current and s.source_id not in moved else s for s in sources]


_LOG_COLUMNS = "log_id, name, origin, tree_size, root, paused"
_SOURCE_COLUMNS = (
    "source_id, log_id, table_schema, table_name, table_oid, mode, key_columns, columns, events, "
    "append_only, row_filter, entry_column, doorbell"
)


# Serialises the choice of origins (`log create`, `log set-origin`): one origin names one log.
ORIGIN_LOCK = 0x6F726967


def check_origin(origin: str) -> None:
    if not origin.strip() or any(unicodedata.category(ch) == "Cc" for ch in origin):
        raise ConfigurationError("the origin must be a non-empty line of text (no control characters)")


def _claim_origin(conn: psycopg.Connection, origin: str, *, how_to_pick: str) -> None:
    """Refuse an origin that a log has or retired, or that a dropped log had: a verifier knows a
    log by its origin, and one key signing two histories under it would be a split view. Inside
    the caller's transaction."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ORIGIN_LOCK,))
    taken = conn.execute(
        "SELECT format('log %%s has origin %%L', name, origin) FROM merkle.logs WHERE origin = %(o)s "
        "UNION ALL SELECT CASE WHEN log_id IS NULL THEN format('origin %%L was log %%s''s (dropped since)', origin, "
        "                 log_name) ELSE format('log %%s retired origin %%L', log_name, origin) END "
        "  FROM merkle.retired_origins WHERE origin = %(o)s LIMIT 1", {"o": origin}).fetchone()
    if taken is not None:
        raise ConfigurationError(f"{taken[0]}: one origin names one log (its verifiers hold its checkpoints); "
                                 f"pick another{how_to_pick}")


def retire_origin(conn: psycopg.Connection, log: Log) -> int | None:
    """Keep the log's origin among the retired ones, with the largest size published under it
    (merkle.checkpoints', or what the signer's memory told the listener when it refused). Also
    when another log still has it (two logs shared one before): that log may not sign it either."""
    published = conn.execute(
        "SELECT greatest((SELECT max(tree_size) FROM merkle.checkpoints WHERE log_id = %(l)s AND origin = %(o)s), "
        "                (SELECT signing_refused_size FROM merkle.logs WHERE log_id = %(l)s))",
        {"l": log.log_id, "o": log.origin}).fetchone()[0]
    conn.execute("INSERT INTO merkle.retired_origins (log_id, log_name, origin, tree_size, root, published_size) "
                 "VALUES (%s, %s, %s, %s, %s, %s)", (log.log_id, log.name, log.origin, log.tree_size, log.root, published))
    return published


def create_log(conn: psycopg.Connection, name: str, origin: str | None = None) -> Log:
    check_log_name(name)
    origin = f"merkle-listener/{name}" if origin is None else origin
    check_origin(origin)
    with conn.transaction():
        check_database_encoding(conn)
        if conn.execute("SELECT 1 FROM merkle.logs WHERE name = %s", (name,)).fetchone():
            raise ConfigurationError(f"log {name!r} exists already; pick another name")
        _claim_origin(conn, origin, how_to_pick=" with --origin")
        with conn.cursor(row_factory=class_row(Log)) as cur:
            cur.execute(
                f"INSERT INTO merkle.logs (name, origin) VALUES (%s, %s) RETURNING {_LOG_COLUMNS}",
                (name, origin),
            )
            return cur.fetchone()


def get_log(conn: psycopg.Connection, name: str, *, for_update: bool = False) -> Log:
    lock = " FOR UPDATE" if for_update else ""
    with conn.cursor(row_factory=class_row(Log)) as cur:
        cur.execute(f"SELECT {_LOG_COLUMNS} FROM merkle.logs WHERE name = %s{lock}", (name,))
        log = cur.fetchone()
    if log is None:
        known = [r[0] for r in conn.execute("SELECT name FROM merkle.logs ORDER BY name")]
        hint = f"known logs: {', '.join(known)}" if known else "create one with `merkle-listener log create NAME`"
        raise ConfigurationError(f"no log named {name!r}; {hint}")
    return log


def set_paused(conn: psycopg.Connection, name: str, paused: bool) -> Log:
    """Pause or resume a log: a paused log's writer appends nothing; changes stay queued."""
    with conn.transaction():
        log = get_log(conn, name, for_update=True)
        conn.execute("UPDATE merkle.logs SET paused = %s WHERE log_id = %s", (paused, log.log_id))
        if not paused:
            trigger.ring(conn, log.name)  # what queued while paused is appended at once
    return get_log(conn, name)


@dataclass(frozen=True)
class RetiredOrigin:
    origin: str
    tree_size: int  # the log's size when the origin was retired
    published_size: int | None  # the largest checkpoint known to have been signed under it
    retired_at: object = None


def set_origin(conn: psycopg.Connection, name: str, origin: str) -> RetiredOrigin:
    """Give a log a new origin, retiring its current one: its checkpoints begin again under the
    new origin, from the whole tree as it is. The way out when signing is refused because the
    database went back behind a published checkpoint (listener/store/checkpoints.py)."""
    check_origin(origin)
    with conn.transaction():
        log = get_log(conn, name, for_update=True)
        if origin == log.origin:
            raise ConfigurationError(f"log {name!r} has origin {origin!r} already")
        _claim_origin(conn, origin, how_to_pick="")
        published = retire_origin(conn, log)
        conn.execute("UPDATE merkle.logs SET origin = %s, signing_refused = NULL, signing_refused_at = NULL, "
                     "signing_refused_size = NULL WHERE log_id = %s", (origin, log.log_id))
    return RetiredOrigin(log.origin, log.tree_size, published)


def retired_origins(conn: psycopg.Connection, log_id: int) -> list[RetiredOrigin]:
    """The origins the log retired, oldest first."""
    with conn.cursor(row_factory=class_row(RetiredOrigin)) as cur:
        return cur.execute("SELECT origin, tree_size, published_size, retired_at FROM merkle.retired_origins "
                           "WHERE log_id = %s ORDER BY retired_at", (log_id,)).fetchall()


def list_logs(conn: psycopg.Connection) -> list[Log]:
    with conn.cursor(row_factory=class_row(Log)) as cur:
        return cur.execute(f"SELECT {_LOG_COLUMNS} FROM merkle.logs ORDER BY name").fetchall()


def list_sources(conn: psycopg.Connection, log_id: int | None = None) -> list[Source]:
    with conn.cursor(row_factory=class_row(Source)) as cur:
        cur.execute(
            f"SELECT {_SOURCE_COLUMNS} FROM merkle.sources "
            "WHERE %(log)s::integer IS NULL OR log_id = %(log)s ORDER BY source_id",
            {"log": log_id},
        )
        return cur.fetchall()


def add_source(
    conn: psycopg.Connection,
    log_name: str,
    table: str,
    *,
    key: list[str] | None = None,
    columns: list[str] | None = None,
    where: str | None = None,
    entry_column: str | None = None,
    append_only: bool = False,
    backfill: bool = False,
    mode: str = "trigger",
    events: list[str] | None = None,
    truncate: str | None = None,
    dsn: str | None = None,
    doorbell: bool = True,
) -> tuple[Source, int]:
    """Validate and register `table` as a source of the log; returns the source and the
    number of existing rows queued by the backfill. All or nothing.

    mode 'trigger' captures inserts with a statement trigger; mode 'replication' through the
    log's publication and logical slot (listener/sources/publication.py), logging `events`
    (default insert) and TRUNCATE per `truncate` ('log', the default, or 'refuse'). `dsn`
    (default: the connection's) opens the replication connection that creates the slot.
    Without `doorbell` (trigger mode), no NOTIFY follows a captured statement, so writers
    may use two-phase commit; the listener polls the outbox instead.
    """
    from listener import relink

    relink.refuse_while_moved(conn, log_name)
    if mode == "replication" and not doorbell:
        raise ConfigurationError("--no-doorbell is for trigger mode: replication mode has no doorbell "
                                 "(and its writers may use two-phase commit as they are)")
    if mode == "replication":
        from listener.sources import replication_setup

        return replication_setup.add_source(
            conn, log_name, table, key=key, columns=columns, where=where, entry_column=entry_column,
            append_only=append_only, backfill=backfill, events=events, truncate=truncate, dsn=dsn)
    if mode != "trigger":
        raise ConfigurationError(f"--mode must be 'trigger' or 'replication', got {mode!r}")
    if (events is not None and [e.strip().lower() for e in events] != ["insert"]) or truncate is not None:
        raise ConfigurationError("trigger mode logs inserts only; use --mode replication for --events and --truncate")
    with conn.transaction():
        log = get_log(conn, log_name, for_update=True)
        spec = validate_source(conn, table, key=key, columns=columns, where=where, entry_column=entry_column)
        if missing := trigger.missing_privileges(conn, spec, outbox=True):  # before the lock, which needs them
            role = conn.execute("SELECT current_user").fetchone()[0]
            raise ConfigurationError(f"role {role!r} lacks what trigger mode needs:\n  - " + "\n  - ".join(missing))
        # Before the other checks: a concurrent add of the same table waits here, then sees it taken.
        trigger.lock_out_writers(conn, spec.ident(), "to add its capture trigger")
        _check_entry_column_not_null(conn, spec)
        check_not_a_source(conn, spec)
        _check_not_partitioned(conn, spec)
        check_append_only_parent(conn, spec, append_only)
        check_not_subscribed(conn, spec, trigger_mode=True, append_only=append_only)
        source = _insert_source(conn, log, spec, append_only, doorbell=doorbell)
        queued = trigger.install(conn, source.source_id, log.name, spec, append_only=append_only, backfill=backfill,
                                 doorbell=doorbell)
        trigger.ring(conn, log.name)  # a running listener reads the log's sources at once
    return source, queued


def set_doorbell(conn: psycopg.Connection, log_name: str, table: str, on: bool) -> Source:
    """Turn a trigger-mode source's doorbell on or off (off: its writers may use two-phase
    commit). Nothing captured is lost: the capture function is replaced in one transaction."""
    with conn.transaction():
        log = get_log(conn, log_name, for_update=True)
        source = find_source(conn, log, table)
        if source.mode != "trigger":
            raise ConfigurationError(f"{source.qualified} is a replication source: replication mode has no doorbell")
        if conn.execute("SELECT to_regprocedure(%s) IS NULL", (f"merkle.capture_{source.source_id}()",)).fetchone()[0]:
            raise ConfigurationError(f"capture of {source.qualified} was stopped by `source remove`; "
                                     "run `source remove` again to finish, then add it anew")
        trigger.set_doorbell(conn, source, log.name, on)
        conn.execute("UPDATE merkle.sources SET doorbell = %s WHERE source_id = %s", (on, source.source_id))
        trigger.ring(conn, log.name)  # sent at COMMIT: a running listener polls (or not) from then on
    return replace(source, doorbell=on)


def _insert_source(conn: psycopg.Connection, log: Log, spec: SourceSpec, append_only: bool,
                   mode: str = "trigger", events: list[str] | None = None, doorbell: bool = True) -> Source:
    with conn.cursor(row_factory=class_row(Source)) as cur:
        cur.execute(
            "INSERT INTO merkle.sources (log_id, table_schema, table_name, table_oid, mode, key_columns, "
            "columns, events, append_only, row_filter, entry_column, doorbell) "
            f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_SOURCE_COLUMNS}",
            (log.log_id, spec.schema, spec.table, spec.oid, mode, list(spec.key_columns), list(spec.columns),
             events or ["insert"], append_only, spec.row_filter, spec.entry_column, doorbell),
        )
        source = cur.fetchone()
    _record_column_types(conn, source.source_id, spec)
    return source


def forget_writer_error(conn: psycopg.Connection, log_name: str) -> None:
    """The log's sources changed (the way out of most errors that stop its writer): whatever
    error a listener kept for `status` is of before, and a writer still stopped keeps it again."""
    with conn.transaction():
        conn.execute("UPDATE merkle.logs SET writer_error = NULL, writer_error_at = NULL "
                     "WHERE name = %s AND writer_error IS NOT NULL", (log_name,))


def _record_column_types(conn: psycopg.Connection, source_id: int, spec: SourceSpec) -> None:
    """Record the type of each column the leaves are computed from: the DDL guard
    (sql/008_source_column_types.sql) refuses a retype against this record, in both modes."""
    # ALTER ... TYPE needs ACCESS EXCLUSIVE: from here to COMMIT the types recorded are the
    # ones captured (validation's locks ended with its rolled-back savepoint).
    conn.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS SHARE MODE").format(spec.ident()))
    cols = list(trigger.captured_columns(spec))
    cur = conn.execute(
        "INSERT INTO merkle.source_columns (source_id, name, type_oid, typmod) "
        "SELECT %s, attname, atttypid, atttypmod FROM pg_attribute "
        "WHERE attrelid = %s AND attname = ANY(%s) AND attnum > 0 AND NOT attisdropped",
        (source_id, spec.oid, cols),
    )
    if cur.rowcount != len(cols):
        raise SourceTableError(f"the columns of {spec.qualified} changed while it was being registered; retry")


def check_not_a_source(conn: psycopg.Connection, spec: SourceSpec) -> None:
    other = conn.execute(
        "SELECT l.name FROM merkle.sources s JOIN merkle.logs l USING (log_id) WHERE s.table_oid = %s",
        (spec.oid,),
    ).fetchone()
    if other:
        raise SourceTableError(
            f"table {spec.qualified} is already a source of log {other[0]!r}; "
            "a table feeds one log (remove it there first)"
        )


def check_append_only_parent(conn: psycopg.Connection, spec: SourceSpec, append_only: bool) -> None:
    """An append-only source refuses UPDATE and DELETE with a statement trigger, which fires only
    for statements naming it: one naming its parent (inheritance or partitioning) would reach
    its rows unrefused (found by review), unless the parent is an append-only source too. The
    DDL guard keeps this so (merkle_guard.check_source_partitions)."""
    if not append_only:
        return
    parent = conn.execute(
        "SELECT i.inhparent::regclass::text FROM pg_inherits i WHERE i.inhrelid = %s AND NOT EXISTS "
        "(SELECT FROM merkle.sources s WHERE s.table_oid = i.inhparent AND s.append_only)", (spec.oid,)).fetchone()
    if parent:
        raise SourceTableError(
            f"{spec.qualified} inherits from (or is a partition of) {parent[0]}: an UPDATE or DELETE naming "
            f"{parent[0]} would change its rows without firing the append-only guard; add {parent[0]} as an "
            "append-only source instead, or detach the table (NO INHERIT, DETACH PARTITION) first")


def check_not_subscribed(conn: psycopg.Connection, spec: SourceSpec, *, trigger_mode: bool, append_only: bool) -> None:
    """A subscription's apply worker fires row triggers only, never statement triggers: a
    trigger-mode source would miss the rows it applies, and an append-only source's guard its
    updates and deletes (found by review). Replication mode streams them like any change. The
    DDL guard refuses such a subscription made later (merkle_guard.check_source_subscription)."""
    if not (trigger_mode or append_only):
        return
    sub = conn.execute(
        "SELECT s.subname::text FROM pg_catalog.pg_subscription_rel r "
        "JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid "
        "WHERE r.srrelid = %s OR r.srrelid IN (SELECT relid FROM pg_catalog.pg_partition_tree(%s))",
        (spec.oid, spec.oid)).fetchone()
    if sub:
        what = "a trigger-mode source would miss" if trigger_mode else "an append-only source could not refuse"
        raise SourceTableError(
            f"subscription {sub[0]} applies changes to {spec.qualified}, and its apply worker fires no statement "
            f"trigger: {what} them; add it with --mode replication{'' if not append_only else ' and without --append-only'}, "
            "or replicate into another table")


def _check_not_partitioned(conn: psycopg.Connection, spec: SourceSpec) -> None:
    """Trigger mode: PostgreSQL fires a statement trigger only for the table a statement names,
    so a partitioned table's capture misses rows inserted into a partition directly, and a
    partition's misses rows inserted through its parent."""
    row = conn.execute(
        "SELECT c.relkind, (SELECT n.nspname || '.' || p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent "
        "JOIN pg_namespace n ON n.oid = p.relnamespace WHERE i.inhrelid = c.oid) "
        "FROM pg_class c WHERE c.oid = %s AND (c.relkind = 'p' OR c.relispartition)", (spec.oid,)).fetchone()
    kind, parent = row or (None, None)
    if kind == "p":
        raise SourceTableError(
            f"{spec.qualified} is a partitioned table: trigger mode's statement trigger does not fire for rows "
            "inserted into one of its partitions directly; use --mode replication, which captures every partition "
            "(one attached later included)")
    if kind is not None:
        raise SourceTableError(
            f"{spec.qualified} is a partition of {parent}: trigger mode's statement trigger does not fire for rows "
            f"inserted through {parent}; use --mode replication (for {parent}, or for this partition)")


def _check_entry_column_not_null(conn: psycopg.Connection, spec: SourceSpec) -> None:
    if not spec.entry_column:
        return
    notnull = conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = %s AND attname = %s", (spec.oid, spec.entry_column)
    ).fetchone()[0]
    if not notnull:
        raise SourceTableError(
            f"entry column {spec.entry_column!r} of {spec.qualified} must be NOT NULL "
            f"(a NULL entry cannot be hashed): ALTER TABLE ... ALTER {spec.entry_column} SET NOT NULL"
        )


def find_source(conn: psycopg.Connection, log: Log, table: str) -> Source:
    """The source of `log` named `table` (schema-qualified or not), as registered or as now named:
    as written unquoted (`Sales.Orders`) or as SQL reads it (`"Sales"."Orders"`)."""
    current = {source_id: (schema, name) for source_id, schema, name in conn.execute(
        "SELECT s.source_id, n.nspname, c.relname FROM merkle.sources s "
        "JOIN pg_class c ON c.oid = s.table_oid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE s.log_id = %s", (log.log_id,)).fetchall()}
    try:
        parsed = parse_table_name(table)
    except SourceTableError:
        parsed = None
    for s in list_sources(conn, log.log_id):
        pairs = {(s.table_schema, s.table_name)} | ({current[s.source_id]} if s.source_id in current else set())
        if any(table in (f"{schema}.{name}", name) or parsed in ((schema, name), (None, name))
               for schema, name in pairs):
            return s
    raise ConfigurationError(f"table {table!r} is not a source of log {log.name!r} (see `merkle-listener source list`)")


def remove_source(conn: psycopg.Connection, log_name: str, table: str, *, dsn: str | None = None,
                  wait: float = 10.0) -> int:
    """Stop capturing `table`. Returns how many captured changes are still queued: while any
    are, the source stays registered so the listener can log them; run again to finish.
    For a replication source, -1 means changes may still be in the stream (see
    replication_setup.remove_source)."""
    from listener import relink

    relink.refuse_while_moved(conn, log_name)
    with conn.transaction():
        log = get_log(conn, log_name)
        mode = find_source(conn, log, table).mode
    if mode == "replication":
        from listener.sources import replication_setup

        return replication_setup.remove_source(conn, log_name, table, dsn=dsn, wait=wait)
    with conn.transaction():
        log = get_log(conn, log_name, for_update=True)
        source = find_source(conn, log, table)
        current = trigger.current_table(conn, source.table_oid) if relink.in_place(conn, source.source_id) else None
        trigger.drop_triggers(conn, source.source_id, current)
        # Without its outbox (a data-only restore) nothing of it is queued: it goes at once.
        queued = 0 if missing_outboxes(conn, [source]) else conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(trigger.outbox_name(source.source_id))
        ).fetchone()[0]
        if queued == 0:
            trigger.drop_outbox(conn, source.source_id)
            delete_source(conn, source.source_id)
    return queued


def delete_source(conn: psycopg.Connection, source_id: int) -> None:
    """Unregister a source. One with leaves in its log leaves its name behind in
    merkle.retired_sources (sql/019), for the proofs and lookups of those leaves."""
    conn.execute(
        "WITH gone AS (DELETE FROM merkle.sources WHERE source_id = %s "
        "RETURNING source_id, log_id, table_schema, table_name, mode) "
        "INSERT INTO merkle.retired_sources (source_id, log_id, table_schema, table_name, mode) "
        "SELECT * FROM gone g WHERE EXISTS (SELECT 1 FROM merkle.processed_log p "
        "WHERE p.log_id = g.log_id AND p.source_id = g.source_id)", (source_id,))
