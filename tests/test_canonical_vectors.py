"""Known-answer vectors (tests/data/canonical_vectors.json, quoted by docs/canonical-entry.md).

The file is checked three ways: it is what the code produces now (so the encoding cannot
drift silently), PostgreSQL outputs exactly the listed texts and entries from the listed SQL,
and the document quotes every entry and leaf hash verbatim.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from listener import canonical, canonical_sql

ROOT = Path(__file__).resolve().parents[1]
VECTORS_PATH = ROOT / "tests" / "data" / "canonical_vectors.json"
DOC_PATH = ROOT / "docs" / "canonical-entry.md"
DATA = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
VECTORS = DATA["vectors"]

WRITER_OPTIONS = "-c timezone=America/St_Johns -c datestyle=SQL,DMY -c intervalstyle=iso_8601 -c extra_float_digits=0 -c bytea_output=escape"


def test_vector_file_is_what_the_code_produces():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import canonical_vectors
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert VECTORS_PATH.read_text(encoding="utf-8") == canonical_vectors.render(), (
        "the vectors changed: the encoding drifted (a bug) or the inputs were edited "
        "(run scripts/canonical_vectors.py and update the doc)"
    )


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_python_encoding_matches_vector(v):
    row = {c["name"]: c["text"] for c in v["columns"]}
    entry = canonical.entry_v1(v["op"], f'{v["schema"]}.{v["table"]}', row)
    assert entry == v["entry"].encode("utf-8") == bytes.fromhex(v["entry_hex"])
    # Independent of leaf_hash_of_entry: the RFC 9162 formula spelled out.
    assert hashlib.sha256(b"\x00" + entry).hexdigest() == v["leaf_hash"]
    assert canonical.leaf_hash_of_entry(entry).hex() == v["leaf_hash"]
    assert canonical.key_json({k: row[k] for k in v["key_columns"]}) == v["source_key"]


def test_hand_checked_vector():
    # Worked by hand from the spec, not from the code: keys in byte order, no whitespace.
    entry = b'{"op":"delete","row":{"id":"42"},"source":"public.orders_del","v":1}'
    assert canonical.entry_v1("delete", "public.orders_del", {"id": "42"}) == entry
    assert canonical.leaf_hash_of_entry(entry).hex() == hashlib.sha256(b"\x00" + entry).hexdigest()
    assert canonical.leaf_hash_of_entry(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"  # RFC 6962 empty leaf
    )


def _create_and_fill(dsn: str, v: dict) -> None:
    table = sql.Identifier(v["schema"], v["table"])
    cols = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c["name"]), sql.SQL(c["type"])) for c in v["columns"]
    )
    values = sql.SQL(", ").join(sql.SQL(c["sql"]) for c in v["columns"])  # trusted test data
    # Written by a session whose settings all differ from the pinned ones.
    with psycopg.connect(dsn, autocommit=True, options=WRITER_OPTIONS) as w:
        w.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(v["schema"])))
        w.execute(sql.SQL("CREATE TABLE {} ({})").format(table, cols))
        w.execute(sql.SQL("INSERT INTO {} VALUES ({})").format(table, values))


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_postgresql_matches_vector(dsn, conn, v):
    _create_and_fill(dsn, v)
    table = sql.Identifier(v["schema"], v["table"])
    names = [c["name"] for c in v["columns"]]
    source = f'{v["schema"]}.{v["table"]}'
    oids = dict(conn.execute(
        "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0",
        (table.as_string(conn),),
    ).fetchall())
    cur = conn.execute(sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(map(sql.Identifier, names)), table))
    texts = [None if cur.pgresult.get_value(0, i) is None else cur.pgresult.get_value(0, i).decode() for i in range(len(names))]
    assert texts == [c["text"] for c in v["columns"]]
    for types in (None, oids):
        entry, key = conn.execute(sql.SQL("SELECT {}, {} FROM {} AS r").format(
            canonical_sql.entry_sql("r", source, names, v["op"], types),
            canonical_sql.key_sql("r", v["key_columns"], types), table,
        )).fetchone()
        assert (entry, key) == (v["entry"], v["source_key"])
    fn_entry, fn_hash = conn.execute(
        "SELECT e, merkle.canonical_leaf_hash(e) FROM merkle.canonical_entry_v1(%s, %s, %s, %s) AS e",
        (v["op"], source, names[::-1], texts[::-1]),
    ).fetchone()
    assert fn_entry == v["entry"] and fn_hash.hex() == v["leaf_hash"]
    sql_hash = conn.execute(sql.SQL("SELECT {}").format(canonical_sql.leaf_hash_sql(sql.Literal(v["entry"])))).fetchone()[0]
    assert sql_hash.hex() == v["leaf_hash"]


def test_entry_column_vectors(conn):
    for v in DATA["entry_column_vectors"]:
        entry = bytes.fromhex(v["entry_hex"])
        assert canonical.leaf_hash_of_entry(entry).hex() == v["leaf_hash"]
        got = conn.execute(sql.SQL("SELECT {}").format(canonical_sql.leaf_hash_of_bytes_sql(sql.Literal(entry)))).fetchone()[0]
        assert got.hex() == v["leaf_hash"]


def test_document_quotes_every_vector():
    doc = DOC_PATH.read_text(encoding="utf-8")
    for v in VECTORS:
        assert v["entry"] in doc, f"docs/canonical-entry.md lacks the entry of vector {v['name']}"
        assert v["leaf_hash"] in doc, f"docs/canonical-entry.md lacks the leaf hash of vector {v['name']}"
    for v in DATA["entry_column_vectors"]:
        assert v["leaf_hash"] in doc


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_standard_library_recipe_of_the_doc(v):
    # docs/canonical-entry.md tells clients that Python's json module produces the entry.
    doc = {"op": v["op"], "row": {c["name"]: c["text"] for c in v["columns"]},
           "source": f'{v["schema"]}.{v["table"]}', "v": 1}
    entry = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    assert hashlib.sha256(b"\x00" + entry).hexdigest() == v["leaf_hash"]


def test_psql_recipe_of_the_doc(dsn, conn):
    v = next(v for v in VECTORS if v["name"] == "orders_delete")
    _create_and_fill(dsn, v)
    got = conn.execute(
        "SELECT encode(merkle.canonical_leaf_hash(merkle.canonical_entry_v1('delete', 'public.orders_del',"
        " ARRAY['id'], ARRAY[CASE WHEN id IS NULL THEN NULL ELSE format('%s', id) END])), 'hex')"
        " FROM public.orders_del WHERE id = 42"
    ).fetchone()[0]
    assert got == v["leaf_hash"]
