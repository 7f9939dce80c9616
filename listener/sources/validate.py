"""Validate a source registration (`merkle-listener source add ...`) before anything is written.

validate_source resolves the table through PostgreSQL and checks the key, the hashed column
list, the row filter and the entry column against the catalog, returning a SourceSpec that
the trigger/replication DDL consumes. All of it runs in one transaction that is always
rolled back, with bound parameters for every catalog lookup: validation never writes.
Parsing of names lives in names.py, the filter whitelist in filter.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from listener.errors import ConfigurationError, DatabaseError, SourceTableError
from listener.sources.filter import check_filter, moving_datetime_literals
from listener.sources.names import check_log_name, parse_column_list, parse_table_name, quote_ident
from listener.store.connect import PINNED_SETTINGS

__all__ = [
    "FILTER_SETTINGS",
    "SourceSpec",
    "check_filter",
    "check_database_encoding",
    "check_log_name",
    "parse_column_list",
    "parse_table_name",
    "validate_source",
]

BYTEA_OID = 17
# Schemas whose tables are never sources: the log's own, and PostgreSQL's.
_RESERVED_SCHEMAS = frozenset({"merkle", "pg_catalog", "information_schema", "pg_toast"})
_RELKIND_NAMES = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "S": "a sequence",
    "i": "an index",
    "I": "a partitioned index",
    "c": "a composite type",
    "t": "a TOAST table",
}
# The search_path the row filter is type-checked under: built-in operators and types only.
FILTER_SEARCH_PATH = "pg_catalog, pg_temp"
# Everything a filter's meaning can depend on in a session: which operators and types its
# names resolve to, and how date/time literals are read. Capture must evaluate it so too.
FILTER_SETTINGS = {
    "search_path": FILTER_SEARCH_PATH,
    **{k: v for k, v in PINNED_SETTINGS.items() if k != "client_encoding"},
}


@dataclass(frozen=True)
class SourceSpec:
    """A checked source registration.

    `row_filter` was type-checked under FILTER_SETTINGS (search_path pinned to pg_catalog,
    TimeZone UTC, ...); evaluate it under the same settings, for example as SET clauses of
    the trigger function, so that its operators resolve to the same built-in ones and its
    literals mean the same instant whatever the writer's session settings are.
    """

    schema: str
    table: str
    oid: int
    key_columns: tuple[str, ...]  # in the key's (index) order
    columns: tuple[str, ...]  # hashed columns, in table order; include the key columns
    row_filter: str | None  # pglast's deparse of the checked filter
    entry_column: str | None
    # Stored generated columns among those the leaves are computed from: a trigger's
    # transition table holds their values, pgoutput does not send them.
    generated: tuple[str, ...] = ()

    @property
    def qualified(self) -> str:
        """ "schema.table" unquoted, as the canonical entry's "source" field spells it."""
        return f"{self.schema}.{self.table}"

    def ident(self) -> sql.Composed:
        """The table as a quoted SQL identifier, for building statements with psycopg.sql."""
        return sql.Identifier(self.schema, self.table)


@dataclass(frozen=True)
class _Column:
    name: str
    type_oid: int
    type_name: str
    not_null: bool  # by a validated NOT NULL constraint (or primary key)
    type_category: str  # pg_type.typcategory: 'D' for date/time types
    generated: str  # pg_attribute.attgenerated: '' plain, 's' stored, 'v' virtual (PostgreSQL 18)


@dataclass(frozen=True)
class _UniqueKey:
    index: str
    constraint: str | None
    primary: bool
    columns: tuple[str, ...]
    problem: str | None  # why it cannot identify a row, or None if it can

    def describe(self) -> str:
        kind = "primary key" if self.primary else ("unique constraint" if self.constraint else "unique index")
        return f"{kind} {self.constraint or self.index} ({', '.join(self.columns) or 'expressions'})"


def validate_source(
    conn: psycopg.Connection,
    table: str,
    *,
    key: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    where: str | None = None,
    entry_column: str | None = None,
) -> SourceSpec:
    """Check a source registration against the database and return what to register.

    `table` is "name" or "schema.name" as SQL would read it (unqualified names follow the
    connection's search_path); `key`, `columns` are column names as stored (already parsed,
    see parse_column_list); `where` is SQL text checked by check_filter. Raises
    SourceTableError for anything the user must fix, DatabaseError if the database fails.
    Requires `conn` to be idle or in a transaction without error; it is left as found.
    """
    schema_name, rel_name = parse_table_name(table)
    key_names = _names(key, "--key") if key is not None else None
    column_names = _names(columns, "--columns") if columns is not None else None
    if entry_column is not None:
        entry_column = _names([entry_column], "--entry-column")[0]
    row_filter, filter_columns = check_filter(where) if where is not None else (None, set())
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL lock_timeout = '5s'")
            conn.execute("SET LOCAL statement_timeout = '30s'")
            check_database_encoding(conn)
            oid, schema, name = _resolve(conn, table, schema_name, rel_name)
            ident = sql.Identifier(schema, name)
            table_columns = _columns(conn, oid)
            by_name = {c.name: c for c in table_columns}
            key_columns = _choose_key(conn, oid, table, key_names, by_name)
            hashed = _hashed_columns(table, column_names, key_columns, table_columns)
            if entry_column is not None:
                _check_entry_column(table, entry_column, by_name)
            captured = [*key_columns, *([entry_column] if entry_column is not None else hashed)]
            _check_not_virtual(table, captured, by_name)
            _check_no_oid_alias(conn, table, oid, captured)
            if row_filter is not None:
                _check_filter_columns(table, where, filter_columns, by_name)
                _check_not_virtual(table, sorted(filter_columns), by_name, f"row filter {where!r}")
                _check_filter_is_fixed(where, row_filter, filter_columns, by_name)
                _type_check_filter(conn, ident, table, where, row_filter)
    except psycopg.Error as exc:
        # Catalog lookups fail only if the server or connection does; the user's mistakes
        # were mapped to SourceTableError where they were found.
        raise DatabaseError(f"database failed while validating table {table}: {exc}; retry") from exc
    return SourceSpec(
        schema=schema,
        table=name,
        oid=oid,
        key_columns=key_columns,
        columns=hashed,
        row_filter=row_filter,
        entry_column=entry_column,
        generated=tuple(dict.fromkeys(c for c in captured if by_name[c].generated == "s")),
    )


def check_database_encoding(conn: psycopg.Connection) -> None:
    """Refuse a SQL_ASCII database. An entry is UTF-8 (docs/canonical-entry.md); PostgreSQL
    converts every other server encoding to it, but a SQL_ASCII database stores bytes of no
    declared character set, and its first value that is not valid UTF-8 could never be
    hashed: the log would stop there, in either capture mode."""
    database, encoding = conn.execute("SELECT current_database(), pg_catalog.getdatabaseencoding()").fetchone()
    if encoding == "SQL_ASCII":
        raise ConfigurationError(
            f"database {database} has encoding SQL_ASCII: its text is bytes in no declared character set, while a "
            "leaf commits to UTF-8 text, so the first value that is not valid UTF-8 would stop the log for good. "
            "Keep the log and its tables in a database created with ENCODING 'UTF8' (or any encoding but SQL_ASCII: "
            "CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0), and move the tables there"
        )


def _names(values: Sequence[str], option: str) -> list[str]:
    if isinstance(values, str):
        raise SourceTableError(f"{option} must be a list of column names, not the string {values!r}")
    out: list[str] = []
    for v in values:
        if not isinstance(v, str) or not v or "\x00" in v:
            raise SourceTableError(f"{option} has an invalid column name {v!r}; give non-empty names")
        if v in out:
            raise SourceTableError(f"{option} names column {v!r} twice; list it once")
        out.append(v)
    if not out:
        raise SourceTableError(f"{option} is empty; give at least one column name")
    return out


def _resolve(conn: psycopg.Connection, shown: str, schema: str | None, rel: str) -> tuple[int, str, str]:
    """Find the table as PostgreSQL would (search_path for unqualified names); check its kind."""
    quoted = sql.Identifier(*[p for p in (schema, rel) if p is not None]).as_string(conn)
    row = conn.execute("SELECT pg_catalog.to_regclass(%s)::oid", [quoted]).fetchone()
    if row is None or row[0] is None:
        if schema is None:
            path = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()[0]
            where = f"looked in search_path {path}; give schema.name if it lives elsewhere"
        else:
            where = f"looked in schema {schema}"
        raise SourceTableError(
            f"table {shown} does not exist ({where}; unquoted names fold to lower case, "
            'so write "MixedCase" in double quotes)'
        )
    oid = row[0]
    nsp, name, relkind, persistence = conn.execute(
        """SELECT n.nspname, c.relname, c.relkind, c.relpersistence
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = %s""",
        [oid],
    ).fetchone()
    if relkind not in ("r", "p"):
        what = _RELKIND_NAMES.get(relkind, f"a relation of kind {relkind!r}")
        raise SourceTableError(
            f"{nsp}.{name} is {what}, not a table: only ordinary and partitioned tables can be "
            "sources; register the table that holds the rows"
        )
    if persistence == "t":
        raise SourceTableError(
            f"{nsp}.{name} is a temporary table, visible to one session only; use a permanent table"
        )
    if nsp in _RESERVED_SCHEMAS or nsp.startswith("pg_"):
        raise SourceTableError(
            f"{nsp}.{name} is in schema {nsp}, which belongs to "
            f"{'merkle-listener itself' if nsp == 'merkle' else 'PostgreSQL'}; "
            "only application tables can be sources"
        )
    _check_tree(conn, oid, f"{nsp}.{name}")
    return oid, nsp, name


def _check_tree(conn: psycopg.Connection, oid: int, shown: str) -> None:
    """Rows a capture would not see: those of an inheritance child (they read as the table's,
    but neither the capture trigger nor the publication covers the child) and those of an
    unlogged partition (no WAL, so the slot never sends them). The DDL guard refuses making
    either later (sql/014_guard_hardening.sql)."""
    child = conn.execute(
        "SELECT i.inhrelid::regclass::text FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c "
        "ON c.oid = i.inhrelid WHERE i.inhparent = %s AND NOT c.relispartition LIMIT 1", [oid]).fetchone()
    if child is not None:
        raise SourceTableError(
            f"{shown} has an inheritance child, {child[0]}, whose rows read as {shown}'s but which no capture "
            f"sees: move its rows into {shown} (or a table of their own) and ALTER TABLE {child[0]} NO INHERIT "
            f"{shown}, then add the source")
    unlogged = conn.execute(
        "SELECT t.relid::regclass::text FROM pg_catalog.pg_partition_tree(%s) t JOIN pg_catalog.pg_class c "
        "ON c.oid = t.relid WHERE t.level > 0 AND c.relpersistence = 'u' LIMIT 1", [oid]).fetchone()
    if unlogged is not None:
        raise SourceTableError(
            f"partition {unlogged[0]} of {shown} is UNLOGGED: its rows write no WAL, so logical replication "
            f"never sends them; ALTER TABLE {unlogged[0]} SET LOGGED, then add the source")


def _columns(conn: psycopg.Connection, oid: int) -> list[_Column]:
    """User columns in table order. On PostgreSQL 18 attnotnull is also set by a NOT VALID
    constraint, which existing rows may violate: only a validated one counts."""
    rows = conn.execute(
        """SELECT a.attname, a.atttypid::int8, pg_catalog.format_type(a.atttypid, a.atttypmod),
                  a.attnotnull AND NOT EXISTS (
                      SELECT FROM pg_catalog.pg_constraint k
                       WHERE k.conrelid = a.attrelid AND k.contype = 'n'
                         AND NOT k.convalidated AND a.attnum = ANY (k.conkey)),
                  (SELECT t.typcategory FROM pg_catalog.pg_type t WHERE t.oid = a.atttypid),
                  a.attgenerated::text
             FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum""",
        [oid],
    ).fetchall()
    return [_Column(*r) for r in rows]


def _unique_keys(conn: psycopg.Connection, oid: int, by_name: dict[str, _Column]) -> list[_UniqueKey]:
    """Every unique index of the table, primary first, each with why it cannot serve as the key."""
    rows = conn.execute(
        """SELECT ic.relname, k.conname, i.indisprimary,
                  i.indisvalid AND i.indisready AND i.indislive,
                  i.indpred IS NOT NULL, i.indexprs IS NOT NULL, i.indnullsnotdistinct,
                  ARRAY(SELECT a.attname
                          FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) WITH ORDINALITY u(attnum, ord)
                          JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum
                         ORDER BY u.ord)
             FROM pg_catalog.pg_index i
             JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
             LEFT JOIN pg_catalog.pg_constraint k ON k.conindid = i.indexrelid AND k.contype IN ('p', 'u')
            WHERE i.indrelid = %s AND i.indisunique
            ORDER BY i.indisprimary DESC, ic.relname""",
        [oid],
    ).fetchall()
    keys = []
    for index, constraint, primary, valid, partial, exprs, nulls_not_distinct, cols in rows:
        problem = None
        if exprs:
            problem = "it is on expressions, not plain columns"
        elif partial:
            problem = "it is partial (has a WHERE clause), so it does not cover every row"
        elif not valid:
            problem = "it is not valid (a failed or unfinished CREATE INDEX CONCURRENTLY); REINDEX it"
        elif not nulls_not_distinct:
            nullable = [c for c in cols if not by_name[c].not_null]
            if nullable:
                problem = (
                    f"column {', '.join(nullable)} may be NULL, and NULLs are not unique; "
                    "add NOT NULL (ALTER TABLE ... ALTER COLUMN ... SET NOT NULL)"
                )
        keys.append(_UniqueKey(index, constraint, primary, tuple(cols), problem))
    return keys


def _choose_key(
    conn: psycopg.Connection,
    oid: int,
    shown: str,
    key: list[str] | None,
    by_name: dict[str, _Column],
) -> tuple[str, ...]:
    keys = _unique_keys(conn, oid, by_name)
    usable = [k for k in keys if k.problem is None]
    candidates = "; ".join(k.describe() for k in usable) or "none"
    if key is None:
        primary = next((k for k in keys if k.primary), None)
        if primary is None:
            raise SourceTableError(
                f"table {shown} has no primary key: add one (ALTER TABLE ... ADD PRIMARY KEY (...)) "
                f"or pass --key with the columns of a unique key (candidates: {candidates})"
            )
        if primary.problem is not None:
            raise SourceTableError(f"the {primary.describe()} of {shown} cannot be used: {primary.problem}")
        return primary.columns
    unknown = [c for c in key if c not in by_name]
    if unknown:
        raise SourceTableError(
            f"--key names column {', '.join(unknown)}, which table {shown} does not have "
            f"(its columns: {', '.join(by_name)}){_case_hint(unknown, by_name)}"
        )
    matching = [k for k in keys if set(k.columns) == set(key) and len(k.columns) == len(key)]
    for k in matching:
        if k.problem is None:
            return k.columns
    if matching:
        reasons = "; ".join(f"{k.describe()}: {k.problem}" for k in matching)
        raise SourceTableError(
            f"--key {', '.join(key)} matches a unique key of {shown} that cannot identify a row "
            f"({reasons}); usable unique keys: {candidates}"
        )
    raise SourceTableError(
        f"--key {', '.join(key)} is not the column set of a primary key or unique constraint of "
        f"{shown}, so it may not identify one row; usable unique keys: {candidates}"
        + ("" if usable else "; add a primary key or a unique constraint on NOT NULL columns")
    )


def _hashed_columns(
    shown: str, given: list[str] | None, key: tuple[str, ...], table_columns: list[_Column]
) -> tuple[str, ...]:
    if given is None:
        # A generated column is left out: its value follows from the others, and pgoutput
        # does not send it, so one default is good for both capture modes.
        return tuple(c.name for c in table_columns if not c.generated or c.name in key)
    known = {c.name for c in table_columns}
    unknown = [c for c in given if c not in known]
    if unknown:
        raise SourceTableError(
            f"--columns names column {', '.join(unknown)}, which table {shown} does not have "
            f"(its columns: {', '.join(c.name for c in table_columns)}){_case_hint(unknown, known)}"
        )
    missing = [c for c in key if c not in given]
    if missing:
        raise SourceTableError(
            f"--columns must include every key column; add {', '.join(missing)} "
            "(a logged row must carry the key that identifies it)"
        )
    chosen = set(given)
    return tuple(c.name for c in table_columns if c.name in chosen)


def _check_not_virtual(shown: str, names: Sequence[str], by_name: dict[str, _Column],
                       user: str = "the source") -> None:
    virtual = [c for c in names if by_name[c].generated == "v"]
    if virtual:
        raise SourceTableError(
            f"{user} uses column {', '.join(virtual)} of {shown}, a virtual generated column: its value is "
            "computed when read, and neither a trigger's transition table nor pgoutput carries it; leave it "
            "out (of --columns, --key, --entry-column or the row filter), or make it STORED"
        )


def _check_no_oid_alias(conn: psycopg.Connection, shown: str, oid: int, names: Sequence[str]) -> None:
    """An OID-alias type (regclass, regtype, regproc, ...) stores an OID and prints the name of
    what it names: whoever owns that object renames it, or its schema, and the text of every
    committed value changes at once, with no rewrite and no leaf (found by review). aclitem
    prints role names the same way (and the walsender decodes them under the catalog of the
    change's time, the drain under today's). Refused as a hashed column's type, or as one its
    type is made of (array, domain, composite, range)."""
    found = conn.execute(
        """WITH RECURSIVE t(col, typid) AS (
               SELECT a.attname::text, a.atttypid FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = %s AND a.attname = ANY (%s::text[]) AND a.attnum > 0 AND NOT a.attisdropped
               UNION
               SELECT t.col, n.next
                 FROM t JOIN pg_catalog.pg_type y ON y.oid = t.typid
                 CROSS JOIN LATERAL (SELECT y.typelem WHERE y.typelem <> 0
                                     UNION ALL SELECT y.typbasetype WHERE y.typbasetype <> 0
                                     UNION ALL SELECT x.atttypid FROM pg_catalog.pg_attribute x
                                                WHERE x.attrelid = y.typrelid AND x.attnum > 0 AND NOT x.attisdropped
                                     UNION ALL SELECT g.rngsubtype FROM pg_catalog.pg_range g WHERE g.rngtypid = y.oid
                                     UNION ALL SELECT g.rngtypid FROM pg_catalog.pg_range g
                                                WHERE g.rngmultitypid = y.oid) n(next))
           SELECT t.col, pg_catalog.format_type(t.typid, NULL) FROM t
             JOIN pg_catalog.pg_type y ON y.oid = t.typid
            WHERE y.typnamespace = 'pg_catalog'::regnamespace
              AND y.typname::text IN ('regclass', 'regcollation', 'regconfig', 'regdictionary', 'regnamespace',
                                      'regoper', 'regoperator', 'regproc', 'regprocedure', 'regrole', 'regtype',
                                      'aclitem')
            ORDER BY 1 LIMIT 1""", [oid, list(names)]).fetchone()
    if found is not None:
        raise SourceTableError(
            f"column {found[0]} of {shown} is (made of) type {found[1]}, which stores OIDs and prints the names "
            "of what they name: renaming that would change every logged value without a leaf; "
            "store the name as text (or the OID as oid), or leave the column out of the source")


def _check_entry_column(shown: str, name: str, by_name: dict[str, _Column]) -> None:
    col = by_name.get(name)
    if col is None:
        raise SourceTableError(
            f"--entry-column {name} does not exist in table {shown} (its columns: {', '.join(by_name)})"
            + _case_hint([name], by_name)
        )
    if col.type_oid != BYTEA_OID:
        raise SourceTableError(
            f"--entry-column {name} has type {col.type_name}; the entry column must be bytea, "
            "holding the exact bytes to log"
        )


def _case_hint(unknown: list[str], known) -> str:
    """Unquoted names fold to lower case: when a mixed-case column was meant, say how to write it."""
    folded = {k.lower(): k for k in known}
    meant = [folded[u] for u in unknown if u == u.lower() and u in folded]
    if not meant:
        return ""
    quoted = ",".join(quote_ident(m) for m in meant)
    return f"; unquoted names are read in lower case: write {quoted} (in single quotes for the shell: '{quoted}')"


def _check_filter_columns(shown: str, where: str, used: set[str], by_name: dict[str, _Column]) -> None:
    unknown = sorted(used - by_name.keys())
    if unknown:
        raise SourceTableError(
            f"row filter {where!r} uses column {', '.join(unknown)}, which table {shown} does not "
            f"have (its columns: {', '.join(by_name)}); quote mixed-case names"
        )


def _check_filter_is_fixed(where: str, row_filter: str, used: set[str], by_name: dict[str, _Column]) -> None:
    """Refuse 'now', 'today', ... when the filter reads a date/time column: such a literal
    would be read as the time of evaluation, so which rows are logged would drift."""
    moving = moving_datetime_literals(row_filter)
    datetime_columns = sorted(c for c in used if by_name[c].type_category == "D")
    if moving and datetime_columns:
        raise SourceTableError(
            f"row filter {where!r} compares date/time column {', '.join(datetime_columns)} with "
            f"{', '.join(repr(m) for m in sorted(moving))}, which means the time the filter runs, "
            "not a fixed value; give a fixed date or timestamp"
        )


def _type_check_filter(
    conn: psycopg.Connection, ident: sql.Composable, shown: str, where: str, row_filter: str
) -> None:
    """Let PostgreSQL type-check the vetted filter against the table; LIMIT 0 reads no row.

    Runs under FILTER_SETTINGS so that only built-in operators and types resolve. Must be
    called inside the rolled-back validation transaction: the settings are transaction-local.
    """
    for name, value in FILTER_SETTINGS.items():
        conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", [name, value])
    query = sql.SQL("SELECT 1 FROM {} WHERE ({}) LIMIT 0").format(ident, sql.SQL(row_filter))
    try:
        with conn.transaction():
            conn.execute(query)
    except pgerrors.DatatypeMismatch as exc:
        raise SourceTableError(
            f"row filter {where!r} is not a true/false condition ({exc.diag.message_primary}); "
            "compare it with something, for example (a + 1) > 10"
        ) from None
    except pgerrors.InsufficientPrivilege as exc:
        raise SourceTableError(
            f"cannot check the row filter against {shown}: {exc.diag.message_primary}; "
            "grant this role SELECT on the table"
        ) from None
    except (pgerrors.LockNotAvailable, pgerrors.QueryCanceled) as exc:
        raise DatabaseError(
            f"table {shown} is locked by another session ({exc.diag.message_primary}); retry later"
        ) from None
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        hint = f" ({exc.diag.message_hint})" if exc.diag.message_hint else ""
        raise SourceTableError(
            f"row filter {where!r} does not type-check against {shown}: "
            f"{exc.diag.message_primary}{hint}; add casts to built-in types or fix the expression"
        ) from None
