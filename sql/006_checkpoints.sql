-- Signed checkpoints (C2SP tlog-checkpoint in a C2SP signed note), every one ever published.
--
-- Invariants (listener.store.checkpoints keeps them, under the log row's lock):
--   * per log, tree_size never decreases from one checkpoint to the next, and each checkpoint's
--     tree is an extension of the previous one (a consistency proof between them was verified
--     before signing): no split view;
--   * (tree_size, root) is the RFC 9162 root of the log's first tree_size leaves;
--   * note is the exact signed note served at /<log>/checkpoint.
-- Each new row is announced with NOTIFY merkle_checkpoint, payload
-- {"log": <name>, "size": <tree_size>, "root": <base64 root>}, delivered at COMMIT.

CREATE TABLE merkle.checkpoints (
    log_id      integer NOT NULL REFERENCES merkle.logs ON DELETE CASCADE,
    tree_size   bigint NOT NULL CHECK (tree_size >= 0),
    root        bytea NOT NULL CHECK (length(root) = 32),
    note        text NOT NULL,
    key_name    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (log_id, tree_size)
);

-- The latest checkpoint of a log (NULL when none was signed yet), for any PostgreSQL client.
CREATE FUNCTION merkle.latest_checkpoint(log_name text)
RETURNS TABLE (tree_size bigint, root bytea, note text, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.tree_size, c.root, c.note, c.created_at
      FROM merkle.checkpoints c JOIN merkle.logs l USING (log_id)
     WHERE l.name = log_name
     ORDER BY c.tree_size DESC
     LIMIT 1
$$;

-- Inclusion proofs by leaf hash (GET /v1/logs/<log>/proof/inclusion?leaf_hash=...) find the
-- index here. A hash index: 4 bytes per row instead of 32, and only equality is ever asked.
CREATE INDEX processed_log_leaf_hash ON merkle.processed_log USING hash (leaf_hash);
