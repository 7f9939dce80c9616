"""The SQL encoding equals the Python encoding, byte for byte, over awkward values.

Rows are written by sessions whose TimeZone, DateStyle, IntervalStyle, extra_float_digits and
bytea_output all differ from the pinned ones; they are read back on the pinned `conn`. Three
builders must agree: canonical_sql.entry_sql over the stored row (generic and typed forms),
canonical.entry_v1 over the values' text output as the server sends it (what pgoutput sends),
and the SQL function merkle.canonical_entry_v1 over those texts.
"""

from __future__ import annotations

import json
import string
from datetime import timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Json, Jsonb

from listener import canonical, canonical_sql
from listener.errors import ProcessingError

SCHEMA, TABLE = "Odd Schema", 'T "1"'
SOURCE = f"{SCHEMA}.{TABLE}"
# (name, type): names that need quoting and that sort differently by bytes and by UTF-16.
COLUMNS = [
    ("id", "bigint"), ("Weird Col", "text"), ("é", "varchar"), ('a"b', "text"), ("UPPER", "boolean"),
    ("\uff61", "timestamptz"), ("\U0001F600", "timestamp"), ("d", "date"), ("t", "time"),
    ("tz", "timetz"), ("n", "numeric"), ("f8", "float8"), ("f4", "float4"), ("i2", "int2"),
    ("i4", "int4"), ("by", "bytea"), ("j", "json"), ("jb", "jsonb"), ("u", "uuid"),
    ("iv", "interval"), ("ia", "int[]"), ("ta", "text[]"), ("ip", "inet"), ("ch", "char(5)"),
    ("flag", "flag"), ("pr", "pair"),
]
NAMES = [c for c, _ in COLUMNS]
KEY = ["id", "Weird Col"]
WRITERS = [
    "-c timezone=America/St_Johns -c datestyle=SQL,DMY -c intervalstyle=iso_8601 -c extra_float_digits=0 -c bytea_output=escape",
    "-c timezone=Asia/Kolkata -c datestyle=German -c intervalstyle=sql_standard -c extra_float_digits=3",
    "-c timezone=Pacific/Chatham -c datestyle=Postgres,MDY -c intervalstyle=postgres_verbose -c extra_float_digits=-15",
]

texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
awkward = st.one_of(texts, st.sampled_from(["", '"', "\\", "\x01\x1f\x7f", "\u2028", "\U0001F600", "NULL", "é"]))
zones = st.sampled_from([timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-3, minutes=-30))])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
numerics = st.one_of(
    st.decimals(min_value=-10**30, max_value=10**30, allow_nan=False),
    st.sampled_from([Decimal("NaN"), Decimal("1e300"), Decimal("-1e-300"), Decimal("0.000"), Decimal("-0")]),
)


def nullable(s):
    return st.one_of(st.none(), s)


ROWS = st.fixed_dictionaries({
    "Weird Col": awkward,  # part of the key
    "é": nullable(awkward),
    'a"b': nullable(awkward),
    "UPPER": nullable(st.booleans()),
    "\uff61": nullable(st.datetimes(timezones=zones)),
    "\U0001F600": nullable(st.datetimes()),
    "d": nullable(st.dates()),
    "t": nullable(st.times()),
    "tz": nullable(st.times(timezones=zones)),
    "n": nullable(numerics),
    "f8": nullable(st.floats()),
    "f4": nullable(st.floats(width=32)),
    "i2": nullable(st.integers(-(2**15), 2**15 - 1)),
    "i4": nullable(st.integers(-(2**31), 2**31 - 1)),
    "by": nullable(st.binary(max_size=12)),
    "j": nullable(st.tuples(json_values, st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :  ")]))),
    "jb": nullable(json_values),
    "u": nullable(st.uuids()),
    "iv": nullable(st.timedeltas(min_value=timedelta(days=-10**5), max_value=timedelta(days=10**5))),
    "ia": nullable(st.lists(nullable(st.integers(-(2**31), 2**31 - 1)), min_size=1, max_size=4)),
    "ta": nullable(st.lists(nullable(awkward), min_size=1, max_size=4)),
    "ip": nullable(st.ip_addresses()),
    "ch": nullable(st.text(string.ascii_letters + ' "\\é', max_size=5)),
    "flag": nullable(st.booleans()),
    "pr": nullable(st.tuples(nullable(st.integers(-5, 5)), nullable(st.integers(-5, 5)))),
})


@pytest.fixture
def source_table(conn):
    conn.execute("CREATE DOMAIN flag AS boolean")
    conn.execute("CREATE TYPE pair AS (a int, b int)")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(
        sql.Identifier(SCHEMA, TABLE),
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in COLUMNS),
    ))
    oids = dict(conn.execute(
        "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0",
        (sql.Identifier(SCHEMA, TABLE).as_string(conn),),
    ).fetchall())
    return oids


def _param(name, value):
    if value is None:
        return None
    if name == "j":
        obj, (comma, colon) = value
        return Json(obj, dumps=lambda o: json.dumps(o, separators=(comma, colon), ensure_ascii=False))
    if name == "jb":
        return Jsonb(value)
    if name == "pr":
        return sql.SQL("ROW({}, {})::pair").format(sql.Literal(value[0]), sql.Literal(value[1]))
    return value


def _insert(dsn, options, row_id, row):
    with psycopg.connect(dsn, autocommit=True, options=options) as w:
        values = [sql.Literal(row_id)]
        params = []
        for name in NAMES[1:]:
            p = _param(name, row[name])
            if isinstance(p, sql.Composable):
                values.append(p)
            else:
                values.append(sql.Placeholder())
                params.append(p)
        w.execute(sql.SQL("INSERT INTO {} VALUES ({})").format(
            sql.Identifier(SCHEMA, TABLE), sql.SQL(", ").join(values)), params)


def _output_texts(conn, row_id):
    """The values as the server's output functions render them (text protocol, raw)."""
    cur = conn.execute(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
        sql.SQL(", ").join(map(sql.Identifier, NAMES)), sql.Identifier(SCHEMA, TABLE)), (row_id,))
    raw = [cur.pgresult.get_value(0, i) for i in range(len(NAMES))]
    return {n: None if v is None else v.decode("utf-8") for n, v in zip(NAMES, raw)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(row=ROWS, writer=st.sampled_from(WRITERS), op=st.sampled_from(sorted(canonical.OPS)), data=st.data())
def test_sql_entry_equals_python_entry(dsn, conn, source_table, row, writer, op, data):
    row_id = data.draw(st.integers(1, 2**62), label="id")
    # Hypothesis reuses the function-scoped table across examples: start each one empty so that
    # neither what is drawn nor what is checked depends on earlier examples (replay must match).
    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(SCHEMA, TABLE)))
    _insert(dsn, writer, row_id, row)
    texts = _output_texts(conn, row_id)
    want = canonical.entry_v1(op, SOURCE, texts)
    want_key = canonical.key_json({k: texts[k] for k in KEY})
    table = sql.Identifier(SCHEMA, TABLE)
    for types in (None, source_table):
        entry, key, leaf = conn.execute(sql.SQL("SELECT e, {}, {} FROM {} AS r, LATERAL (SELECT {} AS e) AS x WHERE id = %s").format(
            canonical_sql.key_sql("r", KEY, types),
            canonical_sql.leaf_hash_sql(sql.Identifier("e")),
            table,
            canonical_sql.entry_sql("r", SOURCE, NAMES, op, types),
        ), (row_id,)).fetchone()
        assert entry.encode("utf-8") == want
        assert key == want_key
        assert leaf == canonical.leaf_hash_of_entry(want)
    shuffled = data.draw(st.permutations(NAMES), label="column order")
    fn_entry, fn_key = conn.execute(
        "SELECT merkle.canonical_entry_v1(%s, %s, %s, %s), merkle.canonical_key(%s, %s)",
        (op, SOURCE, shuffled, [texts[n] for n in shuffled], KEY[::-1], [texts[k] for k in KEY[::-1]]),
    ).fetchone()
    assert fn_entry.encode("utf-8") == want
    assert fn_key == want_key


def test_op_as_sql_expression_and_no_columns(conn):
    conn.execute("CREATE TABLE t (x int)")
    conn.execute("INSERT INTO t VALUES (1)")
    expr = canonical_sql.entry_sql("r", "public.t", [], sql.SQL("lower(%s)"))
    got = conn.execute(sql.SQL("SELECT {} FROM t AS r").format(expr), ("DELETE",)).fetchone()[0]
    assert got.encode() == canonical.entry_v1("delete", "public.t", {})


def test_text_cast_pitfalls_are_avoided(conn):
    # x::text differs from the output function for these types; pgoutput sends the latter.
    conn.execute("CREATE TYPE pair AS (a int, b int)")
    conn.execute('CREATE TABLE p (b boolean, i inet, c char(3), q "char", pr pair)')
    conn.execute("INSERT INTO p VALUES (true, '10.0.0.1', 'x', 'y', ROW(NULL, NULL))")
    names = ["b", "i", "c", "q", "pr"]
    got = conn.execute(sql.SQL("SELECT {} FROM p AS r").format(canonical_sql.entry_sql("r", "public.p", names, "insert"))).fetchone()[0]
    assert got.encode() == canonical.entry_v1(
        "insert", "public.p", {"b": "t", "i": "10.0.0.1", "c": "x  ", "q": "y", "pr": "(,)"}
    )


@pytest.mark.parametrize(
    "call, match",
    [
        ("SELECT merkle.canonical_entry_v1('INSERT', 's.t', '{a}', '{x}')", "op 'INSERT' is not one of"),
        ("SELECT merkle.canonical_entry_v1('insert', '', '{a}', '{x}')", "source must be"),
        ("SELECT merkle.canonical_key('{a,b}', '{x}')", "same length"),
        ("SELECT merkle.canonical_key('{a,NULL}', '{x,y}')", "NULL or empty"),
        ("SELECT merkle.canonical_key('{a,a}', '{x,y}')", "duplicate column names"),
    ],
)
def test_sql_functions_refuse_bad_input(conn, call, match):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=match):
        conn.execute(call)


def test_sql_builders_refuse_bad_input():
    with pytest.raises(ProcessingError, match="op 'merge'"):
        canonical_sql.entry_sql("r", "s.t", ["a"], "merge")
    with pytest.raises(ProcessingError, match="distinct non-empty"):
        canonical_sql.entry_sql("r", "s.t", ["a", "a"], "insert")
    with pytest.raises(ProcessingError, match="not one string"):
        canonical_sql.key_sql("r", "id")
    with pytest.raises(ProcessingError, match="source must be"):
        canonical_sql.entry_sql("r", "", ["a"], "insert")
