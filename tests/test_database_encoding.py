"""A database in another encoding than UTF-8 gives the leaves docs/canonical-entry.md defines.

An entry is UTF-8 whatever the database's encoding: trigger mode converts with
convert_to(…, 'UTF8'), and pgoutput sends text in the replication connection's
client_encoding, which the listener pins to UTF8. Both are checked here against the entry
computed in Python from the Unicode values, with names and values outside ASCII, written by
clients in the server's own encoding and in UTF-8. A SQL_ASCII database, whose text has no
declared character set, is refused before anything is written.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from listener import canonical, registry
from listener.errors import ConfigurationError
from listener.runner import connect
from listener.sequencer import Sequencer
from listener.store import migrate
from tests.helpers import check_log, start_listener
from tests.test_replication import wait_for_size

# Per encoding: a schema, table and column name and values it can hold, outside ASCII.
CASES = {
    "LATIN1": ("Über", "café", "größe", ["crème brûlée", "ÿ\u00a0ß", "½ × ¾", "plain"]),
    "WIN1251": ("Схема", "таблица", "размер", ["Жук", "ёлка «ель»", "№ 5", "plain"]),
    "EUC_JP": ("スキーマ", "表", "大きさ", ["日本語", "ｶﾀｶﾅ and ひらがな", "全角\u3000空白", "plain"]),
}


def _create_database(pg_server, name: str, encoding: str) -> str:
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LOCALE 'C'").format(
            sql.Identifier(name), sql.Literal(encoding)))
    return pg_server.dsn(name)


def _drop_database(pg_server, name: str) -> None:
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        for (slot,) in admin.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)):
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def encoded_database(pg_server, request):
    """(dsn, encoding) of a fresh database in `request.param`'s encoding, with the merkle schema."""
    encoding = request.param
    name = f"enc_{encoding.lower()}"
    dsn = _create_database(pg_server, name, encoding)
    try:
        with connect(dsn) as c:
            migrate.apply(c)
        yield dsn, encoding
    finally:
        _drop_database(pg_server, name)


@pytest.mark.parametrize("encoded_database", sorted(CASES), indirect=True)
def test_both_modes_log_the_utf8_entry(encoded_database):
    dsn, encoding = encoded_database
    schema, table, column, values = CASES[encoding]
    log = f"log_{encoding.lower()}"
    tables = {"trigger": f"{table}_t", "replication": f"{table}_r"}
    with connect(dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for name in tables.values():
            c.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {} text)").format(
                sql.Identifier(schema, name), sql.Identifier(column)))
            c.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(sql.Identifier(schema, name)))
        registry.create_log(c, log)
    with connect(dsn) as c:
        for mode, name in tables.items():
            events = ["insert", "update", "delete"] if mode == "replication" else None
            registry.add_source(c, log, sql.Identifier(schema, name).as_string(c), mode=mode, events=events)

    expected: list[tuple[str, bytes]] = []  # (op, leaf hash) per source, in its order
    by_source: dict[str, list[tuple[str, bytes]]] = {mode: [] for mode in tables}
    # Odd rows from a client in the server's own encoding, even rows from a UTF-8 one.
    for i, value in enumerate(values, start=1):
        client_encoding = encoding if i % 2 else "UTF8"
        with psycopg.connect(dsn, autocommit=True, options=f"-c client_encoding={client_encoding}") as w:
            for mode, name in tables.items():
                w.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(sql.Identifier(schema, name)), (i, value))
                entry = canonical.entry_v1("insert", f"{schema}.{name}", {"id": str(i), column: value})
                by_source[mode].append(("insert", canonical.leaf_hash_of_entry(entry)))
    # Updates and deletes, which only replication mode logs: their values come from the new
    # tuple and from the old one (REPLICA IDENTITY FULL).
    repl = tables["replication"]
    with psycopg.connect(dsn, autocommit=True, options=f"-c client_encoding={encoding}") as w:
        w.execute(sql.SQL("UPDATE {} SET {} = %s WHERE id = 1").format(
            sql.Identifier(schema, repl), sql.Identifier(column)), (values[1] + values[0],))
        w.execute(sql.SQL("DELETE FROM {} WHERE id = 2").format(sql.Identifier(schema, repl)))
    by_source["replication"] += [
        ("update", canonical.leaf_hash_of_entry(canonical.entry_v1(
            "update", f"{schema}.{repl}", {"id": "1", column: values[1] + values[0]}))),
        ("delete", canonical.leaf_hash_of_entry(canonical.entry_v1("delete", f"{schema}.{repl}", {"id": "2"}))),
    ]
    expected = by_source["trigger"] + by_source["replication"]

    with connect(dsn) as c:
        Sequencer(c, log).drain_all()  # the trigger source's leaves first
        c.commit()
    listener = start_listener(dsn)
    try:
        with connect(dsn, autocommit=True) as c:
            wait_for_size(c, log, len(expected), listener=listener)
            rows = check_log(c, log)
            names = dict(c.execute("SELECT source_id, table_name FROM merkle.sources").fetchall())
    finally:
        listener.stop()
    got = {mode: [(r[3], bytes(r[4])) for r in rows if names[r[1]] == name] for mode, name in tables.items()}
    assert got == by_source
    # The change's key, as stored and served, is UTF-8 JSON too.
    assert {r[2] for r in rows} == {f'{{"id":"{i}"}}' for i in range(1, len(values) + 1)}


def test_a_sql_ascii_database_is_refused_before_anything_is_written(pg_server):
    name = "enc_sql_ascii"
    dsn = _create_database(pg_server, name, "SQL_ASCII")
    try:
        with connect(dsn) as c:
            migrate.apply(c)
        with connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            with pytest.raises(ConfigurationError, match=r"encoding SQL_ASCII.*ENCODING 'UTF8'"):
                registry.create_log(c, "ascii")
            assert c.execute("SELECT count(*) FROM merkle.logs").fetchone() == (0,)
            # A log made another way (as by an older version) gets no source either, in either mode.
            c.execute("INSERT INTO merkle.logs (name, origin) VALUES ('ascii', 'merkle-listener/ascii')")
        for mode in ("trigger", "replication"):
            with connect(dsn) as c:
                with pytest.raises(ConfigurationError, match="encoding SQL_ASCII"):
                    registry.add_source(c, "ascii", "t", mode=mode)
        with connect(dsn, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM merkle.sources").fetchone() == (0,)
            assert c.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass").fetchone() == (0,)
            assert c.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
            assert c.execute("SELECT count(*) FROM pg_replication_slots WHERE database = %s",
                             (name,)).fetchone() == (0,)
    finally:
        _drop_database(pg_server, name)
