"""Trigger-mode capture: the DDL that copies each inserted row image into a durable outbox.

For source S on table T (all names composed with psycopg.sql, never pasted):

    merkle.outbox_S   (stmt_id, ord, op, queued_at, <hashed columns of T, same types>); the
                      first four prefixed with merkle_ if T has a column of such a name
    merkle.capture_S  AFTER INSERT ... REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT:
                      one nextval per statement, rows numbered in insertion order,
                      the row filter applied, then one NOTIFY on channel merkle_outbox
                      with the log name (a doorbell: correctness never depends on it).
                      Without the doorbell (PostgreSQL refuses PREPARE TRANSACTION after a
                      NOTIFY, so writers using two-phase commit need that), the listener
                      polls the log's outboxes every 0.1 s instead.

The outbox has no index and no per-row sequence: both are what makes capture expensive for
writers (docs/design.md). The entry is computed later, by the drain, from the row image as
inserted; see listener/sequencer.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from listener.errors import SourceTableError
from listener.sources.validate import FILTER_SETTINGS, SourceSpec

if TYPE_CHECKING:
    from listener.registry import Source

DOORBELL_CHANNEL = "merkle_outbox"
# How long registering or removing a source waits for the table's lock before it gives up.
WRITER_LOCK_TIMEOUT = "10s"


def outbox_name(source_id: int) -> sql.Identifier:
    return sql.Identifier("merkle", f"outbox_{source_id}")


def _capture_function(source_id: int) -> sql.Identifier:
    return sql.Identifier("merkle", f"capture_{source_id}")


def _trigger_names(source_id: int) -> tuple[sql.Identifier, sql.Identifier, sql.Identifier]:
    return (
        sql.Identifier(f"merkle_capture_{source_id}"),
        sql.Identifier(f"merkle_guard_{source_id}"),
        sql.Identifier(f"merkle_guard_truncate_{source_id}"),
    )


@dataclass(frozen=True)
class OutboxColumns:
    """Names of an outbox's own columns (beside the table's, which keep their names)."""

    stmt_id: str
    ord: str
    op: str
    queued_at: str


def outbox_columns(source: SourceSpec | Source) -> OutboxColumns:
    """The plain names, unless the table has a column of one of them: then each is prefixed
    with merkle_ (again, until nothing clashes). Derived from the registered columns alone,
    so the trigger, the drain and `status` agree without asking the outbox."""
    captured = set(captured_columns(source))
    names = [f.name for f in fields(OutboxColumns)]
    prefix = ""
    while any(prefix + n in captured for n in names):
        prefix += "merkle_"
    return OutboxColumns(*(prefix + n for n in names))


def _own_identifiers(source: SourceSpec | Source) -> dict[str, sql.Identifier]:
    return {k: sql.Identifier(v) for k, v in asdict(outbox_columns(source)).items()}


def captured_columns(spec: SourceSpec | Source) -> tuple[str, ...]:
    """Columns copied into the outbox: the hashed ones, or key + entry column."""
    if spec.entry_column:
        cols = list(spec.key_columns)
        if spec.entry_column not in cols:
            cols.append(spec.entry_column)
        return tuple(cols)
    return tuple(spec.columns)


def install(conn: psycopg.Connection, source_id: int, log_name: str, spec: SourceSpec,
            *, append_only: bool, backfill: bool, doorbell: bool = True) -> int:
    """Create outbox, capture trigger and optional guard, in the caller's transaction.

    The caller holds the table locked against writers (lock_out_writers); with backfill, its
    existing rows are queued in key order with op 'backfill', so the seam with live capture has
    no gap and no duplicate. Returns the number of rows queued by the backfill.
    """
    cols = captured_columns(spec)
    own = _own_identifiers(spec)
    outbox = outbox_name(source_id)
    col_list = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    new_cols = sql.SQL(", ").join(sql.Identifier("n", c) for c in cols)
    where = sql.SQL("WHERE ({})").format(sql.SQL(spec.row_filter)) if spec.row_filter else sql.SQL("")

    conn.execute(sql.SQL(
        "CREATE TABLE {outbox} AS SELECT 0::bigint AS {stmt_id}, 0::integer AS {ord}, "
        "'insert'::text AS {op}, now() AS {queued_at}, {cols} FROM {table} WITH NO DATA"
    ).format(outbox=outbox, cols=col_list, table=spec.ident(), **own))
    conn.execute(sql.SQL(
        "ALTER TABLE {outbox} ALTER {stmt_id} SET NOT NULL, ALTER {ord} SET NOT NULL, "
        "ALTER {op} SET NOT NULL, ALTER {op} SET DEFAULT 'insert', "
        "ALTER {queued_at} SET NOT NULL, ALTER {queued_at} SET DEFAULT now()"
    ).format(outbox=outbox, **own))

    _create_capture_function(conn, source_id, log_name, spec, doorbell=doorbell)

    capture = _trigger_names(source_id)[0]
    _create_always(conn, spec.ident(), capture, sql.SQL(
        "CREATE TRIGGER {trg} AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION {fn}()"
    ).format(trg=capture, table=spec.ident(), fn=_capture_function(source_id)))
    install_guards(conn, source_id, log_name, spec.ident(), update_delete=append_only, truncate=append_only)

    if not backfill:
        return 0
    key_order = sql.SQL(", ").join(sql.Identifier("n", c) for c in spec.key_columns)
    stmt = conn.execute("SELECT nextval('merkle.stmt_seq')").fetchone()[0]
    cur = conn.execute(sql.SQL(
        "INSERT INTO {outbox} ({stmt_id}, {ord}, {op}, {cols}) "
        "SELECT {stmt}, row_number() OVER (ORDER BY {key_order}), 'backfill', {new_cols} "
        "FROM {table} n {where}"
    ).format(outbox=outbox, cols=col_list, new_cols=new_cols, table=spec.ident(), stmt=sql.Literal(stmt),
             key_order=key_order, where=where, stmt_id=own["stmt_id"], ord=own["ord"], op=own["op"]))
    return cur.rowcount


def missing_privileges(conn: psycopg.Connection, spec: SourceSpec, *, outbox: bool) -> list[str]:
    """What the role lacks to add the table's triggers (and, with `outbox`, its capture objects
    in schema merkle), each with what to run. The triggers are made ENABLE ALWAYS, which
    PostgreSQL allows the table's owner only (as it does adding a table to a publication)."""
    role, owner, owner_super, owns, may_create = conn.execute(
        "SELECT current_user, c.relowner::regrole::text, r.rolsuper, pg_has_role(c.relowner, 'USAGE'), "
        "has_schema_privilege('merkle', 'CREATE') FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
        "WHERE c.oid = %s", (spec.oid,)).fetchone()
    quoted = sql.Identifier(role).as_string(conn)
    missing = []
    if not owns:
        # Membership in the owning role works too, but never suggest joining a superuser's.
        member = "" if owner_super else f" (or GRANT {owner} TO {quoted};)"
        missing.append(f"ownership of {spec.qualified} (role {owner} owns it; only the owner may add triggers "
                       f"to it): as {owner} or a superuser, run ALTER TABLE {spec.ident().as_string(conn)} OWNER TO "
                       f"{quoted};{member}")
    if outbox and not may_create:
        missing.append(f"CREATE on schema merkle (for the source's outbox and capture function): run "
                       f"GRANT CREATE ON SCHEMA merkle TO {quoted}; as its owner")
    return missing


def install_guards(conn: psycopg.Connection, source_id: int, log_name: str, table: sql.Composable,
                   *, update_delete: bool, truncate: bool) -> None:
    """The append-only guard (alone in replication mode, which has no capture trigger): refuse
    UPDATE and DELETE and/or TRUNCATE on the table. drop_triggers removes them."""
    _, guard, guard_truncate = _trigger_names(source_id)
    for trg, events, wanted in ((guard, "UPDATE OR DELETE", update_delete), (guard_truncate, "TRUNCATE", truncate)):
        if wanted:
            _create_always(conn, table, trg, sql.SQL(
                "CREATE TRIGGER {trg} BEFORE {events} ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION merkle.refuse_change({log})"
            ).format(trg=trg, events=sql.SQL(events), table=table, log=sql.Literal(log_name)))


def _create_capture_function(conn: psycopg.Connection, source_id: int, log_name: str,
                             spec: SourceSpec | Source, *, doorbell: bool, replace: bool = False) -> None:
    cols = captured_columns(spec)
    own = _own_identifiers(spec)
    where = sql.SQL("WHERE ({})").format(sql.SQL(spec.row_filter)) if spec.row_filter else sql.SQL("")
    ring = (sql.SQL("  IF FOUND THEN PERFORM pg_notify({channel}, {log}); END IF;\n").format(
        channel=sql.Literal(DOORBELL_CHANNEL), log=sql.Literal(log_name)) if doorbell else sql.SQL(""))
    # The table's column names (and the row filter's) win over the function's own variable,
    # which is read by its block label: a table may have a column called stmt.
    body = sql.SQL(
        "#variable_conflict use_column\n"
        "<<merkle_capture>>\n"
        "DECLARE stmt bigint := nextval('merkle.stmt_seq');\n"
        "BEGIN\n"
        "  INSERT INTO {outbox} ({stmt_id}, {ord}, {cols})\n"
        "  SELECT merkle_capture.stmt, row_number() OVER (), {new_cols} FROM new_rows n {where};\n"
        "{ring}"
        "  RETURN NULL;\n"
        "END"
    ).format(outbox=outbox_name(source_id), cols=sql.SQL(", ").join(sql.Identifier(c) for c in cols),
             stmt_id=own["stmt_id"], ord=own["ord"],
             new_cols=sql.SQL(", ").join(sql.Identifier("n", c) for c in cols), where=where, ring=ring)
    # SECURITY DEFINER: the writer's role needs no privilege in schema merkle (the function's
    # owner, who added the source, owns the outbox); the pinned settings fix its search_path.
    conn.execute(sql.SQL(
        "CREATE {replace} FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {settings} AS {body}"
    ).format(replace=sql.SQL("OR REPLACE" if replace else ""), fn=_capture_function(source_id),
             settings=_pinned_settings_clause(), body=sql.Literal(body.as_string(conn))))
    # A trigger runs its function without checking EXECUTE, but creating one needs it: no
    # other role may put this function on a table of its own (its rows would become leaves
    # of this source, and its casts would run as this function's owner).
    conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {}() FROM PUBLIC").format(_capture_function(source_id)))


def ring(conn: psycopg.Connection, log_name: str) -> None:
    """Ring the log's doorbell from the caller's transaction (delivered at its COMMIT)."""
    conn.execute("SELECT pg_notify(%s, %s)", (DOORBELL_CHANNEL, log_name))


def set_doorbell(conn: psycopg.Connection, source: Source, log_name: str, on: bool) -> None:
    """Ring the doorbell after each captured statement, or not: the capture function is
    replaced in one transaction: every statement runs one version or the other, and each
    captures its rows."""
    _create_capture_function(conn, source.source_id, log_name, source, doorbell=on, replace=True)


def _create_always(conn: psycopg.Connection, table: sql.Composable, trg: sql.Identifier,
                   create: sql.Composed) -> None:
    """Create a trigger and make it ENABLE ALWAYS: it then fires even under
    session_replication_role = replica, so no session setting bypasses it (and the DDL guard of
    sql/007_source_guard.sql refuses disabling it, checking each ALTER TABLE)."""
    conn.execute(create)
    conn.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(table, trg))


def _pinned_settings_clause() -> sql.Composed:
    """SET clauses that make the row filter mean the same in every writer's session: the
    settings it was checked under at registration (search_path, TimeZone, DateStyle, ...)."""
    clauses = []
    for name, value in FILTER_SETTINGS.items():
        if name == "search_path":
            value_sql = sql.SQL(", ").join(sql.Identifier(p.strip()) for p in value.split(","))
        else:
            value_sql = sql.Literal(value)
        clauses.append(sql.SQL("SET {} TO {}").format(sql.Identifier(name.lower()), value_sql))
    return sql.SQL(" ").join(clauses)


def drop_triggers(conn: psycopg.Connection, source_id: int, table: sql.Composable | None) -> None:
    """Stop capture (and lift the guard); queued rows stay in the outbox for the sequencer.
    Runs in a transaction: the DDL guard lets merkle-listener drop its own triggers only in a
    transaction it marked in merkle.own_ddl, which other roles cannot write (sql/014)."""
    with _bounded_lock_wait(conn, table, "to drop merkle-listener's triggers"):
        conn.execute("SELECT merkle.mark_own_ddl('drop_triggers')")
        if table is not None:
            for trg in _trigger_names(source_id):
                conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trg, table))
        # Those of a partitioned replication source's partitions (sql/011), wherever they are now.
        conn.execute("SELECT merkle.drop_partition_guards(%s)", (source_id,))
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(_capture_function(source_id)))
        conn.execute("SELECT merkle.unmark_own_ddl('drop_triggers')")


def lock_out_writers(conn: psycopg.Connection, table: sql.Composable, purpose: str) -> None:
    """LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE in the caller's transaction: transactions that
    wrote the table end first, and new writes wait for the caller's COMMIT. The mode conflicts
    with itself and covers CREATE TRIGGER and ALTER PUBLICATION on the table, so two
    registrations of one table queue instead of deadlocking on a lock upgrade."""
    with _bounded_lock_wait(conn, table, purpose):
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(table))


@contextlib.contextmanager
def _bounded_lock_wait(conn: psycopg.Connection, table: sql.Composable | None, purpose: str) -> Iterator[None]:
    """A savepoint whose lock waits give up after WRITER_LOCK_TIMEOUT: the table's writers
    queue behind a waiting lock, so stalling them is worse than asking to retry. The caller's
    own lock_timeout is back for the rest of its transaction."""
    try:
        with conn.transaction():
            caller_timeout = conn.execute("SELECT current_setting('lock_timeout')").fetchone()[0]
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (WRITER_LOCK_TIMEOUT,))
            yield
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (caller_timeout,))
    except psycopg.errors.LockNotAvailable:
        raise SourceTableError(
            f"could not lock {table.as_string(conn) if table is not None else 'the table'} within "
            f"{WRITER_LOCK_TIMEOUT} {purpose}: a transaction holds it. A prepared "
            "transaction (two-phase commit) holds its locks until COMMIT PREPARED or ROLLBACK PREPARED: see "
            "SELECT gid, prepared, owner, database FROM pg_prepared_xacts; a long-running one shows in "
            "pg_stat_activity. Nothing was changed; retry once it has ended") from None


def current_table(conn: psycopg.Connection, table_oid: int) -> sql.Identifier | None:
    """The source table as it is named now, found by oid (None once dropped): its registered
    name may since be another table's, if it was renamed where the DDL guard is not installed."""
    row = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = %s", (table_oid,)).fetchone()
    return sql.Identifier(*row) if row else None


def drop_outbox(conn: psycopg.Connection, source_id: int) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(outbox_name(source_id)))
