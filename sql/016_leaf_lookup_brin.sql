-- Lookups by leaf hash (GET /v1/logs/<log>/proof/inclusion?leaf_hash=...) use a BRIN bloom
-- index instead of 006's hash index.
--
-- Why: a leaf hash is random, so each new leaf's hash index entry lands on a random page. After
-- every checkpoint the first change to each such page writes the whole page to the WAL: that
-- index made most of the full-page images of an append, and with them most of the log's WAL
-- (measured, docs/benchmarks.md: ~1,000 bytes of WAL per leaf, ~75-110 full-page images per
-- 1,000 leaves in a long run), which every synchronous commit of the source's writers flushes
-- too. A BRIN index keeps one summary per range of heap pages, and processed_log only grows at
-- its end: a range is summarized once, when it is complete, so an append writes nothing to it.
-- Measured (docs/benchmarks.md, fourth session): PostgreSQL writes processed_log rows 2.0-2.3x
-- as fast, and the log's WAL per leaf went from 570-1,064 bytes to ~450, with almost no
-- full-page images.
--
-- The price: a lookup reads every summary (about 2 bytes per leaf) and the heap ranges whose
-- bloom filter matches (the one holding the leaf, and false positives at 0.1 %): milliseconds
-- instead of a fraction of one. Ranges not yet summarized always match and are read whole:
-- the listener summarizes the ranges the table has left behind about every second
-- (merkle.summarize_leaf_lookup, once a second from `run`); autosummarize and VACUUM do too.
--
-- A range is 16 pages, about 1,000 rows of processed_log (each ~130 bytes): the bloom filter
-- is sized for that many distinct hashes (a range with more only has more false positives).
DROP INDEX merkle.processed_log_leaf_hash;
CREATE INDEX processed_log_leaf_lookup ON merkle.processed_log
    USING brin (leaf_hash bytea_bloom_ops (n_distinct_per_range = 1000, false_positive_rate = 0.001))
    WITH (pages_per_range = 16, autosummarize = on);

-- Summarizes the complete page ranges of processed_log from block from_block on, and returns
-- the first block of the first range left (the caller's next from_block). A summary that exists
-- is rewritten whole, ~2 kB of WAL, for every row added to its range, so only ranges the table
-- has left behind are summarized: those that end at least 128 pages (~8,000 rows) before its
-- end, since PostgreSQL 16+ extends a table by up to 64 pages at once, before COPY fills them.
-- Takes processed_log's SHARE UPDATE EXCLUSIVE lock, which inserts do not wait for; while
-- VACUUM holds it (and summarizes as it ends) this returns from_block and does nothing. A
-- from_block past the table's end (VACUUM FULL shrank it) starts again from block 0: the
-- ranges refilled below it would otherwise never be summarized by the caller.
-- SECURITY DEFINER: brin_summarize_range is for the table's owner.
CREATE FUNCTION merkle.summarize_leaf_lookup(from_block bigint) RETURNS bigint
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
-- Only the schema's owner (the listener's role) summarizes: in another role's hands a loop of
-- calls could keep VACUUM off the table.
REVOKE EXECUTE ON FUNCTION merkle.summarize_leaf_lookup(bigint) FROM PUBLIC;

-- The first index of leaf_hash in the log below size (GET .../proof/inclusion?leaf_hash=...),
-- NULL if none. Through the leaf-hash index whatever the statistics say: the planner prices a
-- bloom BRIN scan as if it read much of the table, and would rather read every log's leaves
-- (in parallel, whose start-up costs more than the lookup).
CREATE FUNCTION merkle.leaf_index(log_id integer, leaf_hash bytea, size bigint) RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET max_parallel_workers_per_gather = 0 AS $$
    SELECT min(f.seq)
      FROM (SELECT p.log_id, p.seq FROM merkle.processed_log p WHERE p.leaf_hash = $2 OFFSET 0) f
     WHERE f.log_id = $1 AND f.seq < $3
$$;
