-- The DDL guard moves out of schema merkle (sql/guard/merkle_guard.sql, installed by a
-- superuser with `merkle-listener guard install`): it keeps its own copy of what it needs to
-- know of the sources, and its own marks of merkle-listener's DDL. These triggers send every
-- change of merkle.sources, merkle.source_columns and merkle.replication_retired to it, and
-- the marks it reads go to both places (the owner's own trigger functions read merkle.own_ddl;
-- the TRUNCATE marks are theirs alone), once the guard is installed; until then they do nothing.

CREATE FUNCTION merkle.guard_installed() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT to_regprocedure('merkle_guard.put_source(integer, integer, text, oid, text, text, text, text[], text[], '
                           'text[], text, boolean, text, boolean)') IS NOT NULL
$$;

CREATE FUNCTION merkle.guard_copy_source() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT merkle.guard_installed() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM merkle_guard.forget_source(OLD.source_id);
    ELSE
        PERFORM merkle_guard.put_source(NEW.source_id, NEW.log_id, (SELECT l.name FROM merkle.logs l WHERE l.log_id = NEW.log_id),
            NEW.table_oid, NEW.table_schema, NEW.table_name, NEW.mode, NEW.events, NEW.columns, NEW.key_columns,
            NEW.entry_column, NEW.append_only, NEW.row_filter,
            EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = NEW.source_id));
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER guard_copy AFTER INSERT OR UPDATE OR DELETE ON merkle.sources
    FOR EACH ROW EXECUTE FUNCTION merkle.guard_copy_source();

CREATE FUNCTION merkle.guard_copy_source_column() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT merkle.guard_installed() THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM merkle_guard.forget_source_column(OLD.source_id, OLD.name);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM merkle_guard.put_source_column(NEW.source_id, NEW.name, NEW.type_oid, NEW.typmod);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER guard_copy AFTER INSERT OR UPDATE OR DELETE ON merkle.source_columns
    FOR EACH ROW EXECUTE FUNCTION merkle.guard_copy_source_column();

CREATE FUNCTION merkle.guard_copy_retired() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF merkle.guard_installed() THEN
        PERFORM merkle_guard.set_retired(CASE TG_OP WHEN 'DELETE' THEN OLD.source_id ELSE NEW.source_id END, TG_OP <> 'DELETE');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER guard_copy AFTER INSERT OR DELETE ON merkle.replication_retired
    FOR EACH ROW EXECUTE FUNCTION merkle.guard_copy_retired();

CREATE OR REPLACE FUNCTION merkle.mark_own_ddl(p_purpose text, p_source_id integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO merkle.own_ddl (xid, purpose, source_id) VALUES (pg_current_xact_id(), p_purpose, p_source_id);
    IF p_purpose <> 'truncate' AND merkle.guard_installed() THEN
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
    IF p_purpose <> 'truncate' AND merkle.guard_installed() THEN
        PERFORM merkle_guard.unmark_own_ddl(p_purpose, p_source_id);
    END IF;
END
$$;
