"""The DDL guard: ALTER TABLE may not break capture or change what a source's leaves hash."""

from __future__ import annotations

import psycopg
import pytest

from listener import registry
from listener.runner import connect
from listener.sequencer import Sequencer
from listener.sources import replication_setup
from listener.store import migrate
from listener.store.connect import options_string
from tests.helpers import check_log


@pytest.fixture
def source(conn, dsn):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body varchar(4), at timestamptz)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "notes", append_only=True)
    return conn


@pytest.mark.parametrize("ddl, why", [
    ("ALTER TABLE notes RENAME COLUMN body TO text", 'column body is hashed'),
    ("ALTER TABLE notes DROP COLUMN body", 'column body is hashed'),
    ("ALTER TABLE notes ALTER body TYPE varchar(40)", 'column body is hashed'),
    ("ALTER TABLE notes ALTER at TYPE timestamp", 'column at is hashed'),
    ("ALTER TABLE notes RENAME TO memos", "may not be renamed"),
    ("ALTER TABLE notes DISABLE TRIGGER merkle_capture_1", "merkle_capture_1 may not be disabled"),
    ("ALTER TABLE notes DISABLE TRIGGER ALL", "may not be disabled"),
    ("ALTER TABLE notes ENABLE TRIGGER merkle_guard_1", "merkle_guard_1 may not be disabled"),
    ("ALTER TRIGGER merkle_capture_1 ON notes RENAME TO innocent", "may not be altered or renamed"),
])
def test_alter_that_would_break_capture_is_refused(source, ddl, why):
    with pytest.raises(psycopg.Error, match="ALTER refused on public.notes") as exc:
        source.execute(ddl)
    assert exc.value.sqlstate == "ML101" and why in str(exc.value)
    source.execute("INSERT INTO notes VALUES (1, 'abcd', now())")  # capture still works


def test_adding_a_column_is_allowed_and_capture_goes_on(source, dsn):
    source.execute("ALTER TABLE notes ADD COLUMN extra int")
    source.execute("INSERT INTO notes VALUES (1, 'abcd', now(), 7)")
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 1
    check_log(source, "audit")


def test_session_replication_role_does_not_bypass_capture_or_guard(source, dsn):
    source.execute("SET session_replication_role = replica")
    source.execute("INSERT INTO notes VALUES (1, 'x', now())")
    with pytest.raises(psycopg.Error, match="append-only"):
        source.execute("DELETE FROM notes")
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 1


def test_replication_source_guard_allows_harmless_alter_and_refuses_disabling(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE facts (id int PRIMARY KEY, body text)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "facts", mode="replication", append_only=True, dsn=dsn)
    conn.execute("ALTER TABLE facts ADD COLUMN extra int")
    conn.execute("ALTER TABLE facts REPLICA IDENTITY FULL")
    with pytest.raises(psycopg.Error, match="may not be disabled"):
        conn.execute("ALTER TABLE facts DISABLE TRIGGER ALL")
    with pytest.raises(psycopg.Error, match="append-only"):
        conn.execute("TRUNCATE facts")


def test_drop_trigger_is_refused_but_source_remove_works(source, dsn):
    with pytest.raises(psycopg.Error, match="DROP TRIGGER refused") as exc:
        source.execute("DROP TRIGGER merkle_capture_1 ON notes")
    assert exc.value.sqlstate == "ML101"
    with connect(dsn) as c:
        assert registry.remove_source(c, "audit", "notes") == 0
    assert source.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'notes'::regclass").fetchone()[0] == 0


def test_roles_that_cannot_read_merkle_can_still_alter_their_tables(source, dsn):
    source.execute("DROP ROLE IF EXISTS app_owner")
    source.execute("CREATE ROLE app_owner LOGIN")
    source.execute("GRANT CREATE ON SCHEMA public TO app_owner")
    try:
        with psycopg.connect(dsn, user="app_owner", autocommit=True) as app:
            app.execute("CREATE TABLE mine (id int)")
            app.execute("ALTER TABLE mine ADD COLUMN x int")
            app.execute("ALTER TABLE mine RENAME TO ours")
            app.execute("DROP TABLE ours")
    finally:
        source.execute("REVOKE CREATE ON SCHEMA public FROM app_owner")
        source.execute("DROP ROLE app_owner")


def test_replica_identity_must_stay_full_while_updates_are_logged(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
    conn.execute("ALTER TABLE accounts REPLICA IDENTITY FULL")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "accounts", mode="replication", events=["insert", "update", "delete"],
                            dsn=dsn)
    with pytest.raises(psycopg.Error, match="REPLICA IDENTITY must stay FULL"):
        conn.execute("ALTER TABLE accounts REPLICA IDENTITY DEFAULT")


def _recorded(conn, table=None) -> dict[str, str]:
    """merkle.source_columns as {column: type}, for one table's source or for all."""
    return dict(conn.execute(
        "SELECT r.name, format_type(r.type_oid, r.typmod) FROM merkle.source_columns r "
        "JOIN merkle.sources s USING (source_id) WHERE %(t)s::text IS NULL OR s.table_name = %(t)s "
        "ORDER BY s.source_id, r.name", {"t": table}).fetchall())


@pytest.fixture
def ledger(rconn, dsn):
    """A replication source hashing id, amount and code; memo is not hashed."""
    rconn.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric(12,2), code varchar(10), memo text)")
    registry.create_log(rconn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "ledger", mode="replication", columns=["id", "amount", "code"], dsn=dsn)
    return rconn


LEDGER_TYPES = {"id": "integer", "amount": "numeric(12,2)", "code": "character varying(10)"}


@pytest.mark.parametrize("ddl, column", [
    ("ALTER TABLE ledger ALTER amount TYPE numeric(14,4)", "amount"),
    ("ALTER TABLE ledger ALTER amount TYPE text", "amount"),
    ("ALTER TABLE ledger ALTER code TYPE varchar(20)", "code"),
    ("ALTER TABLE ledger ALTER id TYPE bigint", "id"),
])
def test_replication_source_refuses_retyping_a_hashed_column(ledger, ddl, column):
    assert _recorded(ledger) == LEDGER_TYPES
    with pytest.raises(psycopg.Error, match="ALTER refused on public.ledger") as exc:
        ledger.execute(ddl)
    assert exc.value.sqlstate == "ML101" and f"column {column} is hashed" in str(exc.value)
    assert ledger.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                          "WHERE attrelid = 'ledger'::regclass AND attname = %s", (column,)).fetchone()[0] \
        == LEDGER_TYPES[column]


def test_replication_source_allows_new_columns_and_retyping_unhashed_ones(ledger):
    ledger.execute("ALTER TABLE ledger ADD COLUMN extra int")
    ledger.execute("ALTER TABLE ledger ALTER memo TYPE varchar(50)")
    assert _recorded(ledger) == LEDGER_TYPES
    with pytest.raises(psycopg.Error, match="column amount is hashed"):
        ledger.execute("ALTER TABLE ledger ALTER amount TYPE numeric(14,4)")


def test_trigger_source_records_the_outbox_types(conn, dsn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, entry bytea NOT NULL, note varchar(5))")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        source, _ = registry.add_source(c, "audit", "docs", entry_column="entry")
    outbox = dict(conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND attname IN ('id', 'entry', 'note')",
        (f"merkle.outbox_{source.source_id}",)).fetchall())
    assert _recorded(conn, "docs") == outbox == {"id": "integer", "entry": "bytea"}
    conn.execute("ALTER TABLE docs ALTER note TYPE text")  # the leaf is the entry column's bytes
    with pytest.raises(psycopg.Error, match="column id is hashed"):
        conn.execute("ALTER TABLE docs ALTER id TYPE bigint")


def test_migration_records_the_types_of_sources_registered_before_it(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric(12,2), code varchar(10), memo text)")
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body varchar(4))")
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, entry bytea NOT NULL, note text)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "ledger", mode="replication", columns=["id", "amount", "code"], dsn=dsn)
        registry.add_source(c, "audit", "notes")
        registry.add_source(c, "audit", "docs", mode="replication", entry_column="entry", dsn=dsn)
    as_registered = _recorded(conn)
    # Back to a database at 007: no recorded types (008's guard function stays, 008 replaces
    # it again). The migrate API applies every known migration, so 008 is unapplied by hand.
    conn.execute("DROP TABLE merkle.source_columns")
    conn.execute("DELETE FROM merkle.schema_version WHERE version = 8")
    # A trigger source's record comes from its outbox, the types as registered: a retype made
    # while no guard was installed is not taken for the registered type.
    conn.execute("ALTER EVENT TRIGGER merkle_source_ddl DISABLE")
    conn.execute("ALTER TABLE notes ALTER body TYPE varchar(40)")
    conn.execute("ALTER EVENT TRIGGER merkle_source_ddl ENABLE")
    with psycopg.connect(dsn, options=options_string()) as c:
        assert [m.version for m in migrate.apply(c)] == [8]
        migrate.check_version(c)
    assert _recorded(conn) == as_registered
    assert _recorded(conn, "docs") == {"id": "integer", "entry": "bytea"}
    with pytest.raises(psycopg.Error, match="column amount is hashed") as exc:
        conn.execute("ALTER TABLE ledger ALTER amount TYPE numeric(14,4)")
    assert exc.value.sqlstate == "ML101"
    with pytest.raises(psycopg.Error, match="column body is hashed"):
        conn.execute("ALTER TABLE notes ADD COLUMN extra int")


def test_removed_sources_leave_no_recorded_types(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("CREATE TABLE facts (id int PRIMARY KEY, body text)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "notes")
        registry.add_source(c, "audit", "facts", mode="replication", dsn=dsn)
        assert conn.execute("SELECT count(*) FROM merkle.source_columns").fetchone()[0] == 4
        assert registry.remove_source(c, "audit", "notes") == 0
        assert _recorded(conn) == {"id": "integer", "body": "text"} == _recorded(conn, "facts")
        replication_setup.drop_log(c, "audit", dsn=dsn)
    assert conn.execute("SELECT count(*) FROM merkle.source_columns").fetchone()[0] == 0


# --- the partitions of a partitioned replication source (sql/011) -------------------------


def _guards(conn) -> list[tuple[str, str, str]]:
    return conn.execute(
        "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger "
        "WHERE tgname ~ '^merkle_(partition|truncate_begin|truncate_end)_' ORDER BY 1, 2").fetchall()


@pytest.fixture
def partitioned(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    registry.create_log(conn, "parts")
    with connect(dsn) as c:
        source, _ = registry.add_source(c, "parts", "m", mode="replication")
    return conn, source.source_id


def _refused(conn, statement: str, sqlstate: str, match: str) -> None:
    with pytest.raises(psycopg.Error, match=match) as exc:
        conn.execute(statement)
    assert exc.value.sqlstate == sqlstate


def test_partitions_created_or_attached_later_are_guarded_too(partitioned):
    conn, sid = partitioned
    conn.execute("CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    conn.execute("CREATE TABLE m_2027 PARTITION OF m FOR VALUES FROM ('2027-01-01') TO ('2028-01-01') "
                 "PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2027a PARTITION OF m_2027 FOR VALUES FROM ('2027-01-01') TO ('2027-07-01')")
    conn.execute("CREATE TABLE m_2023 (id int NOT NULL, at date NOT NULL, v int)")
    conn.execute("ALTER TABLE m ATTACH PARTITION m_2023 FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')")
    assert _guards(conn) == [("m", f"merkle_truncate_begin_{sid}", "A"), ("m", f"merkle_truncate_end_{sid}", "A")] + [
        (t, f"merkle_partition_{sid}", "A") for t in ("m_2023", "m_2025", "m_2026", "m_2027", "m_2027a")]
    for t in ("m_2023", "m_2025", "m_2026", "m_2027", "m_2027a"):
        _refused(conn, f"TRUNCATE {t}", "ML100", f"TRUNCATE of public.{t} is refused: it is a partition of public.m")
    # The TRUNCATE of the source marks only its own statement.
    with pytest.raises(psycopg.Error, match="TRUNCATE of public.m_2025 is refused"):
        with conn.transaction():
            conn.execute("TRUNCATE m")
            conn.execute("TRUNCATE m_2025")
    # Updates and deletes of a partition are the source's, streamed as such: allowed.
    conn.execute("INSERT INTO m VALUES (1, '2025-03-01', 1)")
    conn.execute("DELETE FROM m_2025")


@pytest.mark.parametrize("ddl, sqlstate, why", [
    ("ALTER TABLE m_2025 DISABLE TRIGGER ALL", "ML101", "may not be disabled"),
    ("ALTER TABLE m DISABLE TRIGGER ALL", "ML101", "may not be disabled"),
    ("ALTER TABLE m_2025 ENABLE TRIGGER merkle_partition_1", "ML101", "may not be disabled"),
    ("ALTER TRIGGER merkle_partition_1 ON m_2025 RENAME TO innocent", "ML101", "may not be altered or renamed"),
    ("DROP TRIGGER merkle_partition_1 ON m_2025", "ML101", "is a merkle-listener trigger"),
    ("DROP TRIGGER merkle_truncate_begin_1 ON m", "ML101", "is a merkle-listener trigger"),
])
def test_the_partition_guards_may_not_be_disabled_renamed_or_dropped(partitioned, ddl, sqlstate, why):
    conn, sid = partitioned
    assert sid == 1
    _refused(conn, ddl, sqlstate, why)
    _refused(conn, "TRUNCATE m_2025", "ML100", "is refused")


def test_a_partition_leaves_its_source_only_empty_and_source_remove_takes_every_guard(partitioned, dsn):
    """DETACH PARTITION or DROP TABLE of a partition would take its rows out of the source
    without a leaf: refused while it holds rows; an empty one is let go, its guard dropped."""
    conn, sid = partitioned
    conn.execute("CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    conn.execute("INSERT INTO m VALUES (1, '2026-02-01', 1)")
    _refused(conn, "ALTER TABLE m DETACH PARTITION m_2026", "ML101",
             'DETACH PARTITION of public.m_2026 refused: it holds rows of public.m, which feeds merkle-listener log "parts"')
    _refused(conn, "DROP TABLE m_2026", "ML101", "DROP of partition public.m_2026 refused: it is a partition of public.m")
    conn.execute("CREATE SCHEMA old")
    conn.execute("CREATE TABLE old.m_2020 PARTITION OF m FOR VALUES FROM ('2020-01-01') TO ('2021-01-01')")
    _refused(conn, "DROP SCHEMA old CASCADE", "ML101", "DROP of partition old.m_2020 refused")
    assert conn.execute("SELECT count(*) FROM m").fetchone()[0] == 1
    conn.execute("DELETE FROM m_2026")
    conn.execute("ALTER TABLE m DETACH PARTITION m_2026")
    assert ("m_2026", f"merkle_partition_{sid}", "A") not in _guards(conn)
    conn.execute("INSERT INTO m_2026 VALUES (2, '2026-03-01', 1)")  # a table of its own now
    conn.execute("TRUNCATE m_2026")
    conn.execute("DROP TABLE m_2026")
    conn.execute("ALTER TABLE m DETACH PARTITION old.m_2020")
    conn.execute("DROP SCHEMA old CASCADE")
    with connect(dsn) as c:
        assert replication_setup.remove_source(c, "parts", "m", wait=0) in (0, -1)
    assert _guards(conn) == []
    conn.execute("TRUNCATE m_2025")


def test_migration_drops_the_guards_an_earlier_version_left_on_detached_partitions(partitioned, dsn):
    """Before 014 a partition holding rows could be detached, its guard left on it, inert; the
    DETACH check would take it for one detached now and refuse every later ALTER of the source."""
    conn, sid = partitioned
    conn.execute("CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    conn.execute("INSERT INTO m VALUES (1, '2026-02-01', 1)")
    # Back to a database at 013, with what it allowed. Its guard functions stay 014's, so the
    # event triggers are off until 014 is applied again.
    conn.execute("ALTER EVENT TRIGGER merkle_source_partitions DISABLE")
    conn.execute("ALTER EVENT TRIGGER merkle_partition_guard_drop DISABLE")
    conn.execute("ALTER TABLE m DETACH PARTITION m_2026")
    conn.execute("DROP EVENT TRIGGER merkle_detach_concurrently")
    conn.execute("DROP EVENT TRIGGER merkle_source_column_drop")
    conn.execute("DROP FUNCTION merkle.mark_own_ddl, merkle.unmark_own_ddl, merkle.own_ddl_running, merkle.has_rows, "
                 "merkle.check_detach_concurrently, merkle.check_source_column_drop")
    conn.execute("DROP TABLE merkle.own_ddl")
    conn.execute("DELETE FROM merkle.schema_version WHERE version = 14")
    with psycopg.connect(dsn, options=options_string()) as c:
        assert [m.version for m in migrate.apply(c)] == [14]
    conn.execute("ALTER EVENT TRIGGER merkle_source_partitions ENABLE")
    assert ("m_2026", f"merkle_partition_{sid}", "A") not in _guards(conn)
    conn.execute("CREATE TABLE m_2027 PARTITION OF m FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
    assert ("m_2027", f"merkle_partition_{sid}", "A") in _guards(conn)


def test_a_table_holding_rows_may_not_join_a_source_as_a_partition(partitioned):
    conn, sid = partitioned
    conn.execute("CREATE TABLE m_2023 (id int NOT NULL, at date NOT NULL, v int)")
    conn.execute("INSERT INTO m_2023 VALUES (1, '2023-05-01', 1)")
    _refused(conn, "ALTER TABLE m ATTACH PARTITION m_2023 FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')",
             "ML101", "ATTACH PARTITION of public.m_2023 refused: it holds rows, which would join public.m")
    conn.execute("CREATE TABLE m_2024 (id int NOT NULL, at date NOT NULL, v int) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2024a PARTITION OF m_2024 FOR VALUES FROM ('2024-01-01') TO ('2024-07-01')")
    conn.execute("INSERT INTO m_2024 VALUES (1, '2024-05-01', 1)")
    _refused(conn, "ALTER TABLE m ATTACH PARTITION m_2024 FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
             "ML101", "ATTACH PARTITION of public.m_2024a refused")
    conn.execute("DELETE FROM m_2023")
    conn.execute("ALTER TABLE m ATTACH PARTITION m_2023 FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')")
    conn.execute("INSERT INTO m VALUES (1, '2023-05-01', 1)")  # through the source: streamed
    assert ("m_2023", f"merkle_partition_{sid}", "A") in _guards(conn)


def test_dropping_a_partitioned_source_with_its_partitions_is_not_a_partition_drop(partitioned):
    conn, _ = partitioned
    conn.execute("INSERT INTO m VALUES (1, '2025-02-01', 1)")
    conn.execute("DROP TABLE m")
    assert _guards(conn) == []


def test_the_guards_own_marks_cannot_be_set_by_a_table_owner(rconn, dsn):
    """merkle-listener marks its own trigger changes in merkle.own_ddl, which only the owner of
    schema merkle writes: a table's owner cannot pass for it, by a setting or by the function
    (sql/014; earlier versions used session settings any role could set)."""
    conn = rconn
    conn.execute("DROP ROLE IF EXISTS table_owner")
    conn.execute("CREATE ROLE table_owner LOGIN")
    try:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("CREATE TABLE m (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
        conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
        for table in ("notes", "m", "m_2025"):
            conn.execute(f"ALTER TABLE {table} OWNER TO table_owner")
        conn.execute("GRANT USAGE ON SCHEMA merkle TO table_owner")  # as a reader of proofs would have
        registry.create_log(conn, "g")
        with connect(dsn) as c:
            notes, _ = registry.add_source(c, "g", "notes")
            m, _ = registry.add_source(c, "g", "m", mode="replication")
        conn.execute("INSERT INTO m VALUES (1, '2025-02-01')")
        with psycopg.connect(dsn, user="table_owner", autocommit=True) as owner:
            owner.execute("SET merkle.dropping_triggers = on")
            _refused(owner, f"DROP TRIGGER merkle_capture_{notes.source_id} ON notes", "ML101",
                     "is a merkle-listener trigger")
            _refused(owner, f"DROP TRIGGER merkle_partition_{m.source_id} ON m_2025", "ML101",
                     "is a merkle-listener trigger")
            owner.execute(f"SET merkle.truncating_sources = ',{m.source_id},'")
            _refused(owner, "TRUNCATE m_2025", "ML100", "TRUNCATE of public.m_2025 is refused")
            owner.execute("SET merkle.installing_partition_guards = on")
            _refused(owner, "ALTER TABLE m_2025 DISABLE TRIGGER ALL", "ML101", "may not be disabled")
            _refused(owner, "SELECT merkle.mark_own_ddl('drop_triggers')", "42501", "permission denied")
            _refused(owner, "SELECT merkle_guard.mark_own_ddl('drop_triggers')", "42501", "permission denied")
            owner.execute("INSERT INTO notes VALUES (1, 'still captured')")
        assert conn.execute(f"SELECT count(*) FROM merkle.outbox_{notes.source_id}").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM m").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM merkle.own_ddl").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM merkle_guard.own_ddl").fetchone()[0] == 0
    finally:
        conn.execute("DROP TABLE IF EXISTS notes, m")
        conn.execute("REVOKE USAGE ON SCHEMA merkle FROM table_owner")
        conn.execute("DROP ROLE table_owner")


def test_an_append_only_partitioned_source_refuses_changes_through_its_partitions(rconn, dsn):
    conn = rconn
    conn.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    conn.execute("INSERT INTO m VALUES (1, '2025-03-01', 1)")
    registry.create_log(conn, "ao")
    with connect(dsn) as c:
        registry.add_source(c, "ao", "m", mode="replication", append_only=True)
    for statement in ("UPDATE m_2025 SET v = 2", "DELETE FROM m_2025", "TRUNCATE m_2025",
                      "UPDATE m SET v = 2", "DELETE FROM m", "TRUNCATE m"):
        _refused(conn, statement, "ML100", "append-only")
    conn.execute("INSERT INTO m_2025 VALUES (2, '2025-04-01', 1)")


def test_attaching_a_source_under_a_source_of_the_same_log_is_refused(partitioned, dsn):
    """ATTACH PARTITION would make the publication send the attached source's changes as the
    parent's only; the DDL guard refuses it (`source add` refuses the same tree)."""
    conn, _ = partitioned
    conn.execute("CREATE TABLE m_2026 (id int NOT NULL, at date NOT NULL, v int, PRIMARY KEY (id, at))")
    conn.execute("CREATE TABLE m_2027 (id int NOT NULL, at date NOT NULL, v int, PRIMARY KEY (id, at))")
    registry.create_log(conn, "elsewhere")
    with connect(dsn) as c:
        registry.add_source(c, "parts", "m_2026", mode="replication")
        registry.add_source(c, "elsewhere", "m_2027", mode="replication")
    _refused(conn, "ALTER TABLE m ATTACH PARTITION m_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
             "ML101", "public.m_2026, a replication source of the same log, would be a partition of it")
    conn.execute("ALTER TABLE m ATTACH PARTITION m_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
