-- A log's origin names one history to its verifiers. When the database has gone back behind a
-- checkpoint the signer published (a restore, a standby promoted too early), that history
-- cannot be continued: `merkle-listener log set-origin` gives the log a new origin, and its
-- checkpoints begin again under it. So checkpoints belong to the origin they name, and the
-- origins logs retired are kept.

ALTER TABLE merkle.checkpoints ADD COLUMN origin text;
UPDATE merkle.checkpoints SET origin = split_part(note, E'\n', 1);
ALTER TABLE merkle.checkpoints ALTER COLUMN origin SET NOT NULL;
ALTER TABLE merkle.checkpoints DROP CONSTRAINT checkpoints_pkey;
ALTER TABLE merkle.checkpoints ADD PRIMARY KEY (log_id, origin, tree_size);

-- Origins retired by `log set-origin`, and those of a dropped log that had checkpoints. An
-- origin is never given to a log again: its verifiers hold its checkpoints. log_id is NULL once
-- the log is dropped; tree_size is the log's size when the origin was retired, published_size
-- the largest checkpoint known to have been signed under it (merkle.checkpoints', or the
-- signer's memory, as a refusal or the listener reported it): the size its verifiers are told
-- it ended at.
-- A key of its own: a publication FOR ALL TABLES (a CDC tool's) publishes this table too, and
-- PostgreSQL refuses its updates (log_id set NULL by `log drop`) without a replica identity.
CREATE TABLE merkle.retired_origins (
    retired_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin          text NOT NULL,
    log_id          integer REFERENCES merkle.logs ON DELETE SET NULL,
    log_name        text NOT NULL,
    tree_size       bigint NOT NULL CHECK (tree_size >= 0),
    root            bytea NOT NULL CHECK (length(root) = 32),
    published_size  bigint CHECK (published_size >= 0),
    retired_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (log_id, origin)
);
CREATE INDEX retired_origins_origin ON merkle.retired_origins (origin);

-- Why the listener last refused to sign the log's tree under its origin (NULL: it did not),
-- and the size published under that origin, so that `status` and `log set-origin` can say so:
-- appending goes on unsigned meanwhile.
ALTER TABLE merkle.logs ADD COLUMN signing_refused text, ADD COLUMN signing_refused_at timestamptz,
                        ADD COLUMN signing_refused_size bigint;

CREATE OR REPLACE FUNCTION merkle.latest_checkpoint(log_name text)
RETURNS TABLE (tree_size bigint, root bytea, note text, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.tree_size, c.root, c.note, c.created_at
      FROM merkle.checkpoints c JOIN merkle.logs l ON l.log_id = c.log_id AND c.origin = l.origin
     WHERE l.name = log_name
     ORDER BY c.tree_size DESC
     LIMIT 1
$$;
