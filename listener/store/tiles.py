"""Tiles in PostgreSQL: write them, restore the right edge, and read nodes for proofs.

The tile layout is listener.merkle.tiles' (and merkle.tiles' in sql/001_schema.sql): this
module only moves Tile values in and out of the table. The SQL functions of
sql/002_merkle_functions.sql read the same rows.

    write_tiles(conn, log_id, tiles)          upsert; a tile may only grow
    load_partial_tiles(conn, log_id, size)    the right edge of the tree of `size` (<= 8 rows)
    TileNodeReader(conn, log_id)              NodeReader: one query per get_nodes call, with an
                                              LRU cache of full tiles (they never change)
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import psycopg
from psycopg import pq

from listener.errors import ProcessingError
from listener.merkle import NodeReader, Tile
from listener.merkle.tiles import TILE_HEIGHT, TILE_WIDTH, partial_width, row_offset, tile_for_node

HASH_SIZE = 32

# One pipelined executemany of INSERT .. ON CONFLICT. Measured with 1 to 2,000 full tiles, it
# took 0.2-1.3x the time of COPY into a temporary table plus one INSERT .. SELECT upsert (the
# temporary table only adds work), 0.15-0.5x that of one upsert from unnest() of arrays, and
# 1.0-2.2x that of a plain COPY that cannot upsert (listener.bench.sqlproof --write-tiles).
# A tile is rewritten only to grow with the same leading row-0 hashes (a partial tile getting
# wider; upper rows hash row 0, so the row-0 prefix decides), or with identical content (a
# replayed batch). Anything else would change a complete node: refused.
_UPSERT = """
INSERT INTO merkle.tiles AS t (log_id, level, idx, width, nodes) {source}
ON CONFLICT (log_id, level, idx) DO UPDATE SET width = EXCLUDED.width, nodes = EXCLUDED.nodes
 WHERE (t.width < EXCLUDED.width
        AND substring(t.nodes FROM 1 FOR 32 * t.width) = substring(EXCLUDED.nodes FROM 1 FOR 32 * t.width))
    OR (t.width = EXCLUDED.width AND t.nodes = EXCLUDED.nodes)
"""


def write_tiles(conn: psycopg.Connection, log_id: int, tiles: Iterable[Tile]) -> None:
    """Insert or rewrite these tiles of log `log_id` (a tile given twice: the last one wins).

    Runs in the caller's transaction if one is open (the sequencer's batch), else in its own.
    Raises ProcessingError if a stored tile would shrink or one of its hashes would change:
    complete nodes never change, so that is a bug or a forked log. Nothing is then written in
    its own transaction; in the caller's, the caller must roll back (the sequencer does).
    """
    latest: dict[tuple[int, int], Tile] = {}
    for tile in tiles:
        latest[(tile.level, tile.index)] = tile
    if not latest:
        return
    rows = [(log_id, t.level, t.index, t.width, t.nodes) for t in latest.values()]
    # Inside the caller's transaction no savepoint (two more round trips): the caller must roll
    # back on ProcessingError (the sequencer does), since a refused tile is not a database error.
    in_transaction = conn.info.transaction_status != pq.TransactionStatus.IDLE
    with (contextlib.nullcontext() if in_transaction else conn.transaction()), conn.cursor() as cur:
        cur.executemany(_UPSERT.format(source="VALUES (%s, %s, %s, %s, %s)"), rows)
        written = cur.rowcount
        if written != len(rows):
            refused = _refused(cur, log_id, latest)
            raise ProcessingError(
                f"log id {log_id}: refusing to rewrite tile(s) {refused} with a narrower version or "
                "different hashes; complete nodes never change, so the writer's tree has forked from the stored "
                "one: stop the writer and check the log"
            )


def _refused(cur: psycopg.Cursor, log_id: int, latest: dict[tuple[int, int], Tile]) -> list[str]:
    cur.execute(
        "SELECT level, idx, width, nodes FROM merkle.tiles WHERE log_id = %s"
        " AND (level, idx) IN (SELECT * FROM unnest(%s::smallint[], %s::bigint[]))",
        (log_id, [k[0] for k in latest], [k[1] for k in latest]),
    )
    bad = []
    for level, idx, width, nodes in cur:
        new = latest[(level, idx)]
        if width > new.width or bytes(nodes)[: HASH_SIZE * width] != new.nodes[: HASH_SIZE * width]:
            bad.append(f"{level}/{idx} (stored width {width}, new width {new.width})")
    return bad


def load_partial_tiles(conn: psycopg.Connection, log_id: int, size: int) -> list[Tile]:
    """The right-most partial tile of every level of the tree of `size`, lowest level first.

    This is what TileBuilder(size, partial_tiles) restores the right edge from: at most one
    row per tile level, never the leaves. `size` may be below the log's current size: a stored
    tile that has grown since is cut back to the width it had at `size` (its complete nodes are
    a prefix of every row). Requires size >= 0. Raises ProcessingError when a tile that the tree
    of `size` must have is missing or too narrow.
    """
    if size < 0:
        raise ValueError(f"tree size must be >= 0, got {size}")
    want: dict[tuple[int, int], int] = {}
    level = 0
    while size >> (TILE_HEIGHT * level):
        width = partial_width(size, level)
        if width:
            want[(level, size >> (TILE_HEIGHT * (level + 1)))] = width
        level += 1
    if not want:
        return []
    rows = conn.execute(
        "SELECT level, idx, width, nodes FROM merkle.tiles WHERE log_id = %s"
        " AND (level, idx) IN (SELECT * FROM unnest(%s::smallint[], %s::bigint[]))",
        (log_id, [k[0] for k in want], [k[1] for k in want]),
    ).fetchall()
    found = {(level, idx): (stored, bytes(nodes)) for level, idx, stored, nodes in rows}
    tiles = []
    for (level, idx), width in want.items():
        if (level, idx) not in found or found[(level, idx)][0] < width:
            have = found.get((level, idx), (None,))[0]
            raise ProcessingError(
                f"log id {log_id}: the tree of size {size} needs tile {level}/{idx} of width {width}, "
                f"but merkle.tiles has {'none' if have is None else f'width {have}'}; the stored tree "
                "is damaged: do not extend this log until it is repaired"
            )
        stored, nodes = found[(level, idx)]
        tiles.append(Tile(level, idx, width, cut_tile(nodes, stored, width)))
    return tiles


def cut_tile(nodes: bytes, stored_width: int, width: int) -> bytes:
    """The nodes of a tile of `stored_width` as they were when it had `width` hashes.

    Requires 1 <= width <= stored_width. Row k keeps its first floor(width / 2**k) hashes.
    """
    if width == stored_width:
        return nodes
    parts = []
    for k in range(TILE_HEIGHT):
        start = HASH_SIZE * row_offset(stored_width, k)
        parts.append(nodes[start : start + HASH_SIZE * (width >> k)])
    return b"".join(parts)


class TileNodeReader(NodeReader):
    """A NodeReader over merkle.tiles of one log, for a tree no larger than the stored one.

    get_nodes reads every tile it needs in ONE query. Full tiles (width 256) never change and
    are kept in a bounded LRU cache of `cache_tiles` entries (16 KB each); partial tiles are
    re-read on every call, since they grow. Not thread-safe: one reader per task.
    """

    def __init__(self, conn: psycopg.Connection, log_id: int, *, cache_tiles: int = 64) -> None:
        self.conn = conn
        self.log_id = log_id
        self.cache_tiles = cache_tiles
        self._full: OrderedDict[tuple[int, int], Tile] = OrderedDict()

    def get_nodes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        """Hashes of the complete nodes `ids`, in the order asked.

        Raises ProcessingError if a node is not stored (a missing tile, or a node beyond the
        stored tree: ask only for nodes complete at a size <= merkle.logs.tree_size).
        """
        where = [tile_for_node(level, index) for level, index in ids]
        tiles: dict[tuple[int, int], Tile] = {}
        missing: set[tuple[int, int]] = set()
        for tile_level, tile_index, _, _ in where:
            key = (tile_level, tile_index)
            if key in tiles or key in missing:
                continue
            cached = self._full.get(key)
            if cached is not None:
                self._full.move_to_end(key)
                tiles[key] = cached
            else:
                missing.add(key)
        if missing:
            rows = self.conn.execute(
                "SELECT level, idx, width, nodes FROM merkle.tiles WHERE log_id = %s"
                " AND (level, idx) IN (SELECT * FROM unnest(%s::smallint[], %s::bigint[]))",
                (self.log_id, [k[0] for k in missing], [k[1] for k in missing]),
            ).fetchall()
            for level, idx, width, nodes in rows:
                tile = Tile(level, idx, width, bytes(nodes))
                tiles[(level, idx)] = tile
                if width == TILE_WIDTH:
                    self._remember(tile)
        out = []
        for (level, index), (tile_level, tile_index, k, j) in zip(ids, where):
            tile = tiles.get((tile_level, tile_index))
            if tile is None or j >= tile.width >> k:
                raise ProcessingError(
                    f"log id {self.log_id}: tree node ({level}, {index}) is not in merkle.tiles "
                    f"(tile {tile_level}/{tile_index} {'missing' if tile is None else f'has width {tile.width}'}); "
                    "ask only for sizes <= merkle.logs.tree_size, else the stored tree is damaged"
                )
            out.append(tile.node(level, index))
        return out

    def _remember(self, tile: Tile) -> None:
        if self.cache_tiles <= 0:
            return
        self._full[(tile.level, tile.index)] = tile
        self._full.move_to_end((tile.level, tile.index))
        while len(self._full) > self.cache_tiles:
            self._full.popitem(last=False)
