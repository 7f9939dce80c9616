"""Canonical entries recomputed from the CURRENT source rows (processed_log keeps no row data).

For each leaf: its processed_log row names the source, the key and the op. The entry is
rebuilt as the capture built it (docs/canonical-entry.md):

  * insert / update / backfill: from the row that has that key now, with the registered
    column set (or the entry column's bytes);
  * delete / truncate: from the key alone ("row" holds the key columns of the old row).

Whether the rebuilt entry still hashes to the logged leaf is reported, never assumed: it does
for append-only sources; a row updated or deleted since gives another entry or none.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from psycopg import AsyncConnection, sql

from listener import canonical, canonical_sql
from listener.errors import ProcessingError


@dataclass
class Leaf:
    seq: int
    source_id: int
    source: str | None
    source_key: str
    op: str
    leaf_hash: bytes
    sequenced_at: str
    entry: bytes | None = None

    @property
    def matches(self) -> bool:
        return self.entry is not None and canonical.leaf_hash_of_entry(self.entry) == self.leaf_hash


_LEAVES = (
    "SELECT p.seq, p.source_id, s.table_schema || '.' || s.table_name, p.source_key, p.op, p.leaf_hash,"
    " to_char(p.sequenced_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    " FROM merkle.processed_log p LEFT JOIN merkle.source_names s USING (source_id)"
    " WHERE p.log_id = %s AND p.seq >= %s AND p.seq < %s ORDER BY p.seq"
)

_SOURCE = (
    "SELECT s.table_oid, s.columns, s.key_columns, s.entry_column,"
    " (SELECT array_agg(a.attname || ':' || format_type(a.atttypid, a.atttypmod))"
    "    FROM pg_attribute a WHERE a.attrelid = s.table_oid AND a.attname = ANY (s.key_columns))"
    " FROM merkle.sources s WHERE s.source_id = %s"
)


async def leaves(conn: AsyncConnection, log_id: int, begin: int, end: int) -> list[Leaf]:
    """processed_log rows [begin, end) of a log, with entries recomputed (None when the row
    that had the key is gone)."""
    cur = await conn.execute(_LEAVES, (log_id, begin, end))
    out = [Leaf(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), r[6]) for r in await cur.fetchall()]
    by_source: dict[int, list[Leaf]] = {}
    for leaf in out:
        if leaf.source is None:
            continue  # the source was removed: nothing to rebuild from
        if leaf.op in ("delete", "truncate"):
            leaf.entry = canonical.entry_v1(leaf.op, leaf.source, orjson.loads(leaf.source_key))
        else:
            by_source.setdefault(leaf.source_id, []).append(leaf)
    for source_id, group in by_source.items():
        await _from_rows(conn, source_id, group)
    return out


async def _from_rows(conn: AsyncConnection, source_id: int, group: list[Leaf]) -> None:
    cur = await conn.execute(_SOURCE, (source_id,))
    row = await cur.fetchone()
    if row is None:
        return
    table_oid, columns, key_columns, entry_column, key_types = row
    qualified = group[0].source
    names = await (await conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s",
        (table_oid,),
    )).fetchone()
    if names is None:
        return  # the table was dropped
    types = dict(kt.split(":", 1) for kt in key_types or [])
    if set(types) != set(key_columns):
        return  # a key column was dropped or renamed
    # Key values go back through their type's input function, so the key's index is used.
    join = sql.SQL(" AND ").join(
        sql.SQL("t.{col} = CAST(x.k ->> {name} AS {typ})").format(
            col=sql.Identifier(c), name=sql.Literal(c), typ=sql.SQL(types[c]))
        for c in key_columns
    )
    if entry_column:
        entry = sql.SQL("t.{}").format(sql.Identifier(entry_column))
    else:
        entry = sql.SQL("convert_to({}, 'UTF8')").format(
            canonical_sql.entry_sql("t", qualified, columns, sql.SQL("x.op")))
    query = sql.SQL(
        "SELECT x.n, {entry} FROM unnest(%s::jsonb[], %s::text[]) WITH ORDINALITY AS x(k, op, n)"
        " JOIN {table} t ON {join}"
    ).format(entry=entry, table=sql.Identifier(*names), join=join)
    try:
        cur = await conn.execute(query, ([leaf.source_key for leaf in group], [leaf.op for leaf in group]))
        for n, value in await cur.fetchall():
            group[n - 1].entry = None if value is None else bytes(value)
    except Exception as exc:  # a changed table must not break the API: report no entry
        raise ProcessingError(f"cannot rebuild entries of {qualified}: {exc}") from None


def bundle(entries: list[bytes]) -> bytes:
    """C2SP tlog-tiles entry bundle: each entry as a big-endian uint16 length and its bytes."""
    out = bytearray()
    for e in entries:
        if len(e) > 0xFFFF:
            raise ProcessingError(f"an entry of {len(e)} bytes does not fit an entry bundle (at most 65535)")
        out += len(e).to_bytes(2, "big") + e
    return bytes(out)
