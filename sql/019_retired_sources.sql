-- A removed source's leaves stay in the log for good, and so must the name they were logged
-- under: proofs, the entries endpoint and lookups by key say which table a leaf came from
-- after `source remove` too. merkle.sources keeps only what is captured now; a source that
-- leaves it with leaves in the log is kept here (source ids are never reused).
-- Sources removed before this version left no name behind: their leaves show none.
CREATE TABLE merkle.retired_sources (
    source_id     integer PRIMARY KEY,
    log_id        integer NOT NULL REFERENCES merkle.logs ON DELETE CASCADE,
    table_schema  text NOT NULL,
    table_name    text NOT NULL,
    mode          text NOT NULL,
    removed_at    timestamptz NOT NULL DEFAULT now()
);

-- The name of every source a leaf can have: registered or removed.
CREATE VIEW merkle.source_names AS
    SELECT source_id, log_id, table_schema, table_name FROM merkle.sources
    UNION ALL
    SELECT source_id, log_id, table_schema, table_name FROM merkle.retired_sources;

-- Both belong to the schema's owner, the role the listener, `source remove` and the HTTP API
-- run as, also when a superuser applies this to a schema of that role (`init` as a superuser).
DO $$
DECLARE
    owner text := (SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'merkle');
BEGIN
    EXECUTE format('ALTER TABLE merkle.retired_sources OWNER TO %s', owner);
    EXECUTE format('ALTER VIEW merkle.source_names OWNER TO %s', owner);
END
$$;

CREATE OR REPLACE FUNCTION merkle.leaves_by_key(log_id integer, source text, source_key text, size bigint)
RETURNS TABLE (seq bigint, op text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET max_parallel_workers_per_gather = 0 AS $$
    SELECT f.seq, f.op
      FROM (SELECT p.log_id, p.seq, p.op, p.source_id FROM merkle.processed_log p
             WHERE p.source_key = $3 COLLATE "C" OFFSET 0) f
      JOIN merkle.source_names s ON s.source_id = f.source_id
     WHERE f.log_id = $1 AND s.log_id = $1 AND s.table_schema || '.' || s.table_name = $2 AND f.seq < $4
     ORDER BY f.seq
     LIMIT 1000
$$;
