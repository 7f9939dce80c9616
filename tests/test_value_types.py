"""Types whose text could differ between the capture modes and an outside verifier.

- xml: its cast to text is not its output function (the declaration stays); trigger mode must
  hash the output, as pgoutput sends it.
- money: its text follows lc_monetary, which is pinned to C like the other settings, whatever
  the database or role sets (the test that changes the locale needs de_DE.UTF-8, which .ci/run
  generates; without it that test is skipped).
- aclitem: prints role names, so a role's rename would change committed values: refused.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from listener import canonical, canonical_sql, registry
from listener.errors import SourceTableError
from listener.runner import connect
from listener.sequencer import Sequencer
from tests.helpers import check_log, start_listener
from tests.test_replication import wait_for_size

XML_OID = 142
DOCUMENTED_OPTIONS = ("-c timezone=UTC -c datestyle=ISO,YMD -c intervalstyle=postgres -c extra_float_digits=1 "
                      "-c bytea_output=hex -c lc_monetary=C")  # docs/canonical-entry.md's PGOPTIONS


def _verifier_entry(dsn: str, table: str, columns: list[str], row_id: int) -> bytes:
    """The entry as docs/canonical-entry.md has a verifier compute it: the row's text output
    read in a session with the documented settings."""
    with psycopg.connect(dsn, options=DOCUMENTED_OPTIONS) as c:
        cur = c.execute(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(*table.split("."))), (row_id,))
        texts = {col: (v.decode() if v is not None else None)
                 for col, v in zip(columns, (cur.pgresult.get_value(0, i) for i in range(len(columns))))}
    return canonical.entry_v1("insert", table, texts)


def _without_options(dsn: str) -> str:
    """`dsn` without the tests' pinned settings: a session as the database and role set it up."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info.pop("options", None)
    return psycopg.conninfo.make_conninfo(**info)


def _both_modes(conn, column_type: str, values: list[str]) -> list[tuple[str, bytes]]:
    """Tables public.trg and public.repl (id, v column_type) on log "a", one per capture mode,
    with `values` inserted into each; returns (table, leaf hash) in log order. The listener's
    connection string carries no settings: it must pin them itself."""
    dsn = _without_options(conn.info.dsn)
    for table in ("trg", "repl"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v {column_type})")
    registry.create_log(conn, "a")
    with connect(dsn) as c:
        registry.add_source(c, "a", "trg")
        registry.add_source(c, "a", "repl", mode="replication")
    for i, value in enumerate(values, start=1):
        for table in ("trg", "repl"):
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, value))
    with connect(dsn) as c:
        Sequencer(c, "a").drain_all()
        c.commit()
    listener = start_listener(dsn)
    try:
        wait_for_size(conn, "a", 2 * len(values), listener=listener)
    finally:
        listener.stop()
    names = dict(conn.execute("SELECT source_id, table_name FROM merkle.sources").fetchall())
    return [(names[r[1]], bytes(r[4])) for r in check_log(conn, "a")]


def _has_libxml(conn) -> bool:
    try:
        conn.execute("SELECT '<a/>'::xml")
        return True
    except psycopg.errors.FeatureNotSupported:  # a server built without libxml (the wheel's 18)
        return False


def test_xml_is_hashed_as_its_output_in_both_modes(rconn):
    if not _has_libxml(rconn):
        pytest.skip("this PostgreSQL is built without libxml")
    rconn.execute("CREATE TABLE x (id int, v xml)")
    rconn.execute("""INSERT INTO x VALUES (1, '<?xml version="1.0"?><a/>')""")
    output = _verifier_entry(rconn.info.dsn, "public.x", ["id", "v"], 1)
    assert b'"v":"<a/>"' in output  # the output function drops the declaration
    typed = rconn.execute(sql.SQL("SELECT {} FROM x AS r").format(
        canonical_sql.entry_sql("r", "public.x", ["id", "v"], "insert", {"id": 23, "v": XML_OID}))).fetchone()[0]
    assert typed.encode() == output

    values = ['<?xml version="1.0"?><a/>', '<?xml version="1.0" encoding="UTF-8"?>\n<b>é</b>', "<c/>text"]
    logged = _both_modes(rconn, "xml", values)
    for table in ("public.trg", "public.repl"):
        expected = [canonical.leaf_hash_of_entry(_verifier_entry(rconn.info.dsn, table, ["id", "v"], i))
                    for i in range(1, len(values) + 1)]
        assert [h for t, h in logged if t == table.split(".")[1]] == expected, table


def test_money_is_hashed_under_lc_monetary_c_whatever_the_database_sets(rconn):
    try:
        rconn.execute("SET lc_monetary = 'de_DE.utf8'")
    except psycopg.errors.InvalidParameterValue:
        pytest.skip("no de_DE.UTF-8 locale on this machine (.ci/run makes one with localedef)")
    assert rconn.execute("SELECT 1234.5::money::text").fetchone()[0] != "$1,234.50"  # the locale matters
    rconn.execute("RESET lc_monetary")  # the writer's own setting only changes how it reads its input
    rconn.execute(sql.SQL("ALTER DATABASE {} SET lc_monetary = 'de_DE.utf8'").format(
        sql.Identifier(rconn.info.dbname)))
    with psycopg.connect(_without_options(rconn.info.dsn)) as fresh:  # the database's setting applies
        assert fresh.execute("SELECT 1234.5::money::text").fetchone()[0] == "1.234,50 €"
    logged = _both_modes(rconn, "money", ["1234.5", "-0.01"])
    for table in ("trg", "repl"):
        expected = [canonical.leaf_hash_of_entry(canonical.entry_v1("insert", f"public.{table}", {"id": i, "v": v}))
                    for i, v in (("1", "$1,234.50"), ("2", "-$0.01"))]
        assert [h for t, h in logged if t == table] == expected, table
        assert [canonical.leaf_hash_of_entry(_verifier_entry(rconn.info.dsn, f"public.{table}", ["id", "v"], i))
                for i in (1, 2)] == expected


def test_the_capture_function_pins_lc_monetary(conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v money)")
    registry.create_log(conn, "a")
    with connect(conn.info.dsn) as c:
        source, _ = registry.add_source(c, "a", "t")
    config = conn.execute("SELECT proconfig FROM pg_proc WHERE oid = %s::regprocedure",
                          (f"merkle.capture_{source.source_id}()",)).fetchone()[0]
    assert "lc_monetary=C" in config


@pytest.mark.parametrize("column_type", ["aclitem", "aclitem[]"])
def test_an_aclitem_column_is_not_hashed(conn, column_type):
    conn.execute(f"CREATE TABLE grants (id int PRIMARY KEY, acl {column_type})")
    registry.create_log(conn, "a")
    for mode in ("trigger", "replication"):
        with connect(conn.info.dsn) as c, pytest.raises(SourceTableError, match="column acl .* prints the names"):
            registry.add_source(c, "a", "grants", mode=mode)
    with connect(conn.info.dsn) as c:  # left out, the table is a source like any other
        registry.add_source(c, "a", "grants", columns=["id"])
