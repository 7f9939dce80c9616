-- merkle-listener's own changes to its triggers are marked by a row in merkle.own_ddl, which
-- only the owner of schema merkle (and roles it grants) may write (found by review: they
-- were marked by session settings, merkle.dropping_triggers, merkle.installing_partition_guards
-- and merkle.truncating_sources, which any role may set: a table's owner could drop or disable
-- its capture trigger, or TRUNCATE a partition of a source, with one SET before it).
--
-- A mark holds for the transaction that wrote it (pg_current_xact_id(), the top-level one) and
-- is deleted by the code that wrote it once done; an aborted transaction takes it along.
-- The event triggers and merkle.partition_guard() are SECURITY DEFINER and read it as the
-- schema's owner; merkle.mark_own_ddl() runs as its caller, so a role that cannot write the
-- table cannot mark.
--
-- Also refused from here (found by review: rows left or joined a source without a leaf):
--   * ALTER TABLE ... DETACH PARTITION of a partition that holds rows (an empty one is let go,
--     its guard dropped), and DETACH PARTITION ... CONCURRENTLY under a partitioned source
--     (it commits the detach before the guard runs);
--   * DROP TABLE (or DROP SCHEMA ... CASCADE, DROP OWNED) of a partition, unless the source's
--     own table is dropped too;
--   * ATTACH PARTITION of a table that holds rows;
--   * an UNLOGGED partition (its rows write no WAL: the slot never sends them);
--   * an inheritance child of a source (CREATE TABLE ... INHERITS, ALTER TABLE ... INHERIT):
--     its rows read as the source's, and neither capture mode sees them.
--
-- Trigger functions run as their owner (SECURITY DEFINER) and PostgreSQL checks EXECUTE only
-- when a trigger is created: EXECUTE is revoked from PUBLIC on the capture functions,
-- merkle.partition_guard() and merkle.refuse_change(), so no other role can put them on a table
-- of its own (found by review: that forged leaves and TRUNCATE marks, and ran the role's casts
-- as the function's owner). merkle-listener's own guard triggers are recognised by their
-- function, never by their name alone.

CREATE TABLE merkle.own_ddl (
    xid        xid8 NOT NULL,
    purpose    text NOT NULL CHECK (purpose IN ('drop_triggers', 'install_partition_guards', 'truncate')),
    source_id  integer
);
CREATE INDEX own_ddl_xid ON merkle.own_ddl (xid);

-- The guard reads it as the schema's owner, already while this migration drops triggers below:
-- a superuser applying this to a role's schema hands it to that role now, not after it.
DO $$
BEGIN
    EXECUTE format('ALTER TABLE merkle.own_ddl OWNER TO %s',
                   (SELECT nspowner::regrole FROM pg_namespace WHERE nspname = 'merkle'));
END
$$;

CREATE FUNCTION merkle.mark_own_ddl(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO merkle.own_ddl (xid, purpose, source_id) VALUES (pg_current_xact_id(), p_purpose, p_source_id)
$$;

-- One mark: an inner mark of the same purpose leaves the outer one standing.
CREATE FUNCTION merkle.unmark_own_ddl(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM merkle.own_ddl WHERE ctid = (
        SELECT ctid FROM merkle.own_ddl
         WHERE xid = pg_current_xact_id() AND purpose = p_purpose AND source_id IS NOT DISTINCT FROM p_source_id
         LIMIT 1)
$$;

-- Whether a table (or a partitioned one's partitions) holds rows, for the guard, which runs
-- as a superuser: only plain tables are read (ONLY: not their inheritance children), since a
-- view, a foreign table or a rule would run its owner's code as the reader. A table whose file
-- is empty never held a row, whatever the snapshot; any other is read with a fresh one, so a
-- REPEATABLE READ or SERIALIZABLE transaction, whose snapshot may predate rows committed since,
-- is refused.
CREATE FUNCTION merkle.has_rows(rel regclass) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM ONLY %s)', part) INTO found;
        IF found THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$$;

-- p_source_id NULL: a mark of that purpose for any source.
CREATE FUNCTION merkle.own_ddl_running(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM merkle.own_ddl
                    WHERE xid = pg_current_xact_id_if_assigned() AND purpose = p_purpose
                      AND (p_source_id IS NULL OR source_id = p_source_id))
$$;

CREATE OR REPLACE FUNCTION merkle.check_source_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    obj record;
BEGIN
    IF merkle.own_ddl_running('drop_triggers') THEN
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

CREATE OR REPLACE FUNCTION merkle.partition_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src record;
BEGIN
    SELECT s.*, l.name AS log_name INTO src
      FROM merkle.sources s JOIN merkle.logs l USING (log_id)
     WHERE s.source_id = TG_ARGV[0]::integer
       AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id);
    IF NOT FOUND THEN
        RETURN NULL;  -- its source is gone or being removed
    END IF;
    IF TG_RELID = src.table_oid THEN
        -- In the statement's transaction, so an error inside the statement takes the mark with it.
        -- Only from the two triggers install_partition_guards put there (EXECUTE is revoked, so
        -- no other role can create one that calls this function; belt and braces).
        IF TG_OP = 'TRUNCATE' AND TG_NAME = format('merkle_truncate_begin_%s', src.source_id) THEN
            PERFORM merkle.mark_own_ddl('truncate', src.source_id);
        ELSIF TG_OP = 'TRUNCATE' AND TG_NAME = format('merkle_truncate_end_%s', src.source_id) THEN
            PERFORM merkle.unmark_own_ddl('truncate', src.source_id);
        END IF;
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = src.table_oid) THEN
        RETURN NULL;  -- no longer a partition of the source
    END IF;
    IF TG_OP = 'TRUNCATE' AND merkle.own_ddl_running('truncate', src.source_id) THEN
        RETURN NULL;  -- part of a TRUNCATE of the source, which is logged
    END IF;
    IF TG_OP = 'TRUNCATE' AND 'truncate' = ANY (src.events) THEN
        RAISE EXCEPTION 'TRUNCATE of %.% is refused: it is a partition of %.%, which feeds merkle-listener log "%", '
                        'and the TRUNCATE of a partition does not reach the log (its rows would vanish unlogged)',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, src.table_schema, src.table_name, src.log_name
            USING ERRCODE = 'ML100',
                  HINT = format('TRUNCATE %I.%I (the partitioned table, logged) to empty all of it, or DELETE the '
                                'partition''s rows (logged when the source logs deletes).',
                                src.table_schema, src.table_name);
    END IF;
    RAISE EXCEPTION '% on %.% is refused: it is a partition of %.%, which % (it feeds merkle-listener log "%")',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, src.table_schema, src.table_name,
        CASE WHEN src.append_only THEN 'is append-only' ELSE 'refuses TRUNCATE' END, src.log_name
        USING ERRCODE = 'ML100',
              HINT = CASE WHEN src.append_only
                          THEN 'Append rows instead; to allow changes, run `merkle-listener source remove` and add the source again without --append-only.'
                          ELSE 'The source refuses TRUNCATE (--truncate refuse); remove it and add it again with --truncate log to log TRUNCATE of the partitioned table.' END;
END
$$;

CREATE OR REPLACE FUNCTION merkle.install_partition_guards(p_source_id integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src record;
    part record;
    trg text := format('merkle_partition_%s', p_source_id);
    mark record;
BEGIN
    SELECT s.* INTO src FROM merkle.sources s
     WHERE s.source_id = p_source_id AND s.mode = 'replication'
       AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id);
    IF NOT FOUND OR (SELECT relkind FROM pg_class WHERE oid = src.table_oid) IS DISTINCT FROM 'p' THEN
        RETURN;
    END IF;
    -- Its own ALTER TABLE ... ENABLE ALWAYS would run the event trigger below again, once per
    -- partition, each run looping over the partitions.
    PERFORM merkle.mark_own_ddl('install_partition_guards', p_source_id);
    IF 'truncate' = ANY (src.events) THEN
        FOR mark IN SELECT * FROM (VALUES ('begin', 'BEFORE'), ('end', 'AFTER')) v(name, tg_when) LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = src.table_oid
                              AND tgname = format('merkle_truncate_%s_%s', mark.name, p_source_id)) THEN
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
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', part.relid::regclass);
        END LOOP;
    END IF;
    -- Foreign partitions are left out: their rows are on another server, never streamed.
    FOR part IN SELECT t.relid FROM pg_partition_tree(src.table_oid) t JOIN pg_class c ON c.oid = t.relid
                 WHERE t.level > 0 AND c.relkind IN ('r', 'p')
                   AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.relid AND g.tgname = trg) LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE %s ON %s FOR EACH STATEMENT EXECUTE FUNCTION merkle.partition_guard(%L)',
                       trg, CASE WHEN src.append_only THEN 'UPDATE OR DELETE OR TRUNCATE' ELSE 'TRUNCATE' END,
                       part.relid::regclass, p_source_id);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', part.relid::regclass, trg);
    END LOOP;
    PERFORM merkle.unmark_own_ddl('install_partition_guards', p_source_id);
END
$$;

CREATE OR REPLACE FUNCTION merkle.check_source_partitions() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    src record;
    problem text;
    left_tree record;
    joined record;
BEGIN
    IF merkle.own_ddl_running('install_partition_guards') THEN
        RETURN;  -- merkle.install_partition_guards creating them
    END IF;
    -- A trigger-mode source may not become a partition (ATTACH PARTITION): its statement
    -- trigger would not fire for rows inserted through the partitioned table.
    SELECT format('%I.%I feeds merkle-listener log "%s" in trigger mode and may not be a partition: rows '
                  'inserted through %s would not be captured', s.table_schema, s.table_name, l.name, t.parentrelid::regclass)
      INTO problem
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_partition_tree(c.objid) t ON t.level > 0
      JOIN merkle.sources s ON s.table_oid = t.relid AND s.mode = 'trigger'
      JOIN merkle.logs l USING (log_id)
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
                  'the source''s and no capture would see them', i.inhrelid::regclass, s.table_schema, s.table_name, l.name)
      INTO problem
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_inherits i ON i.inhrelid = c.objid
      JOIN pg_class k ON k.oid = i.inhrelid AND NOT k.relispartition
      JOIN merkle.sources s ON s.table_oid = i.inhparent
      JOIN merkle.logs l USING (log_id)
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
        FOR src IN SELECT s.*, l.name AS log_name FROM merkle.sources s JOIN merkle.logs l USING (log_id)
                   WHERE s.mode = 'replication'
                     AND s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(cmd.relid) a)
                     AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id) LOOP
            problem := NULL;
            SELECT format('%I.%I, a replication source of the same log, would be a partition of it: pgoutput would '
                          'send its changes as %I.%I''s only', o.table_schema, o.table_name, src.table_schema, src.table_name)
              INTO problem
              FROM merkle.sources o JOIN pg_partition_tree(src.table_oid) t ON t.relid = o.table_oid
             WHERE o.log_id = src.log_id AND o.mode = 'replication' AND o.source_id <> src.source_id AND t.level > 0
             LIMIT 1;
            IF problem IS NULL AND cmd.object_type = 'trigger' AND cmd.relid <> src.table_oid AND EXISTS (
                    SELECT 1 FROM pg_trigger t WHERE t.oid = cmd.objid AND t.tgfoid = 'merkle.partition_guard()'::regprocedure) THEN
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
                 WHERE t.level > 0 AND g.tgfoid = 'merkle.partition_guard()'::regprocedure AND g.tgenabled <> 'A'
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
                   AND g.tgfoid <> 'merkle.partition_guard()'::regprocedure
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
                                  AND g.tgfoid = 'merkle.partition_guard()'::regprocedure)
               AND merkle.has_rows(t.relid)
             LIMIT 1;
            IF FOUND THEN
                RAISE EXCEPTION 'ATTACH PARTITION of % refused: it holds rows, which would join %.% (it feeds '
                                'merkle-listener log "%") without a leaf', joined.rel, src.table_schema,
                                src.table_name, src.log_name
                    USING ERRCODE = 'ML101',
                          HINT = format('Attach it empty and INSERT its rows through %I.%I (each is logged).',
                                        src.table_schema, src.table_name);
            END IF;
            PERFORM merkle.install_partition_guards(src.source_id);
        END LOOP;
    END LOOP;
    -- A table still carrying the guard of a source it is no longer under was detached from it
    -- by this command (ALTER TABLE ... DETACH PARTITION): its rows left the source without a
    -- leaf. Refused unless it is empty; an empty one is let go, its guard dropped.
    FOR left_tree IN SELECT g.tgrelid::regclass AS rel, g.tgname, s.table_schema, s.table_name, s.events, l.name AS log_name
                       FROM pg_trigger g
                       JOIN pg_class c ON c.oid = g.tgrelid AND c.relkind IN ('r', 'p')
                       JOIN merkle.sources s ON g.tgname = format('merkle_partition_%s', s.source_id)
                       JOIN merkle.logs l USING (log_id)
                      WHERE g.tgfoid = 'merkle.partition_guard()'::regprocedure AND s.mode = 'replication'
                        AND g.tgrelid <> s.table_oid
                        AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id)
                        AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(g.tgrelid) a WHERE a.relid = s.table_oid) LOOP
        IF merkle.has_rows(left_tree.rel) THEN
            RAISE EXCEPTION 'DETACH PARTITION of % refused: it holds rows of %.%, which feeds merkle-listener log "%", '
                            'and they would leave the source without a leaf', left_tree.rel, left_tree.table_schema,
                            left_tree.table_name, left_tree.log_name
                USING ERRCODE = 'ML101',
                      HINT = CASE WHEN 'delete' = ANY (left_tree.events)
                                  THEN format('DELETE FROM %s first (each row is logged as deleted), then detach it.', left_tree.rel)
                                  ELSE 'Detach it once it is empty, or remove the source (merkle-listener source remove) first.' END;
        END IF;
        PERFORM merkle.mark_own_ddl('drop_triggers');
        EXECUTE format('DROP TRIGGER %I ON %s', left_tree.tgname, left_tree.rel);
        PERFORM merkle.unmark_own_ddl('drop_triggers');
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION merkle.check_partition_guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    obj record;
    sid integer;
    rel regclass;
    src record;
BEGIN
    IF merkle.own_ddl_running('drop_triggers') THEN
        RETURN;  -- merkle-listener removing its own triggers
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type = 'trigger' LOOP
        sid := substring(obj.address_names[3] FROM '^merkle_(?:partition|truncate_begin|truncate_end)_([0-9]+)$')::integer;
        CONTINUE WHEN sid IS NULL;
        IF obj.original THEN
            rel := to_regclass(format('%I.%I', obj.address_names[1], obj.address_names[2]));
            IF EXISTS (SELECT 1 FROM merkle.sources s
                        WHERE s.source_id = sid
                          AND s.table_oid IN (SELECT rel UNION ALL SELECT a.relid FROM pg_partition_ancestors(rel) a)) THEN
                RAISE EXCEPTION 'DROP TRIGGER refused: % is a merkle-listener trigger', obj.object_identity
                    USING ERRCODE = 'ML101',
                          HINT = 'Use merkle-listener source remove to stop capturing a table.';
            END IF;
        ELSIF obj.address_names[3] = format('merkle_partition_%s', sid) THEN
            -- Dropped with its table (DROP TABLE, DROP SCHEMA ... CASCADE, DROP OWNED): a
            -- partition of a source, unless the source's own table goes too.
            SELECT s.table_schema, s.table_name, s.events, l.name AS log_name INTO src
              FROM merkle.sources s JOIN merkle.logs l USING (log_id)
             WHERE s.source_id = sid
               AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id)
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

-- DETACH PARTITION ... CONCURRENTLY commits the detach in a first transaction, before any
-- ddl_command_end trigger runs: refused up front where a partitioned replication source
-- exists. ddl_command_start sees only the statement's text; the two keywords are enough (a
-- keyword cannot be split or quoted), and a false alarm costs a plain DETACH instead.
CREATE FUNCTION merkle.check_detach_concurrently() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_query() ~* 'detach' AND current_query() ~* 'concurrently' AND EXISTS (
            SELECT 1 FROM merkle.sources s JOIN pg_class c ON c.oid = s.table_oid
             WHERE s.mode = 'replication' AND c.relkind = 'p') THEN
        RAISE EXCEPTION 'DETACH PARTITION ... CONCURRENTLY is refused in this database: it commits the detach before '
                        'merkle-listener''s guard can check the partition, whose rows would leave a partitioned source '
                        'without a leaf'
            USING ERRCODE = 'ML101',
                  HINT = 'Use DETACH PARTITION without CONCURRENTLY: the guard lets an empty partition go.';
    END IF;
END
$$;

-- EXECUTE on the trigger functions: their owner's alone (see above).
REVOKE EXECUTE ON FUNCTION merkle.partition_guard(), merkle.refuse_change() FROM PUBLIC;
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS fn, p.proowner::regrole AS owner, pg_has_role(p.proowner, 'USAGE') AS mine
               FROM pg_proc p
              WHERE p.pronamespace = 'merkle'::regnamespace AND p.proname ~ '^capture_[0-9]+$'
                AND has_function_privilege('public', p.oid, 'EXECUTE') LOOP
        IF f.mine THEN
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.fn);
        ELSE
            RAISE WARNING 'merkle-listener: any role may put % on a table of its own and forge leaves; as % run: REVOKE EXECUTE ON FUNCTION % FROM PUBLIC;',
                f.fn, f.owner, f.fn;
        END IF;
    END LOOP;
END
$$;

-- A hashed column dropped by a DROP ... CASCADE of its type, domain or collation (or of a
-- function a generated column calls): no ALTER TABLE names it, so check_source_ddl never
-- runs. Refused when the column is a hashed, key or entry column of a source whose table
-- stays.
CREATE FUNCTION merkle.check_source_column_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hit record;
BEGIN
    IF merkle.own_ddl_running('drop_triggers') OR TG_TAG = 'ALTER TABLE' THEN
        RETURN;  -- an ALTER TABLE ... DROP COLUMN is check_source_ddl's, at its end
    END IF;
    SELECT d.address_names[3] AS col, s.table_schema, s.table_name, l.name AS log_name INTO hit
      FROM pg_event_trigger_dropped_objects() d
      JOIN merkle.sources s ON s.table_oid = d.objid
      JOIN merkle.logs l USING (log_id)
     WHERE d.object_type = 'table column'
       AND d.address_names[3] = ANY (s.columns || s.key_columns || coalesce(s.entry_column, ''))
       AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id)
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

-- Triggers that call merkle-listener's trigger functions but are not the ones it keeps:
-- before this migration any role could create them (EXECUTE was PUBLIC), and revoking it does
-- not stop one that exists; and an earlier version left its guard on a partition detached
-- from its source, which the DETACH check above would take for one detached now. Dropped,
-- each named in a warning.
DO $$
DECLARE
    t record;
BEGIN
    PERFORM merkle.mark_own_ddl('drop_triggers');
    FOR t IN SELECT g.tgrelid::regclass AS rel, g.tgname
               FROM pg_trigger g JOIN pg_proc p ON p.oid = g.tgfoid
              WHERE p.pronamespace = 'merkle'::regnamespace
                AND (p.proname IN ('partition_guard', 'refuse_change') OR p.proname ~ '^capture_[0-9]+$')
                AND NOT EXISTS (
                    SELECT 1 FROM merkle.sources s
                     WHERE (p.proname = pg_catalog.format('capture_%s', s.source_id)
                            AND g.tgname = pg_catalog.format('merkle_capture_%s', s.source_id) AND g.tgrelid = s.table_oid)
                        OR (p.proname = 'refuse_change' AND g.tgrelid = s.table_oid
                            AND g.tgname IN (pg_catalog.format('merkle_guard_%s', s.source_id),
                                             pg_catalog.format('merkle_guard_truncate_%s', s.source_id)))
                        OR (p.proname = 'partition_guard' AND g.tgrelid = s.table_oid
                            AND g.tgname IN (pg_catalog.format('merkle_truncate_begin_%s', s.source_id),
                                             pg_catalog.format('merkle_truncate_end_%s', s.source_id)))
                        OR (p.proname = 'partition_guard' AND g.tgname = pg_catalog.format('merkle_partition_%s', s.source_id)
                            AND s.table_oid IN (SELECT a.relid FROM pg_catalog.pg_partition_ancestors(g.tgrelid) a))) LOOP
        RAISE WARNING 'merkle-listener: dropping trigger % on %, which calls a merkle-listener trigger function but is not one it keeps',
            t.tgname, t.rel;
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    PERFORM merkle.unmark_own_ddl('drop_triggers');
END
$$;

-- The event triggers of this migration; an event trigger's tags cannot be altered, so those of
-- 011 are dropped and created again with more: the partition check also for CREATE SCHEMA
-- (... CREATE TABLE runs under that tag), the drop guard also for DROP TABLE, DROP SCHEMA and
-- DROP OWNED.
DO $$
DECLARE
    statements text := $sql$
        CREATE EVENT TRIGGER merkle_detach_concurrently ON ddl_command_start WHEN TAG IN ('ALTER TABLE')
            EXECUTE FUNCTION merkle.check_detach_concurrently();
        CREATE EVENT TRIGGER merkle_source_column_drop ON sql_drop
            EXECUTE FUNCTION merkle.check_source_column_drop();
        DROP EVENT TRIGGER IF EXISTS merkle_source_partitions;
        CREATE EVENT TRIGGER merkle_source_partitions ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'ALTER TRIGGER', 'CREATE SCHEMA')
            EXECUTE FUNCTION merkle.check_source_partitions();
        DROP EVENT TRIGGER IF EXISTS merkle_partition_guard_drop;
        CREATE EVENT TRIGGER merkle_partition_guard_drop ON sql_drop
            WHEN TAG IN ('DROP TRIGGER', 'DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
            EXECUTE FUNCTION merkle.check_partition_guard_drop();
    $sql$;
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE statements;
    ELSE
        RAISE WARNING 'merkle-listener: the guards of migration 014 against DETACH ... CONCURRENTLY, hashed columns dropped with their type, CREATE SCHEMA and dropped partitions were not installed (they need a superuser)'
            USING HINT = 'As a superuser: ' || regexp_replace(btrim(statements), '\s+', ' ', 'g');
    END IF;
END
$$;
