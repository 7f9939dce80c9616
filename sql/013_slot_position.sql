-- A slot whose confirmed position passed the log's stored end_lsn was moved by something
-- other than the listener (pg_replication_slot_advance, another client streaming the slot,
-- a server that lost the listener's last commits): the transactions in between will never
-- be streamed again, and resuming would skip them without a word.
--
-- The listener now stores a position before it confirms it, also the idle one it confirms
-- so that a quiet slot does not pin WAL (listener/sources/replication_feed.py), so the slot
-- never passes end_lsn by its doing. `slot_checked` says that holds for the log: true for
-- the logs created from now on; false for the existing ones, whose slot an earlier version
-- may have confirmed past end_lsn while idle, until their next stream start takes the
-- slot's position as theirs (once) and sets it.
ALTER TABLE merkle.replication_progress ADD COLUMN slot_checked boolean NOT NULL DEFAULT false;
ALTER TABLE merkle.replication_progress ALTER COLUMN slot_checked SET DEFAULT true;
