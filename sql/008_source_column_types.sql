-- Record the type of every hashed column at registration, for both capture modes (found by
-- review: the guard of 007 caught a retype only in trigger mode, by comparing the table with
-- the outbox's copy of the column; a replication source has no outbox, so
-- `ALTER TABLE src ALTER amount TYPE numeric(14,4)` went through and silently changed the
-- text that is hashed).
--
-- merkle.source_columns holds, per source, the type OID and typmod of each column its leaves
-- are computed from: the hashed columns, or the key and the entry column (the set that
-- listener.sources.trigger.captured_columns copies into an outbox). A table rather than arrays
-- on merkle.sources: the guard joins it by column name, and ON DELETE CASCADE forgets it with
-- the source (`source remove`, `log drop`). Registration (listener/registry.py) fills it in the
-- transaction that inserts the source row.
--
-- Sources registered before this migration are filled here: a trigger source from its
-- outbox (the types as registered, which is what 007 compared with), a replication source
-- from the table as it is now (nothing older is known). merkle.check_source_ddl() is replaced
-- so that its retype check reads this table; every other check is unchanged.

CREATE TABLE merkle.source_columns (
    source_id  integer NOT NULL REFERENCES merkle.sources ON DELETE CASCADE,
    name       text NOT NULL,
    type_oid   oid NOT NULL,
    typmod     integer NOT NULL,
    PRIMARY KEY (source_id, name)
);

-- A column that is gone already gets no row: the guard's existence check refuses it anyway.
INSERT INTO merkle.source_columns (source_id, name, type_oid, typmod)
SELECT DISTINCT s.source_id, col, coalesce(o.atttypid, a.atttypid), coalesce(o.atttypmod, a.atttypmod)
  FROM merkle.sources s
 CROSS JOIN LATERAL unnest(CASE WHEN s.entry_column IS NULL THEN s.columns
                                ELSE s.key_columns || s.entry_column END) AS col
  LEFT JOIN pg_attribute a
         ON a.attrelid = s.table_oid AND a.attname = col AND NOT a.attisdropped AND a.attnum > 0
  LEFT JOIN pg_attribute o
         ON s.mode = 'trigger' AND o.attrelid = to_regclass(format('merkle.outbox_%s', s.source_id))
        AND o.attname = col AND NOT o.attisdropped
 WHERE coalesce(o.atttypid, a.atttypid) IS NOT NULL;

CREATE OR REPLACE FUNCTION merkle.check_source_ddl() RETURNS event_trigger
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
                  LEFT JOIN merkle.source_columns r
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
