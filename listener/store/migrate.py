"""Apply the numbered migrations in sql/ (NNN_name.sql), once each, in order.

`merkle.schema_version` records what was applied; every known migration not recorded there
is applied, in version order. A database holding a migration this program does not know is
refused: an older listener must never write to a newer layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from listener.errors import ConfigurationError
from listener.store import guard

MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# Any constant works; it only serialises concurrent `init` runs on one database.
MIGRATION_LOCK = 0x6D65726B6C65
# The oldest server supported, as libpq numbers it (major * 10000 + minor): 15 is the oldest
# PostgreSQL its community still maintains, and replication mode needs its publication row
# filters and CREATE_REPLICATION_SLOT options. CI runs the tests on each version listed.
MIN_SERVER_VERSION = 150000
TESTED_MAJOR_VERSIONS = (15, 16, 17, 18)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def sql_dir() -> Path:
    """sql/ inside the installed package (wheel), else beside it (source checkout)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "sql", here.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise ConfigurationError(f"cannot find the sql/ migrations near {here}; reinstall merkle-listener")


def migrations() -> list[Migration]:
    found = []
    for path in sorted(sql_dir().iterdir()):
        m = MIGRATION_NAME.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigurationError(f"two migrations in {sql_dir()} share a number: {versions}")
    return found


def latest_version() -> int:
    return max((m.version for m in migrations()), default=0)


def applied_versions(conn: psycopg.Connection) -> set[int]:
    exists = conn.execute("SELECT to_regclass('merkle.schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return set()
    return {r[0] for r in conn.execute("SELECT version FROM merkle.schema_version")}


def current_version(conn: psycopg.Connection) -> int:
    return max(applied_versions(conn), default=0)


def _unknown(applied: set[int]) -> set[int]:
    return applied - {m.version for m in migrations()}


def check_server(conn: psycopg.Connection) -> None:
    """Raise unless the server is a PostgreSQL version the project supports."""
    if conn.info.server_version < MIN_SERVER_VERSION:
        raise ConfigurationError(unsupported_server_message(conn.info.server_version))


def unsupported_server_message(number: int) -> str:
    # libpq numbers 10 and later major * 10000 + minor, older ones 90624 for 9.6.24.
    shown = (f"{number // 10000}.{number % 10000}" if number >= 100000
             else f"{number // 10000}.{number // 100 % 100}.{number % 100}")
    return (
        f"this PostgreSQL is {shown}; merkle-listener needs PostgreSQL "
        f"{MIN_SERVER_VERSION // 10000} or later (tested on {', '.join(map(str, TESTED_MAJOR_VERSIONS))}): "
        "upgrade the server, or leave --dsn out to use the embedded PostgreSQL"
    )


def check_version(conn: psycopg.Connection) -> None:
    """Raise unless the database holds exactly the migrations this program has."""
    check_server(conn)
    database, role = conn.info.dbname, conn.info.user
    try:
        applied = applied_versions(conn)
    except psycopg.errors.InsufficientPrivilege:
        raise ConfigurationError(
            f"role {role} may not read schema merkle in database {database}: connect as the role that ran "
            "`merkle-listener init` there (it owns the schema), or see docs/replication.md, \"Running as a "
            "non-superuser role\"") from None
    if not applied:
        raise ConfigurationError(
            f"database {database} has no merkle schema: run `merkle-listener init` to create it, or point --dsn "
            "(or DATABASE_URL) at the database that has your logs")
    if unknown := _unknown(applied):
        raise ConfigurationError(
            f"the database's merkle schema has migration(s) {sorted(unknown)} that this merkle-listener "
            f"does not know (it knows up to {latest_version()}): upgrade merkle-listener"
        )
    if missing := sorted(m.version for m in migrations() if m.version not in applied):
        raise ConfigurationError(
            f"the merkle schema of database {database} lacks migration(s) {missing}: run `merkle-listener init`"
        )


def apply(conn: psycopg.Connection, handed_over: list[str] | None = None,
          guard_installed: list[str] | None = None) -> list[Migration]:
    """Apply pending migrations; returns those applied. Idempotent and safe to run concurrently.
    `handed_over` gets the ALTER ... OWNER statements of give_to_schema_owner, if any;
    `guard_installed` what guard.install did (a superuser installs the DDL guard too)."""
    check_server(conn)
    applied = []
    handed_over = [] if handed_over is None else handed_over
    guard_installed = [] if guard_installed is None else guard_installed
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        # Run as whoever may alter schema merkle (often a superuser): the migrations name their
        # objects with their schema, and nothing a table's owner put on the caller's path may
        # win a call in them.
        conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        done = applied_versions(conn)
        if unknown := _unknown(done):
            raise ConfigurationError(
                f"the database's merkle schema has migration(s) {sorted(unknown)} that this merkle-listener "
                f"does not know (it knows up to {latest_version()}): upgrade merkle-listener; nothing was changed"
            )
        pending = [m for m in migrations() if m.version not in done]
        if pending:
            check_privileges(conn)
        for m in pending:
            conn.execute(m.path.read_text())
            conn.execute(
                "INSERT INTO merkle.schema_version (version, name) VALUES (%s, %s)", (m.version, m.name)
            )
            # After each one: the next migration's DDL may fire a guard that runs as the owner
            # and reads what this one created.
            handed_over += give_to_schema_owner(conn)
            applied.append(m)
        if not pending and done:
            handed_over += give_to_schema_owner(conn)  # repairs what an earlier upgrade by another role left
        if conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
            guard_installed += guard.install(conn)
    return applied


# What the caller owns in schema merkle, with the statement that hands it to the schema's owner.
# A table takes its indexes and the sequences of its identity and serial columns along, so
# those are left out; a partitioned table does not take its partitions, handed each on its own.
# A regrole's text is quoted already: %s, not %I.
_OWNED_BY_CALLER = """
WITH me AS (SELECT oid FROM pg_roles WHERE rolname = current_user),
     merkle AS (SELECT oid, nspowner FROM pg_namespace WHERE nspname = 'merkle')
SELECT format('ALTER %s %s OWNER TO %s',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
              c.oid::regclass, merkle.nspowner::regrole)
  FROM pg_class c, me, merkle
 WHERE c.relnamespace = merkle.oid AND c.relowner = me.oid AND c.relkind IN ('r', 'p', 'v', 'S')
   AND NOT (c.relkind = 'S' AND EXISTS (
           SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
              AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
UNION ALL
SELECT format('ALTER ROUTINE %s OWNER TO %s', p.oid::regprocedure, merkle.nspowner::regrole)
  FROM pg_proc p, me, merkle
 WHERE p.pronamespace = merkle.oid AND p.proowner = me.oid
"""


def give_to_schema_owner(conn: psycopg.Connection) -> list[str]:
    """Hand what the caller owns in schema merkle to the schema's owner, when the caller is
    not that owner but acts for it (a superuser, or a member of its role, upgrading a role's
    schema): the listener, `source add` and the HTTP API run as the owner and must be able to
    use every table a migration creates, and the guard functions run as the owner, as when the
    role applied the migrations itself. That owner can replace them, so a guard installed on
    its schema trusts it like a superuser (docs/replication.md). Returns the statements run."""
    acts_for_owner = conn.execute(
        f"SELECT n.nspowner <> r.oid AND pg_has_role(n.nspowner, '{_hand_over_privilege(conn)}') "
        "FROM pg_namespace n, pg_roles r WHERE n.nspname = 'merkle' AND r.rolname = current_user").fetchone()
    if not acts_for_owner or not acts_for_owner[0]:
        return []
    statements = [statement for (statement,) in conn.execute(_OWNED_BY_CALLER).fetchall()]
    for statement in statements:
        conn.execute(statement)
    return statements


def check_privileges(conn: psycopg.Connection) -> None:
    """Refuse, with the GRANT that fixes it, a role that cannot apply the migrations: they
    create schema merkle (CREATE on the database) and then alter what is in it (ownership)."""
    role, database, owner, may_create, owns, may_hand_over = conn.execute(
        "SELECT current_user, current_database(), n.nspowner::regrole::text, "
        "has_database_privilege(current_database(), 'CREATE'), pg_has_role(n.nspowner, 'USAGE'), "
        f"pg_has_role(n.nspowner, '{_hand_over_privilege(conn)}') "
        "FROM (SELECT) one LEFT JOIN pg_namespace n ON n.nspname = 'merkle'").fetchone()
    quoted = lambda name: sql.Identifier(name).as_string(conn)  # noqa: E731
    if owner is None and not may_create:
        raise ConfigurationError(
            f"role {role!r} may not create schema merkle in database {database!r}: as its owner or a superuser, "
            f"run GRANT CREATE ON DATABASE {quoted(database)} TO {quoted(role)}; (or run init as a role that "
            "has it; as a superuser, init also installs the DDL guard). Nothing was changed")
    if owner is not None and not owns:
        raise ConfigurationError(
            f"schema merkle belongs to role {owner}, and role {role!r} may not upgrade it: run init as {owner} "
            "or as a superuser. Nothing was changed")
    if owner is not None and not may_hand_over:
        # What the migrations create is handed to the owner (give_to_schema_owner), which
        # PostgreSQL 16 allows only to a role that may SET ROLE to it.
        raise ConfigurationError(
            f"role {role!r} is a member of role {owner}, which owns schema merkle, without the SET option, so it "
            f"cannot hand what an upgrade creates to {owner}: run init as {owner} or as a superuser, or as "
            f"{owner}: GRANT {owner} TO {quoted(role)} WITH SET TRUE; Nothing was changed")


def _hand_over_privilege(conn: psycopg.Connection) -> str:
    """The pg_has_role privilege ALTER ... OWNER TO a role asks of the caller."""
    return "SET" if conn.info.server_version >= 160000 else "USAGE"
