"""Sources whose tables came back under new OIDs: a database restored from pg_dump.

A source names its table by OID (merkle.sources.table_oid): the capture checks, `status`,
`source remove`, the DDL guard and the replication stream all go by it. pg_restore creates
every table anew, under new OIDs, and a source's old OID then names no table, or another
one. Its table is found again by what the dump carried with it:

- a trigger-mode source's capture trigger, `merkle_capture_<id>` calling
  `merkle.capture_<id>()`, which sits on its table and on no other;
- a replication source's registered name, among the tables its log's publication lists (the
  DDL guard refuses renaming a source's table; a table dropped and made again under the same
  name is in no publication).

A source counts as in place while its OID names the table that carries its capture trigger
(trigger mode), or that has its registered name, or (replication mode, renamed where the guard
is not installed) that its publication lists under a name no other source of the log has;
`status` reports the others, and
`merkle-listener init` points them at their tables again (`relink`), before its migrations
(whose guard install copies only the sources whose tables it finds). Nothing is guessed: a
table found by neither way, or claimed by two sources of one log, is left for the user.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from listener.errors import ConfigurationError

# PostgreSQL's first OID for objects that are not built in (FirstNormalObjectId): below it, a
# type's OID is the same in every database, so a restore cannot have changed it.
FIRST_NORMAL_OID = 16384


@dataclass(frozen=True)
class Moved:
    """A source whose OID no longer names its table, and the table that is its now (None: none
    found with certainty)."""

    source_id: int
    log_id: int
    log_name: str
    mode: str
    qualified: str  # schema.table as registered
    old_oid: int
    new_oid: int | None


def moved_sources(conn: psycopg.Connection) -> list[Moved]:
    """Every source whose table_oid is not its table any more. Read-only; one statement."""
    if conn.execute("SELECT to_regclass('merkle.sources') IS NULL").fetchone()[0]:
        return []  # no schema yet
    rows = conn.execute("""
        WITH s AS (
            SELECT s.source_id, s.log_id, l.name AS log_name, s.mode, s.table_schema, s.table_name, s.table_oid,
                   format('merkle_capture_%s', s.source_id) AS capture_trigger,
                   to_regprocedure(format('merkle.capture_%s()', s.source_id)) AS capture_function,
                   cur.nspname AS oid_schema, cur.relname AS oid_table,  -- the table its OID names now
                   coalesce(cur.nspname = s.table_schema AND cur.relname = s.table_name, false) AS oid_has_name
              FROM merkle.sources s JOIN merkle.logs l ON l.log_id = s.log_id
              LEFT JOIN LATERAL (SELECT n.nspname::text, c.relname::text
                                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                  WHERE c.oid = s.table_oid AND c.relkind IN ('r', 'p')) cur(nspname, relname) ON true),
        found AS (
            SELECT s.*,
                   CASE s.mode
                   -- a trigger source's OID carries its capture trigger; without one anywhere (capture
                   -- stopped by a first `source remove`), it is the table of its registered name
                   WHEN 'trigger' THEN
                       EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = s.table_oid
                                 AND t.tgname = s.capture_trigger AND t.tgfoid = s.capture_function)
                       OR (s.oid_has_name
                           AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgname = s.capture_trigger
                                             AND t.tgfoid = s.capture_function))
                   -- a replication source's OID is the table of its registered name, or (renamed where
                   -- the guard is not installed) one its publication lists and no other source of
                   -- the log is registered under
                   ELSE s.oid_has_name
                        OR (EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                                     WHERE r.prrelid = s.table_oid AND p.pubname = 'merkle_' || s.log_name)
                            AND NOT EXISTS (SELECT 1 FROM merkle.sources o
                                             WHERE o.log_id = s.log_id AND o.source_id <> s.source_id
                                               AND o.table_schema = s.oid_schema AND o.table_name = s.oid_table))
                   END AS in_place,
                   CASE s.mode
                   WHEN 'trigger' THEN  -- the one table carrying its capture trigger
                       (SELECT min(t.tgrelid) FROM pg_trigger t
                         WHERE t.tgname = s.capture_trigger AND t.tgfoid = s.capture_function HAVING count(*) = 1)
                   ELSE  -- the table of its registered name, if its log's publication lists it
                       (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = s.table_schema AND c.relname = s.table_name AND c.relkind IN ('r', 'p')
                           AND EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                                        WHERE r.prrelid = c.oid AND p.pubname = 'merkle_' || s.log_name))
                   END AS candidate
              FROM s)
        SELECT f.source_id, f.log_id, f.log_name, f.mode, f.table_schema || '.' || f.table_name, f.table_oid,
               CASE WHEN f.candidate IS NOT NULL
                     -- one source per table and log: not a table another source of the log has,
                     AND NOT EXISTS (SELECT 1 FROM found o WHERE o.log_id = f.log_id AND o.source_id <> f.source_id
                                       AND (o.candidate = f.candidate AND NOT o.in_place
                                            OR o.table_oid = f.candidate AND o.in_place))
                    THEN f.candidate END
          FROM found f
         WHERE NOT f.in_place
         ORDER BY f.source_id""").fetchall()
    return [Moved(*r) for r in rows]


def relink(conn: psycopg.Connection) -> tuple[list[Moved], list[Moved]]:
    """Point every moved source at its table; returns (relinked, left as they were). In the
    caller's transaction. The DDL guard's copy of the sources follows (sql/020's mirror
    trigger); its record of the publications names tables by name, which a restore keeps."""
    if not conn.execute("SELECT to_regclass('merkle.sources') IS NOT NULL "
                        "AND has_table_privilege('merkle.sources', 'UPDATE')").fetchone()[0]:
        return [], []  # no schema yet, or another role's (which `init` then refuses to upgrade)
    moved = moved_sources(conn)
    pending = [m for m in moved if m.new_oid is not None]
    left = [m for m in moved if m.new_oid is None]
    done: list[Moved] = []
    has_columns = conn.execute("SELECT to_regclass('merkle.source_columns') IS NOT NULL").fetchone()[0]
    # Old and new OIDs of one log may overlap (a fresh cluster hands out the same range), and
    # (log_id, table_oid) is unique: a source goes first when no other still holds its new OID.
    while pending:
        held = {(m.log_id, m.old_oid) for m in pending}
        ready = [m for m in pending if (m.log_id, m.new_oid) not in held]
        if not ready:
            break  # a cycle of swapped OIDs: left for the user rather than resolved by a guess
        for m in ready:
            conn.execute("UPDATE merkle.sources SET table_oid = %s WHERE source_id = %s", (m.new_oid, m.source_id))
            if has_columns:
                # A hashed column of a type made by the user (enum, composite, domain) has a new
                # type OID too; the guard compares the column's type with this one.
                conn.execute(
                    "UPDATE merkle.source_columns sc SET type_oid = a.atttypid FROM pg_attribute a "
                    "WHERE sc.source_id = %s AND a.attrelid = %s AND a.attname = sc.name AND a.attnum > 0 "
                    "AND NOT a.attisdropped AND sc.type_oid <> a.atttypid AND sc.type_oid >= %s "
                    "AND a.atttypid >= %s AND sc.typmod = a.atttypmod",
                    (m.source_id, m.new_oid, FIRST_NORMAL_OID, FIRST_NORMAL_OID))
            done.append(m)
        pending = [m for m in pending if m not in ready]
    return done, left + pending


def refuse_while_moved(conn: psycopg.Connection, log_name: str) -> None:
    """Refuse to change a log's sources while some came back under new OIDs: `source add` would
    not see the table as a source already (and capture it twice), `source remove` would not find
    its triggers. A source without its outbox or publication (a data-only restore) is let through
    whatever its old OID names now: nothing of it is on its table for `init` to find it by, and
    `source remove` is its recovery, which then leaves that relation alone (`in_place`). Its own
    transaction: one left open would hold up the slot's creation."""
    from listener import registry

    with conn.transaction():
        log = registry.get_log(conn, log_name)
        stranded = {s.source_id for s in
                    registry.missing_capture(conn, log_name, registry.list_sources(conn, log.log_id))}
        moved = [m.qualified for m in moved_sources(conn) if m.log_name == log_name
                 and (m.new_oid is not None or m.source_id not in stranded and _names_a_relation(conn, m.old_oid))]
    if moved:
        raise ConfigurationError(
            f"log {log_name}: the tables of {', '.join(moved)} came back under new OIDs (the database was restored "
            "from a dump?), by which its sources name them: run `merkle-listener init` first, which points them "
            "at their tables again")


def in_place(conn: psycopg.Connection, source_id: int) -> bool:
    """Whether the source's OID names its table (what its triggers are looked for on)."""
    return all(m.source_id != source_id for m in moved_sources(conn))


def _names_a_relation(conn: psycopg.Connection, oid: int) -> bool:
    """Whether `oid` is some relation's: then a source's old OID is another table's now, and its
    triggers or publication entry would be looked for there. A dropped table's OID is no one's."""
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = %s)", (oid,)).fetchone()[0]


def describe(m: Moved) -> str:
    if m.new_oid is not None:
        return f"log {m.log_name}: source {m.qualified} now names its table by OID {m.new_oid} (was {m.old_oid})"
    return (f"log {m.log_name}: source {m.qualified} has no table under OID {m.old_oid}, and none was found "
            "with certainty (by its capture trigger, or its registered name)")
