-- merkle-listener marks its own changes of a log's publication (`source add`, `source remove`,
-- `log drop`): the DDL guard refuses every other change of what the publication lists, filters
-- or publishes (sql/guard/merkle_guard.sql, check_log_publications), since a change it lets
-- through can never be streamed again.
-- A publication FOR ALL TABLES (a CDC tool's) publishes this table's deletes too, and PostgreSQL
-- refuses a DELETE from a published table without a replica identity.
ALTER TABLE merkle.own_ddl REPLICA IDENTITY FULL;
ALTER TABLE merkle.own_ddl DROP CONSTRAINT own_ddl_purpose_check;
ALTER TABLE merkle.own_ddl ADD CONSTRAINT own_ddl_purpose_check
    CHECK (purpose IN ('drop_triggers', 'install_partition_guards', 'truncate', 'publication'));

-- As in sql/020, except that the mark of a publication change goes to the guard only once it
-- checks publications: a guard installed by an earlier version has no such purpose, and until
-- a superuser installs this version's (`guard install`), its mark would fail.
CREATE OR REPLACE FUNCTION merkle.guard_takes_mark(p_purpose text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT p_purpose <> 'truncate' AND merkle.guard_installed()
           AND (p_purpose <> 'publication' OR to_regprocedure('merkle_guard.check_log_publications()') IS NOT NULL)
$$;

CREATE OR REPLACE FUNCTION merkle.mark_own_ddl(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO merkle.own_ddl (xid, purpose, source_id) VALUES (pg_current_xact_id(), p_purpose, p_source_id);
    IF merkle.guard_takes_mark(p_purpose) THEN
        PERFORM merkle_guard.mark_own_ddl(p_purpose, p_source_id);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION merkle.unmark_own_ddl(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM merkle.own_ddl WHERE ctid = (
        SELECT ctid FROM merkle.own_ddl
         WHERE xid = pg_current_xact_id() AND purpose = p_purpose AND source_id IS NOT DISTINCT FROM p_source_id
         LIMIT 1);
    IF merkle.guard_takes_mark(p_purpose) THEN
        PERFORM merkle_guard.unmark_own_ddl(p_purpose, p_source_id);
    END IF;
END
$$;
