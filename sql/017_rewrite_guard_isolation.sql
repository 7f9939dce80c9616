-- The rewrite guard of 015 in REPEATABLE READ and SERIALIZABLE transactions (found by review).
--
-- merkle.rewrite_digest() read the table under the transaction's snapshot, while a rewrite copies
-- the rows visible to a fresh one, and the rewritten rows are all the transaction's own: a row
-- committed after the snapshot was taken was missing from the digest before the rewrite and
-- present after it, and a row updated since was digested with its old value. So the table's
-- owner could undo a logged UPDATE without a leaf (take the snapshot; the UPDATE commits; ALTER
-- ... USING CASE WHEN <that row> THEN <the old value> ELSE amount END: both digests saw the old
-- value), and an unchanged rewrite after a concurrent INSERT was refused as a change. As
-- merkle.has_rows() of 014 does, such a transaction is refused unless the table's file is
-- empty (then it never held a row, whatever the snapshot).
CREATE OR REPLACE FUNCTION merkle.rewrite_digest(rel regclass, cols text[]) RETURNS bytea
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
