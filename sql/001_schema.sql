-- merkle-listener schema, version 1.
--
-- Invariants (the sequencer keeps them; every batch is one transaction):
--   * logs.tree_size = count of processed_log rows of the log, and seq runs 0 .. tree_size-1
--     with no gap;
--   * logs.root = the RFC 9162 root of the leaf hashes in seq order;
--   * tiles hold every complete node of the tree (see "tiles" below); a full tile never changes;
--   * a change is appended at most once (processed_log's unique change identity).

CREATE SCHEMA IF NOT EXISTS merkle;

-- Which schema version this database holds; one row per applied migration.
CREATE TABLE merkle.schema_version (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per log. tree_size and root are the fence: each batch locks this row and checks
-- that they are the state it extends.
CREATE TABLE merkle.logs (
    log_id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    origin      text NOT NULL CHECK (origin <> '' AND origin !~ '[[:cntrl:]]'),
    tree_size   bigint NOT NULL DEFAULT 0 CHECK (tree_size >= 0),
    root        bytea NOT NULL DEFAULT sha256(''::bytea) CHECK (length(root) = 32),
    paused      boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Which table feeds which log, and how. The hashed column list is fixed at registration.
CREATE TABLE merkle.sources (
    source_id     integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    log_id        integer NOT NULL REFERENCES merkle.logs ON DELETE CASCADE,
    table_schema  text NOT NULL,
    table_name    text NOT NULL,
    table_oid     oid NOT NULL,
    mode          text NOT NULL CHECK (mode IN ('trigger', 'replication')),
    key_columns   text[] NOT NULL CHECK (cardinality(key_columns) > 0),
    columns       text[] NOT NULL,
    events        text[] NOT NULL DEFAULT '{insert}',
    append_only   boolean NOT NULL DEFAULT false,
    row_filter    text,
    entry_column  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (log_id, table_oid)
);

-- The log itself: seq is the leaf index. No copy of the row data, only its hash and key.
-- change_id/change_ord identify the captured change (trigger mode: statement id and row
-- ordinal; replication mode: commit LSN and position in the transaction); the unique index
-- over (source, key, change) both finds a row's leaves by key and makes it impossible to
-- append a replayed change twice.
-- No foreign key to merkle.logs: a per-row FK check would cost more than half of the
-- sequencer's insert time; only the sequencer writes here, for a log it has locked.
CREATE TABLE merkle.processed_log (
    log_id        integer NOT NULL,
    seq           bigint NOT NULL CHECK (seq >= 0),
    source_id     integer NOT NULL,
    source_key    text COLLATE "C" NOT NULL,
    op            text NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'truncate', 'backfill')),
    leaf_hash     bytea NOT NULL CHECK (length(leaf_hash) = 32),
    change_id     bigint NOT NULL,
    change_ord    integer NOT NULL,
    commit_lsn    pg_lsn,
    sequenced_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (log_id, seq)
);
CREATE UNIQUE INDEX processed_log_change ON merkle.processed_log
    (log_id, source_id, source_key, change_id, change_ord);

-- The tree as C2SP tlog-tiles of height 8. Tile (level, idx) of width W (1..256) covers the
-- nodes of tree level 8*level with indices [idx*256, idx*256 + W). `nodes` holds the tile's
-- rows 0..7, lowest first, each only the complete nodes: row k has floor(W / 2^k) hashes of
-- tree level 8*level + k. Row 0 (the first 32*W bytes) is exactly the tlog-tiles tile; the
-- upper rows make any node a substring read. Only the right-most tile of a level is partial
-- and it is rewritten as it grows; full tiles (W = 256) never change.
CREATE TABLE merkle.tiles (
    log_id  integer NOT NULL REFERENCES merkle.logs ON DELETE CASCADE,
    level   smallint NOT NULL CHECK (level BETWEEN 0 AND 7),
    idx     bigint NOT NULL CHECK (idx >= 0),
    width   smallint NOT NULL CHECK (width BETWEEN 1 AND 256),
    nodes   bytea NOT NULL,
    PRIMARY KEY (log_id, level, idx)
);
-- Hashes do not compress; EXTERNAL lets substring() read only the chunks it needs.
ALTER TABLE merkle.tiles ALTER COLUMN nodes SET STORAGE EXTERNAL;
