-- Guard the source tables against DDL that would break capture or silently change what is
-- logged (found by review: renaming or dropping a hashed column made every application
-- INSERT fail inside the capture trigger; changing a column's type changed the text that is
-- hashed; disabling the capture trigger skipped rows without a trace).
--
-- merkle.check_source_ddl() runs at the end of every ALTER TABLE and refuses (SQLSTATE ML101,
-- the ALTER is rolled back) when, for a registered source:
--   * the table was renamed or moved to another schema;
--   * a hashed, key or entry column is gone, or (trigger mode) its type or typmod no longer
--     matches the outbox's copy of it;
--   * a capture or guard trigger of merkle-listener was disabled.
-- Adding columns and any other ALTER stay allowed. Event triggers need a superuser: without
-- one the guard is not installed and `init` says so; the function is installed either way.

CREATE FUNCTION merkle.check_source_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    cmd record;
    src record;
    problem text;
BEGIN
    FOR cmd IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands()
               WHERE object_type IN ('table', 'table column') LOOP
        FOR src IN SELECT s.*, l.name AS log_name FROM merkle.sources s JOIN merkle.logs l USING (log_id)
                   WHERE s.table_oid = cmd.objid LOOP
            problem := NULL;
            IF NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE c.oid = src.table_oid AND c.relname = src.table_name
                             AND n.nspname = src.table_schema) THEN
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
                SELECT format('trigger %I may not be disabled', t.tgname) INTO problem
                  FROM pg_trigger t
                 WHERE t.tgrelid = src.table_oid AND t.tgname LIKE 'merkle\_%' AND t.tgenabled <> 'A'
                 LIMIT 1;
            END IF;
            IF problem IS NOT NULL THEN
                RAISE EXCEPTION 'ALTER TABLE refused on %.%: % (it feeds merkle-listener log "%")',
                    src.table_schema, src.table_name, problem, src.log_name
                    USING ERRCODE = 'ML101',
                          HINT = 'Remove the source (merkle-listener source remove), alter the table, then add it again.';
            END IF;
        END LOOP;
    END LOOP;
END
$$;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER merkle_source_ddl ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
            EXECUTE FUNCTION merkle.check_source_ddl();
    ELSE
        RAISE WARNING 'merkle-listener: the guard against ALTER TABLE on source tables was not installed (it needs a superuser)'
            USING HINT = 'As a superuser: CREATE EVENT TRIGGER merkle_source_ddl ON ddl_command_end WHEN TAG IN (''ALTER TABLE'') EXECUTE FUNCTION merkle.check_source_ddl();';
    END IF;
END
$$;
