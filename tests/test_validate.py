"""Source registration checks (listener.sources.validate) against a real PostgreSQL."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest

from listener.errors import ConfigurationError, SourceTableError
from listener.sources.validate import (
    SourceSpec,
    check_filter,
    check_log_name,
    parse_column_list,
    validate_source,
)
from listener.store.connect import options_string

SCHEMA = """
CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount numeric(10,2),
                     status text NOT NULL, note text, payload bytea, created timestamptz);
CREATE TABLE x (id int);
CREATE SEQUENCE s;
CREATE VIEW orders_view AS SELECT * FROM orders;
CREATE TABLE pairs (a int NOT NULL, b int NOT NULL, c int, UNIQUE (a, b));
CREATE TABLE nullable_key (a int UNIQUE, b int);
CREATE TABLE partial_key (a int NOT NULL, b int);
CREATE UNIQUE INDEX partial_key_a ON partial_key (a) WHERE b > 0;
CREATE TABLE expr_key (a text NOT NULL);
CREATE UNIQUE INDEX expr_key_lower ON expr_key (lower(a));
CREATE TABLE no_key (a int, b int);
CREATE TABLE nnd_key (a int, b int, UNIQUE NULLS NOT DISTINCT (a));
CREATE TABLE dropped (id int PRIMARY KEY, gone int, kept text);
ALTER TABLE dropped DROP COLUMN gone;
CREATE TABLE measurements (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE measurements_2024 PARTITION OF measurements
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE SCHEMA "Sales Ünï";
CREATE TABLE "Sales Ünï"."Order Items" ("Id" int PRIMARY KEY, "naïve col" text, "User" int);
CREATE SCHEMA other;
CREATE TABLE other.orders (ref text PRIMARY KEY, qty int);
"""
# A NOT NULL constraint that is NOT VALID does not keep NULLs out: PostgreSQL 18 and later.
NOT_VALID_NOT_NULL = """
CREATE TABLE not_valid_nn (a int UNIQUE, b int);
ALTER TABLE not_valid_nn ADD CONSTRAINT a_not_null NOT NULL a NOT VALID;
"""


def create_schema(c: psycopg.Connection) -> None:
    c.execute(SCHEMA)
    if c.info.server_version >= 180000:
        c.execute(NOT_VALID_NOT_NULL)


_shared_counter = itertools.count()


@pytest.fixture
def db(conn: psycopg.Connection) -> psycopg.Connection:
    create_schema(conn)
    return conn


@pytest.fixture(scope="module")
def shared_db(pg_server) -> Iterator[psycopg.Connection]:
    """One database for the refusal tests: validation never writes, and each of them checks
    that nothing changed, so they can share it (a database per case would only cost time)."""
    name = f"validate_{os.getpid()}_{next(_shared_counter)}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE merkle_template STRATEGY FILE_COPY")
    try:
        with psycopg.connect(pg_server.dsn(name), autocommit=True, options=options_string()) as c:
            create_schema(c)
            yield c
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def snapshot(conn: psycopg.Connection) -> tuple:
    """Counts a write by validation would change, and the objects hostile input aims at."""
    return conn.execute(
        """SELECT (SELECT count(*) FROM pg_class), (SELECT count(*) FROM pg_trigger),
                  (SELECT count(*) FROM pg_proc), (SELECT count(*) FROM pg_namespace),
                  (SELECT count(*) FROM pg_publication), (SELECT count(*) FROM pg_replication_slots),
                  (SELECT count(*) FROM merkle.sources), (SELECT count(*) FROM merkle.logs),
                  (SELECT count(*) FROM x), (SELECT is_called FROM s),
                  to_regclass('public.x') IS NOT NULL, current_setting('search_path')"""
    ).fetchone()


def assert_refused(conn, exc_type, match, **kwargs):
    before = snapshot(conn)
    with pytest.raises(exc_type, match=match):
        validate_source(conn, **kwargs)
    assert snapshot(conn) == before
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


# --- happy paths -------------------------------------------------------------------------


def test_primary_key_is_the_default_key_and_all_columns_are_hashed(db):
    spec = validate_source(db, "orders")
    assert spec == SourceSpec(
        schema="public",
        table="orders",
        oid=db.execute("SELECT 'public.orders'::regclass::oid").fetchone()[0],
        key_columns=("id",),
        columns=("id", "customer", "amount", "status", "note", "payload", "created"),
        row_filter=None,
        entry_column=None,
    )
    assert spec.qualified == "public.orders"
    assert spec.ident().as_string(db) == '"public"."orders"'


def test_composite_unique_key_in_index_order_and_columns_in_table_order(db):
    spec = validate_source(db, "pairs", key=["b", "a"], columns=["c", "b", "a"])
    assert spec.key_columns == ("a", "b")
    assert spec.columns == ("a", "b", "c")


def test_quoted_mixed_case_and_unicode_identifiers(db):
    spec = validate_source(
        db,
        '"Sales Ünï"."Order Items"',
        key=parse_column_list('"Id"'),
        columns=parse_column_list('"Id", "naïve col"'),
        where='"naïve col" LIKE \'a%\' AND "User" IS NOT NULL',
    )
    assert (spec.schema, spec.table) == ("Sales Ünï", "Order Items")
    assert spec.qualified == "Sales Ünï.Order Items"
    assert spec.key_columns == ("Id",)
    assert spec.columns == ("Id", "naïve col")
    assert spec.ident().as_string(db) == '"Sales Ünï"."Order Items"'
    # The spec's identifier and filter work in a real statement.
    db.execute(psycopg.sql.SQL("SELECT 1 FROM {} WHERE {}").format(spec.ident(), psycopg.sql.SQL(spec.row_filter)))
    # Unquoted, the mixed-case names fold to lower case: the refusal shows how to quote them.
    hint = """unquoted names are read in lower case: write "Id" (in single quotes for the shell: '"Id"')"""
    for option in ("key", "columns"):
        with pytest.raises(SourceTableError) as refused:
            validate_source(db, '"Sales Ünï"."Order Items"', **{option: parse_column_list("Id")})
        assert hint in str(refused.value), refused.value


def test_schema_qualified_name_picks_that_schema(db):
    assert validate_source(db, "other.orders").key_columns == ("ref",)
    assert validate_source(db, "public.orders").key_columns == ("id",)
    assert validate_source(db, "OTHER.Orders").schema == "other"  # unquoted names fold


def test_unqualified_name_follows_search_path(db):
    db.execute("SET search_path TO other, public")
    spec = validate_source(db, "orders")
    assert (spec.schema, spec.columns) == ("other", ("ref", "qty"))
    # pairs is only in public, found further down the path
    assert validate_source(db, "pairs", key=["a", "b"]).schema == "public"
    assert db.execute("SHOW search_path").fetchone()[0] == "other, public"


def test_filter_is_normalized_and_selects_the_same_rows(db):
    db.execute(
        """INSERT INTO orders (id, customer, amount, status) VALUES
           (1, 'ann', 5, 'paid'), (2, 'bob', 50, 'paid'), (3, NULL, 500, 'open'), (4, 'cy', 7, 'void')"""
    )
    where = "amount BETWEEN 1 AND 100 AND (status IN ('paid', 'open') OR customer IS NULL) -- x"
    with pytest.raises(SourceTableError, match="comment"):
        validate_source(db, "orders", where=where)
    where = where.removesuffix(" -- x")
    spec = validate_source(db, "orders", where=where, entry_column="payload")
    assert spec.row_filter == "amount BETWEEN 1 AND 100 AND (status IN ('paid', 'open') OR customer IS NULL)"
    assert spec.entry_column == "payload"
    ids = db.execute(f"SELECT id FROM orders WHERE {spec.row_filter} ORDER BY id").fetchall()
    assert ids == [(1,), (2,)]


def test_whitelisted_filter_forms_type_check(db):
    where = (
        "amount * 2 + 1 > 10.5 AND id % 2 = 0 AND -id < 0 AND status <> 'x' AND status != 'y' "
        "AND customer NOT LIKE 'a%' AND customer ILIKE 'B%' AND note NOT ILIKE '%z' "
        "AND id NOT IN (1, 2) AND id NOT BETWEEN 5 AND 6 AND (note IS NULL) IS NOT FALSE "
        "AND created >= timestamptz '2024-01-01 00:00:00+00' AND amount::integer <= 100 "
        "AND CAST(id AS numeric(20, 0)) / 3 < 100 AND NOT (status = 'void')"
    )
    spec = validate_source(db, "orders", where=where)
    assert "<>" in spec.row_filter and "!=" not in spec.row_filter


def test_nulls_not_distinct_unique_key_may_be_nullable(db):
    assert validate_source(db, "nnd_key", key=["a"]).key_columns == ("a",)


def test_partitioned_table_and_dropped_columns(db):
    assert validate_source(db, "measurements").key_columns == ("id", "at")
    assert validate_source(db, "dropped").columns == ("id", "kept")


def test_validation_leaves_an_open_transaction_as_it_was(dsn):
    with psycopg.connect(dsn) as c:
        create_schema(c)
        c.execute("INSERT INTO x VALUES (1)")
        validate_source(c, "orders", where="id > 0")
        with pytest.raises(SourceTableError):
            validate_source(c, "orders", where="id + 1")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert c.execute("SELECT count(*) FROM x").fetchone()[0] == 1
        assert c.execute("SHOW search_path").fetchone()[0] == '"$user", public'


# --- bad tables ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ("nope", r"table nope does not exist \(looked in search_path"),
        ("other.nope", r"table other.nope does not exist \(looked in schema other"),
        ("Orders_View", "public.orders_view is a view, not a table"),
        ("merkle.logs", "schema merkle, which belongs to merkle-listener"),
        ("pg_class", "schema pg_catalog, which belongs to PostgreSQL"),
        ("s", "public.s is a sequence, not a table"),
        ("orders_pkey", "is an index, not a table"),
        ('"Orders"', 'table "Orders" does not exist'),
        ("orders; DROP TABLE x", "2 SQL statements"),
        ('"a"."b"."c"', "has three parts"),
        ("orders\x00; DROP TABLE x", "NUL character"),
        ("orders AS o", "more than a table name"),
        ("ONLY orders", "more than a table name"),
        ("orders, x", "not a plain table name"),
        ("(SELECT 1) q", "not a plain table name"),
        ("orders WHERE true", "more than a table name"),
        ("", "table name is empty"),
        ("'orders'", "cannot parse table name"),
    ],
)
def test_bad_table_is_refused(shared_db, table, match):
    assert_refused(shared_db, SourceTableError, match, table=table)


def test_temporary_table_is_refused(db):
    db.execute("CREATE TEMP TABLE scratch (id int PRIMARY KEY)")
    assert_refused(db, SourceTableError, "temporary table", table="scratch")


# --- bad keys and columns -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(table="no_key"), r"has no primary key: add one .* or pass --key .*candidates: none"),
        (dict(table="pairs"), r"no primary key.*candidates: unique constraint pairs_a_b_key \(a, b\)"),
        (dict(table="orders", key=["status"]), r"--key status is not the column set .*primary key orders_pkey \(id\)"),
        (dict(table="pairs", key=["a"]), r"--key a is not the column set.*pairs_a_b_key \(a, b\)"),
        (dict(table="nullable_key", key=["a"]), "column a may be NULL"),
        (dict(table="not_valid_nn", key=["a"]), "column a may be NULL"),
        (dict(table="partial_key", key=["a"]), "it is partial"),
        (dict(table="expr_key", key=["a"]), "not the column set"),
        (dict(table="orders", key=["nope"]), r"--key names column nope, which table orders does not have"),
        (dict(table="orders", key=["ID"]), "--key names column ID"),
        (dict(table="orders", key=[]), "--key is empty"),
        (dict(table="orders", key="id"), "must be a list of column names"),
        (dict(table="orders", columns=["id", "nope"]), "--columns names column nope"),
        (dict(table="orders", columns=["customer", "amount"]), "--columns must include every key column; add id"),
        (dict(table="pairs", key=["a", "b"], columns=["a", "c"]), "add b"),
        (dict(table="orders", columns=["id", "id"]), "twice"),
        (dict(table="orders", entry_column="note"), "--entry-column note has type text; the entry column must be bytea"),
        (dict(table="orders", entry_column="nope"), "--entry-column nope does not exist"),
        (dict(table="orders", columns=["id", "x\x00"]), "invalid column name"),
    ],
)
def test_bad_key_or_columns_are_refused(shared_db, kwargs, match):
    if kwargs.get("table") == "not_valid_nn" and shared_db.info.server_version < 180000:
        pytest.skip("NOT NULL ... NOT VALID exists from PostgreSQL 18")
    assert_refused(shared_db, SourceTableError, match, **kwargs)


# --- bad filters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("1=1; DROP TABLE x", "2 SQL statements"),
        ("(SELECT 1)=1", r"a subquery \(\(SELECT 1\)\)"),
        ("EXISTS (SELECT 1 FROM x)", "a subquery"),
        ("id IN (SELECT id FROM x)", "a subquery"),
        ("random() > 0.5", r"a function call \(random\(\)\)"),
        ("nextval('s') > 0", r"a function call \(nextval\('s'\)\)"),
        ("pg_sleep(1) IS NULL", r"a function call \(pg_sleep\(1\)\)"),
        ("now() > created", "a function call"),
        ("created > current_timestamp", "function-like keyword"),
        ("created > timestamptz 'now'", "changes with the time"),
        ("id = $1", r"a parameter \(\$1\)"),
        ("orders.id = 1", "qualified column reference orders.id"),
        ("public.orders.id = 1", "qualified column reference"),
        ("*", r'syntax error at or near "\*"'),
        ("orders.* IS NULL", r"contains \*"),
        ("status ~ 'x'", "the operator ~"),
        ("status SIMILAR TO 'x'", "SIMILAR TO"),
        ("status || 'x' = 'y'", r"the operator \|\|"),
        ("id OPERATOR(pg_catalog.=) 1", "schema-qualified operator"),
        ("id = ANY ('{1,2}')", r"ANY\(\.\.\.\)"),
        ("id IN (1, amount)", "inside an IN list"),
        ("id = 1 /* sneaky */", "a comment"),
        ("id = 1 ORDER BY 1", "SQL beyond a single expression"),
        ("true UNION SELECT 1", "SQL beyond a single expression"),
        ("id = 1 FOR UPDATE", "SQL beyond a single expression"),
        ("id::regclass IS NULL", "cast to regclass"),
        ("id::public.int4 = 1", "cast to public.int4"),
        ("CASE WHEN id > 0 THEN true END", "CASE"),
        ("status COLLATE \"C\" = 'x'", "COLLATE"),
        ("id = 1\x00; DROP TABLE x", "NUL character"),
        ("id = = 1", "not a valid SQL expression"),
        ("", "row filter is empty"),
    ],
)
def test_hostile_filter_is_refused(shared_db, where, match):
    assert_refused(shared_db, SourceTableError, match, table="orders", where=where)


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("amount + 1", r"not a true/false condition \(argument of WHERE must be type boolean, not type numeric\)"),
        ("status", "not a true/false condition"),
        ("status > 1", "does not type-check against orders: operator does not exist: text > integer"),
        ("id = 1/0", "division by zero"),
        ("nope = 1", r"uses column nope, which table orders does not have \(its columns: id, customer"),
        ('"Status" = 1', "uses column Status"),
    ],
)
def test_filter_that_does_not_fit_the_table_is_refused(shared_db, where, match):
    assert_refused(shared_db, SourceTableError, match, table="orders", where=where)


def test_filter_type_check_uses_built_in_operators_only(db):
    # An operator the table's owner defined in public resolves in a normal session, but the
    # filter is checked (and must be evaluated) with search_path pinned to pg_catalog.
    db.execute(
        """CREATE FUNCTION public.text_gt_int(text, integer) RETURNS boolean
               LANGUAGE sql IMMUTABLE AS 'SELECT length($1) > $2';
           CREATE OPERATOR public.> (LEFTARG = text, RIGHTARG = integer, FUNCTION = public.text_gt_int)"""
    )
    db.execute("SELECT 1 FROM orders WHERE status > 1")  # fine outside validation
    assert_refused(db, SourceTableError, "operator does not exist: text > integer", table="orders", where="status > 1")


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("created > 'now'", r"compares date/time column created with 'now'"),
        ("created BETWEEN ' Yesterday' AND 'tomorrow'", "which means the time the filter runs"),
        ("created IN ('today') OR status = 'open'", "give a fixed date or timestamp"),
    ],
)
def test_filter_reading_the_clock_is_refused(shared_db, where, match):
    assert_refused(shared_db, SourceTableError, match, table="orders", where=where)


def test_clock_words_are_plain_text_for_text_columns(db):
    assert validate_source(db, "orders", where="status IN ('today', 'now')").row_filter == (
        "status IN ('today', 'now')"
    )


def test_filter_literals_are_read_under_pinned_settings(db):
    # Under DateStyle DMY this literal is 13 January; the capture path reads it under the
    # pinned ISO, YMD setting, where it is invalid, so validation must refuse it.
    db.execute("SET DateStyle = 'ISO, DMY'")
    db.execute("SELECT 1 FROM orders WHERE created > '13/01/2024'")
    assert_refused(db, SourceTableError, "date/time field value out of range", table="orders",
                   where="created > '13/01/2024'")
    assert db.execute("SHOW DateStyle").fetchone()[0] == "ISO, DMY"


def test_filter_needs_select_privilege(db):
    db.execute("CREATE ROLE validator_nosel")
    db.execute("GRANT USAGE ON SCHEMA merkle TO validator_nosel")
    db.execute("GRANT SELECT ON merkle.sources, merkle.logs, x, s TO validator_nosel")
    db.execute("SET ROLE validator_nosel")
    try:
        assert_refused(db, SourceTableError, "grant this role SELECT", table="orders", where="id > 0")
    finally:
        db.execute("RESET ROLE")
        db.execute("DROP OWNED BY validator_nosel")
        db.execute("DROP ROLE validator_nosel")


# --- pure parsers --------------------------------------------------------------------------


def test_parse_column_list():
    assert parse_column_list('a,b,"Weird Col"') == ["a", "b", "Weird Col"]
    assert parse_column_list(' Id , "Id", "naïve ""q"""') == ["id", "Id", 'naïve "q"']
    assert parse_column_list('"user", data, value') == ["user", "data", "value"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a.b", "qualified name a.b"),
        ("a,,b", "cannot parse column list"),
        ("a; DROP TABLE x", "2 SQL statements"),
        ("a b", "more than column names"),
        ("*", r"contains '\*'"),
        ("a, A", "twice"),
        ("user", "not a column name"),
        ("lower(a)", "not a column name"),
        ("1", "not a column name"),
        ("a FROM x", "more than column names"),
        ("", "empty"),
        ("a\x00", "NUL"),
    ],
)
def test_parse_column_list_refuses(text, match):
    with pytest.raises(SourceTableError, match=match):
        parse_column_list(text)


def test_check_filter_returns_normalized_text_and_columns():
    assert check_filter('A = 1 AND "B" != 2 OR c IS NULL') == ('(a = 1 AND "B" <> 2) OR c IS NULL', {"a", "B", "c"})
    assert check_filter("x::date < '2024-01-01'") == ("CAST(x AS date) < '2024-01-01'", {"x"})
    assert check_filter("flag IS NOT TRUE") == ("flag IS NOT TRUE", {"flag"})


def test_a_refused_filter_names_casts_among_what_is_allowed():
    """The hint left casts out, though they are allowed (and the docs suggest one)."""
    with pytest.raises(SourceTableError, match=r"casts to built-in types \(x::date\)") as refused:
        check_filter("lower(name) = 'x'")
    assert "bare column names" in str(refused.value)
    check_filter("x::date > '2024-01-01'")


def test_check_log_name():
    assert check_log_name("orders_log") == "orders_log"
    assert check_log_name("a" * 63) == "a" * 63
    for bad in ["", "Orders", "1x", "_x", "a-b", "a" * 64, "abc\n", "ab c", "ü"]:
        with pytest.raises(ConfigurationError, match="invalid log name"):
            check_log_name(bad)


# --- generated columns ---------------------------------------------------------------------


def test_generated_columns_are_left_out_by_default_and_may_be_named(db):
    """Left out by default in both modes (pgoutput does not send them; replication mode refuses
    naming one, see tests/test_replication_edges.py); a stored one may be named."""
    db.execute("CREATE TABLE gen (id int PRIMARY KEY, v int, twice int GENERATED ALWAYS AS (v * 2) STORED)")
    db.execute("CREATE TABLE gen_key (k int GENERATED ALWAYS AS (v + 1) STORED PRIMARY KEY, v int)")
    spec = validate_source(db, "gen")
    assert (spec.columns, spec.generated) == (("id", "v"), ())
    spec = validate_source(db, "gen", columns=["id", "twice"])
    assert (spec.columns, spec.generated) == (("id", "twice"), ("twice",))
    spec = validate_source(db, "gen_key")  # the key is hashed, generated or not
    assert (spec.columns, spec.generated) == (("k", "v"), ("k",))


def test_virtual_generated_columns_are_refused(db):
    """PostgreSQL 18: a virtual column's value is computed when read; a trigger's transition
    table holds NULL for it, and pgoutput never sends it."""
    if db.info.server_version < 180000:
        pytest.skip("virtual generated columns are PostgreSQL 18's")
    db.execute("CREATE TABLE genv (id int PRIMARY KEY, v int, twice int GENERATED ALWAYS AS (v * 2) VIRTUAL)")
    assert validate_source(db, "genv").columns == ("id", "v")
    with pytest.raises(SourceTableError, match="uses column twice of genv, a virtual generated column"):
        validate_source(db, "genv", columns=["id", "twice"])
    with pytest.raises(SourceTableError, match="row filter 'twice > 2' uses column twice of genv, a virtual"):
        validate_source(db, "genv", where="twice > 2")


def test_trigger_mode_captures_a_stored_generated_column_named_in_columns(conn, dsn):
    from listener import canonical, registry
    from listener.runner import connect
    from listener.sequencer import Sequencer
    from tests.helpers import check_log

    conn.execute("CREATE TABLE gen (id int PRIMARY KEY, v int, twice int GENERATED ALWAYS AS (v * 2) STORED)")
    registry.create_log(conn, "gen")
    with connect(dsn) as c:
        registry.add_source(c, "gen", "gen", columns=["id", "twice"])
    conn.execute("INSERT INTO gen (id, v) VALUES (1, 21)")
    with connect(dsn) as w:
        assert Sequencer(w, "gen").drain_all() == 1
    rows = check_log(conn, "gen")
    assert bytes(rows[0][4]) == canonical.leaf_hash_of_entry(
        canonical.entry_v1("insert", "public.gen", {"id": "1", "twice": "42"}))
