-- merkle-listener schema, version 2: the Merkle tree read from SQL.
--
-- Roots, inclusion proofs and consistency proofs of any log, computed from merkle.tiles
-- alone, so that any PostgreSQL client (psql included) can prove without the listener:
--
--   merkle.root(log, tree_size)                  -> bytea    RFC 9162 §2.1.1 MTH(D[0:n])
--   merkle.inclusion_proof(log, leaf_index, size) -> bytea[]  RFC 9162 §2.1.3.1 PATH(m, D[0:n])
--   merkle.consistency_proof(log, first, second)  -> bytea[]  RFC 9162 §2.1.4.1 PROOF(m, D[0:n])
--   merkle.leaf_hash(log, leaf_index)            -> bytea    SHA-256(0x00 || entry)
--
-- Proof arrays are ordered as in the RFC: from the leaf (or the old tree's subtree) upwards.
-- A consistency proof from 0, or from a size to itself, is the empty array.
--
-- Errors (never NULL, never a guess):
--   22004 null_value_not_allowed   an argument is NULL
--   22023 invalid_parameter_value  a negative size or index, leaf_index >= tree_size,
--                                  first > second, a tree node beyond 2^63 leaves
--   ML001 (unknown log)            no log of that name in merkle.logs
--   ML002 (beyond the log)         tree_size (or second) > the log's current tree_size, or
--                                  leaf_hash's leaf_index >= it; retry once the log has grown
--   ML003 (log data missing)       a tile, tree node or processed_log row that must exist
--                                  does not, or a recomputed root differs from logs.root:
--                                  the stored log is damaged, do not trust it
--
-- How a node is found (layout: see merkle.tiles in 001_schema.sql). Tree node (level, index)
-- lives in tile level level / 8, row k = level % 8, tile idx = index >> (8 - k), at position
-- j = index & (2^(8-k) - 1) of the row; it is stored iff j < floor(width / 2^k). Row k starts
-- at hash number sum_{i<k} floor(width / 2^i). Any complete node is one 32-byte slice of
-- `nodes`, so no hashing is needed inside a tile; a subtree that ends at the ragged right edge
-- of the tree is folded from at most 63 complete nodes. A call lists the nodes it needs first,
-- then reads each tile they lie in once (merkle.nodes).
--
-- The functions are STABLE: every query in one call sees the same snapshot, and since nodes
-- are only ever added (a partial tile is rewritten wider, never narrower), a proof for a
-- size <= logs.tree_size stays answerable while the listener appends.

-- Hash number at which row k (0..7) of a tile of `width` hashes starts: sum_{i<k} floor(width/2^i);
-- k = 8 gives the tile's length in hashes.
CREATE FUNCTION merkle.tile_row_offset(width integer, k integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE k
    WHEN 0 THEN 0
    WHEN 1 THEN width
    WHEN 2 THEN width + (width >> 1)
    WHEN 3 THEN width + (width >> 1) + (width >> 2)
    WHEN 4 THEN width + (width >> 1) + (width >> 2) + (width >> 3)
    WHEN 5 THEN width + (width >> 1) + (width >> 2) + (width >> 3) + (width >> 4)
    WHEN 6 THEN width + (width >> 1) + (width >> 2) + (width >> 3) + (width >> 4) + (width >> 5)
    WHEN 7 THEN width + (width >> 1) + (width >> 2) + (width >> 3) + (width >> 4) + (width >> 5)
                + (width >> 6)
    WHEN 8 THEN width + (width >> 1) + (width >> 2) + (width >> 3) + (width >> 4) + (width >> 5)
                + (width >> 6) + (width >> 7)
END;

-- The log's id and current tree size. Raises ML001 for an unknown log.
CREATE FUNCTION merkle.log_state(log text, OUT log_id integer, OUT tree_size bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF log IS NULL THEN
        RAISE EXCEPTION 'merkle: the log name is NULL' USING ERRCODE = '22004',
            HINT = 'pass the name of a log (SELECT name FROM merkle.logs)';
    END IF;
    SELECT l.log_id, l.tree_size INTO log_state.log_id, log_state.tree_size
      FROM merkle.logs l WHERE l.name = log_state.log;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'merkle: there is no log named %', quote_literal(log) USING ERRCODE = 'ML001',
            HINT = 'the existing logs are listed by SELECT name FROM merkle.logs';
    END IF;
END $$;

-- Checks a requested tree size against the log: 0 <= size <= the log's tree_size.
CREATE FUNCTION merkle.check_size(log text, size bigint, log_size bigint, what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF size IS NULL THEN
        RAISE EXCEPTION 'merkle: % is NULL', what USING ERRCODE = '22004';
    END IF;
    IF size < 0 THEN
        RAISE EXCEPTION 'merkle: % must not be negative, got %', what, size USING ERRCODE = '22023';
    END IF;
    IF size > log_size THEN
        RAISE EXCEPTION 'merkle: % % is beyond log %, whose tree size is %', what, size,
            quote_literal(log), log_size USING ERRCODE = 'ML002',
            HINT = 'ask for a size <= merkle.logs.tree_size, or retry after the log has grown';
    END IF;
END $$;

-- The hashes of complete tree nodes (levels[i], indexes[i]), in the order asked. Requires every
-- node to be complete in the log's current tree; raises ML003 if one is not stored, 22023 for
-- a node that no tree of fewer than 2^63 leaves has (negative, or beyond 2^63 leaves).
--
-- Each needed tile is read once, whole, by one query (array_agg detoasts it), then every node
-- is a substring of the in-memory copy. A whole-tile read costs about two single-node
-- substring() reads (each of those is a TOAST index lookup too), and an audit path needs up to
-- 8 nodes per tile: measured at 1M leaves with a 20-node path, this is 2-3x faster than one
-- substring() per node straight from the table.
-- A tile is keyed as level << 56 | idx: for a node within 2^63 leaves, idx < 2^55.
CREATE FUNCTION merkle.nodes(log_id integer, levels integer[], indexes bigint[]) RETURNS bytea[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    keys bigint[];
    widths integer[];
    bodies bytea[];
    hashes bytea[] := '{}';
    missing integer;
    slot integer;
    level integer;
    index bigint;
    k integer;
    j integer;
BEGIN
    IF log_id IS NULL OR levels IS NULL OR indexes IS NULL THEN
        RAISE EXCEPTION 'merkle: merkle.nodes needs a log id, levels and indexes, got a NULL'
            USING ERRCODE = '22004';
    END IF;
    IF cardinality(levels) <> cardinality(indexes) THEN
        RAISE EXCEPTION 'merkle: % levels but % indexes', cardinality(levels), cardinality(indexes)
            USING ERRCODE = '22023';
    END IF;
    -- A node that is invalid (refused below) may alias some other tile here: harmless.
    SELECT array_agg(w.tkey), array_agg(t.width), array_agg(t.nodes)
      INTO keys, widths, bodies
      FROM (SELECT DISTINCT ((u.level / 8)::bigint << 56) | (u.index >> (8 - u.level % 8)) AS tkey
              FROM unnest(levels, indexes) AS u(level, index)) w
      JOIN merkle.tiles t ON t.log_id = nodes.log_id AND t.level = (w.tkey >> 56)
                         AND t.idx = w.tkey & ((1::bigint << 56) - 1);
    FOR p IN 1 .. cardinality(levels) LOOP
        level := levels[p];
        index := indexes[p];
        IF level IS NULL OR level NOT BETWEEN 0 AND 62 OR index IS NULL OR index < 0
           OR index >> (63 - level) <> 0 THEN
            RAISE EXCEPTION 'merkle: no tree node (level %, index %)', level, index
                USING ERRCODE = '22023',
                HINT = 'a node (level, index) covers leaves [index * 2^level, (index + 1) * 2^level), '
                       'which must lie below 2^63';
        END IF;
        k := level % 8;
        slot := array_position(keys, ((level / 8)::bigint << 56) | (index >> (8 - k)));
        j := index & ((1 << (8 - k)) - 1);
        IF slot IS NULL OR j >= (widths[slot] >> k)
           OR octet_length(bodies[slot]) <> 32 * merkle.tile_row_offset(widths[slot], 8) THEN
            missing := coalesce(missing, p);
            CONTINUE;
        END IF;
        hashes := hashes || substring(bodies[slot] FROM 32 * (merkle.tile_row_offset(widths[slot], k) + j) + 1
                                      FOR 32);
    END LOOP;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'merkle: tree node (level %, index %) of log id % is not in merkle.tiles',
            levels[missing], indexes[missing], log_id USING ERRCODE = 'ML003',
            HINT = 'the stored tree is damaged or the node is beyond the tree; do not trust this log '
                   'until it is repaired';
    END IF;
    RETURN hashes;
END $$;

-- The hash of one complete tree node. Same rules as merkle.nodes.
CREATE FUNCTION merkle.node(log_id integer, level integer, index bigint) RETURNS bytea
LANGUAGE sql STABLE
RETURN (merkle.nodes(log_id, ARRAY[level], ARRAY[index]))[1];

-- Subtree hashes folded from complete nodes: entry e is made of the nodes
-- ends[e-1]+1 .. ends[e] (1-based, ends[0] = 0), listed left to right, each one the left
-- sibling of the fold of those after it (RFC 9162 §2.1.1: the right edge of a subtree is a
-- smaller subtree, so MTH of [a, b) is HASH(0x01 || node || MTH(rest))). Requires ends to be
-- increasing, ends[last] = cardinality(levels).
CREATE FUNCTION merkle.subtree_hashes(log_id integer, levels integer[], indexes bigint[], ends integer[])
RETURNS bytea[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    hashes bytea[] := merkle.nodes(log_id, levels, indexes);
    out bytea[] := '{}';
    h bytea;
    first integer := 1;
    e integer;
BEGIN
    FOREACH e IN ARRAY ends LOOP
        h := hashes[e];
        FOR p IN REVERSE e - 1 .. first LOOP
            h := sha256('\x01'::bytea || hashes[p] || h);
        END LOOP;
        out := out || h;
        first := e + 1;
    END LOOP;
    RETURN out;
END $$;

-- The audit path of complete node (node_level, node_index) in the tree of `size` leaves,
-- bottom-up, preceded by that node itself if with_node. This is RFC 9162 §2.1.3.1 PATH for
-- a leaf (level 0), and the part of §2.1.4.1 SUBPROOF above the old tree's last full subtree
-- for a consistency proof. Requires the node to be complete in the tree of `size`, and
-- size <= the log's tree_size.
--
-- Walking up from the node: at each level the sibling is either to the left (a complete
-- node), to the right and complete, to the right and ragged (the subtree [start, size),
-- decomposed into at most `level` complete nodes), or absent (the node is on the right edge
-- and is carried up unchanged). The walk ends when the node's subtree covers [0, size).
CREATE FUNCTION merkle.path_hashes(log_id integer, node_level integer, node_index bigint, size bigint,
                                   with_node boolean) RETURNS bytea[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    levels integer[] := '{}';
    indexes bigint[] := '{}';
    ends integer[] := '{}';
    idx bigint := node_index;
    w bigint;
    start bigint;
    rest bigint;
    pos bigint;
BEGIN
    IF with_node THEN
        levels := ARRAY[node_level];
        indexes := ARRAY[node_index];
        ends := ARRAY[1];
    END IF;
    FOR h IN node_level .. 62 LOOP
        w := 1::bigint << h;
        start := idx << h;
        IF idx & 1 = 1 THEN
            levels := levels || h;
            indexes := indexes || (idx - 1);
        ELSIF size - start > w THEN
            rest := size - start - w;
            IF rest >= w THEN
                levels := levels || h;
                indexes := indexes || (idx + 1);
            ELSE
                pos := start + w;
                FOR t IN REVERSE h - 1 .. 0 LOOP
                    IF (rest >> t) & 1 = 1 THEN
                        levels := levels || t;
                        indexes := indexes || (pos >> t);
                        pos := pos + (1::bigint << t);
                    END IF;
                END LOOP;
            END IF;
        ELSIF start = 0 THEN
            EXIT;
        ELSE
            idx := idx >> 1;
            CONTINUE;
        END IF;
        ends := ends || cardinality(levels);
        idx := idx >> 1;
    END LOOP;
    IF cardinality(ends) = 0 THEN
        RETURN '{}';
    END IF;
    RETURN merkle.subtree_hashes(log_id, levels, indexes, ends);
END $$;

-- RFC 9162 §2.1.1: MTH(D[0:tree_size]) of the log; sha256('') for tree_size 0.
-- At the log's current size the result is checked against merkle.logs.root (ML003 if not equal).
CREATE FUNCTION merkle.root(log text, tree_size bigint) RETURNS bytea
LANGUAGE plpgsql STABLE AS $$
DECLARE
    st record;
    levels integer[] := '{}';
    indexes bigint[] := '{}';
    pos bigint := 0;
    result bytea;
    stored bytea;
BEGIN
    st := merkle.log_state(log);
    PERFORM merkle.check_size(log, tree_size, st.tree_size, 'tree_size');
    IF tree_size = 0 THEN
        RETURN sha256(''::bytea);
    END IF;
    -- [0, tree_size) as complete subtrees, largest (leftmost) first: one per bit of tree_size.
    FOR t IN REVERSE 62 .. 0 LOOP
        IF (tree_size >> t) & 1 = 1 THEN
            levels := levels || t;
            indexes := indexes || (pos >> t);
            pos := pos + (1::bigint << t);
        END IF;
    END LOOP;
    result := (merkle.subtree_hashes(st.log_id, levels, indexes, ARRAY[cardinality(levels)]))[1];
    IF tree_size = st.tree_size THEN
        SELECT l.root INTO stored FROM merkle.logs l WHERE l.log_id = st.log_id;
        IF stored IS DISTINCT FROM result THEN
            RAISE EXCEPTION 'merkle: log % stores root % at size %, but its tiles give %',
                quote_literal(log), encode(stored, 'hex'), tree_size, encode(result, 'hex')
                USING ERRCODE = 'ML003', HINT = 'the stored tree is damaged; do not trust this log';
        END IF;
    END IF;
    RETURN result;
END $$;

-- RFC 9162 §2.1.3.1: the inclusion proof of leaf leaf_index in the tree of tree_size leaves.
CREATE FUNCTION merkle.inclusion_proof(log text, leaf_index bigint, tree_size bigint) RETURNS bytea[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    st record;
BEGIN
    st := merkle.log_state(log);
    PERFORM merkle.check_size(log, tree_size, st.tree_size, 'tree_size');
    IF leaf_index IS NULL THEN
        RAISE EXCEPTION 'merkle: leaf_index is NULL' USING ERRCODE = '22004';
    END IF;
    IF leaf_index < 0 OR leaf_index >= tree_size THEN
        RAISE EXCEPTION 'merkle: leaf_index % is not in a tree of size % (need 0 <= leaf_index < tree_size)',
            leaf_index, tree_size USING ERRCODE = '22023';
    END IF;
    RETURN merkle.path_hashes(st.log_id, 0, leaf_index, tree_size, false);
END $$;

-- RFC 9162 §2.1.4.1: the consistency proof between the trees of `first` and `second` leaves.
-- Empty for first = 0 or first = second. The old tree's rightmost complete subtree, of size
-- 2^level where level is the number of trailing zero bits of `first`, is where SUBPROOF stops
-- descending; the proof is that subtree (omitted when first is a power of two, since it is
-- then the old root itself) followed by its audit path in the new tree.
CREATE FUNCTION merkle.consistency_proof(log text, first bigint, second bigint) RETURNS bytea[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    st record;
    level integer := 0;
BEGIN
    st := merkle.log_state(log);
    PERFORM merkle.check_size(log, second, st.tree_size, 'second');
    IF first IS NULL THEN
        RAISE EXCEPTION 'merkle: first is NULL' USING ERRCODE = '22004';
    END IF;
    IF first < 0 OR first > second THEN
        RAISE EXCEPTION 'merkle: no consistency proof from size % to size % (need 0 <= first <= second)',
            first, second USING ERRCODE = '22023';
    END IF;
    IF first = 0 OR first = second THEN
        RETURN '{}';
    END IF;
    WHILE (first >> level) & 1 = 0 LOOP
        level := level + 1;
    END LOOP;
    RETURN merkle.path_hashes(st.log_id, level, (first - 1) >> level, second,
                              ((first - 1) >> level) <> 0);
END $$;

-- The leaf hash at leaf_index, from merkle.processed_log (the log's ground truth).
CREATE FUNCTION merkle.leaf_hash(log text, leaf_index bigint) RETURNS bytea
LANGUAGE plpgsql STABLE AS $$
DECLARE
    st record;
    result bytea;
BEGIN
    st := merkle.log_state(log);
    IF leaf_index IS NULL THEN
        RAISE EXCEPTION 'merkle: leaf_index is NULL' USING ERRCODE = '22004';
    END IF;
    IF leaf_index < 0 THEN
        RAISE EXCEPTION 'merkle: leaf_index must not be negative, got %', leaf_index
            USING ERRCODE = '22023';
    END IF;
    IF leaf_index >= st.tree_size THEN
        RAISE EXCEPTION 'merkle: leaf_index % is beyond log %, whose tree size is %', leaf_index,
            quote_literal(log), st.tree_size USING ERRCODE = 'ML002',
            HINT = 'ask for an index < merkle.logs.tree_size, or retry after the log has grown';
    END IF;
    SELECT p.leaf_hash INTO result FROM merkle.processed_log p
     WHERE p.log_id = st.log_id AND p.seq = leaf_index;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'merkle: log % has no processed_log row for leaf %', quote_literal(log), leaf_index
            USING ERRCODE = 'ML003', HINT = 'the stored log is damaged; do not trust it';
    END IF;
    RETURN result;
END $$;
