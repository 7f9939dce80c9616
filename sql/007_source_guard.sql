-- Guard the source tables against DDL that would break capture or silently change what is
-- logged (found by review: renaming or dropping a hashed column made every application
-- INSERT fail inside the capture trigger; changing a column's type changed the text that is
-- hashed; disabling, renaming or dropping the capture trigger skipped rows without a trace;
-- REPLICA IDENTITY other than FULL makes pgoutput omit values that updates/deletes hash).
--
-- merkle.check_source_ddl() runs at the end of every ALTER TABLE and ALTER TRIGGER and
-- refuses (SQLSTATE ML101, the command is rolled back) when, for a registered source:
--   * the table was renamed or moved to another schema;
--   * a hashed, key or entry column is gone, or (trigger mode) its type or typmod no longer
--     matches the outbox's copy of it;
--   * a trigger of merkle-listener (found by its function, whatever its name) is not
--     ENABLE ALWAYS, or was renamed;
--   * (replication mode, updates or deletes logged) REPLICA IDENTITY is no longer FULL.
-- merkle.check_source_drop() refuses DROP TRIGGER of a merkle-listener trigger, except by
-- merkle-listener itself (`source remove`, `log drop`), which sets merkle.dropping_triggers.
-- Adding columns and any other ALTER stay allowed. Both functions are SECURITY DEFINER: they
-- run for every role's DDL, including roles that cannot read schema merkle. Event triggers need
-- a superuser: without one the guard is not installed and `init` says so.

CREATE FUNCTION merkle.check_source_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    src record;
    problem text;
BEGIN
    FOR cmd IN SELECT DISTINCT CASE WHEN c.object_type = 'trigger'
                                    THEN (SELECT t.tgrelid FROM pg_trigger t WHERE t.oid = c.objid)
                                    ELSE c.objid END AS relid,
                               c.object_type, c.objid
               FROM pg_event_trigger_ddl_commands() c
               WHERE c.object_type IN ('table', 'table column', 'trigger') LOOP
        FOR src IN SELECT s.*, l.name AS log_name FROM merkle.sources s JOIN merkle.logs l USING (log_id)
                   WHERE s.table_oid = cmd.relid LOOP
            problem := NULL;
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
                  LEFT JOIN pg_attribute o
                         ON src.mode = 'trigger' AND o.attrelid = to_regclass(format('merkle.outbox_%s', src.source_id))
                        AND o.attname = col AND NOT o.attisdropped
                 WHERE a.attnum IS NULL
                    OR (o.attnum IS NOT NULL AND (a.atttypid <> o.atttypid OR a.atttypmod <> o.atttypmod))
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
            IF problem IS NOT NULL THEN
                RAISE EXCEPTION 'ALTER refused on %.%: % (it feeds merkle-listener log "%")',
                    src.table_schema, src.table_name, problem, src.log_name
                    USING ERRCODE = 'ML101',
                          HINT = 'Remove the source (merkle-listener source remove), alter the table, then add it again.';
            END IF;
        END LOOP;
    END LOOP;
END
$$;

CREATE FUNCTION merkle.check_source_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    obj record;
BEGIN
    IF current_setting('merkle.dropping_triggers', true) = 'on' THEN
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

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER merkle_source_ddl ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'ALTER TRIGGER')
            EXECUTE FUNCTION merkle.check_source_ddl();
        CREATE EVENT TRIGGER merkle_source_drop ON sql_drop WHEN TAG IN ('DROP TRIGGER')
            EXECUTE FUNCTION merkle.check_source_drop();
    ELSE
        RAISE WARNING 'merkle-listener: the guard against DDL on source tables was not installed (it needs a superuser)'
            USING HINT = 'As a superuser: CREATE EVENT TRIGGER merkle_source_ddl ON ddl_command_end WHEN TAG IN (''ALTER TABLE'', ''ALTER TRIGGER'') EXECUTE FUNCTION merkle.check_source_ddl(); CREATE EVENT TRIGGER merkle_source_drop ON sql_drop WHEN TAG IN (''DROP TRIGGER'') EXECUTE FUNCTION merkle.check_source_drop();';
    END IF;
END
$$;
