"""C2SP tlog-tiles (height 8) coordinates and paths, our tile storage layout, and TileBuilder,
the bounded in-memory right edge of a log that turns batches of leaf hashes into tiles.

Tile (L, N) of width W holds, in row k = 0..7, the complete nodes of tree level 8*L + k with
indices N * 2**(8-k) + j, j < floor(W / 2**k):

    row 2 (level 8L+2):  [ n0          n1          ]        W = 11: rows of 11, 5, 2, 1,
    row 1 (level 8L+1):  [ n0    n1    n2    n3  n4 ]               0, 0, 0, 0 hashes
    row 0 (level 8L):    [ n0 n1 n2 n3 n4 n5 n6 n7 n8 n9 n10 ]

`Tile.nodes` is the rows concatenated, lowest first; row 0 alone is the C2SP tile body. Row 0
of tile level L+1 holds the level-8(L+1) nodes, i.e. the roots of the full tiles of level L.
Only the right-most tile of each level is partial (1 <= W < 256); full tiles never change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .hashing import EMPTY_ROOT, HASH_SIZE, hash_children

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
#: C2SP tlog-tiles allows tile levels 0..63.
MAX_TILE_LEVEL = 63


def row_offset(width: int, k: int) -> int:
    """Number of hashes stored before row k in a tile of `width`: sum of floor(W / 2**i), i < k.

    row_offset(width, TILE_HEIGHT) is the tile's total hash count. Requires 0 <= k <= 8.
    """
    return sum(width >> i for i in range(k))


def tile_for_node(level: int, index: int) -> tuple[int, int, int, int]:
    """Where tree node (level, index) is stored: (tile_level, tile_index, row k, position j).

    Inverse: the node at row k, position j of tile (L, N) is (8*L + k, N * 2**(8-k) + j).
    Requires level >= 0 and index >= 0.
    """
    if level < 0 or index < 0:
        raise ValueError(f"node ({level}, {index}) has a negative coordinate")
    tile_level, k = divmod(level, TILE_HEIGHT)
    shift = TILE_HEIGHT - k
    return tile_level, index >> shift, k, index & ((1 << shift) - 1)


@dataclass(frozen=True)
class Tile:
    """One stored tile: C2SP coordinates (level, index, width) and all its rows (see module doc)."""

    level: int
    index: int
    width: int
    nodes: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.level <= MAX_TILE_LEVEL:
            raise ValueError(f"tile level must be in 0..{MAX_TILE_LEVEL}, got {self.level}")
        if self.index < 0:
            raise ValueError(f"tile index must be >= 0, got {self.index}")
        if not 1 <= self.width <= TILE_WIDTH:
            raise ValueError(f"tile width must be in 1..{TILE_WIDTH}, got {self.width}")
        want = HASH_SIZE * row_offset(self.width, TILE_HEIGHT)
        if len(self.nodes) != want:
            raise ValueError(
                f"tile {self.level}/{self.index} of width {self.width} must hold {want} bytes of nodes, "
                f"got {len(self.nodes)}"
            )

    @property
    def body(self) -> bytes:
        """Row 0: the C2SP tlog-tiles tile served at tile_path(level, index, width)."""
        return self.nodes[: HASH_SIZE * self.width]

    @property
    def path(self) -> str:
        return tile_path(self.level, self.index, self.width)

    def row(self, k: int) -> list[bytes]:
        """The hashes of row k (tree level 8*level + k), left to right. Requires 0 <= k < 8."""
        start = HASH_SIZE * row_offset(self.width, k)
        nodes = self.nodes
        return [nodes[i : i + HASH_SIZE] for i in range(start, start + HASH_SIZE * (self.width >> k), HASH_SIZE)]

    def node(self, tree_level: int, tree_index: int) -> bytes:
        """Hash of tree node (tree_level, tree_index). Requires the node to be stored in this tile."""
        tile_level, tile_index, k, j = tile_for_node(tree_level, tree_index)
        if (tile_level, tile_index) != (self.level, self.index) or j >= self.width >> k:
            raise ValueError(
                f"node ({tree_level}, {tree_index}) is not stored in tile {self.level}/{self.index} "
                f"of width {self.width}"
            )
        start = HASH_SIZE * (row_offset(self.width, k) + j)
        return self.nodes[start : start + HASH_SIZE]


def _encode_index(index: int) -> str:
    # C2SP tlog-tiles: 3-digit groups, all but the last prefixed with "x" (1234067 -> x001/x234/067).
    parts = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        parts.append(f"x{index % 1000:03d}")
        index //= 1000
    return "/".join(reversed(parts))


def tile_path(tile_level: int, tile_index: int, width: int = TILE_WIDTH) -> str:
    """C2SP tlog-tiles path of a tile: "tile/<L>/<N>[.p/<W>]"; tile_level -1 gives the entry
    bundle path "tile/entries/<N>[.p/<W>]". Requires -1 <= tile_level <= 63, tile_index >= 0,
    1 <= width <= 256 (".p/<W>" only when width < 256)."""
    if not -1 <= tile_level <= MAX_TILE_LEVEL:
        raise ValueError(f"tile level must be in 0..{MAX_TILE_LEVEL} (or -1 for entries), got {tile_level}")
    if tile_index < 0:
        raise ValueError(f"tile index must be >= 0, got {tile_index}")
    if not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"tile width must be in 1..{TILE_WIDTH}, got {width}")
    level = "entries" if tile_level == -1 else str(tile_level)
    partial = f".p/{width}" if width < TILE_WIDTH else ""
    return f"tile/{level}/{_encode_index(tile_index)}{partial}"


def entries_path(bundle_index: int, width: int = TILE_WIDTH) -> str:
    """C2SP tlog-tiles entry bundle path "tile/entries/<N>[.p/<W>]" (same rules as tile_path)."""
    return tile_path(-1, bundle_index, width)


def partial_width(size: int, tile_level: int) -> int:
    """Width of the partial tile of `tile_level` in a tree of `size`: floor(size / 256**L) mod 256.

    0 means the level has no partial tile (C2SP tlog-tiles, "Partial Tiles").
    """
    return (size >> (TILE_HEIGHT * tile_level)) & (TILE_WIDTH - 1)


class TileBuilder:
    """The right edge of a log: the right-most partial tile of every tile level, in memory.

    Invariant: edge[h] (tree level h = 8*L + k) is exactly row k of level L's partial tile, i.e.
    the floor(W / 2**k) complete level-h nodes to the right of the last full tile of level L.
    The compact range of the tree (one node per set bit of size) is the last node of those rows
    whose bit is set, so the root needs no other state. Memory is at most 8 partial tiles,
    whatever the log size.

    Owned by one writer (the sequencer); not thread-safe.
    """

    def __init__(self, size: int = 0, partial_tiles: Iterable[Tile] = ()) -> None:
        """Restore the edge of a tree of `size` from its partial tiles (those of width < 256).

        Raises ValueError when the tiles do not match `size` exactly (a level's tile missing,
        extra, of the wrong index or width) or when a tile's rows do not hash together.
        """
        if size < 0:
            raise ValueError(f"tree size must be >= 0, got {size}")
        self._size = size
        self._root: bytes | None = None
        self._edge: list[list[bytes]] = []
        given: dict[int, Tile] = {}
        for tile in partial_tiles:
            if tile.level in given:
                raise ValueError(f"two partial tiles given for tile level {tile.level}")
            given[tile.level] = tile
        level = 0
        while size >> (TILE_HEIGHT * level):
            width = partial_width(size, level)
            index = size >> (TILE_HEIGHT * (level + 1))
            tile = given.pop(level, None)
            if width == 0:
                if tile is not None:
                    raise ValueError(f"tree size {size} has no partial tile at level {level}, but one was given")
                self._edge.extend([] for _ in range(TILE_HEIGHT))
            else:
                if tile is None:
                    raise ValueError(f"tree size {size} needs the partial tile {tile_path(level, index, width)}, missing")
                if (tile.index, tile.width) != (index, width):
                    raise ValueError(
                        f"tree size {size} needs the partial tile {tile_path(level, index, width)}, got {tile.path}"
                    )
                rows = [tile.row(k) for k in range(TILE_HEIGHT)]
                for k in range(1, TILE_HEIGHT):
                    below = rows[k - 1]
                    if any(rows[k][j] != hash_children(below[2 * j], below[2 * j + 1]) for j in range(len(rows[k]))):
                        raise ValueError(f"tile {tile.path}: row {k} is not the hash of row {k - 1}; the tile is corrupt")
                self._edge.extend(rows)
            level += 1
        if given:
            raise ValueError(f"tree size {size} has no tile level {min(given)}, but a partial tile was given for it")

    @property
    def size(self) -> int:
        return self._size

    @property
    def root(self) -> bytes:
        """MTH of all leaves appended so far; EMPTY_ROOT for size 0 (RFC 9162 §2.1.1)."""
        if self._root is None:
            self._root = self._compute_root()
        return self._root

    def _compute_root(self) -> bytes:
        acc: bytes | None = None
        size, h = self._size, 0
        while size >> h:
            if (size >> h) & 1:
                node = self._edge[h][-1]
                acc = node if acc is None else hash_children(node, acc)
            h += 1
        return EMPTY_ROOT if acc is None else acc

    def append(self, leaf_hashes: Sequence[bytes]) -> list[Tile]:
        """Append a batch of 32-byte leaf hashes; return every tile the batch changed.

        Each tile comes once in the storage layout: the tiles that became full, then (per level)
        the new partial tile if the level changed. Tiles come level by level, left to right.
        Work is batch-wise, one tree level at a time, hashing only the pairs the batch completed.
        """
        count = len(leaf_hashes)
        if count == 0:
            return []
        if set(map(len, leaf_hashes)) != {HASH_SIZE}:
            raise ValueError(f"every leaf hash must be {HASH_SIZE} bytes")
        old, new_size = self._size, self._size + count
        sha = hashlib.sha256
        edge = self._edge
        # rows[h] = (index of cur[0], cur): every level-h node from the old partial tile's start.
        rows: dict[int, tuple[int, list[bytes]]] = {}
        fresh = list(leaf_hashes)
        h = 0
        while fresh:
            if h == len(edge):
                edge.append([])
            tile_level, k = divmod(h, TILE_HEIGHT)
            tile_shift = TILE_HEIGHT * (tile_level + 1)
            base = (old >> tile_shift) << (TILE_HEIGHT - k)
            cur = edge[h] + fresh
            rows[h] = (base, cur)
            # Pairs inside the old edge already have their parent in edge[h + 1]; base is even.
            start = len(edge[h]) & ~1
            fresh = [sha(b"\x01" + a + b).digest() for a, b in zip(cur[start::2], cur[start + 1 :: 2])]
            edge[h] = cur[((new_size >> tile_shift) << (TILE_HEIGHT - k)) - base :]
            h += 1
        self._size = new_size
        self._root = None
        return self._changed_tiles(old, new_size, rows)

    def _changed_tiles(self, old: int, new_size: int, rows: dict[int, tuple[int, list[bytes]]]) -> list[Tile]:
        tiles = []
        tile_level = 0
        while (new_size >> (TILE_HEIGHT * tile_level)) > (old >> (TILE_HEIGHT * tile_level)):
            before = old >> (TILE_HEIGHT * tile_level)
            after = new_size >> (TILE_HEIGHT * tile_level)
            levels = []
            for k in range(TILE_HEIGHT):
                h = TILE_HEIGHT * tile_level + k
                # A level without new nodes kept its edge, which then is the old tile's row.
                levels.append(rows.get(h) or ((old >> (TILE_HEIGHT * (tile_level + 1))) << (TILE_HEIGHT - k), self._edge_row(h)))
            for index in range(before >> TILE_HEIGHT, ((after - 1) >> TILE_HEIGHT) + 1):
                width = min(TILE_WIDTH, after - (index << TILE_HEIGHT))
                parts: list[bytes] = []
                for k, (base, cur) in enumerate(levels):
                    first = (index << (TILE_HEIGHT - k)) - base
                    parts += cur[first : first + (width >> k)]
                tiles.append(Tile(tile_level, index, width, b"".join(parts)))
            tile_level += 1
        return tiles

    def _edge_row(self, h: int) -> list[bytes]:
        return self._edge[h] if h < len(self._edge) else []

    def partial_tiles(self) -> list[Tile]:
        """The right-most partial tile of every level (width 1..255), lowest level first.

        Together with size they restore this builder: TileBuilder(size, partial_tiles()).
        """
        tiles = []
        level = 0
        while self._size >> (TILE_HEIGHT * level):
            width = partial_width(self._size, level)
            if width:
                rows = self._edge[TILE_HEIGHT * level : TILE_HEIGHT * (level + 1)]
                tiles.append(
                    Tile(level, self._size >> (TILE_HEIGHT * (level + 1)), width, b"".join(b"".join(r) for r in rows))
                )
            level += 1
        return tiles


class TileReader:
    """A NodeReader over stored tiles, keyed by (tile_level, tile_index), latest version of each.

    A later version of a partial tile holds every node of the earlier ones (complete nodes
    never change), so the latest tiles answer proofs and roots at every size up to the latest.
    """

    def __init__(self, tiles: dict[tuple[int, int], Tile] | None = None) -> None:
        self.tiles: dict[tuple[int, int], Tile] = {} if tiles is None else tiles

    def store(self, tiles: Iterable[Tile]) -> None:
        """Keep these tiles, replacing older versions of the same (level, index)."""
        for tile in tiles:
            self.tiles[(tile.level, tile.index)] = tile

    def get_nodes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        """Hashes of complete nodes in the order asked; ValueError for a node not stored."""
        out = []
        for level, index in ids:
            tile_level, tile_index, _, _ = tile_for_node(level, index)
            tile = self.tiles.get((tile_level, tile_index))
            if tile is None:
                raise ValueError(f"node ({level}, {index}) is not stored: no tile {tile_level}/{tile_index}")
            out.append(tile.node(level, index))
        return out
