"""The canonical entry encoding v1 as SQL expressions, for capture inside INSERT ... SELECT.

`listener.canonical` builds an entry in Python; this module builds the same bytes in SQL, as a
flat chain of `||` over literals pre-rendered in Python (keys sorted and JSON-escaped here,
at build time) and one small expression per column value. Nothing from the user is pasted
into SQL: names become `sql.Identifier`, rendered JSON becomes `sql.Literal`. Functions are
called as pg_catalog.<name>: the polymorphic and variadic ones (to_json, concat, num_nulls)
would otherwise lose to a better-matching function that a table's owner put on the search_path,
which would then run as the listener's role.

Precondition of every expression built here: it runs in a session with the pinned settings
of `listener.store.connect.PINNED_SETTINGS` (TimeZone=UTC, DateStyle='ISO, YMD',
IntervalStyle=postgres, extra_float_digits=1, bytea_output=hex, lc_monetary=C). The listener's connections
pin them; a trigger function pins them with `CREATE FUNCTION ... SET TimeZone = 'UTC' ...`.
Under other settings the expressions still run, but timestamps, floats, intervals and bytea
come out differently and the leaf hashes will not match.

A value's text must be its type's *output function* result, which is what pgoutput sends.
`x::text` is not always that: PostgreSQL has explicit casts to text for boolean ('true', not
't'), inet/cidr (always with a /mask), character(n) (trailing blanks stripped) and "char".
So the generic value expression uses concat(x), which calls the output function, and the
faster `x::text` forms are used only for built-in types known to be safe (pass `types`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson
from psycopg import sql

from listener.canonical import ENTRY_VERSION, LEAF_PREFIX, OPS, utf8_order
from listener.errors import ProcessingError

# Built-in type OIDs (fixed in every PostgreSQL) whose output never contains '"', '\' or a
# control character, and whose cast to text is the output function: quoted without to_json.
_NO_ESCAPE_OIDS = frozenset({
    20, 21, 23,          # int8, int2, int4
    700, 701, 1700,      # float4, float8, numeric
    1082, 1083, 1266,    # date, time, timetz
    1114, 1184, 1186,    # timestamp, timestamptz, interval
    2950,                # uuid
})
# Built-in types whose cast to text is the output function but whose output may need escaping.
# Not xml: its cast to text is binary and keeps an `<?xml version="1.0"?>` declaration that the
# output function drops.
_IO_CAST_OIDS = frozenset({
    25, 1043, 17, 114, 3802,             # text, varchar, bytea, json, jsonb
    1005, 1007, 1016, 1021, 1022, 1231,  # int2[] int4[] int8[] float4[] float8[] numeric[]
    1009, 1015, 1000, 2951,              # text[] varchar[] bool[] uuid[]
    1115, 1185, 1182, 1187,              # timestamp[] timestamptz[] date[] interval[]
})
_BOOL_OID = 16


def value_sql(value: sql.Composable, type_oid: int | None = None) -> sql.Composable:
    """JSON text of one column value: its output-function text as a JSON string, or null.

    `type_oid` (pg_attribute.atttypid) picks a cheaper form for known built-in types; any
    other type, including domains, gets the generic form, which is right for every type.
    """
    if type_oid in _NO_ESCAPE_OIDS:
        return sql.SQL("""coalesce('"' || {v}::text || '"', 'null')""").format(v=value)
    if type_oid in _IO_CAST_OIDS:
        return sql.SQL("coalesce(pg_catalog.to_json({v}::text)::text, 'null')").format(v=value)
    if type_oid == _BOOL_OID:
        return sql.SQL("""CASE WHEN {v} THEN '"t"' WHEN NOT {v} THEN '"f"' ELSE 'null' END""").format(v=value)
    # num_nulls() tests the datum itself: `x IS NULL` is also true for a composite value
    # whose fields are all NULL, which is not NULL and whose output is "(,)".
    return sql.SQL("CASE WHEN pg_catalog.num_nulls({v}) = 1 THEN 'null' "
                   "ELSE pg_catalog.to_json(pg_catalog.concat({v}))::text END").format(v=value)


def entry_sql(
    record: str | sql.Composable,
    source: str,
    columns: Sequence[str],
    op: str | sql.Composable,
    types: Mapping[str, int] | None = None,
) -> sql.Composed:
    """A text expression producing `canonical.entry_v1(op, source, {c: record.c ...})`.

    `record` names a row: a table alias such as "r" (column c is read as "r"."c"), or a
    composite-valued SQL expression (read as (record)."c"). `op` is one of canonical.OPS, or an SQL expression yielding one.
    `types` optionally maps column names to type OIDs for cheaper value expressions.
    Requires the pinned settings (see the module docstring). The result is text; hash it
    with `leaf_hash_sql`.
    """
    if isinstance(op, str):
        if op not in OPS:
            raise ProcessingError(f"canonical entry SQL: op {op!r} is not one of {sorted(OPS)}; fix the caller")
        head: list[sql.Composable] = []
        text = '{"op":' + _json(op) + ',"row":{'
    else:
        head = [sql.SQL("{}::text").format(sql.Literal('{"op":')), sql.SQL("pg_catalog.to_json(({})::text)::text").format(op)]
        text = ',"row":{'
    if not isinstance(source, str) or not source:
        raise ProcessingError(f"canonical entry SQL: source must be a non-empty '<schema>.<table>' string, got {source!r}")
    tail = '},"source":' + _json(source) + ',"v":' + str(ENTRY_VERSION) + "}"
    return _chain(head, text, _row_parts(record, columns, types), tail)


def key_sql(
    record: str | sql.Composable, key_columns: Sequence[str], types: Mapping[str, int] | None = None
) -> sql.Composed:
    """A text expression producing `canonical.key_json({k: record.k ...})` (the source key).

    Requires the pinned settings (see the module docstring).
    """
    return _chain([], "{", _row_parts(record, key_columns, types), "}")


def leaf_hash_sql(entry_text: sql.Composable) -> sql.Composed:
    """bytea expression: RFC 9162 §2.1.1 leaf hash SHA-256(0x00 || UTF-8 bytes of the entry)."""
    return sql.SQL("pg_catalog.sha256({} || pg_catalog.convert_to({}, 'UTF8'))").format(sql.Literal(LEAF_PREFIX), entry_text)


def leaf_hash_of_bytes_sql(entry_bytes: sql.Composable) -> sql.Composed:
    """bytea expression: the leaf hash of an entry that is already bytes (an entry column)."""
    return sql.SQL("pg_catalog.sha256({} || {})").format(sql.Literal(LEAF_PREFIX), entry_bytes)


def _row_parts(
    record: str | sql.Composable, columns: Sequence[str], types: Mapping[str, int] | None
) -> list[tuple[str, sql.Composable]]:
    """(JSON key text, value expression) per column, sorted by the column name's UTF-8 bytes."""
    if isinstance(columns, str):
        raise ProcessingError("canonical entry SQL: columns must be a sequence of names, not one string")
    names = list(columns)
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ProcessingError(f"canonical entry SQL: columns must be distinct non-empty names, got {names!r}")
    types = types or {}
    return [
        (_json(n) + ":", value_sql(_field(record, n), types.get(n)))
        for n in sorted(names, key=utf8_order)
    ]


def _field(record: str | sql.Composable, name: str) -> sql.Composable:
    """Column `name` of `record`. An alias given as a string is read as "alias"."name", which
    PostgreSQL resolves to the table alias first: ("alias")."name" would read a column that
    happens to be called like the alias (a table with a column "n" or "o") instead."""
    if isinstance(record, str):
        return sql.Identifier(record, name)
    return sql.SQL("({}).{}").format(record, sql.Identifier(name))


def _chain(
    head: list[sql.Composable], text: str, parts: list[tuple[str, sql.Composable]], tail: str
) -> sql.Composed:
    """Flatten literals and value expressions into one `a || b || ...` text expression.

    `text` is the literal before the first key, `tail` the literal after the last value;
    adjacent literal text is merged, so each column costs one literal and one value.
    """
    pieces = list(head)
    for i, (key, value) in enumerate(parts):
        text += ("," if i else "") + key
        pieces.append(_lit(text, first=not pieces))
        pieces.append(value)
        text = ""
    pieces.append(_lit(text + tail, first=not pieces))
    return sql.SQL(" || ").join(pieces)


def _lit(text: str, *, first: bool) -> sql.Composable:
    # The leading literal is typed so that a chain without columns is still text.
    return sql.SQL("{}::text").format(sql.Literal(text)) if first else sql.Literal(text)


def _json(text: str) -> str:
    """A JSON string literal, escaped exactly as in canonical.entry_v1."""
    return orjson.dumps(text).decode("utf-8")
