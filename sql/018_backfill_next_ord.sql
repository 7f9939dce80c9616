-- A replication backfill is appended BACKFILL_ROWS_PER_BATCH rows per batch, in ord order
-- (listener/sources/replication_apply.py). next_ord is its first row not yet appended, moved
-- in the same transaction as the rows it passes, so a batch reads its range straight from the
-- primary key: finding the first row left by min(ord) would step over the index entries of
-- every row appended before, which stay while any older snapshot is open.
-- Backfills queued before this version were appended whole: theirs begin at 1.
ALTER TABLE merkle.replication_backfill_state ADD COLUMN next_ord bigint NOT NULL DEFAULT 1;
