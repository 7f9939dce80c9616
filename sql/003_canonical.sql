-- The canonical entry encoding v1 (docs/canonical-entry.md) as SQL functions, for psql users
-- and for tests. The capture code does not call these: it inlines the same encoding as one
-- flat expression per source (listener/canonical_sql.py), which is faster per row.
--
-- Both functions take values that are ALREADY text: each must be the value's type output
-- (what psql shows, what pgoutput sends, what format('%s', x) gives) under the pinned
-- settings TimeZone=UTC, DateStyle='ISO, YMD', IntervalStyle=postgres, extra_float_digits=1,
-- bytea_output=hex. Beware x::text: for boolean it gives 'true' where the output is 't', for
-- inet/cidr it always adds the /mask, for character(n) it strips trailing blanks.
-- Hence they do not pin settings themselves, and are IMMUTABLE.
--
-- Errors: SQLSTATE 22023 (invalid_parameter_value) for a bad op, mismatched or NULL
-- column names, duplicate column names.

-- {"<col>":"<text>"|null,...}: keys sorted by UTF-8 bytes, strings escaped by to_json(text),
-- which escapes exactly as RFC 8785 §3.2.2.2 does. cols may be given in any order.
CREATE FUNCTION merkle.canonical_key(cols text[], vals text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    result text;
BEGIN
    IF cols IS NULL OR vals IS NULL OR cardinality(cols) <> cardinality(vals) THEN
        RAISE EXCEPTION 'canonical key: cols and vals must be arrays of the same length'
            USING ERRCODE = '22023', HINT = 'pass one value (or NULL) per column name';
    END IF;
    IF array_position(cols, NULL) IS NOT NULL OR array_position(cols, '') IS NOT NULL THEN
        RAISE EXCEPTION 'canonical key: a column name is NULL or empty' USING ERRCODE = '22023';
    END IF;
    IF (SELECT count(DISTINCT c) FROM unnest(cols) AS c) <> cardinality(cols) THEN
        RAISE EXCEPTION 'canonical key: duplicate column names in %', cols USING ERRCODE = '22023';
    END IF;
    SELECT '{' || coalesce(string_agg(to_json(c)::text || ':' || coalesce(to_json(v)::text, 'null'), ','
                                      ORDER BY convert_to(c, 'UTF8')), '') || '}'
      INTO result
      FROM unnest(cols, vals) AS u(c, v);
    RETURN result;
END
$$;

-- {"op":...,"row":{...},"source":"<schema>.<table>","v":1}; hash it with
-- sha256('\x00'::bytea || convert_to(merkle.canonical_entry_v1(...), 'UTF8')).
CREATE FUNCTION merkle.canonical_entry_v1(op text, source text, cols text[], vals text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF op IS NULL OR op NOT IN ('insert', 'update', 'delete', 'truncate', 'backfill') THEN
        RAISE EXCEPTION 'canonical entry: op % is not one of insert, update, delete, truncate, backfill',
            quote_nullable(op) USING ERRCODE = '22023';
    END IF;
    IF source IS NULL OR source = '' THEN
        RAISE EXCEPTION 'canonical entry: source must be ''<schema>.<table>''' USING ERRCODE = '22023';
    END IF;
    RETURN '{"op":' || to_json(op)::text || ',"row":' || merkle.canonical_key(cols, vals)
        || ',"source":' || to_json(source)::text || ',"v":1}';
END
$$;

-- The leaf hash of an entry given as text (RFC 9162 §2.1.1: SHA-256(0x00 || entry)).
CREATE FUNCTION merkle.canonical_leaf_hash(entry text) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN sha256(decode('00', 'hex') || convert_to(entry, 'UTF8'));
