"""Apply the numbered migrations in sql/ (NNN_name.sql), once each, in order.

`merkle.schema_version` records what was applied. A database whose schema is newer than
this program knows is refused: an older listener must never write to a newer layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from listener.errors import ConfigurationError

MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# Any constant works; it only serialises concurrent `init` runs on one database.
MIGRATION_LOCK = 0x6D65726B6C65


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
    if versions != list(range(1, len(found) + 1)):
        raise ConfigurationError(f"migrations in {sql_dir()} are not numbered 1..n: {versions}")
    return found


def latest_version() -> int:
    return len(migrations())


def current_version(conn: psycopg.Connection) -> int:
    exists = conn.execute("SELECT to_regclass('merkle.schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM merkle.schema_version").fetchone()[0]


def check_version(conn: psycopg.Connection) -> None:
    """Raise unless the database holds exactly the schema this program expects."""
    have, want = current_version(conn), latest_version()
    if have == want:
        return
    if have > want:
        raise ConfigurationError(
            f"the database's merkle schema is version {have}, newer than this merkle-listener "
            f"knows ({want}): upgrade merkle-listener"
        )
    raise ConfigurationError(
        f"the database's merkle schema is version {have}, this merkle-listener needs {want}: "
        "run `merkle-listener init`"
    )


def apply(conn: psycopg.Connection) -> list[Migration]:
    """Apply pending migrations; returns those applied. Idempotent and safe to run concurrently."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        have, known = current_version(conn), migrations()
        if have > len(known):
            raise ConfigurationError(
                f"the database's merkle schema is version {have}, newer than this merkle-listener "
                f"knows ({len(known)}): upgrade merkle-listener; nothing was changed"
            )
        for m in known[have:]:
            conn.execute(m.path.read_text())
            conn.execute(
                "INSERT INTO merkle.schema_version (version, name) VALUES (%s, %s)", (m.version, m.name)
            )
            applied.append(m)
    return applied
