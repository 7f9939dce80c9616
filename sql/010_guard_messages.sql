-- Messages that name the real cause (found by review).
--
-- merkle.refuse_change(): the guard trigger refuses UPDATE/DELETE/TRUNCATE of an append-only
-- source, and TRUNCATE of a replication source added with --truncate refuse; the second was
-- told "the table is append-only" with a hint to drop --append-only. It now reads the
-- source's policy (SECURITY DEFINER: the application's role need not read merkle.sources).
--
-- merkle.check_source_ddl(): a replication source whose own events are insert only could have
-- its replica identity lowered (ALTER TABLE ... REPLICA IDENTITY DEFAULT) while another
-- source of its log logs updates, so that the log's publication publishes updates for it
-- too: PostgreSQL then refused every UPDATE of the table. The rule `source add` applies is
-- now kept by the guard (with a hint of its own: REPLICA IDENTITY FULL is always allowed);
-- every other check is that of 008.

CREATE OR REPLACE FUNCTION merkle.refuse_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' AND EXISTS (
            SELECT 1 FROM merkle.sources s JOIN merkle.logs l USING (log_id)
             WHERE s.table_oid = TG_RELID AND l.name = TG_ARGV[0] AND NOT s.append_only) THEN
        RAISE EXCEPTION 'TRUNCATE on %.% is refused: merkle-listener log "%" refuses TRUNCATE of this table (its source was added with --truncate refuse)',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]
            USING ERRCODE = 'ML100',
                  HINT = 'DELETE the rows instead; to log TRUNCATE as an event, run `merkle-listener source remove` and add the source again with --truncate log.';
    END IF;
    RAISE EXCEPTION '% on %.% is refused: the table is append-only (it feeds merkle-listener log "%")',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = 'ML100',
              HINT = 'Append rows instead; to allow changes, run `merkle-listener source remove` and add the source again without --append-only.';
END
$$;

CREATE OR REPLACE FUNCTION merkle.check_source_ddl() RETURNS event_trigger
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
               WHERE c.object_type IN ('table', 'table column', 'trigger') LOOP
        FOR src IN SELECT s.*, l.name AS log_name FROM merkle.sources s JOIN merkle.logs l USING (log_id)
                   WHERE s.table_oid = cmd.relid LOOP
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
            -- The log's publication publishes updates/deletes for all its tables when any of its
            -- sources logs them; PostgreSQL then refuses UPDATE and DELETE on a table whose
            -- replica identity does not cover its key and row filter. The rule of
            -- listener.sources.publication.check_publication_identities, kept after registration.
            IF problem IS NULL AND src.mode = 'replication'
               AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = src.source_id)
               AND EXISTS (
                    SELECT 1 FROM merkle.sources o
                     WHERE o.log_id = src.log_id AND o.mode = 'replication' AND o.events && '{update,delete}'
                       AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = o.source_id))
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
