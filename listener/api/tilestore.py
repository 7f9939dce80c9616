"""Tiles for the HTTP server: an LRU of tile contents with coalesced database fetches.

Tile content is append-only: a tile of width W is a prefix of the same tile at any larger
width, and complete nodes never change (sql/001_schema.sql). So a cached tile, full or
partial, answers every node it holds, forever; a node beyond a cached partial tile's width
triggers a re-read. Nothing is ever invalidated.

Concurrent requests that miss the cache do not each run a query: their tile keys join the
next batch, and one of `fetchers` tasks reads a whole batch in ONE query. Under load the
batches grow, so the database cost per proof falls (the hand-tuned part of the design,
measured in docs/benchmarks.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import anyio
from psycopg_pool import AsyncConnectionPool

from listener.errors import ProcessingError
from listener.merkle import Tile
from listener.merkle.tiles import TILE_HEIGHT, TILE_WIDTH, row_offset

Key = tuple[int, int, int]  # (log_id, tile level, tile index)

# _BYTE_OFFSET[width][k]: where row k starts in the nodes of a tile of `width` (the hot path
# of every proof; row_offset() computed once per width instead of once per node).
_BYTE_OFFSET = [[32 * row_offset(w, k) for k in range(TILE_HEIGHT)] for w in range(TILE_WIDTH + 1)]

_FETCH = (
    "SELECT log_id, level, idx, width, nodes FROM merkle.tiles"
    " WHERE (log_id, level, idx) IN (SELECT * FROM unnest(%s::integer[], %s::smallint[], %s::bigint[]))"
)


class _Batch:
    def __init__(self) -> None:
        self.keys: set[Key] = set()
        self.done = anyio.Event()
        self.result: dict[Key, Tile] = {}
        self.error: BaseException | None = None


class TileStore:
    """Not thread-safe; one per event loop."""

    def __init__(self, pool: AsyncConnectionPool, cache_bytes: int = 256 << 20):
        self.pool = pool
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[Key, Tile] = OrderedDict()
        self._bytes = 0
        self._next = _Batch()
        self._work = anyio.Event()
        self.queries = 0
        self.fetched = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    @property
    def cached_tiles(self) -> int:
        return len(self._cache)

    async def run(self, fetchers: int = 2, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(fetchers):
                tg.start_soon(self._fetcher)
            task_status.started()

    async def _fetcher(self) -> None:
        while True:
            await self._work.wait()
            batch, self._next = self._next, _Batch()
            self._work = anyio.Event()
            try:
                keys = list(batch.keys)
                async with self.pool.connection() as conn:
                    cur = conn.cursor(binary=True)
                    await cur.execute(_FETCH, ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]))
                    rows = await cur.fetchall()
                self.queries += 1
                self.fetched += len(rows)
                for log_id, level, idx, width, nodes in rows:
                    tile = Tile(level, idx, width, bytes(nodes))
                    batch.result[(log_id, level, idx)] = tile
                    self._remember((log_id, level, idx), tile)
            except BaseException as exc:  # handed to every waiter; the fetcher goes on
                batch.error = exc
                if not isinstance(exc, Exception):
                    batch.done.set()
                    raise
            batch.done.set()

    async def preload(self) -> int:
        """Fill the cache from merkle.tiles, upper levels first (every proof needs them), until
        it is full. Returns the number of tiles loaded. For a read server that trades memory
        (about 64 bytes per leaf for a whole log) for proofs without database reads."""
        loaded = 0
        async with self.pool.connection() as conn:
            async with conn.transaction():
                cur = conn.cursor("merkle_preload", binary=True)
                await cur.execute("SELECT log_id, level, idx, width, nodes FROM merkle.tiles ORDER BY level DESC, log_id, idx")
                while True:
                    rows = await cur.fetchmany(1000)
                    if not rows:
                        break
                    for log_id, level, idx, width, nodes in rows:
                        if self._bytes + len(nodes) > self.cache_bytes:
                            return loaded
                        self._remember((log_id, level, idx), Tile(level, idx, width, bytes(nodes)))
                        loaded += 1
        return loaded

    def _remember(self, key: Key, tile: Tile) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            if old.width > tile.width:  # a lagging replica read: keep the wider one
                tile = old
            self._bytes -= len(old.nodes)
        self._cache[key] = tile
        self._bytes += len(tile.nodes)
        while self._bytes > self.cache_bytes and self._cache:
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= len(dropped.nodes)

    async def tiles(self, wanted: dict[Key, int]) -> dict[Key, Tile]:
        """Tiles with at least the asked width (key -> minimum width); a key missing from the
        result is not stored that wide."""
        out: dict[Key, Tile] = {}
        missing = []
        for key, width in wanted.items():
            tile = self._cache.get(key)
            if tile is not None and tile.width >= width:
                self._cache.move_to_end(key)
                out[key] = tile
            else:
                missing.append(key)
        if missing:
            batch = self._next
            batch.keys.update(missing)
            self._work.set()
            await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            for key in missing:
                tile = batch.result.get(key)
                if tile is not None and tile.width >= wanted[key]:
                    out[key] = tile
        return out

    async def nodes(self, log_id: int, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        """Hashes of complete tree nodes (level, index) of one log, in the order asked.

        Requires every node to be complete in the stored tree; raises ProcessingError when one
        is not stored (ask only for sizes <= the log's tree_size)."""
        # Node (level, index) is row k = level % 8, position j of tile (level // 8, index >> (8 - k)).
        where = []
        wanted: dict[Key, int] = {}
        for level, index in ids:
            tl, k = divmod(level, TILE_HEIGHT)
            shift = TILE_HEIGHT - k
            key, j = (log_id, tl, index >> shift), index & ((1 << shift) - 1)
            where.append((key, k, j))
            need = (j + 1) << k
            if wanted.get(key, 0) < need:
                wanted[key] = need
        got = await self.tiles(wanted)
        out = []
        for key, k, j in where:
            tile = got.get(key)
            if tile is None:
                raise ProcessingError(f"log id {log_id}: tile {key[1]}/{key[2]} is not in merkle.tiles as wide as needed")
            start = _BYTE_OFFSET[tile.width][k] + 32 * j
            out.append(tile.nodes[start : start + 32])
        return out
