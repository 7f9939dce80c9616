-- What keeps the log's writer from appending (NULL: nothing), and since when. The listener
-- keeps it once the same error has stopped the writer twice running, and clears it once the
-- writer gets through: a log stuck on a change it cannot log (docs/replication.md) was seen
-- only in the listener's own output, while `status` said all was well.
ALTER TABLE merkle.logs ADD COLUMN writer_error text, ADD COLUMN writer_error_at timestamptz;
