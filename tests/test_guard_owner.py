"""What a role that owns the source tables, and is no superuser, can do against the DDL guard.

The role owns the source tables (and its own objects in schema public), has USAGE on schema
merkle (as a reader of proofs would), and nothing else there; the sources are registered by
the superuser that ran `init`. Each test tries one way to make rows enter, change in or leave a
source without a leaf, or to run the role's code as that superuser, and asserts it fails
(sql/014_guard_hardening.sql). What the guard cannot stop is listed in docs/design.md.
"""

from __future__ import annotations

import psycopg
import pytest

from listener import registry
from listener.errors import SourceTableError
from listener.runner import connect
from listener.sequencer import Sequencer
from listener.store import migrate

ROLE = "table_owner_app"


@pytest.fixture
def app(rconn, dsn):
    """(admin connection, a function opening an autocommit connection as the table owner)."""
    conn = rconn
    conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
    conn.execute(f"CREATE ROLE {ROLE} LOGIN")
    conn.execute(f"GRANT CREATE ON SCHEMA public TO {ROLE}")
    conn.execute(f"GRANT USAGE ON SCHEMA merkle TO {ROLE}")
    opened = []

    def as_owner(autocommit: bool = True) -> psycopg.Connection:
        c = psycopg.connect(dsn, user=ROLE, autocommit=autocommit)
        opened.append(c)
        return c

    try:
        yield conn, as_owner
    finally:
        for c in opened:
            c.close()
        conn.execute(f"ALTER ROLE {ROLE} NOSUPERUSER")
        conn.execute(f"REASSIGN OWNED BY {ROLE} TO CURRENT_USER")
        conn.execute(f"DROP OWNED BY {ROLE}")
        conn.execute(f"DROP ROLE {ROLE}")


def _own(conn, *tables: str) -> None:
    for t in tables:
        conn.execute(f"ALTER TABLE {t} OWNER TO {ROLE}")


def _owned_source(conn, dsn, table: str, **options):
    """Table `table` (id, body), owned by the role, registered as a source of log "audit"."""
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
    _own(conn, table)
    # By hand, as on a schema of an earlier version (the upgrade test): `log create` knows this one's.
    conn.execute("INSERT INTO merkle.logs (name, origin) VALUES ('audit', 'merkle-listener/audit')")
    with connect(dsn) as c:
        source, _ = registry.add_source(c, "audit", table, **options)
    return source


def _inserts_sent(conn, log: str) -> int:
    """Insert messages the log's slot would send now (peeked: nothing is consumed)."""
    return conn.execute(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
        "'publication_names', %s) WHERE get_byte(data, 0) = ascii('I')", (f"merkle_{log}", f"merkle_{log}")).fetchone()[0]


def _refused(conn, statement: str, match: str | None = None) -> None:
    """The statement must fail with the guard's SQLSTATE (ML100/ML101)."""
    with pytest.raises(psycopg.Error, match=match) as exc:
        conn.execute(statement)
    assert exc.value.sqlstate in ("ML100", "ML101"), f"{statement!r} failed with {exc.value.sqlstate}: {exc.value}"


def _is_superuser(conn) -> bool:
    return conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()[0]


@pytest.fixture
def partitioned(app, dsn):
    """An append-only partitioned replication source m (owned by the attacker), a row in m_2025."""
    conn, as_owner = app
    conn.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    _own(conn, "m", "m_2025")
    registry.create_log(conn, "parts")
    with connect(dsn) as c:
        source, _ = registry.add_source(c, "parts", "m", mode="replication", append_only=True)
    conn.execute("INSERT INTO m VALUES (1, '2025-02-01', 1)")
    return conn, as_owner, source.source_id


# --- privilege escalation through the guard's own SECURITY DEFINER code --------------------


def test_a_view_named_like_a_partition_guard_does_not_run_the_owners_code_as_superuser(app, dsn):
    """check_source_partitions (SECURITY DEFINER, owned by the superuser that ran `init`) looks
    for rows in tables that carry a source's partition guard but are no longer under it, to
    spot a DETACH. A view can carry a trigger of that name (INSTEAD OF), and SELECT from a view
    runs the functions it calls as the current user, the superuser: the guard is recognised by
    its function, and only plain tables are read."""
    conn, as_owner = app
    source = _owned_source(conn, dsn, "facts", mode="replication")
    owner = as_owner()
    owner.execute(f"""CREATE FUNCTION public.evil() RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
          IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE 'ALTER ROLE {ROLE} SUPERUSER';
          END IF;
          RETURN false;
        END $$""")
    owner.execute("CREATE VIEW public.bait AS SELECT 1 AS x WHERE public.evil()")
    owner.execute("CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$")
    owner.execute(f"CREATE TRIGGER merkle_partition_{source.source_id} INSTEAD OF INSERT ON public.bait "
                  "FOR EACH ROW EXECUTE FUNCTION public.noop()")
    assert not _is_superuser(conn)
    try:
        owner.execute("CREATE TABLE anything (id int)")  # any CREATE/ALTER TABLE runs the event trigger
    except psycopg.Error:
        pass
    assert not _is_superuser(conn), "the table owner made itself superuser through merkle.has_rows()"


def test_a_capture_function_cannot_be_reused_to_forge_leaves(app, dsn):
    """merkle.capture_<id>() is SECURITY DEFINER: were EXECUTE granted to PUBLIC (the default
    before sql/014), the table owner could attach it to a table of its own, whose rows would be
    queued and logged as inserts into the source (leaves for rows that never were in it)."""
    conn, as_owner = app
    source = _owned_source(conn, dsn, "notes", append_only=True)
    owner = as_owner()
    owner.execute("CREATE TABLE fake (id int, body text)")
    try:
        owner.execute("CREATE TRIGGER forge AFTER INSERT ON fake REFERENCING NEW TABLE AS new_rows "
                      f"FOR EACH STATEMENT EXECUTE FUNCTION merkle.capture_{source.source_id}()")
        owner.execute("INSERT INTO fake VALUES (777, 'never in notes')")
    except psycopg.Error:
        pass
    with connect(dsn) as w:
        Sequencer(w, "audit").drain_all()
    assert conn.execute("SELECT count(*) FROM merkle.processed_log").fetchone()[0] == 0, \
        "a leaf was logged for a row that was never inserted into the source"


def test_a_capture_function_cannot_run_the_owners_cast_as_its_owner(app, dsn):
    """The same reuse, with a column of the owner's composite type and an assignment cast of its
    own to the outbox column's type: the cast runs inside the capture function, as the role
    that ran `source add` (here, as often in practice, a superuser)."""
    conn, as_owner = app
    source = _owned_source(conn, dsn, "notes", append_only=True)
    owner = as_owner()
    owner.execute("CREATE TYPE public.boxed AS (x int)")
    owner.execute(f"""CREATE FUNCTION public.unbox(b public.boxed) RETURNS int LANGUAGE plpgsql AS $$
        BEGIN
          IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE 'ALTER ROLE {ROLE} SUPERUSER';
          END IF;
          RETURN b.x;
        END $$""")
    owner.execute("CREATE CAST (public.boxed AS int) WITH FUNCTION public.unbox(public.boxed) AS ASSIGNMENT")
    owner.execute("CREATE TABLE fake (id public.boxed, body text)")
    try:
        owner.execute("CREATE TRIGGER forge AFTER INSERT ON fake REFERENCING NEW TABLE AS new_rows "
                      f"FOR EACH STATEMENT EXECUTE FUNCTION merkle.capture_{source.source_id}()")
        owner.execute("INSERT INTO fake VALUES (ROW(777), 'x')")
    except psycopg.Error:
        pass
    assert not _is_superuser(conn), "the table owner made itself superuser through the capture function"


# --- rows leaving or joining a partitioned replication source without a leaf ---------------


def test_a_truncate_mark_cannot_be_forged_with_the_guard_function(partitioned):
    """The TRUNCATE mark lives in merkle.own_ddl, which only the owner of schema merkle may
    write; merkle.partition_guard() is SECURITY DEFINER, so a trigger of the role's own on the
    source table calling it would write the mark, and TRUNCATE of a partition of an append-only
    source would pass. EXECUTE is not the role's, and only the guard's own TRUNCATE triggers mark."""
    conn, as_owner, sid = partitioned
    owner = as_owner()
    _refused(owner, "TRUNCATE m_2025", "append-only")
    try:
        owner.execute("CREATE TRIGGER forge BEFORE INSERT ON m FOR EACH STATEMENT "
                      f"EXECUTE FUNCTION merkle.partition_guard('{sid}')")
    except psycopg.Error:
        pass
    try:
        with owner.transaction():
            owner.execute("INSERT INTO m SELECT 0, '2025-01-01', 0 WHERE false")  # fires the forged mark
            owner.execute("TRUNCATE m_2025")
    except psycopg.Error:
        pass
    assert conn.execute("SELECT count(*) FROM m").fetchone()[0] == 1, \
        "a row of an append-only source vanished (TRUNCATE of its partition) without a leaf"


def test_a_table_with_a_trigger_named_like_the_guard_may_not_join_holding_rows(partitioned):
    """install_partition_guards skips a table that has a trigger named merkle_partition_<id>: a
    trigger of the role's own by that name would let a table holding rows join the source and
    leave the new partition unguarded. Guards are recognised by their function; a merkle-named
    trigger of another function under a source is refused."""
    conn, as_owner, sid = partitioned
    owner = as_owner()
    owner.execute("CREATE TABLE m_2030 (id int NOT NULL, at date NOT NULL, v int)")
    owner.execute("INSERT INTO m_2030 VALUES (30, '2030-03-01', 1)")
    owner.execute("CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$")
    owner.execute(f"CREATE TRIGGER merkle_partition_{sid} BEFORE TRUNCATE ON m_2030 "
                  "FOR EACH STATEMENT EXECUTE FUNCTION public.noop()")
    _refused(owner, "ALTER TABLE m ATTACH PARTITION m_2030 FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')",
             f"trigger merkle_partition_{sid} on public.m_2030 was not created by merkle-listener")
    assert conn.execute("SELECT count(*) FROM m").fetchone()[0] == 1


def test_detach_partition_concurrently_does_not_take_rows_out_of_the_source(partitioned):
    """DETACH ... CONCURRENTLY commits its first transaction (partition marked detach-pending,
    no longer seen through the source) before any ddl_command_end trigger runs: it is refused
    at ddl_command_start, so the rows stay in the source and the partition stays guarded."""
    conn, as_owner, _ = partitioned
    owner = as_owner()
    try:
        owner.execute("ALTER TABLE m DETACH PARTITION m_2025 CONCURRENTLY")
    except psycopg.Error:
        pass
    assert conn.execute("SELECT count(*) FROM m").fetchone()[0] == 1, \
        "DETACH CONCURRENTLY took a partition holding rows out of the source"
    _refused(owner, "TRUNCATE m_2025")


def test_detach_partition_in_an_old_snapshot_is_refused_when_the_partition_has_rows(partitioned):
    """In REPEATABLE READ, with a snapshot taken before the rows were committed, a partition
    holding them would look empty: the guard refuses to judge from such a snapshot."""
    conn, as_owner, _ = partitioned
    conn.execute("CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    _own(conn, "m_2026")
    owner, other = as_owner(autocommit=False), as_owner()
    owner.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    owner.execute("SELECT 1")  # the snapshot
    other.execute("INSERT INTO m VALUES (2, '2026-02-01', 1)")  # committed, streamed, logged
    try:
        owner.execute("ALTER TABLE m DETACH PARTITION m_2026")
        owner.commit()
    except psycopg.Error:
        owner.rollback()
    assert conn.execute("SELECT count(*) FROM m WHERE at >= '2026-01-01'").fetchone()[0] == 1, \
        "a partition holding rows was detached: they left the source without a leaf"


def test_attach_partition_in_an_old_snapshot_is_refused_when_the_table_has_rows(partitioned):
    conn, as_owner, _ = partitioned
    owner, other = as_owner(autocommit=False), as_owner()
    owner.execute("CREATE TABLE m_2030 (id int NOT NULL, at date NOT NULL, v int)")
    owner.commit()
    owner.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    owner.execute("SELECT 1")  # the snapshot
    other.execute("INSERT INTO m_2030 VALUES (30, '2030-03-01', 1)")
    try:
        owner.execute("ALTER TABLE m ATTACH PARTITION m_2030 FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')")
        owner.commit()
    except psycopg.Error:
        owner.rollback()
    assert conn.execute("SELECT count(*) FROM m").fetchone()[0] == 1, \
        "a table holding rows joined the source as a partition without a leaf"


@pytest.mark.parametrize("ddl", [
    "ALTER TABLE m_2025 SET UNLOGGED",
    "CREATE UNLOGGED TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
])
def test_an_unlogged_partition_is_refused(partitioned, ddl):
    """Rows of an unlogged table write no WAL, so the slot never sees them: rows inserted
    through the source into an unlogged partition would enter it without a leaf. PostgreSQL
    refuses SET UNLOGGED on a published table, but a partition of a publish_via_partition_root
    source is not published itself."""
    conn, as_owner, _ = partitioned
    owner = as_owner()
    _refused(owner, ddl, "is UNLOGGED: its rows write no WAL")
    before = _inserts_sent(conn, "parts")
    owner.execute("INSERT INTO m VALUES (2, '2025-03-01', 1)")
    assert _inserts_sent(conn, "parts") - before == 1, "a row inserted through the source was not streamed"


@pytest.mark.parametrize("mode", ["trigger", "replication"])
@pytest.mark.parametrize("how", ["create", "inherit"])
def test_an_inheritance_child_may_not_put_rows_into_a_source(app, dsn, mode, how):
    """A child table's rows are read as the source's (SELECT without ONLY) but are captured by
    neither mode: the capture trigger fires for statements naming the source, and the child
    is not in the log's publication. For an append-only source, the child's rows can also be
    updated and deleted. Like ATTACH PARTITION of a table holding rows, INHERIT is refused."""
    conn, as_owner = app
    _owned_source(conn, dsn, "notes", mode=mode, append_only=True)
    owner = as_owner()
    try:
        if how == "create":
            owner.execute("CREATE TABLE notes_more () INHERITS (notes)")
            owner.execute("INSERT INTO notes_more VALUES (1, 'never logged')")
        else:
            owner.execute("CREATE TABLE notes_more (id int NOT NULL, body text)")
            owner.execute("INSERT INTO notes_more VALUES (1, 'never logged')")
            owner.execute("ALTER TABLE notes_more INHERIT notes")
    except psycopg.Error:
        pass
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 0, \
        "rows entered the source through an inheritance child without a leaf"


# --- committed values rewritten without a leaf (sql/015) ----------------------------------


@pytest.mark.parametrize("mode", ["trigger", "replication"])
def test_a_rewrite_cannot_change_hashed_values_whatever_the_owners_code_does(app, dsn, mode):
    """ALTER COLUMN ... TYPE <same type> USING rewrites every row without a row trigger or a
    decoded change. The owner's code runs between the two reads of the guard (the USING
    expression): the digest is kept where it cannot write, under settings it cannot change, and
    a statement it runs from inside the rewrite does not end the check; a savepoint or an
    exception block does not hide what the transaction altered."""
    conn, as_owner = app
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, memo int, body text)")
    _own(conn, "notes")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "notes", mode=mode, columns=["id", "body"])
    owner = as_owner()
    owner.execute("INSERT INTO notes VALUES (1, 1, 'as written'), (2, 2, 'also as written')")
    if mode == "trigger":
        with connect(dsn) as w:
            assert Sequencer(w, "audit").drain_all() == 2
    rows = conn.execute("SELECT * FROM notes ORDER BY id").fetchall()
    leaves = conn.execute("SELECT leaf_hash FROM merkle.processed_log ORDER BY seq").fetchall()
    rewrite = "ALTER TABLE notes ALTER body TYPE text USING {}"
    _refused(owner, rewrite.format("upper(body)"), "it would rewrite committed values of hashed column body")
    owner.execute("BEGIN")
    owner.execute("SAVEPOINT s")
    _refused(owner, rewrite.format("body || '!'"), "hashed column body")
    owner.execute("ROLLBACK")
    _refused(owner, """DO $$ BEGIN
                         ALTER TABLE notes ALTER body TYPE text USING body || '?';
                       EXCEPTION WHEN division_by_zero THEN NULL;
                       END $$""", "hashed column body")
    owner.execute("CREATE TABLE scratch (x int)")
    owner.execute("""CREATE FUNCTION public.launder(b text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
          BEGIN
            DELETE FROM merkle_guard.rewrite_checks;
          EXCEPTION WHEN insufficient_privilege THEN NULL;
          END;
          PERFORM set_config('TimeZone', 'Asia/Tokyo', false);
          PERFORM set_config('search_path', 'public', false);
          EXECUTE 'ALTER TABLE scratch ADD COLUMN IF NOT EXISTS y int';
          EXECUTE 'ALTER TABLE scratch ALTER x TYPE bigint USING x + 1';
          RETURN b || ' (laundered)';
        END $$""")
    _refused(owner, rewrite.format("public.launder(body)"), "hashed column body")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        owner.execute("INSERT INTO merkle_guard.rewrite_checks VALUES (pg_current_xact_id(), 'notes'::regclass, 0, "
                      "'{}', '{}', '')")
    # A column before the hashed one retyped in the same statement: refused, not read at its
    # new width (which can crash the server).
    _refused(owner, "ALTER TABLE notes ALTER memo TYPE text USING repeat('x', 10000), "
                    "ALTER body TYPE text USING body || '.'", "altered hashed column body and also column memo")
    assert conn.execute("SELECT * FROM notes ORDER BY id").fetchall() == rows
    assert conn.execute("SELECT leaf_hash FROM merkle.processed_log ORDER BY seq").fetchall() == leaves
    if mode == "replication":
        assert _inserts_sent(conn, "audit") == 2
    owner.execute(rewrite.format("body || ''"))  # the same values pass
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 0


# --- what the guard held before sql/014 too ------------------------------------------------


def test_what_held(partitioned, dsn):
    """ON CONFLICT DO UPDATE and MERGE on append-only sources of both modes, TRUNCATE ... CASCADE
    through foreign keys (to the source and to one partition), rules, session settings the
    owner may not set, and the merkle functions callable with USAGE."""
    conn, as_owner, sid = partitioned
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("CREATE TABLE facts (id int PRIMARY KEY, body text)")
    _own(conn, "notes", "facts")
    with connect(dsn) as c:
        registry.add_source(c, "parts", "notes", append_only=True)
        registry.add_source(c, "parts", "facts", mode="replication", append_only=True)
    owner = as_owner()
    for t in ("notes", "facts"):
        owner.execute(f"INSERT INTO {t} VALUES (1, 'a')")
        _refused(owner, f"INSERT INTO {t} VALUES (1, 'b') ON CONFLICT (id) DO UPDATE SET body = excluded.body")
        _refused(owner, f"MERGE INTO {t} t USING (VALUES (1, 'c')) s(id, body) ON t.id = s.id "
                        "WHEN MATCHED THEN DELETE")
    owner.execute("CREATE RULE r AS ON INSERT TO notes DO ALSO UPDATE notes SET body = 'rule' WHERE id = 1")
    _refused(owner, "INSERT INTO notes VALUES (3, 'x')")
    owner.execute("CREATE TABLE parent (id int PRIMARY KEY)")
    owner.execute("INSERT INTO parent VALUES (1)")
    owner.execute("ALTER TABLE m_2025 ADD CONSTRAINT fk FOREIGN KEY (v) REFERENCES parent")
    owner.execute("ALTER TABLE facts ADD COLUMN pid int REFERENCES parent")
    _refused(owner, "TRUNCATE parent CASCADE")
    settings = ["session_replication_role = replica"]
    if conn.info.server_version >= 170000:
        settings.append("event_triggers = off")  # a setting since PostgreSQL 17
    for setting in settings:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            owner.execute(f"SET {setting}")
    _refused(owner, f"SELECT merkle.drop_partition_guards({sid})")
    for call in (f"merkle.install_partition_guards({sid})", "merkle.mark_own_ddl('truncate')",
                 "merkle.unmark_own_ddl('truncate')", "merkle_guard.mark_own_ddl('drop_triggers')",
                 f"merkle_guard.install_partition_guards({sid})", f"merkle_guard.forget_source({sid})"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            owner.execute(f"SELECT {call}")
    assert conn.execute("SELECT count(*) FROM m").fetchone()[0] == 1


# --- the superuser's own sessions, and DDL under other tags ----------------------------------


ESCALATE = f"""
    BEGIN
      IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE {ROLE} SUPERUSER';
      END IF;
"""


def test_the_drain_does_not_call_the_owners_functions_as_the_listener(app, dsn):
    """pg_catalog's to_json, num_nulls and concat are polymorphic or VARIADIC "any": a function
    public.to_json(text) of the table owner's would be a better match for the drain's canonical
    expressions, and run as the listener's role, were they not called as pg_catalog.<name>."""
    conn, as_owner = app
    _owned_source(conn, dsn, "notes", append_only=True)
    owner = as_owner()
    owner.execute(f"""CREATE FUNCTION public.to_json(t text) RETURNS json LANGUAGE plpgsql AS $$
        {ESCALATE}
          RETURN pg_catalog.to_json(t);
        END $$""")
    owner.execute("INSERT INTO notes VALUES (1, 'a')")
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 1
    assert not _is_superuser(conn), "the table owner's public.to_json(text) ran as the listener's role"


def _downgrade_to(admin, version: int) -> None:
    """Rebuild schema merkle up to `version` (nothing is registered yet, so nothing is lost)."""
    for (evt,) in admin.execute("SELECT evtname FROM pg_event_trigger").fetchall():
        admin.execute(f"DROP EVENT TRIGGER {evt}")
    admin.execute("DROP SCHEMA merkle CASCADE")
    for m in migrate.migrations():
        if m.version <= version:
            admin.execute(m.path.read_text())
            admin.execute("INSERT INTO merkle.schema_version (version, name) VALUES (%s, %s)", (m.version, m.name))
    admin.execute(f"GRANT USAGE ON SCHEMA merkle TO {ROLE}")


def test_the_upgrade_to_014_neither_runs_the_owners_functions_nor_keeps_its_planted_triggers(app, dsn):
    """Before sql/014 any role could put merkle-listener's trigger functions on a table of its
    own (EXECUTE was PUBLIC's), and revoking EXECUTE does not stop a trigger that exists: the
    upgrade drops them. It runs as a superuser, under search_path pg_catalog, pg_temp, so a
    public.format(text, integer) of the owner's cannot win its calls."""
    conn, as_owner = app
    with psycopg.connect(dsn, autocommit=True) as admin:
        _downgrade_to(admin, 13)
    source = _owned_source(conn, dsn, "notes", append_only=True)
    # As an earlier version created it (this one revokes EXECUTE at once).
    conn.execute(f"GRANT EXECUTE ON FUNCTION merkle.capture_{source.source_id}() TO PUBLIC")
    owner = as_owner()
    owner.execute("CREATE TABLE fake (id int, body text)")
    owner.execute("CREATE TRIGGER forge AFTER INSERT ON fake REFERENCING NEW TABLE AS new_rows "
                  f"FOR EACH STATEMENT EXECUTE FUNCTION merkle.capture_{source.source_id}()")
    owner.execute("CREATE TRIGGER bait BEFORE TRUNCATE ON fake FOR EACH STATEMENT "
                  f"EXECUTE FUNCTION merkle.partition_guard('{source.source_id}')")
    owner.execute(f"""CREATE FUNCTION public.format(f text, i integer) RETURNS text LANGUAGE plpgsql AS $$
        {ESCALATE}
          RETURN pg_catalog.format(f, i);
        END $$""")
    with psycopg.connect(dsn) as c:
        assert [m.version for m in migrate.apply(c)] == list(range(14, migrate.latest_version() + 1))
    assert not _is_superuser(conn), "the table owner's public.format() ran as the superuser applying sql/014"
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'fake'::regclass").fetchone()[0] == 0
    owner.execute("INSERT INTO fake VALUES (777, 'never in notes')")
    with connect(dsn) as w:
        assert Sequencer(w, "audit").drain_all() == 0
    assert conn.execute("SELECT count(*) FROM merkle.processed_log").fetchone()[0] == 0


def test_a_partition_created_inside_create_schema_is_guarded_or_refused(partitioned):
    """CREATE SCHEMA ... CREATE TABLE runs under the tag CREATE SCHEMA, which the partition
    guard's event trigger now watches too."""
    conn, as_owner, _ = partitioned
    conn.execute(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {ROLE}")
    owner = as_owner()
    _refused(owner, "CREATE SCHEMA unlogged_one CREATE UNLOGGED TABLE m_2031 PARTITION OF public.m "
                    "FOR VALUES FROM ('2031-01-01') TO ('2032-01-01')", "is UNLOGGED")
    owner.execute("CREATE SCHEMA sneaky CREATE TABLE m_2030 PARTITION OF public.m "
                  "FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')")
    owner.execute("INSERT INTO m VALUES (30, '2030-03-01', 1)")
    _refused(owner, "DELETE FROM sneaky.m_2030", "append-only")
    _refused(owner, "TRUNCATE sneaky.m_2030", "append-only")
    assert conn.execute("SELECT count(*) FROM m WHERE id = 30").fetchone()[0] == 1


@pytest.mark.parametrize("mode", ["trigger", "replication"])
def test_an_inheritance_child_created_inside_create_schema_is_refused(app, dsn, mode):
    conn, as_owner = app
    _owned_source(conn, dsn, "notes", mode=mode, append_only=True)
    conn.execute(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {ROLE}")
    _refused(as_owner(), "CREATE SCHEMA sneaky CREATE TABLE notes_more () INHERITS (public.notes)",
             "may not inherit from public.notes")


@pytest.mark.parametrize("mode", ["trigger", "replication"])
@pytest.mark.parametrize("drop", ["DROP DOMAIN public.short CASCADE", "DROP COLLATION public.mine CASCADE"])
def test_a_hashed_column_cannot_be_dropped_by_dropping_its_type(app, dsn, mode, drop):
    """Dropping a hashed column's domain or collation with CASCADE drops the column, under a tag
    no ALTER TABLE check sees: a sql_drop event trigger refuses it."""
    conn, as_owner = app
    owner = as_owner()
    owner.execute("CREATE DOMAIN public.short AS text")
    owner.execute("CREATE COLLATION public.mine (provider = libc, locale = 'C')")
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body public.short, tag text COLLATE public.mine)")
    _own(conn, "notes")
    registry.create_log(conn, "audit")
    with connect(dsn) as c:
        registry.add_source(c, "audit", "notes", mode=mode, append_only=True)
    owner.execute("INSERT INTO notes VALUES (1, 'logged', 'logged')")
    _refused(owner, drop, "is hashed by the log and may not be dropped")
    cols = {r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'notes'::regclass "
                                       "AND attnum > 0 AND NOT attisdropped")}
    assert cols == {"id", "body", "tag"}


@pytest.mark.parametrize("mode", ["trigger", "replication"])
def test_source_add_refuses_a_table_with_an_inheritance_child(app, dsn, mode):
    conn, as_owner = app
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    _own(conn, "notes")
    as_owner().execute("CREATE TABLE notes_more () INHERITS (notes)")
    registry.create_log(conn, "audit")
    with connect(dsn) as c, pytest.raises(SourceTableError, match="has an inheritance child, notes_more"):
        registry.add_source(c, "audit", "notes", mode=mode, append_only=True)
    assert conn.execute("SELECT count(*) FROM merkle.sources").fetchone()[0] == 0


def test_source_add_refuses_a_partitioned_table_with_an_unlogged_partition(app, dsn):
    conn, _ = app
    conn.execute("CREATE TABLE m (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute("CREATE UNLOGGED TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    registry.create_log(conn, "parts")
    with connect(dsn) as c, pytest.raises(SourceTableError, match="partition m_2025 of public.m is UNLOGGED"):
        registry.add_source(c, "parts", "m", mode="replication", append_only=True)
    assert conn.execute("SELECT count(*) FROM merkle.sources").fetchone()[0] == 0
