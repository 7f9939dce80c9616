-- The change identity's unique index no longer begins with the row's key, and lookups by key
-- go through the BRIN bloom index that 016 built for leaf hashes.
--
-- Why: 001's unique index (log_id, source_id, source_key, change_id, change_ord) put each leaf
-- where its key sorts. With keys that do not grow with time (UUIDs, hashes, names: most
-- tables) that is a random page of the index, and after every checkpoint the first change to
-- each such page writes the whole page to the WAL: the same cost 016 removed for leaf hashes.
-- Measured (docs/benchmarks.md, "fifth session"), COPYing processed_log rows after 2M leaves:
-- with random keys 86-93k rows/s, ~1,300 bytes of WAL and ~155 full-page images per 1,000
-- leaves; with this index set 363-387k rows/s, ~300 bytes, none. With keys that grow
-- (bigserial ids), 230-251k against 348-378k rows/s.
--
-- The change identity is (source, change_id, change_ord) alone: trigger mode's (statement id
-- from merkle.stmt_seq, row number) and replication mode's (commit end_lsn, position in the
-- transaction) are unique without the key, so this index is stricter than 001's. change_id
-- grows with time in both modes (a backfill's is 0), so each source's leaves are appended at
-- the right edge of its part of the index.
--
-- The price: a lookup by key (GET /v1/logs/<log>/lookup) reads every BRIN summary and the
-- ranges whose bloom filter matches: milliseconds instead of a fraction of one, as for leaf
-- hashes. merkle.leaves_by_key makes sure the index is used.
--
-- Rebuilding both indexes took 7 s for 10M leaves here; the listener's batches wait meanwhile.
DROP INDEX merkle.processed_log_change;
CREATE UNIQUE INDEX processed_log_change ON merkle.processed_log (log_id, source_id, change_id, change_ord);

-- One summary per range for both lookups: the table's pages are read once to summarize them,
-- and merkle.summarize_leaf_lookup keeps summarizing this index by its name.
DROP INDEX merkle.processed_log_leaf_lookup;
CREATE INDEX processed_log_leaf_lookup ON merkle.processed_log
    USING brin (leaf_hash bytea_bloom_ops (n_distinct_per_range = 1000, false_positive_rate = 0.001),
                source_key text_bloom_ops (n_distinct_per_range = 1000, false_positive_rate = 0.001))
    WITH (pages_per_range = 16, autosummarize = on);

-- The leaves of the row with key source_key of source (schema.table) in the log below size,
-- in log order, the first 1,000. Through the BRIN index whatever the statistics say (see
-- merkle.leaf_index): the planner would rather read the whole log in seq order.
CREATE FUNCTION merkle.leaves_by_key(log_id integer, source text, source_key text, size bigint)
RETURNS TABLE (seq bigint, op text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET max_parallel_workers_per_gather = 0 AS $$
    SELECT f.seq, f.op
      FROM (SELECT p.log_id, p.seq, p.op, p.source_id FROM merkle.processed_log p
             WHERE p.source_key = $3 COLLATE "C" OFFSET 0) f
      JOIN merkle.sources s ON s.source_id = f.source_id
     WHERE f.log_id = $1 AND s.log_id = $1 AND s.table_schema || '.' || s.table_name = $2 AND f.seq < $4
     ORDER BY f.seq
     LIMIT 1000
$$;
