"""Cost of the canonical entry expression per captured row, variant by variant.

Builds a 100k-row table of common types, then times SELECT sum(length(leaf hash)) over it for
each value-expression variant, and prints each as a ratio to reading the row as text
(r::text) in the same run. A benchmark command, not a test.

    /work/venv/bin/python scripts/bench_canonical_sql.py [DSN]   (default: a throwaway embedded cluster)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from listener import canonical_sql  # noqa: E402
from listener.store.connect import options_string  # noqa: E402

ROWS = 100_000
COLUMNS = ["arr", "b", "f", "h", "id", "j", "n", "t", "ts"]


def naive_cast(v: sql.Composable, _oid: int | None) -> sql.Composable:
    """The x::text form: WRONG for boolean, inet, cidr, character(n), "char"; for comparison."""
    return sql.SQL("coalesce(to_json({}::text)::text, 'null')").format(v)


def chain(value) -> sql.Composable:
    parts = []
    for i, c in enumerate(COLUMNS):
        parts.append(sql.Literal(('{"op":"insert","row":{' if i == 0 else ",") + f'"{c}":'))
        parts.append(value(sql.SQL("(r).{}").format(sql.Identifier(c)), c))
    parts.append(sql.Literal('},"source":"public.bench","v":1}'))
    return sql.SQL(" || ").join(parts)


def run(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS bench")
    conn.execute(f"""CREATE TABLE bench AS SELECT g::bigint AS id, now() + g * interval '1 min' AS ts,
        'name ' || g || CASE WHEN g % 7 = 0 THEN E'"q\\n' ELSE '' END AS t, (g * 1.25)::numeric AS n,
        g % 2 = 0 AS b, g / 3.0::float8 AS f, jsonb_build_object('k', g) AS j, ARRAY[g, g + 1] AS arr,
        CASE WHEN g % 5 = 0 THEN NULL ELSE md5(g::text) END AS h FROM generate_series(1, {ROWS}) AS g""")
    conn.execute("VACUUM ANALYZE bench")
    oids = dict(conn.execute("SELECT attname, atttypid::int FROM pg_attribute "
                             "WHERE attrelid = 'bench'::regclass AND attnum > 0").fetchall())
    variants = {
        "r::text (baseline, not canonical)": sql.SQL("r::text"),
        "x::text everywhere (incorrect)": chain(lambda v, c: naive_cast(v, None)),
        "generic (entry_sql, no types)": canonical_sql.entry_sql("r", "public.bench", COLUMNS, "insert"),
        "typed (entry_sql with type OIDs)": canonical_sql.entry_sql("r", "public.bench", COLUMNS, "insert", oids),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        for name, expr in variants.items():
            q = sql.SQL("SELECT sum(length({})) FROM bench AS r").format(canonical_sql.leaf_hash_sql(expr))
            t0 = time.perf_counter()
            conn.execute(q).fetchone()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["r::text (baseline, not canonical)"])
    print(f"{ROWS} rows, median of 3; ratio = time / time of r::text")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:36s} {m:7.3f}s  {m / base:5.2f}x  ({m / ROWS * 1e6:.2f} µs/row)")


def main() -> None:
    if len(sys.argv) > 1:
        with psycopg.connect(sys.argv[1], autocommit=True, options=options_string()) as conn:
            run(conn)
        return
    from listener.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="ml-bench-")), settings={"fsync": "off"})
    server.start(owned=True)
    try:
        with psycopg.connect(server.dsn(), autocommit=True, options=options_string()) as conn:
            run(conn)
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
