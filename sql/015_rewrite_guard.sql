-- Rewrites that change committed values of hashed columns are refused (found by review: the
-- table's owner could change them without a leaf, since no row trigger fires and logical
-- decoding sends no change for a rewrite):
--   * ALTER TABLE ... ALTER COLUMN c TYPE <its own type> USING <expression>;
--   * ALTER TABLE ... ALTER COLUMN c SET EXPRESSION AS (...) of a stored generated column
--     (PostgreSQL 17+).
-- Neither changes the column's type, so merkle.check_source_ddl() let both through.
--
-- The check brackets the rewrite. The table_rewrite event fires before PostgreSQL copies the
-- rows; merkle.check_source_rewrite() then reads the hashed columns of every row of the table
-- (a partition of a source is rewritten, and checked, on its own) and records a digest of
-- their canonical values in merkle.rewrite_checks. At the end of the statement
-- merkle.check_source_rewritten() reads them again and refuses (SQLSTATE ML101, the statement
-- is rolled back) if the digest differs. An identical result (SET EXPRESSION yielding the same
-- values, a retype USING the identity) passes.
--
-- A rewrite only changes a hashed value if the statement altered that column (a column that
-- a generated column uses may not be retyped), which writes its pg_attribute or pg_attrdef
-- row: the rows are read only when this transaction wrote one of those, so ADD COLUMN with
-- a volatile default, SET LOGGED or the retype of a column that is not hashed cost nothing.
--
-- When table_rewrite fires, the catalog already describes the table as it will be, while its
-- file holds the old rows: a column retyped by the statement would be read with its new
-- layout, and every column after it misread (that can crash the server). So the rows are read
-- only if no column before the last hashed one, hashed columns aside, was altered by this
-- transaction; otherwise the statement is refused, with a hint to alter that column in a
-- transaction of its own. Likewise an index the statement creates on a retyped column: it is
-- empty until the rewrite is done, and planning any query on the table reads a B-tree's first
-- page (the hint: drop the index first). A hashed column has the type recorded in
-- merkle.source_columns (check_source_ddl refuses anything else), so a hashed column whose
-- type differs is refused here, before any read, as check_source_ddl would refuse it at the
-- end; under ALTER TYPE (a typed table retyped with its type), which check_source_ddl does not
-- see, this is the only check.
--
-- Under REPEATABLE READ or SERIALIZABLE the digest would read the transaction's snapshot while
-- the rewrite copies the rows committed now (and every rewritten row is then the transaction's
-- own): a row updated and logged since the snapshot was taken would be digested with its old
-- value both times, so the owner could rewrite it back without a leaf. As merkle.has_rows()
-- of 014 does, such a transaction is refused unless the table's file is empty.
--
-- The digest is recorded in a table that only the owner of schema merkle writes, not in a
-- session setting: the statement runs the table owner's code between the two events (a USING
-- expression, a default), and that code may set any setting. A row lasts for the transaction
-- that wrote it (an error takes it along) and is deleted once checked. Cost: reading the
-- table twice, when the rewrite is of an altered hashed column, which is itself O(table).

CREATE TABLE merkle.rewrite_checks (
    xid       xid8 NOT NULL,
    relid     oid NOT NULL,
    filenode  oid NOT NULL,      -- the table's file before the rewrite
    columns   text[] NOT NULL,   -- digested
    altered   text[] NOT NULL,   -- hashed columns this transaction altered, named when refused
    digest    bytea NOT NULL,
    PRIMARY KEY (xid, relid)
);

-- The multiset of the rows' canonical objects {"<col>":"<text>"|null,...} over cols (as
-- merkle.canonical_key builds them, with the value expression of listener/canonical_sql.py),
-- as one SHA-256: the rows' hashes sorted, so the physical order, which a rewrite may change,
-- does not count. Under the pinned settings of the canonical encoding, and lc_monetary: the
-- table owner's code may change the session's settings between the two reads. The heap is read
-- (no index: those on a retyped column are rebuilt after the rewrite), plain tables only
-- (ONLY), and row security off: a policy would run its owner's code as the reader.
CREATE FUNCTION merkle.rewrite_digest(rel regclass, cols text[]) RETURNS bytea
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET "TimeZone" = 'UTC' SET "DateStyle" = 'ISO, YMD' SET "IntervalStyle" = 'postgres'
SET extra_float_digits = 1 SET bytea_output = 'hex' SET lc_monetary = 'C'
SET row_security = off SET enable_indexscan = off SET enable_indexonlyscan = off
SET enable_bitmapscan = off SET max_parallel_workers_per_gather = 0 AS $$
DECLARE
    obj text;
    result bytea;
BEGIN
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

CREATE FUNCTION merkle.check_source_rewrite() RETURNS event_trigger
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
    -- The sources whose table is rel or a partitioned ancestor of it.
    FOR src IN SELECT s.*, l.name AS log_name FROM merkle.sources s JOIN merkle.logs l USING (log_id)
                WHERE (s.table_oid = rel OR s.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(rel) a))
                  AND NOT EXISTS (SELECT 1 FROM merkle.replication_retired r WHERE r.source_id = s.source_id)
                ORDER BY s.source_id LOOP
        shown := coalesce(shown, src.table_schema || '.' || src.table_name);
        log_name := coalesce(log_name, src.log_name);
        hashed := hashed || src.columns || src.key_columns || array_remove(ARRAY[src.entry_column], NULL);
        -- Retyped or gone: refused at the end by check_source_ddl, and unreadable here.
        SELECT format('column %I is hashed by the log and may not be dropped, renamed or retyped', col)
          INTO problem
          FROM unnest(src.columns || src.key_columns || array_remove(ARRAY[src.entry_column], NULL)) AS col
          LEFT JOIN pg_attribute a ON a.attrelid = rel AND a.attname = col AND NOT a.attisdropped AND a.attnum > 0
          LEFT JOIN merkle.source_columns r ON r.source_id = src.source_id AND r.name = col
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
    -- The transaction's ids, its subtransactions' included: each holds a lock on its own.
    mine := ARRAY(SELECT l.transactionid FROM pg_locks l
                   WHERE l.locktype = 'transactionid' AND l.pid = pg_backend_pid()
                     AND l.mode = 'ExclusiveLock' AND l.granted);
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
    INSERT INTO merkle.rewrite_checks (xid, relid, filenode, columns, altered, digest)
    VALUES (pg_current_xact_id(), rel, pg_relation_filenode(rel), hashed, altered, merkle.rewrite_digest(rel, hashed))
    -- A check not yet made (its rewrite was under way when a statement ended inside it) keeps
    -- the digest of the older rows, the ones the log knows.
    ON CONFLICT (xid, relid) DO UPDATE SET filenode = excluded.filenode;
END
$$;

-- At the end of the statement, and of any statement run inside it (a function in a USING
-- expression may run one): a table whose file is the one recorded is not rewritten yet, and is
-- left for the statement that rewrites it.
CREATE FUNCTION merkle.check_source_rewritten() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    chk record;
    src record;
BEGIN
    FOR chk IN SELECT * FROM merkle.rewrite_checks WHERE xid = pg_current_xact_id_if_assigned() ORDER BY relid LOOP
        CONTINUE WHEN pg_relation_filenode(chk.relid) IS NOT DISTINCT FROM chk.filenode;
        IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = chk.relid)
           AND merkle.rewrite_digest(chk.relid, chk.columns) IS DISTINCT FROM chk.digest THEN
            SELECT s.table_schema, s.table_name, s.table_oid, l.name AS log_name INTO src
              FROM merkle.sources s JOIN merkle.logs l USING (log_id)
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
        DELETE FROM merkle.rewrite_checks WHERE xid = chk.xid AND relid = chk.relid;
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION merkle.rewrite_digest(regclass, text[]) FROM PUBLIC;

DO $$
DECLARE
    statements text := $sql$
        CREATE EVENT TRIGGER merkle_source_rewrite ON table_rewrite WHEN TAG IN ('ALTER TABLE', 'ALTER TYPE')
            EXECUTE FUNCTION merkle.check_source_rewrite();
        CREATE EVENT TRIGGER merkle_source_rewritten ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'ALTER TYPE')
            EXECUTE FUNCTION merkle.check_source_rewritten();
    $sql$;
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE statements;
    ELSE
        RAISE WARNING 'merkle-listener: the guard of migration 015 against rewriting committed values of hashed columns (ALTER COLUMN ... TYPE ... USING, SET EXPRESSION) was not installed (it needs a superuser)'
            USING HINT = 'As a superuser: ' || regexp_replace(btrim(statements), '\s+', ' ', 'g');
    END IF;
END
$$;
