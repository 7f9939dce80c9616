"""The rewrite guard (sql/015_rewrite_guard.sql): a statement that rewrites a source table may
not change the committed values of its hashed columns, since no leaf would record the change.
ALTER COLUMN ... TYPE <its own type> USING and SET EXPRESSION (PostgreSQL 17+) were let
through by the type check of sql/008. A non-superuser table owner's attempts to get around it
are in tests/test_guard_owner.py."""

from __future__ import annotations

import psycopg
import pytest

from listener import registry
from listener.runner import connect
from listener.sequencer import Sequencer
from listener.store import migrate
from listener.store.connect import options_string
from tests.helpers import check_log


def _refused(conn, statement: str, match: str) -> None:
    with pytest.raises(psycopg.Error, match=match) as exc:
        conn.execute(statement)
    assert exc.value.sqlstate == "ML101", f"{statement!r} failed with {exc.value.sqlstate}: {exc.value}"


def _state(conn, table: str, log: str) -> tuple[list, list]:
    """The table's rows and the log's leaves."""
    rows = conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    leaves = conn.execute("SELECT seq, leaf_hash FROM merkle.processed_log p JOIN merkle.logs l USING (log_id) "
                          "WHERE l.name = %s ORDER BY seq", (log,)).fetchall()
    return rows, leaves


def _needs_set_expression(conn) -> None:
    if conn.info.server_version < 170000:
        pytest.skip("ALTER COLUMN ... SET EXPRESSION is PostgreSQL 17+")


@pytest.fixture
def ledger(conn, dsn):
    """A trigger source hashing id, amount and the stored generated column doubled (of base,
    which PostgreSQL then refuses to retype); memo is not hashed and comes before amount.
    Three rows, logged."""
    conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, memo int, amount numeric(12,2), base int, "
                 "doubled int GENERATED ALWAYS AS (base * 2) STORED)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "ledger", columns=["id", "amount", "doubled"])
    conn.execute("INSERT INTO ledger (id, memo, amount, base) VALUES (1, 10, 1.50, 1), (2, 20, 2.50, 2), "
                 "(3, NULL, NULL, NULL)")
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 3
    return conn


@pytest.fixture
def facts(rconn, dsn):
    """A replication source hashing id and amount (memo is not), logging every event."""
    conn = rconn
    conn.execute("CREATE TABLE facts (id int PRIMARY KEY, memo int, amount numeric(12,2))")
    conn.execute("ALTER TABLE facts REPLICA IDENTITY FULL")
    conn.execute("INSERT INTO facts VALUES (1, 10, 1.50), (2, 20, 2.50)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "facts", mode="replication", columns=["id", "amount"],
                            events=["insert", "update", "delete"], dsn=dsn)
    return conn


@pytest.mark.parametrize("ddl", [
    "ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount + 1",
    "ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING CASE WHEN id = 3 THEN 9 ELSE amount END",
    # A value moved to another row: the set of hashed rows changes.
    "ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING CASE id WHEN 1 THEN 2.50 WHEN 2 THEN 1.50 END",
    # With a column that is not hashed and comes after the hashed ones.
    "ALTER TABLE ledger ADD COLUMN extra float DEFAULT random(), ALTER amount TYPE numeric(12,2) USING -amount",
])
def test_a_trigger_source_refuses_rewriting_committed_hashed_values(ledger, dsn, ddl):
    before = _state(ledger, "ledger", "audit")
    _refused(ledger, ddl, 'ALTER refused on public.ledger: it would rewrite committed values of hashed column '
                          r'\w+ without a leaf \(it feeds merkle-listener log "audit"\)')
    assert _state(ledger, "ledger", "audit") == before
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 0
    assert ledger.execute("SELECT count(*) FROM merkle_guard.rewrite_checks").fetchone()[0] == 0


def test_a_rewrite_that_builds_an_index_anew_is_refused(ledger, dsn):
    """An index on a retyped or recomputed column is created empty, and built after the
    rewrite: no query can read the table before, so the guard cannot compare. Refused, with
    how to get there: without the index, an unchanged result passes."""
    before = _state(ledger, "ledger", "audit")
    for ddl in ("ALTER TABLE ledger ALTER id TYPE int USING id + 100", "ALTER TABLE ledger ALTER id TYPE int USING id + 0"):
        _refused(ledger, ddl, "cannot check that this rewrite of public.ledger keeps the values of hashed column id, "
                              "since the statement builds index public.ledger_pkey anew")
    ledger.execute("CREATE INDEX ledger_amount ON ledger (amount)")
    _refused(ledger, "ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount + 0",
             "(?s)builds index public.ledger_amount anew.*HINT:  To change no hashed value, drop index "
             "public.ledger_amount")
    ledger.execute("ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount")  # no rewrite, index kept
    ledger.execute("DROP INDEX ledger_amount")
    ledger.execute("ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount + 0")
    assert _state(ledger, "ledger", "audit") == before
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 0


def test_rewrites_that_keep_the_hashed_values_are_allowed(ledger, dsn):
    ledger.execute("ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount")
    ledger.execute("ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount + 0")
    ledger.execute("ALTER TABLE ledger ALTER memo TYPE bigint USING memo * 1000")
    ledger.execute("ALTER TABLE ledger ALTER memo TYPE text USING 'memo ' || memo")
    ledger.execute("ALTER TABLE ledger ADD COLUMN noise float DEFAULT random()")
    ledger.execute("ALTER TABLE ledger SET UNLOGGED")
    ledger.execute("ALTER TABLE ledger SET LOGGED")
    # An altered hashed column earlier in the transaction: the rows are read, and match.
    with ledger.transaction():
        ledger.execute("ALTER TABLE ledger ALTER amount SET STATISTICS 200")
        ledger.execute("ALTER TABLE ledger ADD COLUMN more float DEFAULT random()")
    assert ledger.execute("SELECT id, memo, amount, doubled FROM ledger ORDER BY id").fetchall() == [
        (1, "memo 10000", 1.5, 2), (2, "memo 20000", 2.5, 4), (3, None, None, None)]
    assert ledger.execute("SELECT count(*) FROM merkle_guard.rewrite_checks").fetchone()[0] == 0
    ledger.execute("INSERT INTO ledger (id, memo, amount) VALUES (4, 'x', 4)")  # capture goes on
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 1
    check_log(ledger, "audit")


def test_retyping_a_hashed_column_is_still_refused_as_before(ledger):
    before = _state(ledger, "ledger", "audit")
    for ddl in ("ALTER TABLE ledger ALTER amount TYPE numeric(14,4)", "ALTER TABLE ledger ALTER amount TYPE text",
                "ALTER TABLE ledger ALTER id TYPE bigint USING id + 1"):
        _refused(ledger, ddl, "column (amount|id) is hashed by the log and may not be dropped, renamed or retyped")
    _refused(ledger, "ALTER TABLE ledger DROP COLUMN doubled, ADD COLUMN noise float DEFAULT random()",
             "column doubled is hashed")
    assert _state(ledger, "ledger", "audit") == before


def test_set_expression_of_a_hashed_generated_column(ledger, dsn):
    _needs_set_expression(ledger)
    before = _state(ledger, "ledger", "audit")
    _refused(ledger, "ALTER TABLE ledger ALTER doubled SET EXPRESSION AS (base * 3)",
             "it would rewrite committed values of hashed column doubled without a leaf")
    _refused(ledger, "ALTER TABLE ledger ALTER doubled SET EXPRESSION AS (CASE WHEN base = 2 THEN 0 ELSE base * 2 END)",
             "hashed column doubled")
    assert _state(ledger, "ledger", "audit") == before
    ledger.execute("ALTER TABLE ledger ALTER doubled SET EXPRESSION AS (base + base)")  # the same values
    assert _state(ledger, "ledger", "audit") == before
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 0


def test_set_expression_of_a_generated_column_that_is_not_hashed(conn, dsn):
    _needs_set_expression(conn)
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int, g int GENERATED ALWAYS AS (v + 1) STORED)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "t", columns=["id", "v"])
    conn.execute("INSERT INTO t (id, v) VALUES (1, 1)")
    conn.execute("ALTER TABLE t ALTER g SET EXPRESSION AS (v + 2)")
    assert conn.execute("SELECT g FROM t").fetchone()[0] == 3


def test_an_unreadable_rewrite_is_refused_not_read(ledger):
    """The table_rewrite event fires with the catalog already describing the new table: had
    memo (before amount) been retyped by the statement, amount would be read at memo's new
    width. The guard refuses rather than read; the two steps pass in transactions of their own."""
    before = _state(ledger, "ledger", "audit")
    _refused(ledger, "ALTER TABLE ledger ALTER memo TYPE text USING memo::text, "
                     "ALTER amount TYPE numeric(12,2) USING amount + 1",
             "cannot check that this rewrite of public.ledger keeps the hashed values, since this transaction "
             "altered hashed column amount and also column memo")
    _refused(ledger, "ALTER TABLE ledger ALTER memo TYPE text USING memo::text, "
                     "ALTER amount TYPE numeric(12,2) USING amount", "Alter column memo in a transaction of its own")
    assert _state(ledger, "ledger", "audit") == before
    assert ledger.execute("SELECT 1").fetchone() == (1,)  # the server is up
    ledger.execute("ALTER TABLE ledger ALTER memo TYPE text USING memo::text")
    ledger.execute("ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount")


def test_a_replication_source_refuses_rewriting_committed_hashed_values(facts):
    def sent() -> int:
        return facts.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('merkle_audit', NULL, NULL, 'proto_version', "
            "'1', 'publication_names', 'merkle_audit') WHERE get_byte(data, 0) IN (ascii('I'), ascii('U'))").fetchone()[0]

    rows = facts.execute("SELECT * FROM facts ORDER BY id").fetchall()
    _refused(facts, "ALTER TABLE facts ALTER amount TYPE numeric(12,2) USING amount * 10",
             'ALTER refused on public.facts: it would rewrite committed values of hashed column amount without a leaf')
    assert facts.execute("SELECT * FROM facts ORDER BY id").fetchall() == rows
    facts.execute("ALTER TABLE facts ALTER memo TYPE bigint USING memo + 1")  # not hashed
    facts.execute("ALTER TABLE facts ALTER amount TYPE numeric(12,2) USING amount")
    assert sent() == 0
    facts.execute("UPDATE facts SET amount = amount * 10")  # the way to change them: logged
    assert sent() == 2


def test_a_typed_table_retyped_through_its_type_is_refused(conn, dsn):
    """ALTER TYPE ... ALTER ATTRIBUTE ... CASCADE rewrites the typed tables of the type under
    the tag ALTER TYPE, which the retype check of ALTER TABLE never saw."""
    conn.execute("CREATE TYPE pair AS (id int, v int)")
    conn.execute("CREATE TABLE pairs OF pair (PRIMARY KEY (id))")
    conn.execute("INSERT INTO pairs VALUES (1, 1)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "pairs")
    _refused(conn, "ALTER TYPE pair ALTER ATTRIBUTE v TYPE bigint CASCADE",
             "ALTER refused on public.pairs: column v is hashed by the log and may not be dropped, renamed or retyped")
    conn.execute("ALTER TYPE pair ALTER ATTRIBUTE v TYPE int CASCADE")  # the same type
    assert conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = 'pairs'::regclass AND attname = 'v'").fetchone()[0] == "integer"


@pytest.fixture
def partitioned(rconn, dsn):
    """A partitioned replication source hashing id, at and v, with a partition under a
    partitioned one; one row in each leaf."""
    conn = rconn
    conn.execute("CREATE TABLE m (id int, at date, v int, memo int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    conn.execute("CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01') "
                 "PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2026h1 PARTITION OF m_2026 FOR VALUES FROM ('2026-01-01') TO ('2026-07-01')")
    registry.create_log(conn, "parts")
    with connect(dsn) as c:
        registry.add_source(c, "parts", "m", mode="replication", columns=["id", "at", "v"])
    conn.execute("INSERT INTO m VALUES (1, '2025-02-01', 1, 1), (2, '2026-02-01', 2, 2)")
    return conn


def test_a_partitioned_source_refuses_rewriting_committed_hashed_values(partitioned):
    conn = partitioned
    rows = conn.execute("SELECT * FROM m ORDER BY id").fetchall()
    _refused(conn, "ALTER TABLE m ALTER v TYPE int USING v + 1",
             r"ALTER refused on public.m: it would rewrite committed values of hashed column v in partition "
             r"public.m_2025 without a leaf")
    _refused(conn, "ALTER TABLE m ALTER v TYPE int USING CASE WHEN at >= '2026-01-01' THEN 0 ELSE v END",
             "hashed column v in partition public.m_2026h1 without a leaf")
    with pytest.raises(psycopg.errors.InvalidTableDefinition, match="cannot alter inherited column"):
        conn.execute("ALTER TABLE m_2026 ALTER v TYPE int USING v + 1")  # a partition's own: PostgreSQL refuses
    assert conn.execute("SELECT * FROM m ORDER BY id").fetchall() == rows
    conn.execute("ALTER TABLE m ALTER v TYPE int USING v")
    conn.execute("ALTER TABLE m ALTER memo TYPE bigint USING memo * 2")
    conn.execute("ALTER TABLE m ADD COLUMN noise float DEFAULT random()")
    assert conn.execute("SELECT id, at::text, v, memo FROM m ORDER BY id").fetchall() == [
        (1, "2025-02-01", 1, 2), (2, "2026-02-01", 2, 4)]
    assert conn.execute("SELECT count(*) FROM merkle_guard.rewrite_checks").fetchone()[0] == 0


def test_the_upgrade_from_014_installs_the_rewrite_guard(ledger, dsn):
    """A database at 014: the rewrite went through. Applying 015 refuses it."""
    ledger.execute("DROP EVENT TRIGGER merkle_source_rewrite")
    ledger.execute("DROP EVENT TRIGGER merkle_source_rewritten")
    ledger.execute("DROP FUNCTION merkle.check_source_rewrite, merkle.check_source_rewritten, merkle.rewrite_digest")
    ledger.execute("DROP TABLE merkle.rewrite_checks")
    ledger.execute("DELETE FROM merkle.schema_version WHERE version = 15")
    with ledger.transaction(force_rollback=True):
        ledger.execute("ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount + 1")
    with psycopg.connect(dsn, options=options_string()) as c:
        assert [m.version for m in migrate.apply(c)] == [15]
    _refused(ledger, "ALTER TABLE ledger ALTER amount TYPE numeric(12,2) USING amount + 1", "hashed column amount")
    assert ledger.execute("SELECT evtname, evtevent, evttags FROM pg_event_trigger WHERE evtname ~ 'rewrit' "
                          "ORDER BY 1").fetchall() == [
        ("merkle_source_rewrite", "table_rewrite", ["ALTER TABLE", "ALTER TYPE"]),
        ("merkle_source_rewritten", "ddl_command_end", ["ALTER TABLE", "ALTER TYPE"])]


def test_a_repeatable_read_rewrite_cannot_undo_a_logged_change(facts, dsn):
    """Found by review: in REPEATABLE READ the digest before the rewrite read the transaction's
    snapshot, while the rewrite copies the rows as they are now. A logged UPDATE committed after
    the snapshot was undone by a rewrite, without a leaf: both digests saw the old value."""
    facts.execute("UPDATE facts SET amount = 9 WHERE id = 2")  # committed before the snapshot
    owner = psycopg.connect(dsn, options=options_string())
    try:
        owner.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        assert owner.execute("SELECT amount FROM facts WHERE id = 2").fetchone()[0] == 9
        facts.execute("UPDATE facts SET amount = 1000 WHERE id = 2")  # logged (op update)
        with pytest.raises(psycopg.Error, match="isolation level repeatable read") as exc:
            owner.execute("ALTER TABLE facts ALTER amount TYPE numeric(12,2) USING CASE WHEN id = 2 THEN 9 "
                          "ELSE amount END")
        assert exc.value.sqlstate == "ML101"
        owner.rollback()
    finally:
        owner.close()
    assert facts.execute("SELECT amount FROM facts WHERE id = 2").fetchone()[0] == 1000
    # Nothing to miss in an empty table, and READ COMMITTED reads the rows the rewrite copies.
    facts.execute("CREATE TABLE empty_facts (id int PRIMARY KEY, amount numeric(12,2))")
    registry.add_source(facts, "audit", "empty_facts", mode="replication", columns=["id", "amount"], dsn=dsn)
    with psycopg.connect(dsn, options=options_string()) as owner:
        owner.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        owner.execute("SELECT 1").fetchone()
        owner.execute("ALTER TABLE empty_facts ALTER amount TYPE numeric(12,2) USING amount + 1")
    _refused(facts, "ALTER TABLE facts ALTER amount TYPE numeric(12,2) USING CASE WHEN id = 2 THEN 9 ELSE amount END",
             "hashed column amount")


def test_an_invalid_index_left_by_a_failed_concurrent_build_does_not_refuse(facts):
    """Found by review: a failed CREATE INDEX CONCURRENTLY leaves an invalid, empty index,
    which no query reads; it is not an index the rewrite builds anew."""
    facts.execute("INSERT INTO facts VALUES (3, 10, 3.50)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        facts.execute("CREATE UNIQUE INDEX CONCURRENTLY facts_memo ON facts (memo)")
    assert facts.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'facts_memo'::regclass").fetchone() == (
        False,)
    facts.execute("DELETE FROM facts WHERE id = 3")  # the rewrite rebuilds the index: unique now
    facts.execute("ALTER TABLE facts ALTER amount TYPE numeric(12,2) USING amount + 0")
    _refused(facts, "ALTER TABLE facts ALTER amount TYPE numeric(12,2) USING amount + 1", "hashed column amount")
    assert facts.execute("SELECT id, amount FROM facts ORDER BY id").fetchall() == [(1, 1.5), (2, 2.5)]
