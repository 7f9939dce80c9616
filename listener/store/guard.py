"""The DDL guard: installed by a superuser in schema merkle_guard, out of the reach of schema
merkle's owner, and a report of whether it is in place (docs/replication.md, "The DDL guard
on a role's schema").

Event triggers fire on every role's DDL, a superuser's too, in that role's session. The guard
(sql/guard/merkle_guard.sql) therefore runs no code and reads no object of schema merkle's
owner: its functions belong to the superuser who installed them, and it reads a copy of the
sources that the owner's triggers keep (sql/020) through functions that accept only the
owner's tables. `install` itself reads the owner's tables once, to make that copy, and only
after checking that they are plain tables with the column types it expects and no index or
statistics expression, which planning the query would fold, running any function they call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import pglast
import psycopg
from psycopg import sql

from listener.errors import ConfigurationError

SCHEMA = "merkle_guard"


@dataclass(frozen=True)
class EventTrigger:
    name: str
    event: str
    tags: tuple[str, ...] | None  # None: every command of the event
    function: str  # merkle_guard.<function>(), RETURNS event_trigger


EVENT_TRIGGERS = (
    # ALTER INDEX, VIEW, MATERIALIZED VIEW and FOREIGN TABLE rename tables and their columns too;
    # ALTER TYPE the columns of typed tables; ALTER SCHEMA its tables (check_source_ddl).
    EventTrigger("merkle_source_ddl", "ddl_command_end",
                 ("ALTER TABLE", "ALTER TRIGGER", "ALTER INDEX", "ALTER VIEW", "ALTER MATERIALIZED VIEW",
                  "ALTER FOREIGN TABLE", "ALTER TYPE", "ALTER SCHEMA"), "check_source_ddl"),
    EventTrigger("merkle_source_drop", "sql_drop", ("DROP TRIGGER",), "check_source_drop"),
    EventTrigger("merkle_source_partitions", "ddl_command_end",
                 ("CREATE TABLE", "ALTER TABLE", "ALTER TRIGGER", "CREATE SCHEMA"), "check_source_partitions"),
    EventTrigger("merkle_partition_guard_drop", "sql_drop",
                 ("DROP TRIGGER", "DROP TABLE", "DROP SCHEMA", "DROP OWNED"), "check_partition_guard_drop"),
    EventTrigger("merkle_detach_concurrently", "ddl_command_start", ("ALTER TABLE",), "check_detach_concurrently"),
    EventTrigger("merkle_source_column_drop", "sql_drop", None, "check_source_column_drop"),
    EventTrigger("merkle_source_rewrite", "table_rewrite", ("ALTER TABLE", "ALTER TYPE"), "check_source_rewrite"),
    EventTrigger("merkle_source_rewritten", "ddl_command_end", ("ALTER TABLE", "ALTER TYPE"), "check_source_rewritten"),
    EventTrigger("merkle_source_trigger_create", "ddl_command_end", ("CREATE TRIGGER",), "check_source_trigger_create"),
    EventTrigger("merkle_source_subscription", "ddl_command_end", ("CREATE SUBSCRIPTION", "ALTER SUBSCRIPTION"),
                 "check_source_subscription"),
    # A log's publication as merkle-listener recorded it: after what changes publications or
    # renames a row filter's column, and after every drop (cascades from DROP FUNCTION, DROP
    # COLUMN, ... take tables out of publications).
    EventTrigger("merkle_log_publication", "ddl_command_end",
                 ("CREATE PUBLICATION", "ALTER PUBLICATION", "ALTER TABLE"), "check_log_publications"),
    EventTrigger("merkle_log_publication_drop", "sql_drop", None, "check_log_publications"),
    # The labels of hashed enums, and the attributes of hashed composites (which ALTER TYPE,
    # ALTER [FOREIGN] TABLE and CREATE OR REPLACE VIEW change): check_hashed_type_text.
    EventTrigger("merkle_hashed_type_text_start", "ddl_command_start",
                 ("ALTER TYPE", "ALTER TABLE", "ALTER FOREIGN TABLE", "CREATE VIEW"), "remember_hashed_type_text"),
    EventTrigger("merkle_hashed_type_text", "ddl_command_end",
                 ("ALTER TYPE", "ALTER TABLE", "ALTER FOREIGN TABLE", "CREATE VIEW"), "check_hashed_type_text"),
)

# The functions through which the owner of schema merkle keeps the guard's copy (sql/020).
_OWNER_CALLS = ("put_source(integer, integer, text, oid, text, text, text, text[], text[], text[], text, boolean, "
                "text, boolean)", "forget_source(integer)", "set_retired(integer, boolean)",
                "put_source_column(integer, text, oid, integer)", "forget_source_column(integer, text)")

# What `install` reads of the owner's tables, with the type each column must have.
_OWNER_COLUMNS = {
    "sources": {"source_id": "integer", "log_id": "integer", "table_oid": "oid", "table_schema": "text",
                "table_name": "text", "mode": "text", "events": "text[]", "columns": "text[]",
                "key_columns": "text[]", "entry_column": "text", "append_only": "boolean", "row_filter": "text"},
    "logs": {"log_id": "integer", "name": "text"},
    "source_columns": {"source_id": "integer", "name": "text", "type_oid": "oid", "typmod": "integer"},
    "replication_retired": {"source_id": "integer"},
}

_COPY = """
TRUNCATE merkle_guard.sources, merkle_guard.source_columns;
INSERT INTO merkle_guard.sources
SELECT s.source_id, s.log_id, l.name, s.table_oid, s.table_schema, s.table_name, s.mode, s.events, s.columns,
       s.key_columns, s.entry_column, s.append_only, s.row_filter,
       EXISTS (SELECT FROM ONLY merkle.replication_retired r WHERE r.source_id = s.source_id)
  FROM ONLY merkle.sources s JOIN ONLY merkle.logs l ON l.log_id = s.log_id
  -- only the tables pinned and checked before, as put_source would take them (found by review:
  -- a table_oid that named no table yet was copied, and claimed the next table of any role)
  JOIN pg_class c ON c.oid = s.table_oid AND c.relkind IN ('r', 'p')
  JOIN pg_namespace n ON n.nspname = 'merkle' AND pg_has_role(n.nspowner, c.relowner, 'USAGE');
INSERT INTO merkle_guard.source_columns  -- the stored values' type is the column's own (sql/guard)
SELECT c.source_id, c.name, c.type_oid, c.typmod, a.atttypid, a.atttypmod
  FROM ONLY merkle.source_columns c JOIN merkle_guard.sources s ON s.source_id = c.source_id
  JOIN pg_attribute a ON a.attrelid = s.table_oid AND a.attname = c.name AND a.attnum > 0 AND NOT a.attisdropped
"""


def guard_sql() -> str:
    from listener.store.migrate import sql_dir

    return (sql_dir() / "guard" / "merkle_guard.sql").read_text()


@cache
def bodies() -> dict[str, str]:
    """The body of each event-trigger function as this version ships it (pg_proc.prosrc)."""
    found = {}
    for statement in pglast.split(guard_sql()):
        m = re.match(r"CREATE OR REPLACE FUNCTION merkle_guard\.(\w+)\(\) RETURNS event_trigger", statement)
        if m:
            stmt = pglast.parse_sql(statement)[0].stmt
            found[m.group(1)] = next(o.arg[0].sval for o in stmt.options if o.defname == "as")
    return found


@dataclass(frozen=True)
class TriggerState:
    trigger: EventTrigger
    present: bool  # with the event, tags and this version's function
    enabled: bool
    function: str | None  # what it calls
    function_owner: str | None
    owner_may_replace_it: bool  # no superuser: it could run its code in a superuser's session
    as_shipped: bool  # this version's body, SECURITY DEFINER, search_path pinned


@dataclass(frozen=True)
class GuardState:
    schema_owner: str
    triggers: tuple[TriggerState, ...]

    @property
    def complete(self) -> bool:
        return all(t.present and t.enabled and t.as_shipped and not t.owner_may_replace_it for t in self.triggers)

    @property
    def replaceable_by(self) -> list[str]:
        """Roles that own a function an event trigger calls and are no superuser."""
        return sorted({t.function_owner for t in self.triggers if t.function and t.owner_may_replace_it})


def state(conn: psycopg.Connection) -> GuardState | None:
    """The guard as the catalogs describe it, or None without schema merkle. Reads catalogs only."""
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        row = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'merkle'").fetchone()
        if row is None:
            return None
        states = []
        for t in EVENT_TRIGGERS:
            evt = conn.execute(
                "SELECT e.evtevent::text, e.evttags::text[], e.evtenabled = 'A', p.oid::regprocedure::text, "
                "       r.rolname::text, NOT r.rolsuper, p.prosrc, "
                "       p.prosecdef AND p.proconfig = '{\"search_path=pg_catalog, pg_temp\"}'::text[] "
                "  FROM pg_event_trigger e JOIN pg_proc p ON p.oid = e.evtfoid JOIN pg_roles r ON r.oid = p.proowner "
                " WHERE e.evtname = %s", (t.name,)).fetchone()
            if evt is None:
                states.append(TriggerState(t, False, False, None, None, False, False))
                continue
            event, tags, enabled, function, owner, plain_role, src, pinned = evt
            present = (function == f"{SCHEMA}.{t.function}()" and event == t.event
                       and (tuple(tags) if tags else None) == t.tags)
            states.append(TriggerState(t, present, enabled, function, owner, plain_role,
                                       present and pinned and src == bodies()[t.function]))
    return GuardState(row[0], tuple(states))


def install(conn: psycopg.Connection) -> list[str]:
    """Install (or repair) the guard, as a superuser, in the caller's transaction; returns what
    was done. Runs no code of schema merkle's owner (module docstring)."""
    conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
    me, superuser = conn.execute("SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not superuser:
        raise ConfigurationError(f"role {me!r} is no superuser, and only a superuser may create event triggers: "
                                 "run `guard install` as one. Nothing was changed")
    owner = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'merkle'").fetchone()
    if owner is None:
        raise ConfigurationError("there is no schema merkle in this database: run `merkle-listener init` first. "
                                 "Nothing was changed")
    owner = owner[0]
    # This guard's marks need sql/021 (purpose 'publication'), as its copy needs sql/020.
    if conn.execute("SELECT to_regprocedure('merkle.guard_takes_mark(text)') IS NULL").fetchone()[0]:
        raise ConfigurationError(f"schema merkle predates this version of merkle-listener: run `merkle-listener init` "
                                 f"as its owner, role {owner}, first. Nothing was changed")
    # First, before any statement that could fire them: event triggers of an earlier install
    # may call functions of the owner's (those of schema merkle, before sql/020), and one an
    # earlier version had and this one has not would stay behind.
    stale = conn.execute(
        "SELECT e.evtname::text FROM pg_event_trigger e JOIN pg_proc p ON p.oid = e.evtfoid "
        "WHERE p.pronamespace IN (SELECT oid FROM pg_namespace WHERE nspname IN ('merkle', %s))", (SCHEMA,)).fetchall()
    for name in sorted({t.name for t in EVENT_TRIGGERS} | {n for (n,) in stale}):
        conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
    done: list[str] = []
    schema_owner = conn.execute("SELECT r.rolsuper, r.rolname::text FROM pg_namespace n JOIN pg_roles r "
                                "ON r.oid = n.nspowner WHERE n.nspname = %s", (SCHEMA,)).fetchone()
    if schema_owner is None:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        done.append(f"created schema {SCHEMA}, owned by {me}")
    elif not schema_owner[0]:
        raise ConfigurationError(f"schema {SCHEMA} belongs to role {schema_owner[1]}, which is no superuser and could "
                                 f"change the guard: drop it (DROP SCHEMA {SCHEMA} CASCADE) and run `guard install` "
                                 "again. Nothing was changed")
    conn.execute(guard_sql())
    role = sql.Identifier(owner)
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(sql.Identifier(SCHEMA)))
    conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
        sql.SQL(", ").join(sql.SQL(f"{SCHEMA}.{f}") for f in _OWNER_CALLS), role))
    _copy_sources(conn, owner)
    # Those not recorded yet, as they are (they are checked from here on); one recorded before
    # keeps its record, so that a change made while the guard was off is not taken for its own.
    conn.execute("SELECT merkle_guard.record_new_log_publications()")
    for (log,) in conn.execute("SELECT merkle_guard.changed_log_publications()").fetchall():
        done.append(f"warning: publication merkle_{log} is not as merkle-listener made it (changed while the guard "
                    "was off?): DDL that could change publications is refused until `merkle-listener status` has "
                    "been followed to recover")
    for t in EVENT_TRIGGERS:
        when = sql.SQL(" WHEN TAG IN ({})").format(sql.SQL(", ").join(map(sql.Literal, t.tags))) if t.tags else sql.SQL("")
        conn.execute(sql.SQL("CREATE EVENT TRIGGER {} ON {}{} EXECUTE FUNCTION {}.{}()").format(
            sql.Identifier(t.name), sql.Identifier(t.event), when, sql.Identifier(SCHEMA), sql.Identifier(t.function)))
        # ALWAYS: enabled as created, they would not fire under session_replication_role = replica,
        # which a superuser (or a role granted SET on it) may set (found by review).
        conn.execute(sql.SQL("ALTER EVENT TRIGGER {} ENABLE ALWAYS").format(sql.Identifier(t.name)))
    done.append(f"{len(EVENT_TRIGGERS)} event triggers call the functions of schema {SCHEMA}, which are {me}'s"
                + ("" if _is_superuser(conn, owner) else f": role {owner}, which owns schema merkle, cannot change them"))
    return done


def _is_superuser(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


def _copy_sources(conn: psycopg.Connection, owner: str) -> None:
    """The guard's copy of the sources, read from the owner's tables once they are pinned and
    checked to be plain tables with exactly the column types expected and no index or
    statistics expression (planning a query folds the function calls in those:
    merkle_guard.refuse_planner_code)."""
    # Each by OID through merkle_guard.pin() (locked, the one locked, its schema's name held),
    # then each name must still lead to it, in schema merkle (found by review: names locked and
    # checked could lead elsewhere by the time the copy read them).
    pinned = {}
    for table in _OWNER_COLUMNS:
        oid = conn.execute("SELECT to_regclass(%s)::oid", (f"merkle.{table}",)).fetchone()[0]
        if oid is None:
            raise ConfigurationError(f"there is no table merkle.{table}: run `merkle-listener init` as role {owner}. "
                                     "Nothing was changed")
        conn.execute("SELECT merkle_guard.pin(%s::oid::regclass)", (oid,))
        pinned[table] = oid
    moved = conn.execute(
        "SELECT t FROM unnest(%s::text[], %s::oid[]) AS p(t, oid) JOIN pg_class c ON c.oid = p.oid "
        "WHERE to_regclass('merkle.' || quote_ident(t)) IS DISTINCT FROM p.oid::regclass "
        "   OR c.relnamespace IS DISTINCT FROM to_regnamespace('merkle')::oid",
        (list(pinned), list(pinned.values()))).fetchall()
    if moved:
        raise ConfigurationError(f"merkle.{moved[0][0]} was replaced while the guard waited for it: run "
                                 "`guard install` again. Nothing was changed")
    conn.execute("SET LOCAL constraint_exclusion = partition")
    if conn.execute("SELECT current_setting('transaction_isolation')").fetchone()[0] != "read committed":
        raise ConfigurationError("`guard install` must run in a READ COMMITTED transaction. Nothing was changed")
    for table, columns in _OWNER_COLUMNS.items():
        rows = conn.execute(
            "SELECT c.relkind::text, a.attname::text, a.atttypid::regtype::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'merkle' "
            "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "WHERE c.relname = %s", (table,)).fetchall()
        kinds = {kind for kind, _, _ in rows}
        types = {name: type_ for _, name, type_ in rows}
        expressions = conn.execute(
            "SELECT EXISTS (SELECT FROM pg_index WHERE indrelid = %(t)s::regclass "
            "               AND (indexprs IS NOT NULL OR indpred IS NOT NULL)) "
            "    OR EXISTS (SELECT FROM pg_statistic_ext WHERE stxrelid = %(t)s::regclass AND stxexprs IS NOT NULL)",
            {"t": f"merkle.{table}"}).fetchone()[0] if kinds == {"r"} else False
        if kinds != {"r"} or expressions or any(types.get(name) != type_ for name, type_ in columns.items()):
            raise ConfigurationError(
                f"merkle.{table} is not the table this version of merkle-listener made (a view, another type of a "
                "column, an index or statistics on an expression?): the guard reads it as a superuser only as made. "
                f"Run `merkle-listener init` as role {owner}, or repair the table. Nothing was changed")
    # The source tables too, before their columns' types are read (in the copy's own statement,
    # a fresh snapshot): a retype under way holds its table until it commits.
    for (oid,) in conn.execute("SELECT DISTINCT s.table_oid FROM ONLY merkle.sources s "
                               "JOIN pg_class c ON c.oid = s.table_oid AND c.relkind IN ('r', 'p')").fetchall():
        conn.execute("SELECT merkle_guard.pin(%s::oid::regclass)", (oid,))
    conn.execute(_COPY)
