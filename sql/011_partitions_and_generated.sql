-- Guard the partitions of a partitioned replication source (found by review: TRUNCATE of
-- one partition removed committed rows of the source without a leaf. With
-- publish_via_partition_root pgoutput sends a partition's TRUNCATE only when the partition is
-- published as itself, and statement triggers on the partitioned table, the append-only
-- guard's included, do not fire for a statement that names a partition).
--
-- For replication source S whose table is partitioned, merkle.install_partition_guards(S)
-- puts on every partition, at every level, a trigger merkle_partition_<S>: BEFORE TRUNCATE
-- (and UPDATE OR DELETE when S is append-only) FOR EACH STATEMENT, ENABLE ALWAYS. It refuses
-- the statement, except a TRUNCATE that is part of a TRUNCATE of S itself (logged, or refused
-- by S's own guard): when S logs TRUNCATE, merkle_truncate_begin_<S> and
-- merkle_truncate_end_<S> on S mark that statement (PostgreSQL fires S's BEFORE TRUNCATE
-- triggers, then its partitions', and S's AFTER TRUNCATE triggers once all are truncated).
-- A trigger left on a table that is no longer under S (detached, or S removed where the
-- guard below is not installed) lets everything through.
--
-- `source add` installs them; merkle.check_source_partitions(), run at the end of every
-- CREATE TABLE, ALTER TABLE and ALTER TRIGGER, installs them on partitions created or
-- attached later and refuses (SQLSTATE ML101) disabling, altering or renaming them, and a
-- partition tree holding two replication sources of one log (ATTACH PARTITION of one under
-- the other: pgoutput would send the partition's changes as the parent's only).
-- merkle.check_partition_guard_drop() refuses DROP TRIGGER of one that still guards a
-- partition of its source. Both event triggers need a superuser, like those of 007.

CREATE FUNCTION merkle.partition_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    src record;
    marks text := coalesce(current_setting('merkle.truncating_sources', true), '');
BEGIN
    SELECT s.*, l.name AS log_name INTO src
      FROM merkle.sources s JOIN merkle.logs l USING (log_id)
     WHERE s.source_id = TG_ARGV[0]::integer
       AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id);
    IF NOT FOUND THEN
        RETURN NULL;  -- its source is gone or being removed
    END IF;
    IF TG_RELID = src.table_oid THEN
        -- Transaction-local, so an error inside the statement takes the mark with it.
        PERFORM set_config('merkle.truncating_sources',
                           CASE WHEN TG_WHEN = 'BEFORE' THEN marks || ',' || src.source_id || ',' ELSE '' END, true);
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a WHERE a.relid = src.table_oid) THEN
        RETURN NULL;  -- no longer a partition of the source
    END IF;
    IF TG_OP = 'TRUNCATE' AND position(',' || src.source_id || ',' IN marks) > 0 THEN
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

-- Idempotent: creates what is missing. SECURITY INVOKER: `source add` runs it as the role
-- that registers the table, the event trigger below as its owner.
CREATE FUNCTION merkle.install_partition_guards(p_source_id integer) RETURNS void
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
    PERFORM set_config('merkle.installing_partition_guards', 'on', true);
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
    PERFORM set_config('merkle.installing_partition_guards', 'off', true);
END
$$;

-- For `source remove` and `log drop`, which set merkle.dropping_triggers: wherever they are.
CREATE FUNCTION merkle.drop_partition_guards(p_source_id integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT tgrelid::regclass AS rel, tgname FROM pg_trigger
              WHERE tgname IN (format('merkle_partition_%s', p_source_id), format('merkle_truncate_begin_%s', p_source_id),
                               format('merkle_truncate_end_%s', p_source_id)) LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
END
$$;

CREATE FUNCTION merkle.check_source_partitions() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    src record;
    problem text;
BEGIN
    IF current_setting('merkle.installing_partition_guards', true) = 'on' THEN
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
            IF problem IS NOT NULL THEN
                RAISE EXCEPTION 'refused on %.%: % (it feeds merkle-listener log "%")',
                    src.table_schema, src.table_name, problem, src.log_name
                    USING ERRCODE = 'ML101',
                          HINT = 'Remove the source (merkle-listener source remove), change the tables, then add it again.';
            END IF;
            PERFORM merkle.install_partition_guards(src.source_id);
        END LOOP;
    END LOOP;
END
$$;

CREATE FUNCTION merkle.check_partition_guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    obj record;
    sid integer;
    rel regclass;
BEGIN
    IF current_setting('merkle.dropping_triggers', true) = 'on' THEN
        RETURN;  -- merkle-listener removing its own triggers
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects()
               WHERE object_type = 'trigger' AND original LOOP
        sid := substring(obj.address_names[3] FROM '^merkle_(?:partition|truncate_begin|truncate_end)_([0-9]+)$')::integer;
        rel := to_regclass(format('%I.%I', obj.address_names[1], obj.address_names[2]));
        IF sid IS NOT NULL AND EXISTS (
                SELECT 1 FROM merkle.sources s
                 WHERE s.source_id = sid
                   AND s.table_oid IN (SELECT rel UNION ALL SELECT a.relid FROM pg_partition_ancestors(rel) a)) THEN
            RAISE EXCEPTION 'DROP TRIGGER refused: % is a merkle-listener trigger', obj.object_identity
                USING ERRCODE = 'ML101',
                      HINT = 'Use merkle-listener source remove to stop capturing a table.';
        END IF;
    END LOOP;
END
$$;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER merkle_source_partitions ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'ALTER TRIGGER')
            EXECUTE FUNCTION merkle.check_source_partitions();
        CREATE EVENT TRIGGER merkle_partition_guard_drop ON sql_drop WHEN TAG IN ('DROP TRIGGER')
            EXECUTE FUNCTION merkle.check_partition_guard_drop();
    ELSE
        RAISE WARNING 'merkle-listener: the guard of partitions created or attached later under a partitioned source was not installed (it needs a superuser)'
            USING HINT = 'As a superuser: CREATE EVENT TRIGGER merkle_source_partitions ON ddl_command_end WHEN TAG IN (''CREATE TABLE'', ''ALTER TABLE'', ''ALTER TRIGGER'') EXECUTE FUNCTION merkle.check_source_partitions(); CREATE EVENT TRIGGER merkle_partition_guard_drop ON sql_drop WHEN TAG IN (''DROP TRIGGER'') EXECUTE FUNCTION merkle.check_partition_guard_drop();';
    END IF;
END
$$;
