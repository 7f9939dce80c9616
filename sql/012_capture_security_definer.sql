-- Capture functions run as the role that added the source (found by review: they ran as the
-- writer, so every role inserting into a trigger-mode source needed USAGE on schema merkle,
-- on merkle.stmt_seq and INSERT on the source's outbox, or its INSERTs failed with
-- "permission denied for schema merkle" from the moment the source was added).
--
-- listener/sources/trigger.py now creates them SECURITY DEFINER; their search_path and the
-- other settings the row filter depends on are pinned already (SET clauses). Existing ones
-- are altered here when this role may (it owns them, or is a member of their owner); any
-- other is named in a warning with the statement its owner runs.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS fn, p.proowner::regrole AS owner,
                    pg_has_role(p.proowner, 'USAGE') AS mine
               FROM merkle.sources s
               JOIN pg_proc p ON p.proname = format('capture_%s', s.source_id)
                             AND p.pronamespace = 'merkle'::regnamespace
              WHERE s.mode = 'trigger' AND NOT p.prosecdef LOOP
        IF f.mine THEN
            EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', f.fn);
        ELSE
            RAISE WARNING 'merkle-listener: % still runs as the writer, whose role then needs privileges in schema merkle; as % run: ALTER FUNCTION % SECURITY DEFINER;',
                f.fn, f.owner, f.fn;
        END IF;
    END LOOP;
END
$$;
