-- Trigger-mode capture support.
--
-- Each trigger-mode source S gets (created by `merkle-listener source add`, see
-- listener/sources/trigger.py): an outbox table merkle.outbox_<S> with the hashed columns of
-- the source, typed as in the source, plus (stmt_id, ord, op, queued_at); and a statement
-- trigger that copies each inserted row image into it. The canonical entry and the leaf hash
-- are computed from that image by the sequencer's drain, under pinned settings.
--
-- stmt_id comes from one sequence shared by all sources: a statement takes one value, its
-- rows are numbered 1..n by `ord` in insertion order. (stmt_id, ord) orders the changes of a
-- transaction; the drain never searches by "id > last", it deletes what is committed.

CREATE SEQUENCE merkle.stmt_seq AS bigint CACHE 1;

-- The append-only guard: BEFORE UPDATE/DELETE/TRUNCATE statement trigger on a source.
-- TG_ARGV[0] is the log's name, for the message.
CREATE FUNCTION merkle.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on %.% is refused: the table is append-only (it feeds merkle-listener log "%")',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = 'ML100',
              HINT = 'Append rows instead; to allow changes, run `merkle-listener source remove` and add the source again without --append-only.';
END
$$;
