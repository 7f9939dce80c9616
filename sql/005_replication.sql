-- Replication-mode capture support (listener/sources/replication*.py).
--
-- A log with replication-mode sources has one publication and one pgoutput logical slot,
-- both named merkle_<log>. The stream's position that counts is the one stored here, not the
-- slot's: the slot's confirmed position is not durable across a server crash.

-- The commit end_lsn of the last source transaction whose changes are in the log.
-- Invariant: written in the same transaction as those changes' processed_log rows, so
-- "appended" and "end_lsn advanced" are one durable fact. A restart resumes after end_lsn and
-- skips every transaction whose end_lsn <= it (exactly-once).
CREATE TABLE merkle.replication_progress (
    log_id       integer PRIMARY KEY REFERENCES merkle.logs ON DELETE CASCADE,
    slot_name    text NOT NULL,
    publication  text NOT NULL,
    end_lsn      pg_lsn NOT NULL DEFAULT '0/0',
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Rows that existed when a replication-mode source was added with --backfill, read in the
-- snapshot the log's slot was created with (or under a SHARE lock when the slot existed
-- already), so with the stream they have no gap and no duplicate. The sequencer appends
-- them (op 'backfill', in ord = key order) before any streamed change of the source and
-- deletes them in the same transaction.
-- `ready` is false while the backfill is being written: the source's streamed changes wait.
CREATE TABLE merkle.replication_backfill_state (
    source_id  integer PRIMARY KEY REFERENCES merkle.sources ON DELETE CASCADE,
    ready      boolean NOT NULL DEFAULT false
);
CREATE TABLE merkle.replication_backfill (
    source_id   integer NOT NULL REFERENCES merkle.replication_backfill_state ON DELETE CASCADE,
    ord         bigint NOT NULL,
    source_key  text COLLATE "C" NOT NULL,
    leaf_hash   bytea NOT NULL CHECK (length(leaf_hash) = 32),
    PRIMARY KEY (source_id, ord)
);

-- A replication source being removed: it left the publication when the server's WAL was at
-- until_lsn. Changes committed before that are still streamed and logged; once the log's
-- slot has confirmed until_lsn, `source remove` deletes the source (run it again).
CREATE TABLE merkle.replication_retired (
    source_id  integer PRIMARY KEY REFERENCES merkle.sources ON DELETE CASCADE,
    until_lsn  pg_lsn NOT NULL
);
