-- The DDL guard, installed by a superuser with `merkle-listener guard install` (not a
-- migration: its objects belong to that superuser, in schema merkle_guard, which the owner of
-- schema merkle cannot alter). Written again by every install; listener/store/guard.py.
--
-- Event triggers fire on every role's DDL, a superuser's too, in that role's session. So the
-- guard runs no code and reads no object that the owner of schema merkle controls: only the
-- catalogs, this schema, and the rows of the table a statement alters (plain tables, read with
-- built-in functions only). Its functions are SECURITY DEFINER, owned by the superuser who
-- installed them, with search_path pinned. Before this, the guard's functions, tables and
-- helpers were in schema merkle: on a plain role's schema, that role could replace any of
-- them and have its code run in the session of the next superuser to run DDL, and even code
-- run as a powerless role there can leave settings behind that the superuser's next query uses
-- (docs/replication.md, "The DDL guard on a role's schema").
--
-- What the guard knows of the sources is a copy kept here: the owner's triggers on its tables
-- (sql/020_guard_mirror.sql) send every change through the functions below, which accept only
-- tables that the owner of schema merkle owns (or is a member of the owning role of), and
-- `guard install` copies it all once. Marks of merkle-listener's own DDL go through them too.

CREATE TABLE IF NOT EXISTS merkle_guard.sources (
    source_id     integer PRIMARY KEY,
    log_id        integer NOT NULL,
    log_name      text NOT NULL,
    table_oid     oid NOT NULL,
    table_schema  text NOT NULL,
    table_name    text NOT NULL,
    mode          text NOT NULL,
    events        text[] NOT NULL,
    columns       text[] NOT NULL,
    key_columns   text[] NOT NULL,
    entry_column  text,
    append_only   boolean NOT NULL,
    row_filter    text,
    retired       boolean NOT NULL
);
-- type_oid/typmod: the type the owner recorded when the source was added, which a retype is
-- checked against; heap_type/heap_typmod: the column's type when the guard learnt of it, which
-- its stored values have (a retype of a hashed column is refused), and which the rewrite check
-- reads them as: never the owner's word (found by review: a type the owner chose crashed the
-- server when the check read a column's values as it).
CREATE TABLE IF NOT EXISTS merkle_guard.source_columns (
    source_id    integer NOT NULL,
    name         text NOT NULL,
    type_oid     oid NOT NULL,
    typmod       integer NOT NULL,
    heap_type    oid NOT NULL,
    heap_typmod  integer NOT NULL,
    PRIMARY KEY (source_id, name)
);
CREATE TABLE IF NOT EXISTS merkle_guard.own_ddl (
    xid        xid8 NOT NULL,
    purpose    text NOT NULL,
    source_id  integer
);
CREATE INDEX IF NOT EXISTS own_ddl_xid ON merkle_guard.own_ddl (xid);
-- Replaced at every install: a version may add a purpose ('publication': check_log_publications).
-- A publication FOR ALL TABLES (a CDC tool's) publishes this table's deletes too, and PostgreSQL
-- refuses a DELETE from a published table without a replica identity (found by review).
ALTER TABLE merkle_guard.own_ddl REPLICA IDENTITY FULL;
ALTER TABLE merkle_guard.own_ddl DROP CONSTRAINT IF EXISTS own_ddl_purpose_check;
ALTER TABLE merkle_guard.own_ddl ADD CONSTRAINT own_ddl_purpose_check
    CHECK (purpose IN ('drop_triggers', 'install_partition_guards', 'truncate', 'publication'));
CREATE TABLE IF NOT EXISTS merkle_guard.rewrite_checks (
    xid       xid8 NOT NULL,
    relid     oid NOT NULL,
    filenode  oid NOT NULL,
    columns   text[] NOT NULL,
    altered   text[] NOT NULL,
    digest    bytea NOT NULL,
    PRIMARY KEY (xid, relid)
);

-- What the owner of schema merkle may tell the guard (EXECUTE is its alone: guard.install).
-- A source's table must be the owner's, or its role's: otherwise the guard would put
-- partition guards, which run the owner's merkle.partition_guard(), on another role's tables.
CREATE OR REPLACE FUNCTION merkle_guard.put_source(
    p_source_id integer, p_log_id integer, p_log_name text, p_table_oid oid, p_table_schema text,
    p_table_name text, p_mode text, p_events text[], p_columns text[], p_key_columns text[],
    p_entry_column text, p_append_only boolean, p_row_filter text, p_retired boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class c, pg_namespace n
                    WHERE c.oid = p_table_oid AND c.relkind IN ('r', 'p') AND n.nspname = 'merkle'
                      AND pg_has_role(n.nspowner, c.relowner, 'USAGE')) THEN
        RAISE EXCEPTION 'merkle-listener: table % does not belong to the owner of schema merkle', p_table_oid::regclass;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM merkle_guard.sources s WHERE s.source_id = p_source_id)
       AND merkle_guard.alien_trigger(p_table_oid) IS NOT NULL THEN
        RAISE EXCEPTION 'merkle-listener: %, which would run as every role that writes to %, the owner''s too',
            merkle_guard.alien_trigger(p_table_oid), p_table_oid::regclass
            USING ERRCODE = 'ML101',
                  HINT = 'Drop that trigger, or have the table''s owner (or a superuser) own its function, first.';
    END IF;
    INSERT INTO merkle_guard.sources VALUES (p_source_id, p_log_id, p_log_name, p_table_oid, p_table_schema,
        p_table_name, p_mode, p_events, p_columns, p_key_columns, p_entry_column, p_append_only, p_row_filter, p_retired)
    ON CONFLICT (source_id) DO UPDATE SET log_id = excluded.log_id, log_name = excluded.log_name,
        table_oid = excluded.table_oid, table_schema = excluded.table_schema, table_name = excluded.table_name,
        mode = excluded.mode, events = excluded.events, columns = excluded.columns, key_columns = excluded.key_columns,
        entry_column = excluded.entry_column, append_only = excluded.append_only, row_filter = excluded.row_filter,
        retired = excluded.retired;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.forget_source(p_source_id integer) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM merkle_guard.source_columns WHERE source_id = p_source_id;
    DELETE FROM merkle_guard.sources WHERE source_id = p_source_id;
$$;

CREATE OR REPLACE FUNCTION merkle_guard.set_retired(p_source_id integer, p_retired boolean) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE merkle_guard.sources SET retired = p_retired WHERE source_id = p_source_id;
$$;

-- The table is pinned (an ALTER under way holds it until it commits) and read in a statement of
-- its own, read committed: the type taken is the one its stored values have now (found by
-- review: a type read under an older snapshot, or before a retype committed, was wrong).
CREATE OR REPLACE FUNCTION merkle_guard.put_source_column(p_source_id integer, p_name text, p_type_oid oid, p_typmod integer)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := (SELECT s.table_oid FROM merkle_guard.sources s WHERE s.source_id = p_source_id);
BEGIN
    IF rel IS NULL THEN
        RETURN;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'merkle-listener records the type of %.% in a READ COMMITTED transaction only', rel, p_name
            USING ERRCODE = 'ML101';
    END IF;
    PERFORM merkle_guard.pin(rel);
    INSERT INTO merkle_guard.source_columns
    SELECT p_source_id, p_name, p_type_oid, p_typmod, a.atttypid, a.atttypmod
      FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = p_name AND a.attnum > 0 AND NOT a.attisdropped
    ON CONFLICT (source_id, name) DO UPDATE SET type_oid = excluded.type_oid, typmod = excluded.typmod,
        heap_type = excluded.heap_type, heap_typmod = excluded.heap_typmod;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.forget_source_column(p_source_id integer, p_name text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM merkle_guard.source_columns WHERE source_id = p_source_id AND name = p_name;
$$;

-- A mark lasts for the transaction that wrote it (pg_current_xact_id(), the top-level one):
-- merkle-listener's own change of its triggers, which the guard then lets through. Whoever
-- may write merkle.own_ddl may mark (as before the guard moved here): `source remove` and
-- `log drop` run as the schema's owner or a role it granted its tables to.
CREATE OR REPLACE FUNCTION merkle_guard.may_mark() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT coalesce(has_table_privilege(session_user, to_regclass('merkle.own_ddl'), 'INSERT'), false) THEN
        RAISE EXCEPTION 'permission denied for function mark_own_ddl'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.mark(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO merkle_guard.own_ddl (xid, purpose, source_id) VALUES (pg_current_xact_id(), p_purpose, p_source_id)
$$;

-- One mark: an inner mark of the same purpose leaves the outer one standing.
CREATE OR REPLACE FUNCTION merkle_guard.unmark(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM merkle_guard.own_ddl WHERE ctid = (
        SELECT ctid FROM merkle_guard.own_ddl
         WHERE xid = pg_current_xact_id() AND purpose = p_purpose AND source_id IS NOT DISTINCT FROM p_source_id
         LIMIT 1)
$$;

CREATE OR REPLACE FUNCTION merkle_guard.mark_own_ddl(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM merkle_guard.may_mark();
    PERFORM merkle_guard.mark(p_purpose, p_source_id);
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.unmark_own_ddl(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM merkle_guard.may_mark();
    PERFORM merkle_guard.unmark(p_purpose, p_source_id);
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA merkle_guard FROM PUBLIC;

-- The guard itself: as in sql/010, 014 and 015, reading the copy above instead of schema
-- merkle's tables (a source's log name and whether it is being removed are columns of it).
CREATE OR REPLACE FUNCTION merkle_guard.own_ddl_running(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM merkle_guard.own_ddl
                    WHERE xid = pg_current_xact_id_if_assigned() AND purpose = p_purpose
                      AND (p_source_id IS NULL OR source_id = p_source_id))
$$;

-- A statement names a table, and by the time its lock is granted the name can lead to another
-- one: the owner may rename tables and schemas while the guard waits (found by review: the
-- guard then checked one table and read, or put its trigger on, another). Before the guard
-- reads a table or alters it by name, pin() locks it by name, makes sure that this table is
-- the one locked now (a locked table cannot be renamed or moved), and holds its schema's row,
-- which ALTER SCHEMA ... RENAME waits for. It also refuses a table that is not the schema
-- owner's (or its roles'): the guard must not put the owner's trigger function on, or read
-- for rows, another role's table.
CREATE OR REPLACE FUNCTION merkle_guard.pin(rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    owner text;
BEGIN
    EXECUTE format('LOCK TABLE ONLY %s IN SHARE ROW EXCLUSIVE MODE', rel);
    IF NOT EXISTS (SELECT 1 FROM pg_locks l
                    WHERE l.locktype = 'relation' AND l.relation = rel AND l.pid = pg_backend_pid() AND l.granted
                      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                      AND l.mode IN ('ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')) THEN
        RAISE EXCEPTION 'merkle-listener: % was renamed while the guard waited for it; run the statement again', rel
            USING ERRCODE = 'ML101';
    END IF;
    PERFORM 1 FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid WHERE c.oid = rel FOR SHARE OF n;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'merkle-listener: the schema of % changed while the guard waited for it; run the statement again', rel
            USING ERRCODE = 'ML101';
    END IF;
    SELECT pg_get_userbyid(c.relowner) INTO owner FROM pg_class c, pg_namespace m
     WHERE c.oid = rel AND m.nspname = 'merkle' AND NOT pg_has_role(m.nspowner, c.relowner, 'USAGE');
    IF FOUND THEN
        RAISE EXCEPTION 'merkle-listener''s guard will not read or alter %: it belongs to role %, not to the owner of '
                        'schema merkle or a role of it', rel, owner
            USING ERRCODE = 'ML101',
                  HINT = 'Tables that join a source (partitions) must belong to the owner of schema merkle: create them '
                         'as that role (SET ROLE), or give them to it first.';
    END IF;
END
$$;

-- Planning a query on a table folds the immutable function calls with constant arguments in
-- its index expressions, index predicates and statistics expressions, so that reading a table
-- would run its owner's functions as the guard, a superuser (found by review). The guard reads
-- a table's rows only once none of those names a function, operator or type that is not built
-- in, under a lock that keeps new ones out (CREATE INDEX and CREATE STATISTICS wait for it);
-- and with constraint_exclusion at its default, so that CHECK constraints are not folded.
CREATE OR REPLACE FUNCTION merkle_guard.refuse_planner_code(rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found text;
BEGIN
    PERFORM merkle_guard.pin(rel);
    SELECT CASE WHEN d.classid = 'pg_class'::regclass THEN format('index %s', d.objid::regclass)
                ELSE format('statistics object %I', x.stxname) END
      INTO found
      FROM pg_depend d
      LEFT JOIN pg_index i ON d.classid = 'pg_class'::regclass AND i.indexrelid = d.objid
      LEFT JOIN pg_statistic_ext x ON d.classid = 'pg_statistic_ext'::regclass AND x.oid = d.objid
     WHERE ((i.indrelid = rel AND (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL))
            OR (x.stxrelid = rel AND x.stxexprs IS NOT NULL))
       AND d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_type'::regclass)
       AND d.refobjid >= 16384  -- FirstNormalObjectId: below it, built in
     LIMIT 1;
    -- A JSON_VALUE/JSON_QUERY ... RETURNING a domain records no dependency on the domain.
    IF found IS NULL THEN
        SELECT format('index %s', i.indexrelid::regclass) INTO found FROM pg_index i
         WHERE i.indrelid = rel AND concat(i.indexprs::text, i.indpred::text) LIKE '%{JSONEXPR %' LIMIT 1;
    END IF;
    IF found IS NULL THEN
        SELECT format('statistics object %I', x.stxname) INTO found FROM pg_statistic_ext x
         WHERE x.stxrelid = rel AND x.stxexprs::text LIKE '%{JSONEXPR %' LIMIT 1;
    END IF;
    IF found IS NOT NULL THEN
        RAISE EXCEPTION 'merkle-listener''s guard must read the rows of % and will not: its % uses a function, '
                        'operator or type that is not built in, which reading the table would run as a superuser',
                        rel, found
            USING ERRCODE = 'ML101',
                  HINT = 'Drop that index or statistics object for this change, and create it again afterwards.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.has_rows(rel regclass) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET constraint_exclusion = partition AS $$
DECLARE
    part regclass;
    found boolean;
BEGIN
    -- pg_partition_tree lists a table that is in no partition tree not even itself.
    FOR part IN SELECT c.oid FROM pg_class c
                 WHERE c.relkind = 'r' AND (c.oid = rel OR c.oid IN (SELECT t.relid FROM pg_partition_tree(rel) t)) LOOP
        CONTINUE WHEN pg_relation_size(part) = 0;
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'merkle-listener must see whether % holds rows, and this transaction''s snapshot may '
                            'predate rows committed since (isolation level %)', part,
                            current_setting('transaction_isolation')
                USING ERRCODE = 'ML101',
                      HINT = 'Run the ALTER TABLE in a READ COMMITTED transaction.';
        END IF;
        PERFORM merkle_guard.refuse_planner_code(part);
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM ONLY %s)', part) INTO found;
        IF found THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.rewrite_digest(rel regclass, cols text[]) RETURNS bytea
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET "TimeZone" = 'UTC' SET "DateStyle" = 'ISO, YMD' SET "IntervalStyle" = 'postgres'
SET extra_float_digits = 1 SET bytea_output = 'hex' SET lc_monetary = 'C'
SET row_security = off SET enable_indexscan = off SET enable_indexonlyscan = off
SET enable_bitmapscan = off SET max_parallel_workers_per_gather = 0 SET constraint_exclusion = partition AS $$
DECLARE
    obj text;
    result bytea;
BEGIN
    PERFORM merkle_guard.refuse_planner_code(rel);
    IF current_setting('transaction_isolation') <> 'read committed' AND pg_relation_size(rel) > 0 THEN
        RAISE EXCEPTION 'merkle-listener must compare the hashed values of % before and after this rewrite, and this '
                        'transaction''s snapshot may predate rows committed since (isolation level %)',
                        rel, current_setting('transaction_isolation')
            USING ERRCODE = 'ML101',
                  HINT = 'Run the ALTER in a READ COMMITTED transaction.';
    END IF;
    SELECT pg_catalog.string_agg(
               pg_catalog.format('%L || CASE WHEN pg_catalog.num_nulls(%I) = 1 THEN ''null'' '
                                 'ELSE pg_catalog.to_json(pg_catalog.concat(%I))::text END',
                                 pg_catalog.to_json(c)::text || ':', c, c),
               ' || '','' || ' ORDER BY pg_catalog.convert_to(c, 'UTF8'))
      INTO obj
      FROM pg_catalog.unnest(cols) AS c;
    EXECUTE pg_catalog.format(
        'SELECT pg_catalog.sha256(coalesce(pg_catalog.string_agg(h, ''''::bytea ORDER BY h), ''''::bytea)) '
        'FROM (SELECT pg_catalog.sha256(pg_catalog.convert_to(''{'' || %s || ''}'', ''UTF8'')) AS h FROM ONLY %s) r',
        obj, rel)
      INTO result;
    RETURN result;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.install_partition_guards(p_source_id integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src record;
    part record;
    trg text := format('merkle_partition_%s', p_source_id);
    mark record;
BEGIN
    SELECT s.* INTO src FROM merkle_guard.sources s
     WHERE s.source_id = p_source_id AND s.mode = 'replication'
       AND NOT s.retired;
    IF NOT FOUND OR (SELECT relkind FROM pg_class WHERE oid = src.table_oid) IS DISTINCT FROM 'p' THEN
        RETURN;
    END IF;
    -- Its own ALTER TABLE ... ENABLE ALWAYS would run the event trigger below again, once per
    -- partition, each run looping over the partitions.
    PERFORM merkle_guard.mark('install_partition_guards', p_source_id);
    IF 'truncate' = ANY (src.events) THEN
        FOR mark IN SELECT * FROM (VALUES ('begin', 'BEFORE'), ('end', 'AFTER')) v(name, tg_when) LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = src.table_oid
                              AND tgname = format('merkle_truncate_%s_%s', mark.name, p_source_id)) THEN
                PERFORM merkle_guard.pin(src.table_oid);
                EXECUTE format('CREATE TRIGGER %I %s TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION merkle.partition_guard(%L)',
                               format('merkle_truncate_%s_%s', mark.name, p_source_id), mark.tg_when,
                               src.table_oid::regclass, p_source_id);
                EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I',
                               src.table_oid::regclass, format('merkle_truncate_%s_%s', mark.name, p_source_id));
            END IF;
        END LOOP;
    END IF;
    -- An update or delete carries the old row as the partition holding it is set, and a new
    -- partition starts at REPLICA IDENTITY DEFAULT: without FULL, an update that leaves a
    -- TOASTed value alone would stop the log (`source add` checks the partitions it finds).
    IF src.events && '{update,delete}' THEN
        FOR part IN SELECT t.relid FROM pg_partition_tree(src.table_oid) t JOIN pg_class c ON c.oid = t.relid
                     WHERE t.level > 0 AND c.relkind = 'r' AND c.relreplident <> 'f' LOOP
            PERFORM merkle_guard.pin(part.relid);
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', part.relid::regclass);
        END LOOP;
    END IF;
    -- Foreign partitions are left out: their rows are on another server, never streamed.
    FOR part IN SELECT t.relid FROM pg_partition_tree(src.table_oid) t JOIN pg_class c ON c.oid = t.relid
                 WHERE t.level > 0 AND c.relkind IN ('r', 'p')
                   AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.relid AND g.tgname = trg) LOOP
        PERFORM merkle_guard.pin(part.relid);
        EXECUTE format('CREATE TRIGGER %I BEFORE %s ON %s FOR EACH STATEMENT EXECUTE FUNCTION merkle.partition_guard(%L)',
                       trg, CASE WHEN src.append_only THEN 'UPDATE OR DELETE OR TRUNCATE' ELSE 'TRUNCATE' END,
                       part.relid::regclass, p_source_id);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', part.relid::regclass, trg);
    END LOOP;
    PERFORM merkle_guard.unmark('install_partition_guards', p_source_id);
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_source_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    src record;
    problem text;
    hint text;
BEGIN
    FOR cmd IN SELECT DISTINCT CASE WHEN c.object_type = 'trigger'
                                    THEN (SELECT t.tgrelid FROM pg_trigger t WHERE t.oid = c.objid)
                                    ELSE c.objid END AS relid,
                               c.object_type, c.objid
               FROM pg_event_trigger_ddl_commands() c
               WHERE c.object_type IN ('table', 'table column', 'trigger')
               -- Renames under other tags (found by review): ALTER INDEX ... RENAME and ALTER
               -- VIEW, MATERIALIZED VIEW or FOREIGN TABLE ... RENAME COLUMN work on tables too;
               -- ALTER TYPE ... RENAME ATTRIBUTE ... CASCADE renames the columns of the type's
               -- typed tables; ALTER SCHEMA ... RENAME renames every table in it.
               UNION
               SELECT k.oid, 'table', k.oid
                 FROM pg_event_trigger_ddl_commands() c
                 JOIN pg_class k
                   ON (c.object_type = 'schema' AND k.relnamespace = c.objid)
                   OR (c.object_type IN ('type', 'composite type', 'composite type column')
                       AND k.reloftype IN (SELECT y.oid FROM pg_type y WHERE y.oid = c.objid OR y.typrelid = c.objid))
                WHERE k.oid IN (SELECT s.table_oid FROM merkle_guard.sources s) LOOP
        -- The sources whose table is the one named, or inherits from it or is a partition of
        -- it: ALTER TABLE recurses into them (found by review: a hashed column of a source
        -- that inherits from another table was dropped or renamed through that table).
        FOR src IN SELECT s.* FROM merkle_guard.sources s
                   WHERE s.table_oid IN (WITH RECURSIVE d(relid) AS (
                                             SELECT cmd.relid
                                             UNION
                                             SELECT i.inhrelid FROM pg_inherits i JOIN d ON i.inhparent = d.relid)
                                         SELECT d.relid FROM d) LOOP
            problem := NULL;
            hint := 'Remove the source (merkle-listener source remove), alter the table, then add it again.';
            IF cmd.object_type = 'trigger' AND EXISTS (
                    SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                    WHERE t.oid = cmd.objid AND p.pronamespace = 'merkle'::regnamespace) THEN
                problem := 'its merkle-listener triggers may not be altered or renamed';
            END IF;
            IF problem IS NULL AND NOT EXISTS (
                    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE c.oid = src.table_oid AND c.relname = src.table_name AND n.nspname = src.table_schema) THEN
                problem := 'the table may not be renamed or moved to another schema';
            END IF;
            IF problem IS NULL THEN
                SELECT format('column %I is hashed by the log and may not be dropped, renamed or retyped', col)
                  INTO problem
                  FROM unnest(src.columns || src.key_columns || array_remove(ARRAY[src.entry_column], NULL)) AS col
                  LEFT JOIN pg_attribute a
                         ON a.attrelid = src.table_oid AND a.attname = col AND NOT a.attisdropped AND a.attnum > 0
                  LEFT JOIN merkle_guard.source_columns r
                         ON r.source_id = src.source_id AND r.name = col
                 WHERE a.attnum IS NULL
                    OR (r.name IS NOT NULL AND (a.atttypid <> r.type_oid OR a.atttypmod <> r.typmod))
                 LIMIT 1;
            END IF;
            IF problem IS NULL THEN
                SELECT format('trigger %I may not be disabled (merkle-listener triggers are ENABLE ALWAYS)', t.tgname)
                  INTO problem
                  FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                 WHERE t.tgrelid = src.table_oid AND p.pronamespace = 'merkle'::regnamespace AND t.tgenabled <> 'A'
                 LIMIT 1;
            END IF;
            IF problem IS NULL AND src.mode = 'replication' AND src.events && '{update,delete}'
               AND (SELECT relreplident FROM pg_class WHERE oid = src.table_oid) <> 'f' THEN
                problem := 'REPLICA IDENTITY must stay FULL while updates or deletes are logged';
            END IF;
            -- The log's publication publishes updates/deletes for all its tables when any of its
            -- sources logs them; PostgreSQL then refuses UPDATE and DELETE on a table whose
            -- replica identity does not cover its key and row filter. The rule of
            -- listener.sources.publication.check_publication_identities, kept after registration.
            IF problem IS NULL AND src.mode = 'replication'
               AND NOT src.retired
               AND EXISTS (
                    SELECT 1 FROM merkle_guard.sources o
                     WHERE o.log_id = src.log_id AND o.mode = 'replication' AND o.events && '{update,delete}'
                       AND NOT o.retired)
               AND NOT (SELECT c.relreplident = 'f'
                               OR (c.relreplident = 'd' AND src.row_filter IS NULL
                                   AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
                               OR (c.relreplident = 'i' AND src.row_filter IS NULL)
                          FROM pg_class c WHERE c.oid = src.table_oid) THEN
                problem := 'its replica identity must cover its key and row filter (REPLICA IDENTITY FULL) while '
                           'the log publishes updates or deletes, or PostgreSQL refuses UPDATE and DELETE on it';
                hint := format('ALTER TABLE %I.%I REPLICA IDENTITY FULL is allowed (and repairs a table whose '
                               'identity was lowered before this check existed).', src.table_schema, src.table_name);
            END IF;
            IF problem IS NOT NULL THEN
                RAISE EXCEPTION 'ALTER refused on %.%: % (it feeds merkle-listener log "%")',
                    src.table_schema, src.table_name, problem, src.log_name
                    USING ERRCODE = 'ML101', HINT = hint;
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- CREATE OR REPLACE TRIGGER replaces a trigger of the same name with any other, and needs only
-- the TRIGGER privilege on the table (found by review: a role given TRIGGER on a source swapped
-- its capture trigger for a no-op; a member of the owning role swapped a partition guard, then
-- detached the partition with its rows). A trigger of a merkle-listener name on a source's
-- table, or on a partition of one, is created by merkle-listener alone: in the transaction that
-- records its source, or in one marked as installing partition guards.
-- A trigger in a source's partition tree (on the source, a partition of it, or cloned onto one
-- from a partitioned parent) whose function is neither a superuser's nor that of a role that
-- may act as the owners of the trigger's table and of the source: it runs that role's code as
-- whoever writes there (found by review: made before `source add`, on a parent and cloned onto
-- the source, or on a table attached later). p_tgname: that trigger (and its clones) only.
CREATE OR REPLACE FUNCTION merkle_guard.alien_trigger(p_rel oid, p_tgname name DEFAULT NULL) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('trigger %I on %s runs function %s of role %s', t.tgname, t.tgrelid::regclass,
                  p.oid::regprocedure, pg_get_userbyid(p.proowner))
      FROM (SELECT p_rel UNION SELECT x.relid FROM pg_partition_tree(p_rel) x) d(relid)
      JOIN pg_trigger t ON t.tgrelid = d.relid
      JOIN pg_proc p ON p.oid = t.tgfoid
      JOIN pg_class k ON k.oid = t.tgrelid
      JOIN pg_class o ON o.oid = p_rel
     WHERE (p_tgname IS NULL OR t.tgname = p_tgname)
       AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.oid = p.proowner)
       AND NOT (pg_has_role(p.proowner, k.relowner, 'USAGE') AND pg_has_role(p.proowner, o.relowner, 'USAGE'))
     LIMIT 1
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_source_trigger_create() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hit record;
    mine xid[];
BEGIN
    IF merkle_guard.own_ddl_running('install_partition_guards') THEN
        RETURN;  -- merkle_guard.install_partition_guards, or `source add` (replication mode)
    END IF;
    mine := ARRAY(SELECT l.transactionid FROM pg_locks l
                   WHERE l.locktype = 'transactionid' AND l.pid = pg_backend_pid()
                     AND l.mode = 'ExclusiveLock' AND l.granted);
    SELECT t.tgname, t.tgrelid::regclass AS rel, s.table_schema, s.table_name, s.log_name INTO hit
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_trigger t ON t.oid = c.objid
      JOIN merkle_guard.sources s
        ON s.table_oid = t.tgrelid OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(t.tgrelid) a)
     WHERE c.object_type = 'trigger'
       AND t.tgname ~ '^merkle_(capture|guard|guard_truncate|partition|truncate_begin|truncate_end)_[0-9]+$'
       AND NOT EXISTS (SELECT 1 FROM merkle_guard.sources n
                        WHERE n.source_id = substring(t.tgname FROM '_([0-9]+)$')::integer
                          AND n.xmin = ANY (mine))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'CREATE TRIGGER refused: % on % is a merkle-listener trigger, which merkle-listener alone '
                        'creates (%.% feeds merkle-listener log "%")', hit.tgname, hit.rel, hit.table_schema,
                        hit.table_name, hit.log_name
            USING ERRCODE = 'ML101',
                  HINT = 'Give a trigger of your own another name; merkle-listener''s triggers may not be replaced.';
    END IF;
    -- A trigger runs its function as whichever role writes to the table, the owner of schema
    -- merkle or a superuser too (found by review: a role given TRIGGER on a source emptied the
    -- outbox from the owner's INSERT). On a source or a partition of one, a trigger's function
    -- must be the code of a role that may act as the table's owner already, or a superuser's.
    -- A row trigger on a partitioned table is cloned onto its partitions: a source below it too.
    SELECT merkle_guard.alien_trigger(s.table_oid, t.tgname) AS problem, s.table_schema, s.table_name, s.log_name
      INTO hit
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_trigger t ON t.oid = c.objid
      JOIN merkle_guard.sources s
        ON s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(t.tgrelid) a
                           UNION ALL SELECT t.tgrelid UNION ALL SELECT d.relid FROM pg_partition_tree(t.tgrelid) d)
     WHERE c.object_type = 'trigger'
       AND merkle_guard.alien_trigger(s.table_oid, t.tgname) IS NOT NULL
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'CREATE TRIGGER refused: %, as every role that writes to the table, its owner''s too '
                        '(%.% feeds merkle-listener log "%")', hit.problem, hit.table_schema, hit.table_name,
                        hit.log_name
            USING ERRCODE = 'ML101',
                  HINT = 'Have the table''s owner (or a superuser) create the trigger function.';
    END IF;
END
$$;

-- A subscription's apply worker fires row triggers only, never statement triggers (found by
-- review): a trigger-mode source would miss the rows it applies, and an append-only source's
-- guard its updates and deletes. Replication mode streams applied changes like any other.
-- pg_subscription_rel holds a subscription's tables once CREATE SUBSCRIPTION (connected) or
-- ALTER SUBSCRIPTION ... REFRESH PUBLICATION has read them from the publisher.
CREATE OR REPLACE FUNCTION merkle_guard.check_source_subscription() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hit record;
BEGIN
    SELECT u.subname, s.table_schema, s.table_name, s.log_name, s.mode INTO hit
      FROM pg_subscription_rel r
      JOIN pg_subscription u ON u.oid = r.srsubid
      JOIN merkle_guard.sources s
        ON s.table_oid = r.srrelid OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(r.srrelid) a)
     WHERE NOT s.retired AND (s.mode = 'trigger' OR s.append_only)
       -- the subscription this command made or altered, if it applies (ENABLE is checked): one
       -- left from before must stay stoppable, others alterable (found by review)
       AND u.subenabled
       AND u.oid IN (SELECT c.objid FROM pg_event_trigger_ddl_commands() c WHERE c.object_type = 'subscription')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '% refused: subscription % would apply changes to %.%, which feeds merkle-listener log "%", '
                        'and its apply worker fires no statement trigger: %', TG_TAG, hit.subname, hit.table_schema,
                        hit.table_name, hit.log_name,
                        CASE WHEN hit.mode = 'trigger' THEN 'trigger-mode capture would miss its rows'
                             ELSE 'the append-only guard would not refuse its updates and deletes' END
            USING ERRCODE = 'ML101',
                  HINT = 'Replicate into another table, or capture this one in replication mode (not append-only).';
    END IF;
END
$$;

-- A log's publication does for its replication sources what a capture trigger does for a
-- trigger-mode source: what it lists, filters and publishes decides which changes the slot
-- sends, and pgoutput reads it as it was at each change's place in the WAL, so a change it let
-- through can never be streamed again (found by review: ALTER PUBLICATION ... DROP TABLE, SET
-- (publish = ...), a row filter, DROP PUBLICATION; ALTER TABLE ... DROP COLUMN ... CASCADE of a
-- filter's column, DROP FUNCTION ... CASCADE of a generated column's function: each lost
-- committed changes without a word). Only merkle-listener changes it, in a transaction marked
-- 'publication', which records the publication as it made it; at the end of every other
-- statement that could change one, and at every drop of anything, the logs' publications must
-- be as recorded. The record is a table, not the session's: nothing the statement runs can
-- change it, and a change committed together with its record by a `source add` while the
-- statement waited is no change to it (found by review: a record kept in a setting was taken
-- at the statement's start, and rewritten by a statement nested in it).
CREATE TABLE IF NOT EXISTS merkle_guard.log_publications (
    pubname     text PRIMARY KEY,
    log_name    text NOT NULL,
    options     jsonb NOT NULL,  -- its name and what it publishes
    tables      jsonb NOT NULL,  -- "schema"."table" -> row filter and column list
    namespaces  jsonb NOT NULL
);
-- Tables and schemas are recorded by name, which pg_dump keeps and the guard does not let change
-- (a source's table, or its schema, is not renamed), not by OID, which a restore changes: a
-- record made before that (an earlier version) is put in those terms here.
UPDATE merkle_guard.log_publications r
   SET tables = (SELECT coalesce(jsonb_object_agg(
                            CASE WHEN t.key ~ '^[0-9]+$'
                                 THEN coalesce((SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                                                  JOIN pg_namespace n ON n.oid = c.relnamespace
                                                 WHERE c.oid = t.key::oid), t.key)
                                 ELSE t.key END,
                            CASE WHEN t.key ~ '^[0-9]+$'
                                 THEN jsonb_build_array(t.value -> 0,
                                          (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                                            WHERE a.attrelid = t.key::oid
                                              AND a.attnum = ANY (string_to_array(t.value ->> 1, ' ')::int2[]))::text)
                                 ELSE t.value END), '{}')
                   FROM jsonb_each(r.tables) t),
       namespaces = (SELECT coalesce(jsonb_agg(x ORDER BY x), '[]')
                       FROM (SELECT CASE jsonb_typeof(n) WHEN 'number' THEN (n #>> '{}')::oid::regnamespace::text
                                                         ELSE n #>> '{}' END AS x
                               FROM jsonb_array_elements(r.namespaces) n) e)
 WHERE EXISTS (SELECT 1 FROM jsonb_object_keys(r.tables) k WHERE k ~ '^[0-9]+$')
    OR EXISTS (SELECT 1 FROM jsonb_array_elements(r.namespaces) n WHERE jsonb_typeof(n) = 'number');

-- The publication of each log with replication sources, as it is now (a dropped table is no
-- change to it: DROP TABLE of a source takes the source's table out of it).
CREATE OR REPLACE FUNCTION merkle_guard.log_publications_now()
RETURNS TABLE (pubname text, log_name text, options jsonb, tables jsonb, namespaces jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    -- Named fields, not the whole row: a PostgreSQL upgrade that adds a column to pg_publication
    -- must not make every publication differ from its record.
    SELECT p.pubname::text, l.log_name,
           jsonb_build_object('name', p.pubname, 'all tables', p.puballtables, 'insert', p.pubinsert,
                              'update', p.pubupdate, 'delete', p.pubdelete, 'truncate', p.pubtruncate,
                              'via root', p.pubviaroot),
           coalesce((SELECT jsonb_object_agg(format('%I.%I', n.nspname, c.relname),
                                             jsonb_build_array(pg_get_expr(r.prqual, r.prrelid),
                                                               (SELECT array_agg(a.attname::text ORDER BY a.attnum)
                                                                  FROM pg_attribute a
                                                                 WHERE a.attrelid = r.prrelid
                                                                   AND a.attnum = ANY (r.prattrs))::text))
                       FROM pg_publication_rel r JOIN pg_class c ON c.oid = r.prrelid
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE r.prpubid = p.oid), '{}'),
           coalesce((SELECT jsonb_agg(format('%I', s.nspname) ORDER BY format('%I', s.nspname))
                       FROM pg_publication_namespace n JOIN pg_namespace s ON s.oid = n.pnnspid
                      WHERE n.pnpubid = p.oid), '[]')
      FROM pg_publication p
      JOIN (SELECT DISTINCT s.log_name FROM merkle_guard.sources s WHERE s.mode = 'replication') l
        ON p.pubname = 'merkle_' || l.log_name
$$;

-- The logs with replication sources whose publication differs from its record.
CREATE OR REPLACE FUNCTION merkle_guard.changed_log_publications() RETURNS SETOF text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    -- One statement, one snapshot: the record and the catalogs as committed together.
    SELECT r.log_name
      FROM merkle_guard.log_publications r
      LEFT JOIN merkle_guard.log_publications_now() n ON n.pubname = r.pubname
     WHERE r.log_name IN (SELECT s.log_name FROM merkle_guard.sources s WHERE s.mode = 'replication')
       AND (n.pubname IS NULL OR n.options IS DISTINCT FROM r.options OR n.namespaces IS DISTINCT FROM r.namespaces
            OR n.tables IS DISTINCT FROM (SELECT coalesce(jsonb_object_agg(t.key, t.value), '{}')
                                            FROM jsonb_each(r.tables) t
                                           WHERE t.key !~ '^[0-9]+$' AND to_regclass(t.key) IS NOT NULL))
$$;

-- For `status` and the listener, whatever role runs them: whether a log's publication differs.
CREATE OR REPLACE FUNCTION merkle_guard.log_publication_changed(p_log text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT p_log IN (SELECT merkle_guard.changed_log_publications())
$$;

-- `guard install`: a record for each publication that has none yet; one that has one keeps
-- it, so that a publication changed while the guard was off stays reported, not accepted.
CREATE OR REPLACE FUNCTION merkle_guard.record_new_log_publications() RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM merkle_guard.log_publications r
     WHERE r.log_name NOT IN (SELECT s.log_name FROM merkle_guard.sources s WHERE s.mode = 'replication');
    INSERT INTO merkle_guard.log_publications SELECT * FROM merkle_guard.log_publications_now()
        ON CONFLICT (pubname) DO NOTHING;
$$;

CREATE OR REPLACE FUNCTION merkle_guard.record_log_publications() RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM merkle_guard.log_publications r
     WHERE r.pubname NOT IN (SELECT n.pubname FROM merkle_guard.log_publications_now() n);
    INSERT INTO merkle_guard.log_publications SELECT * FROM merkle_guard.log_publications_now()
        ON CONFLICT (pubname) DO UPDATE SET log_name = excluded.log_name, options = excluded.options,
                                            tables = excluded.tables, namespaces = excluded.namespaces
        WHERE (log_publications.log_name, log_publications.options, log_publications.tables,
               log_publications.namespaces)
              IS DISTINCT FROM (excluded.log_name, excluded.options, excluded.tables, excluded.namespaces);
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_log_publications() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    changed text;
BEGIN
    IF merkle_guard.own_ddl_running('publication') THEN
        PERFORM merkle_guard.record_log_publications();  -- merkle-listener's source add, source remove or log drop
        RETURN;
    END IF;
    IF merkle_guard.own_ddl_running('drop_triggers') OR merkle_guard.own_ddl_running('install_partition_guards') THEN
        RETURN;  -- merkle-listener's own triggers, which no publication lists (the recovery runs here)
    END IF;
    SELECT c INTO changed FROM merkle_guard.changed_log_publications() c LIMIT 1;
    IF changed IS NOT NULL THEN
        RAISE EXCEPTION '% refused: publication merkle_% would not be as merkle-listener made it, and it decides '
                        'which changes of merkle-listener log "%" its slot sends: a change it lets through can never '
                        'be streamed again', TG_TAG, changed, changed
            USING ERRCODE = 'ML101',
                  HINT = 'Only merkle-listener source add and source remove change it (its owner may be changed: ALTER '
                         'PUBLICATION ... OWNER TO); a column a row filter reads may not be renamed or dropped while '
                         'the source is there. If it was changed while the guard was off, every such statement is '
                         'refused until `merkle-listener status` has been followed to recover.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_source_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    obj record;
BEGIN
    IF merkle_guard.own_ddl_running('drop_triggers') THEN
        RETURN;  -- merkle-listener removing its own triggers
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects()
               WHERE object_type = 'trigger' AND original LOOP
        -- A merkle-listener trigger cannot have been renamed (check_source_ddl refuses it).
        IF obj.object_identity ~ '^merkle_(capture|guard|guard_truncate)_[0-9]+ on ' THEN
            RAISE EXCEPTION 'DROP TRIGGER refused: % is a merkle-listener trigger', obj.object_identity
                USING ERRCODE = 'ML101',
                      HINT = 'Use merkle-listener source remove to stop capturing a table.';
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_source_partitions() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    src record;
    problem text;
    left_tree record;
    joined record;
BEGIN
    IF merkle_guard.own_ddl_running('install_partition_guards') THEN
        RETURN;  -- merkle_guard.install_partition_guards creating them
    END IF;
    -- An append-only source refuses UPDATE and DELETE with a statement trigger, which fires only
    -- for statements naming it (found by review: an UPDATE or DELETE naming its parent changed
    -- its rows): it may not inherit from, or be a partition of, a table that is no append-only
    -- source itself (which refuses them for its whole tree).
    SELECT format('%I.%I, an append-only source of merkle-listener log "%s", may not inherit from or be a partition '
                  'of %s: an UPDATE or DELETE naming %s would change its rows unrefused', s.table_schema,
                  s.table_name, s.log_name, i.inhparent::regclass, i.inhparent::regclass)
      INTO problem
      FROM merkle_guard.sources s JOIN pg_inherits i ON i.inhrelid = s.table_oid
     WHERE s.append_only AND NOT s.retired
       AND NOT EXISTS (SELECT 1 FROM merkle_guard.sources p
                        WHERE p.table_oid = i.inhparent AND p.append_only AND NOT p.retired)
       AND EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() c
                    WHERE c.object_type = 'table' AND c.objid IN (s.table_oid, i.inhparent))
     LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'refused: %', problem
            USING ERRCODE = 'ML101',
                  HINT = 'Keep the append-only source out of other tables'' trees, or remove the source first.';
    END IF;
    -- A table attached as a partition of a source brings its triggers (found by review).
    SELECT format('%s, in the partition tree of %I.%I (merkle-listener log "%s"): it would run as every role that '
                  'writes there, the owner''s too', merkle_guard.alien_trigger(s.table_oid), s.table_schema,
                  s.table_name, s.log_name)
      INTO problem
      FROM merkle_guard.sources s
     WHERE NOT s.retired
       AND EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() c
                    WHERE c.object_type = 'table'
                      AND s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(c.objid) a))
       AND merkle_guard.alien_trigger(s.table_oid) IS NOT NULL
     LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'refused: %', problem
            USING ERRCODE = 'ML101',
                  HINT = 'Drop that trigger, or have the table''s owner (or a superuser) own its function, first.';
    END IF;
    -- A trigger-mode source may not become a partition (ATTACH PARTITION): its statement
    -- trigger would not fire for rows inserted through the partitioned table.
    SELECT format('%I.%I feeds merkle-listener log "%s" in trigger mode and may not be a partition: rows '
                  'inserted through %s would not be captured', s.table_schema, s.table_name, s.log_name, t.parentrelid::regclass)
      INTO problem
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_partition_tree(c.objid) t ON t.level > 0
      JOIN merkle_guard.sources s ON s.table_oid = t.relid AND s.mode = 'trigger'
     WHERE c.object_type = 'table'
     LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'refused: %', problem
            USING ERRCODE = 'ML101',
                  HINT = 'Remove the source (merkle-listener source remove) first; to log a partitioned table, add it with --mode replication.';
    END IF;
    -- An inheritance child of a source: its rows read as the source's, and no capture sees
    -- them (the capture trigger fires for statements naming the source; the publication holds
    -- the source alone).
    SELECT format('%s may not inherit from %I.%I, which feeds merkle-listener log "%s": its rows would read as '
                  'the source''s and no capture would see them', i.inhrelid::regclass, s.table_schema, s.table_name, s.log_name)
      INTO problem
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_inherits i ON i.inhrelid = c.objid
      JOIN pg_class k ON k.oid = i.inhrelid AND NOT k.relispartition
      JOIN merkle_guard.sources s ON s.table_oid = i.inhparent
     WHERE c.object_type = 'table'
     LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'refused: %', problem
            USING ERRCODE = 'ML101',
                  HINT = 'Keep the rows in a table of their own, or insert them into the source (each is logged).';
    END IF;
    FOR cmd IN SELECT DISTINCT CASE WHEN c.object_type = 'trigger'
                                    THEN (SELECT t.tgrelid FROM pg_trigger t WHERE t.oid = c.objid)
                                    ELSE c.objid END AS relid,
                               c.object_type, c.objid, c.command_tag
               FROM pg_event_trigger_ddl_commands() c
               WHERE c.object_type IN ('table', 'trigger') LOOP
        -- The replication sources whose partition tree holds the table (pg_partition_ancestors
        -- lists the table itself too, when it is partitioned or a partition).
        FOR src IN SELECT s.* FROM merkle_guard.sources s
                   WHERE s.mode = 'replication'
                     AND s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(cmd.relid) a)
                     AND NOT s.retired LOOP
            problem := NULL;
            SELECT format('%I.%I, a replication source of the same log, would be a partition of it: pgoutput would '
                          'send its changes as %I.%I''s only', o.table_schema, o.table_name, src.table_schema, src.table_name)
              INTO problem
              FROM merkle_guard.sources o JOIN pg_partition_tree(src.table_oid) t ON t.relid = o.table_oid
             WHERE o.log_id = src.log_id AND o.mode = 'replication' AND o.source_id <> src.source_id AND t.level > 0
             LIMIT 1;
            IF problem IS NULL AND cmd.object_type = 'trigger' AND cmd.relid <> src.table_oid AND EXISTS (
                    SELECT 1 FROM pg_trigger t WHERE t.oid = cmd.objid AND t.tgfoid = to_regprocedure('merkle.partition_guard()')) THEN
                problem := 'the merkle-listener triggers of its partitions may not be altered or renamed';
            END IF;
            -- A partition of its own ALTER TABLE: lowering its identity is refused, where one
            -- created or attached is set to FULL below.
            IF problem IS NULL AND cmd.object_type = 'table' AND cmd.command_tag = 'ALTER TABLE'
               AND cmd.relid <> src.table_oid AND src.events && '{update,delete}'
               AND (SELECT relkind = 'r' AND relreplident <> 'f' FROM pg_class WHERE oid = cmd.relid) THEN
                problem := format('partition %s must keep REPLICA IDENTITY FULL while updates or deletes are logged',
                                  cmd.relid::regclass);
            END IF;
            IF problem IS NULL THEN
                SELECT format('trigger %I on partition %s may not be disabled (merkle-listener triggers are ENABLE ALWAYS)',
                              g.tgname, g.tgrelid::regclass)
                  INTO problem
                  FROM pg_partition_tree(src.table_oid) t JOIN pg_trigger g ON g.tgrelid = t.relid
                 WHERE t.level > 0 AND g.tgfoid = to_regprocedure('merkle.partition_guard()') AND g.tgenabled <> 'A'
                 LIMIT 1;
            END IF;
            -- A trigger of another function under a merkle-listener name would pass for the
            -- guard (install_partition_guards skips a table that has one).
            IF problem IS NULL THEN
                SELECT format('trigger %I on %s was not created by merkle-listener, whose triggers alone may be '
                              'named so', g.tgname, g.tgrelid::regclass)
                  INTO problem
                  FROM pg_partition_tree(src.table_oid) t JOIN pg_trigger g ON g.tgrelid = t.relid
                 WHERE g.tgname ~ '^merkle_(partition|truncate_begin|truncate_end)_[0-9]+$'
                   AND g.tgfoid <> to_regprocedure('merkle.partition_guard()')
                 LIMIT 1;
            END IF;
            -- An unlogged partition's rows write no WAL: the slot would never send them.
            IF problem IS NULL THEN
                SELECT format('partition %s is UNLOGGED: its rows write no WAL, so the log''s slot would never '
                              'send them', t.relid::regclass)
                  INTO problem
                  FROM pg_partition_tree(src.table_oid) t JOIN pg_class c ON c.oid = t.relid
                 WHERE t.level > 0 AND c.relpersistence <> 'p'
                 LIMIT 1;
            END IF;
            IF problem IS NOT NULL THEN
                RAISE EXCEPTION 'refused on %.%: % (it feeds merkle-listener log "%")',
                    src.table_schema, src.table_name, problem, src.log_name
                    USING ERRCODE = 'ML101',
                          HINT = 'Remove the source (merkle-listener source remove), change the tables, then add it again.';
            END IF;
            -- A partition without its guard yet was attached by this command (one created
            -- as a partition is empty): rows it holds would join the source without a leaf.
            SELECT t.relid::regclass AS rel INTO joined
              FROM pg_partition_tree(src.table_oid) t JOIN pg_class c ON c.oid = t.relid
             WHERE t.level > 0 AND c.relkind = 'r'
               AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.relid
                                  AND g.tgname = format('merkle_partition_%s', src.source_id)
                                  AND g.tgfoid = to_regprocedure('merkle.partition_guard()'))
               AND merkle_guard.has_rows(t.relid)
             LIMIT 1;
            IF FOUND THEN
                RAISE EXCEPTION 'ATTACH PARTITION of % refused: it holds rows, which would join %.% (it feeds '
                                'merkle-listener log "%") without a leaf', joined.rel, src.table_schema,
                                src.table_name, src.log_name
                    USING ERRCODE = 'ML101',
                          HINT = format('Attach it empty and INSERT its rows through %I.%I (each is logged).',
                                        src.table_schema, src.table_name);
            END IF;
            PERFORM merkle_guard.install_partition_guards(src.source_id);
        END LOOP;
    END LOOP;
    -- A table still carrying the guard of a source it is no longer under was detached from it
    -- by this command (ALTER TABLE ... DETACH PARTITION): its rows left the source without a
    -- leaf. Refused unless it is empty; an empty one is let go, its guard dropped.
    FOR left_tree IN SELECT g.tgrelid::regclass AS rel, g.tgname, s.table_schema, s.table_name, s.events, s.log_name
                       FROM pg_trigger g
                       JOIN pg_class c ON c.oid = g.tgrelid AND c.relkind IN ('r', 'p')
                       JOIN merkle_guard.sources s ON g.tgname = format('merkle_partition_%s', s.source_id)
                      WHERE g.tgfoid = to_regprocedure('merkle.partition_guard()') AND s.mode = 'replication'
                        AND g.tgrelid <> s.table_oid
                        AND NOT s.retired
                        AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(g.tgrelid) a WHERE a.relid = s.table_oid)
                        -- only where this command touched the table or its source's tree (found
                        -- by review: every DDL in the database read every such table)
                        AND EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() k
                                     WHERE k.object_type = 'table'
                                       AND (k.objid = g.tgrelid OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(k.objid) a)))
                      LOOP
        IF merkle_guard.has_rows(left_tree.rel) THEN
            RAISE EXCEPTION 'DETACH PARTITION of % refused: it holds rows of %.%, which feeds merkle-listener log "%", '
                            'and they would leave the source without a leaf', left_tree.rel, left_tree.table_schema,
                            left_tree.table_name, left_tree.log_name
                USING ERRCODE = 'ML101',
                      HINT = CASE WHEN 'delete' = ANY (left_tree.events)
                                  THEN format('DELETE FROM %s first (each row is logged as deleted), then detach it.', left_tree.rel)
                                  ELSE 'Detach it once it is empty, or remove the source (merkle-listener source remove) first.' END;
        END IF;
        PERFORM merkle_guard.pin(left_tree.rel);
        PERFORM merkle_guard.mark('drop_triggers');
        EXECUTE format('DROP TRIGGER %I ON %s', left_tree.tgname, left_tree.rel);
        PERFORM merkle_guard.unmark('drop_triggers');
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_partition_guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    obj record;
    sid integer;
    rel regclass;
    src record;
BEGIN
    IF merkle_guard.own_ddl_running('drop_triggers') THEN
        RETURN;  -- merkle-listener removing its own triggers
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type = 'trigger' LOOP
        sid := substring(obj.address_names[3] FROM '^merkle_(?:partition|truncate_begin|truncate_end)_([0-9]+)$')::integer;
        CONTINUE WHEN sid IS NULL;
        IF obj.original THEN
            rel := to_regclass(format('%I.%I', obj.address_names[1], obj.address_names[2]));
            IF EXISTS (SELECT 1 FROM merkle_guard.sources s
                        WHERE s.source_id = sid
                          AND s.table_oid IN (SELECT rel UNION ALL SELECT a.relid FROM pg_partition_ancestors(rel) a)) THEN
                RAISE EXCEPTION 'DROP TRIGGER refused: % is a merkle-listener trigger', obj.object_identity
                    USING ERRCODE = 'ML101',
                          HINT = 'Use merkle-listener source remove to stop capturing a table.';
            END IF;
        ELSIF obj.address_names[3] = format('merkle_partition_%s', sid) THEN
            -- Dropped with its table (DROP TABLE, DROP SCHEMA ... CASCADE, DROP OWNED): a
            -- partition of a source, unless the source's own table goes too.
            SELECT s.table_schema, s.table_name, s.events, s.log_name INTO src
              FROM merkle_guard.sources s
             WHERE s.source_id = sid
               AND NOT s.retired
               AND NOT EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d
                                WHERE d.classid = 'pg_class'::regclass AND d.objid = s.table_oid);
            IF FOUND THEN
                RAISE EXCEPTION 'DROP of partition %.% refused: it is a partition of %.%, which feeds merkle-listener log "%", '
                                'and its rows would leave the source without a leaf',
                    obj.address_names[1], obj.address_names[2], src.table_schema, src.table_name, src.log_name
                    USING ERRCODE = 'ML101',
                          HINT = CASE WHEN 'delete' = ANY (src.events)
                                      THEN 'DELETE its rows first (each is logged as deleted), DETACH PARTITION it (allowed once it is empty), then drop it.'
                                      ELSE 'DETACH PARTITION it once it is empty, then drop it; or remove the source (merkle-listener source remove) first.' END;
            END IF;
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_detach_concurrently() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_query() ~* 'detach' AND current_query() ~* 'concurrently' AND EXISTS (
            SELECT 1 FROM merkle_guard.sources s JOIN pg_class c ON c.oid = s.table_oid
             WHERE s.mode = 'replication' AND c.relkind = 'p') THEN
        RAISE EXCEPTION 'DETACH PARTITION ... CONCURRENTLY is refused in this database: it commits the detach before '
                        'merkle-listener''s guard can check the partition, whose rows would leave a partitioned source '
                        'without a leaf'
            USING ERRCODE = 'ML101',
                  HINT = 'Use DETACH PARTITION without CONCURRENTLY: the guard lets an empty partition go.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_source_column_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hit record;
BEGIN
    IF merkle_guard.own_ddl_running('drop_triggers') OR TG_TAG = 'ALTER TABLE' THEN
        RETURN;  -- an ALTER TABLE ... DROP COLUMN is check_source_ddl's, at its end
    END IF;
    -- A source's table dropped with something else: its type (DROP TYPE ... CASCADE), the
    -- table it is a partition or child of, its schema (found by review: the owners of those, other
    -- roles, dropped a source, rows and all). Its owner drops it by naming it (DROP TABLE), or
    -- names another source it goes with (a partitioned source and its partitions).
    SELECT s.table_schema, s.table_name, s.log_name INTO hit
      FROM pg_event_trigger_dropped_objects() d
      JOIN merkle_guard.sources s ON s.table_oid = d.objid
     WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND NOT d.original AND NOT s.retired
       AND NOT EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() o JOIN merkle_guard.sources t ON t.table_oid = o.objid
                        WHERE o.classid = 'pg_class'::regclass AND o.objsubid = 0 AND o.original)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '% refused: it would drop table %.%, which feeds merkle-listener log "%", with its rows',
            TG_TAG, hit.table_schema, hit.table_name, hit.log_name
            USING ERRCODE = 'ML101',
                  HINT = 'Remove the source (merkle-listener source remove), or drop the table itself (DROP TABLE), first.';
    END IF;
    -- An attribute of a composite type (or of a table, view, foreign table whose row type it
    -- is) that a hashed column is made of, dropped with what its type is (DROP DOMAIN, TYPE,
    -- TABLE ... CASCADE, DROP OWNED BY ... CASCADE): the text of every stored value changes
    -- (found by review). ALTER TYPE, ALTER TABLE are check_hashed_type_text's.
    SELECT y.oid::regtype AS typ, d.address_names[3] AS col INTO hit
      FROM pg_event_trigger_dropped_objects() d
      JOIN pg_type y ON y.typrelid = d.objid
     WHERE d.classid = 'pg_class'::regclass AND d.objsubid > 0
       AND y.oid IN (SELECT merkle_guard.hashed_types())
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '% refused: it drops attribute % of %, which would change the text of committed values '
                        'that merkle-listener has hashed (a source''s hashed column is made of this type)',
            TG_TAG, hit.col, hit.typ
            USING ERRCODE = 'ML101',
                  HINT = 'Drop what the attribute depends on without CASCADE, or remove the source first.';
    END IF;
    SELECT d.address_names[3] AS col, s.table_schema, s.table_name, s.log_name INTO hit
      FROM pg_event_trigger_dropped_objects() d
      JOIN merkle_guard.sources s ON s.table_oid = d.objid
     WHERE d.object_type = 'table column'
       AND d.address_names[3] = ANY (s.columns || s.key_columns || coalesce(s.entry_column, ''))
       AND NOT s.retired
       AND NOT EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() t
                        WHERE t.object_type = 'table' AND t.objid = s.table_oid)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'DROP refused: column % is hashed by the log and may not be dropped (%.% feeds merkle-listener log "%")',
            hit.col, hit.table_schema, hit.table_name, hit.log_name
            USING ERRCODE = 'ML101',
                  HINT = 'Remove the source (merkle-listener source remove) first, or drop what the column depends on without CASCADE.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_source_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel oid := pg_event_trigger_table_rewrite_oid();
    src record;
    shown text;     -- the first source, for the messages
    log_name text;
    hashed text[] := '{}';
    problem text;
    mine xid[];
    altered text[];
    early record;
    unbuilt regclass;
BEGIN
    -- The records read below may not change before the transaction ends (found by review:
    -- another session forgot a column between the statements of this check, which then read
    -- it unchecked): their rows are locked, and a new record waits for the table (put_source_column).
    PERFORM 1 FROM merkle_guard.sources s
     WHERE s.table_oid = rel OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(rel) a) FOR SHARE;
    PERFORM 1 FROM merkle_guard.source_columns r
     WHERE r.source_id IN (SELECT s.source_id FROM merkle_guard.sources s
                            WHERE s.table_oid = rel OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(rel) a))
       FOR SHARE;
    -- The sources whose table is rel or a partitioned ancestor of it.
    FOR src IN SELECT s.* FROM merkle_guard.sources s
                WHERE (s.table_oid = rel OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(rel) a))
                  AND NOT s.retired
                ORDER BY s.source_id LOOP
        shown := coalesce(shown, src.table_schema || '.' || src.table_name);
        log_name := coalesce(log_name, src.log_name);
        -- What the leaves are computed from, each with its recorded type, which the check below
        -- makes sure it still has: a column retyped by this statement would be read as its new
        -- type from the old rows (found by review: that crashed the server). A column whose type
        -- is not recorded is not hashed (an entry-column source's other columns) and not read.
        hashed := hashed || ARRAY(SELECT r.name FROM merkle_guard.source_columns r
                                   WHERE r.source_id = src.source_id AND r.name = ANY (
                                         src.columns || src.key_columns || array_remove(ARRAY[src.entry_column], NULL)));
        -- Retyped or gone: refused at the end by check_source_ddl, and unreadable here.
        SELECT format('column %I is hashed by the log and may not be dropped, renamed or retyped', col)
          INTO problem
          FROM unnest(src.columns || src.key_columns || array_remove(ARRAY[src.entry_column], NULL)) AS col
          LEFT JOIN pg_attribute a ON a.attrelid = rel AND a.attname = col AND NOT a.attisdropped AND a.attnum > 0
          LEFT JOIN merkle_guard.source_columns r ON r.source_id = src.source_id AND r.name = col
         WHERE a.attnum IS NULL
            OR (r.name IS NOT NULL AND (a.atttypid <> r.type_oid OR a.atttypmod <> r.typmod))
         LIMIT 1;
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION 'ALTER refused on %.%: % (it feeds merkle-listener log "%")',
                src.table_schema, src.table_name, problem, src.log_name
                USING ERRCODE = 'ML101',
                      HINT = 'Remove the source (merkle-listener source remove), alter the table, then add it again.';
        END IF;
    END LOOP;
    IF shown IS NULL THEN
        RETURN;
    END IF;
    hashed := ARRAY(SELECT DISTINCT unnest(hashed));
    -- Each column read, as the type the catalog gives it now, must have the type its stored
    -- values have: otherwise it would be misread (that can crash the server).
    SELECT format('column %I does not have the type of its stored values any more', a.attname) INTO problem
      FROM merkle_guard.sources s JOIN merkle_guard.source_columns r USING (source_id)
      JOIN pg_attribute a ON a.attrelid = rel AND a.attname = r.name AND a.attnum > 0 AND NOT a.attisdropped
     WHERE (s.table_oid = rel OR s.table_oid IN (SELECT a2.relid FROM pg_partition_ancestors(rel) a2))
       AND NOT s.retired AND r.name = ANY (hashed)
       AND (a.atttypid <> r.heap_type OR a.atttypmod <> r.heap_typmod)
     LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'ALTER refused on %: % (it feeds merkle-listener log "%")', shown, problem, log_name
            USING ERRCODE = 'ML101',
                  HINT = 'Remove the source (merkle-listener source remove), alter the table, then add it again.';
    END IF;
    -- The transaction's ids, its subtransactions' included: each holds a lock on its own.
    mine := ARRAY(SELECT l.transactionid FROM pg_locks l
                   WHERE l.locktype = 'transactionid' AND l.pid = pg_backend_pid()
                     AND l.mode = 'ExclusiveLock' AND l.granted);
    -- The record of what is read and as which type must predate the statement: the owner's
    -- code can run inside it (a USING expression) and change the record, and a column read as a
    -- type that its bytes are not crashes the server (found by review).
    IF EXISTS (SELECT 1 FROM merkle_guard.sources s LEFT JOIN merkle_guard.source_columns r USING (source_id)
                WHERE (s.table_oid = rel OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(rel) a))
                  AND (s.xmin = ANY (mine) OR r.xmin = ANY (mine))) THEN
        RAISE EXCEPTION 'ALTER refused on %: its source was registered or changed in this transaction, and '
                        'merkle-listener checks a rewrite against a record made before it (it feeds merkle-listener '
                        'log "%")', shown, log_name
            USING ERRCODE = 'ML101',
                  HINT = 'Alter the table in a transaction of its own.';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO altered
      FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = ANY (hashed)
       AND (a.xmin = ANY (mine)
            OR EXISTS (SELECT 1 FROM pg_attrdef d
                        WHERE d.adrelid = rel AND d.adnum = a.attnum AND d.xmin = ANY (mine)));
    IF altered IS NULL THEN
        RETURN;  -- the rewrite copies the hashed values as they are
    END IF;
    SELECT a.attname, h.attname AS hashed_name INTO early
      FROM pg_attribute a
      JOIN LATERAL (SELECT max(x.attnum) AS last FROM pg_attribute x
                     WHERE x.attrelid = rel AND x.attname = ANY (hashed)) m ON true
      JOIN pg_attribute h ON h.attrelid = rel AND h.attnum = m.last
     WHERE a.attrelid = rel AND a.attnum > 0 AND a.attnum < m.last AND NOT a.attisdropped
       AND a.attname <> ALL (hashed) AND a.xmin = ANY (mine)
     ORDER BY a.attnum
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ALTER refused on %: merkle-listener cannot check that this rewrite of % keeps the hashed '
                        'values, since this transaction altered hashed column % and also column %, which comes before '
                        'hashed column %: the rows as they were cannot be read (it feeds merkle-listener log "%")',
            shown, rel::regclass, array_to_string(altered, ', '), early.attname, early.hashed_name, log_name
            USING ERRCODE = 'ML101',
                  HINT = format('Alter column %I in a transaction of its own, and the hashed columns in another.',
                                early.attname);
    END IF;
    -- An index on a retyped (or recomputed) column is created empty, to be built after the
    -- rewrite; planning any query on the table reads a B-tree's first page, which it lacks yet.
    SELECT i.indexrelid::regclass INTO unbuilt
      FROM pg_index i
     WHERE i.indrelid = rel AND i.indisvalid AND pg_relation_size(i.indexrelid) = 0
     ORDER BY i.indexrelid
     LIMIT 1;
    IF unbuilt IS NOT NULL THEN
        RAISE EXCEPTION 'ALTER refused on %: merkle-listener cannot check that this rewrite of % keeps the values '
                        'of hashed column %, since the statement builds index % anew and the rows cannot be read '
                        'before it is built (it feeds merkle-listener log "%")',
            shown, rel::regclass, array_to_string(altered, ', '), unbuilt, log_name
            USING ERRCODE = 'ML101',
                  HINT = format('To change no hashed value, drop index %s (or its constraint) first and create it '
                                'again afterwards; to change values, UPDATE the rows (each change is logged).',
                                unbuilt);
    END IF;
    INSERT INTO merkle_guard.rewrite_checks (xid, relid, filenode, columns, altered, digest)
    VALUES (pg_current_xact_id(), rel, pg_relation_filenode(rel), hashed, altered, merkle_guard.rewrite_digest(rel, hashed))
    -- A check not yet made (its rewrite was under way when a statement ended inside it) keeps
    -- the digest of the older rows, the ones the log knows.
    ON CONFLICT (xid, relid) DO UPDATE SET filenode = excluded.filenode;
END
$$;

-- ALTER TYPE ... RENAME VALUE changes the text of every stored value of an enum at once, with
-- no rewrite (found by review: the owner of an enum that a source's column has swapped two
-- labels in every committed row). Before an ALTER TYPE the labels of the enums that hashed
-- values are made of are remembered; after it, one that changed is refused.
CREATE TABLE IF NOT EXISTS merkle_guard.enum_labels (
    xid        xid8 NOT NULL,
    label_oid  oid NOT NULL,
    label      name NOT NULL,
    PRIMARY KEY (xid, label_oid)
);

-- The types a hashed column's text is made of: its type, and those that an array, domain,
-- composite, range or multirange type on the way is made of.
CREATE OR REPLACE FUNCTION merkle_guard.hashed_types() RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH RECURSIVE t(typid) AS (
        SELECT a.atttypid
          FROM merkle_guard.sources s JOIN merkle_guard.source_columns r ON r.source_id = s.source_id
          JOIN pg_attribute a ON a.attrelid = s.table_oid AND a.attname = r.name AND a.attnum > 0 AND NOT a.attisdropped
         WHERE NOT s.retired
        UNION
        SELECT n.next
          FROM t JOIN pg_type y ON y.oid = t.typid
          CROSS JOIN LATERAL (SELECT y.typelem WHERE y.typelem <> 0
                              UNION ALL SELECT y.typbasetype WHERE y.typbasetype <> 0
                              UNION ALL SELECT x.atttypid FROM pg_attribute x
                                         WHERE x.attrelid = y.typrelid AND x.attnum > 0 AND NOT x.attisdropped
                              UNION ALL SELECT g.rngsubtype FROM pg_range g WHERE g.rngtypid = y.oid
                              UNION ALL SELECT g.rngtypid FROM pg_range g WHERE g.rngmultitypid = y.oid) n(next))
    SELECT t.typid FROM t
$$;

-- The enums whose labels are (part of) a hashed column's text.
CREATE OR REPLACE FUNCTION merkle_guard.hashed_enums() RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT y.oid FROM pg_type y WHERE y.oid IN (SELECT merkle_guard.hashed_types()) AND y.typtype = 'e'
$$;

-- A composite value prints the attributes its type has now: ALTER TYPE ... ADD or DROP
-- ATTRIBUTE, ALTER [FOREIGN] TABLE ... ADD or DROP COLUMN, CREATE OR REPLACE VIEW adding one,
-- on the type (or table, view) a hashed column is made of changes the text of every stored
-- value at once, with no rewrite (found by review: PostgreSQL refuses such a change only when
-- it needs one). The attribute list of each such type is remembered before the first of these
-- commands in a transaction, and every one after it must leave it as it was (so that commands
-- run inside one, by code it calls, are held to it too).
CREATE TABLE IF NOT EXISTS merkle_guard.composite_attrs (
    xid    xid8 NOT NULL,
    relid  oid NOT NULL,
    attrs  text NOT NULL,
    PRIMARY KEY (xid, relid)
);

CREATE OR REPLACE FUNCTION merkle_guard.composite_signature(p_relid oid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(string_agg(format('%s:%s:%s:%s', a.attnum, a.atttypid, a.atttypmod, a.attisdropped), ','
                               ORDER BY a.attnum), '')
      FROM pg_attribute a WHERE a.attrelid = p_relid AND a.attnum > 0
$$;

CREATE OR REPLACE FUNCTION merkle_guard.remember_hashed_type_text() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_TAG = 'ALTER TYPE' THEN
        INSERT INTO merkle_guard.enum_labels (xid, label_oid, label)
        SELECT pg_current_xact_id(), e.oid, e.enumlabel FROM pg_enum e
         WHERE e.enumtypid IN (SELECT merkle_guard.hashed_enums())
        ON CONFLICT (xid, label_oid) DO UPDATE SET label = excluded.label;
    END IF;
    -- Those of finished transactions go; rows another session's DDL is deleting are left to it
    -- (waiting for them would make unrelated DDL of two sessions wait for each other).
    DELETE FROM merkle_guard.composite_attrs WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM merkle_guard.composite_attrs
         WHERE xid < pg_snapshot_xmin(pg_current_snapshot()) FOR UPDATE SKIP LOCKED));
    INSERT INTO merkle_guard.composite_attrs (xid, relid, attrs)
    SELECT pg_current_xact_id(), y.typrelid, merkle_guard.composite_signature(y.typrelid) FROM pg_type y
     WHERE y.oid IN (SELECT merkle_guard.hashed_types()) AND y.typrelid <> 0
    ON CONFLICT (xid, relid) DO NOTHING;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_hashed_type_text() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    was name;
    now name;
    typ regtype;
BEGIN
    SELECT l.label, e.enumlabel, e.enumtypid INTO was, now, typ
      FROM merkle_guard.enum_labels l JOIN pg_enum e ON e.oid = l.label_oid
     WHERE l.xid = pg_current_xact_id_if_assigned() AND e.enumlabel <> l.label
     LIMIT 1;
    DELETE FROM merkle_guard.enum_labels WHERE xid = pg_current_xact_id_if_assigned();
    IF was IS NOT NULL THEN
        RAISE EXCEPTION 'ALTER TYPE refused: renaming value % of % to % would change committed values that '
                        'merkle-listener has hashed (a source''s hashed column is made of this enum)', was, typ, now
            USING ERRCODE = 'ML101',
                  HINT = 'Add a new value instead (ALTER TYPE ... ADD VALUE), and UPDATE the rows (each change is logged).';
    END IF;
    SELECT y.oid::regtype INTO typ
      FROM merkle_guard.composite_attrs r JOIN pg_type y ON y.typrelid = r.relid
     WHERE r.xid = pg_current_xact_id_if_assigned() AND merkle_guard.composite_signature(r.relid) <> r.attrs
     LIMIT 1;
    IF typ IS NOT NULL THEN
        RAISE EXCEPTION '% refused: it adds or drops attributes of %, which would change the text of committed '
                        'values that merkle-listener has hashed (a source''s hashed column is made of this type)', TG_TAG, typ
            USING ERRCODE = 'ML101',
                  HINT = 'Make a new type, add a column of it, and UPDATE the rows (each change is logged).';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION merkle_guard.check_source_rewritten() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    chk record;
    src record;
BEGIN
    FOR chk IN SELECT * FROM merkle_guard.rewrite_checks WHERE xid = pg_current_xact_id_if_assigned() ORDER BY relid LOOP
        CONTINUE WHEN pg_relation_filenode(chk.relid) IS NOT DISTINCT FROM chk.filenode;
        IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = chk.relid)
           AND merkle_guard.rewrite_digest(chk.relid, chk.columns) IS DISTINCT FROM chk.digest THEN
            SELECT s.table_schema, s.table_name, s.table_oid, s.log_name INTO src
              FROM merkle_guard.sources s
             WHERE s.table_oid = chk.relid OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(chk.relid) a)
             LIMIT 1;
            RAISE EXCEPTION 'ALTER refused on %.%: it would rewrite committed values of hashed column % without a leaf '
                            '(it feeds merkle-listener log "%")',
                src.table_schema, src.table_name, array_to_string(chk.altered, ', ')
                || CASE WHEN chk.relid <> src.table_oid THEN format(' in partition %s', chk.relid::regclass) ELSE '' END,
                src.log_name
                USING ERRCODE = 'ML101',
                      HINT = 'UPDATE the rows instead, so that each change is logged (an append-only source refuses '
                             'that), or remove the source (merkle-listener source remove), alter the table, then add it again.';
        END IF;
        DELETE FROM merkle_guard.rewrite_checks WHERE xid = chk.xid AND relid = chk.relid;
    END LOOP;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA merkle_guard FROM PUBLIC;
GRANT EXECUTE ON FUNCTION merkle_guard.mark_own_ddl(text, integer), merkle_guard.unmark_own_ddl(text, integer) TO PUBLIC;
GRANT EXECUTE ON FUNCTION merkle_guard.log_publication_changed(text) TO PUBLIC;
