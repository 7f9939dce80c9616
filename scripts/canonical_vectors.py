"""Write tests/data/canonical_vectors.json: the canonical entry test vectors of docs/canonical-entry.md.

Each vector gives a table (schema, name, typed columns), the SQL that inserts its row, the
text PostgreSQL outputs for each value under the pinned settings, and the entry and leaf hash
computed by listener.canonical. tests/test_canonical_vectors.py checks that the file matches
the code and that PostgreSQL produces the same texts, entries and hashes.

Run from the repository root: /work/venv/bin/python scripts/canonical_vectors.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from listener.canonical import entry_v1, key_json, leaf_hash_of_entry  # noqa: E402

OUT = ROOT / "tests" / "data" / "canonical_vectors.json"

# (name, what it shows, op, schema, table, key columns, [(column, type, SQL input, text output)])
INPUTS = [
    ("orders_insert", "one row of common types: timestamptz, NULL, unicode and control characters, "
     "numeric, bytea, a text array, boolean, float8", "insert", "public", "orders", ["id"], [
        ("id", "bigint", "42", "42"),
        ("placed_at", "timestamp with time zone", "'2024-03-01 12:34:56.789+05:30'", "2024-03-01 07:04:56.789+00"),
        ("note", "text", "E'caf\\u00e9 \"quoted\" back\\\\slash\\ttab\\nnew line\\u0001 \\U0001F600'",
         "café \"quoted\" back\\slash\ttab\nnew line\u0001 \U0001F600"),
        ("amount", "numeric", "12345678901234567890.12345", "12345678901234567890.12345"),
        ("paid", "boolean", "true", "t"),
        ("receipt", "bytea", "'\\xdeadbeef'::bytea", "\\xdeadbeef"),
        ("tags", "text[]", "ARRAY['a b', 'say \"hi\"', NULL]", "{\"a b\",\"say \\\"hi\\\"\",NULL}"),
        ("ratio", "double precision", "0.1", "0.1"),
        ("comment", "text", "NULL", None),
        ("empty", "text", "''", ""),
    ]),
    ("orders_delete", "a delete: the row holds only the key columns of the old row", "delete",
     "public", "orders_del", ["id"], [
        ("id", "bigint", "42", "42"),
    ]),
    ("awkward_names", "schema, table and column names that need quoting; keys sorted by UTF-8 bytes "
     "(U+FF61 before U+1F600, although UTF-16 order would put U+1F600 first)", "insert",
     "Sales Dept", "Q1 \"totals\"", ["Weird Col"], [
        ("Weird Col", "integer", "1", "1"),
        ("é", "text", "'e-acute'", "e-acute"),
        ("a\"b", "text", "'quote in name'", "quote in name"),
        ("Z", "text", "'upper case sorts first'", "upper case sorts first"),
        ("\uff61", "text", "'U+FF61'", "U+FF61"),
        ("\U0001F600", "text", "'U+1F600'", "U+1F600"),
    ]),
    ("dates_and_numbers", "date, time, timetz, interval, timestamp, special floats and numerics, "
     "json kept as written, jsonb normalised, uuid, inet, character(n)", "insert",
     "public", "misc", ["id"], [
        ("id", "integer", "7", "7"),
        ("d", "date", "'2024-02-29'", "2024-02-29"),
        ("t", "time without time zone", "'23:59:59.5'", "23:59:59.5"),
        ("tz", "time with time zone", "'08:00:00-03:30'", "08:00:00-03:30"),
        ("iv", "interval", "'P1Y2M3DT4H5M6.5S'", "1 year 2 mons 3 days 04:05:06.5"),
        ("ts", "timestamp without time zone", "'1999-12-31 23:59:59'", "1999-12-31 23:59:59"),
        ("f_nan", "double precision", "'NaN'", "NaN"),
        ("f_neg_inf", "double precision", "'-Infinity'", "-Infinity"),
        ("f_neg_zero", "double precision", "'-0'", "-0"),
        ("f_tiny", "double precision", "'5e-324'", "5e-324"),
        ("f4", "real", "'3.14159274'", "3.1415927"),
        ("n_nan", "numeric", "'NaN'", "NaN"),
        ("n_huge", "numeric", "1e40", "10000000000000000000000000000000000000000"),
        ("j", "json", "'{\"b\": 1,  \"a\": [true]}'", "{\"b\": 1,  \"a\": [true]}"),
        ("jb", "jsonb", "'{\"b\": 1,  \"a\": [true]}'", "{\"a\": [true], \"b\": 1}"),
        ("u", "uuid", "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("ip", "inet", "'192.0.2.1'", "192.0.2.1"),
        ("ch", "character(4)", "'ab'", "ab  "),
        ("ia", "integer[]", "ARRAY[1, NULL, -3]", "{1,NULL,-3}"),
    ]),
]

ENTRY_COLUMN = [("hello", "68656c6c6f")]  # (name, entry bytes in hex)


def build() -> dict:
    vectors = []
    for name, what, op, schema, table, key, columns in INPUTS:
        row = {c: text for c, _, _, text in columns}
        entry = entry_v1(op, f"{schema}.{table}", row)
        vectors.append({
            "name": name,
            "description": what,
            "op": op,
            "schema": schema,
            "table": table,
            "key_columns": key,
            "columns": [{"name": c, "type": t, "sql": s, "text": text} for c, t, s, text in columns],
            "entry": entry.decode("utf-8"),
            "entry_hex": entry.hex(),
            "leaf_hash": leaf_hash_of_entry(entry).hex(),
            "source_key": key_json({k: row[k] for k in key}),
        })
    entry_columns = [
        {"name": n, "entry_hex": h, "leaf_hash": leaf_hash_of_entry(bytes.fromhex(h)).hex()} for n, h in ENTRY_COLUMN
    ]
    return {
        "version": 1,
        "pinned_settings": {"TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres",
                            "extra_float_digits": "1", "bytea_output": "hex", "lc_monetary": "C"},
        "vectors": vectors,
        "entry_column_vectors": entry_columns,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
