-- Trigger mode's doorbell made optional per source.
--
-- The capture trigger rings a NOTIFY after each statement that queued rows. PostgreSQL refuses
-- PREPARE TRANSACTION in a transaction that sent a NOTIFY, so with the doorbell a writer using
-- two-phase commit (XA transaction managers, for instance) cannot prepare a transaction that
-- inserted into a source. A source without the doorbell is drained by the listener's poll
-- instead (every 0.1 s while the log has such a source); nothing else changes.
-- `source add --no-doorbell` and `source doorbell LOG TABLE on|off` set it
-- (listener/sources/trigger.py replaces the capture function). Replication sources have no
-- capture trigger; theirs stays true.

ALTER TABLE merkle.sources ADD COLUMN doorbell boolean NOT NULL DEFAULT true;
ALTER TABLE merkle.sources ADD CONSTRAINT sources_doorbell_trigger_mode CHECK (doorbell OR mode = 'trigger');
