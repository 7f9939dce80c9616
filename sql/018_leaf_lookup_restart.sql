-- merkle.summarize_leaf_lookup (016) after processed_log shrank (found by review). The
-- listener's janitor keeps the block it reached and passes it back each second; VACUUM FULL
-- merkle.processed_log (which docs/design.md advises after a large log drop) rebuilds the index
-- with summaries for the compacted table only, and the ranges rows then refill below the
-- janitor's old block were never summarized by it: until autosummarize's work item ran (never,
-- with autovacuum off), every lookup by hash read all of them. A from_block past the table's
-- end now starts again from block 0 (ranges summarized already cost a revmap read each).
CREATE OR REPLACE FUNCTION merkle.summarize_leaf_lookup(from_block bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '50ms' AS $$
DECLARE
    per_range CONSTANT bigint := 16;
    margin CONSTANT bigint := 128;
    blocks bigint := pg_relation_size('merkle.processed_log'::regclass)
                     / current_setting('block_size')::bigint;
    start bigint := CASE WHEN from_block > blocks THEN 0 ELSE greatest(from_block, 0) END / per_range * per_range;
    first bigint := start;
BEGIN
    WHILE start + per_range + margin <= blocks LOOP
        PERFORM brin_summarize_range('merkle.processed_log_leaf_lookup'::regclass, start);
        start := start + per_range;
    END LOOP;
    RETURN start;
EXCEPTION WHEN lock_not_available THEN
    RETURN first;
END
$$;
