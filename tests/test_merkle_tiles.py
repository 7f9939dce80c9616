"""Tile coordinates, C2SP paths, the storage layout, and TileBuilder's emitted and restored tiles."""

from __future__ import annotations

import hashlib

import pytest

from listener.merkle import (
    TILE_WIDTH,
    MemoryTree,
    Tile,
    TileBuilder,
    TileReader,
    entries_path,
    partial_width,
    root_at,
    row_offset,
    tile_for_node,
    tile_path,
)


def leaf_hashes(begin: int, end: int) -> list[bytes]:
    return [hashlib.sha256(b"\x00" + b"entry %d" % i).digest() for i in range(begin, end)]


# Examples from the C2SP tlog-tiles spec ("index 1234067 will be encoded as x001/x234/067";
# "a tree of size 70,000 will be represented by 273 full level 0 tiles, one partial level 0
# tile of width 112, one full level 1 tile, one partial level 1 tile of width 17, and one
# partial level 2 tile of width 1").
@pytest.mark.parametrize(
    ("args", "path"),
    [
        ((0, 1234067), "tile/0/x001/x234/067"),
        ((0, 1234067, 8), "tile/0/x001/x234/067.p/8"),
        ((1, 0), "tile/1/000"),
        ((2, 999, 255), "tile/2/999.p/255"),
        ((3, 1000), "tile/3/x001/000"),
        ((63, 999999999999999999, 255), "tile/63/x999/x999/x999/x999/x999/999.p/255"),
        ((-1, 1234067), "tile/entries/x001/x234/067"),
        ((-1, 273, 112), "tile/entries/273.p/112"),
    ],
)
def test_tile_path(args, path):
    assert tile_path(*args) == path


def test_entries_path_is_level_minus_one():
    assert entries_path(1234067, 8) == "tile/entries/x001/x234/067.p/8"
    assert entries_path(0) == "tile/entries/000"


@pytest.mark.parametrize("args", [(64, 0), (-2, 0), (0, -1), (0, 0, 0), (0, 0, 257)])
def test_tile_path_refuses_bad_coordinates(args):
    with pytest.raises(ValueError):
        tile_path(*args)


def test_spec_example_size_70000_partial_tiles():
    builder = TileBuilder()
    emitted = builder.append(leaf_hashes(0, 70_000))
    assert [(t.level, t.index, t.width) for t in builder.partial_tiles()] == [(0, 273, 112), (1, 1, 17), (2, 0, 1)]
    full = [(t.level, t.index) for t in emitted if t.width == TILE_WIDTH]
    assert full == [(0, i) for i in range(273)] + [(1, 0)]
    assert [t.path for t in emitted if t.width < TILE_WIDTH] == ["tile/0/273.p/112", "tile/1/001.p/17", "tile/2/000.p/1"]
    assert [partial_width(256, level) for level in range(2)] == [0, 1]


def test_row_offset_and_tile_for_node():
    assert [row_offset(256, k) for k in range(9)] == [0, 256, 384, 448, 480, 496, 504, 508, 510]
    assert [row_offset(11, k) for k in range(9)] == [0, 11, 16, 18, 19, 19, 19, 19, 19]
    assert tile_for_node(0, 300) == (0, 1, 0, 44)
    assert tile_for_node(3, 70) == (0, 2, 3, 6)
    assert tile_for_node(8, 5) == (1, 0, 0, 5)
    assert tile_for_node(15, 3) == (1, 1, 7, 1)


def test_tile_rows_are_the_tree_levels():
    hashes = leaf_hashes(0, 300)
    tree = MemoryTree(hashes)
    tiles = {(t.level, t.index): t for t in TileBuilder().append(hashes)}
    full, partial = tiles[(0, 0)], tiles[(0, 1)]
    assert (full.width, partial.width) == (256, 44)
    assert full.body == b"".join(hashes[:256])
    assert partial.body == b"".join(hashes[256:])
    for k in range(8):
        assert full.row(k) == tree.levels[k][: 256 >> k]
        assert partial.row(k) == tree.levels[k][256 >> k : (256 >> k) + (44 >> k)]
    assert tiles[(1, 0)].body == tree.levels[8][0]
    assert partial.node(2, 69) == tree.levels[2][69]
    with pytest.raises(ValueError, match="not stored"):
        partial.node(2, 75)  # node (2, 75) covers leaves 300..303: not complete at 300
    with pytest.raises(ValueError, match="not stored"):
        partial.node(0, 3)


def test_tile_refuses_wrong_node_bytes():
    with pytest.raises(ValueError, match="must hold 608 bytes"):
        Tile(0, 0, 11, b"\x00" * 32 * 11)


def test_full_tiles_are_emitted_once_and_never_change():
    builder = TileBuilder()
    seen_full: dict[tuple[int, int], bytes] = {}
    reader = TileReader()
    size = 0
    for batch in [1, 255, 1, 300, 65_000, 3, 535, 0, 1]:
        tiles = builder.append(leaf_hashes(size, size + batch))
        size += batch
        keys = [(t.level, t.index) for t in tiles]
        assert len(keys) == len(set(keys))
        for t in tiles:
            if t.width == TILE_WIDTH:
                assert (t.level, t.index) not in seen_full
                seen_full[(t.level, t.index)] = t.nodes
            else:
                assert t.width == partial_width(size, t.level)
        reader.store(tiles)
    assert size == 66_096
    assert set(seen_full) == {(0, i) for i in range(258)} | {(1, 0)}
    tree = MemoryTree(leaf_hashes(0, size))
    assert root_at(reader, size) == tree.root() == builder.root
    for probe in [1, 255, 256, 257, 65_536, 65_537, 66_000]:
        assert root_at(reader, probe) == tree.root(probe)


def test_append_refuses_bad_leaf_hashes():
    builder = TileBuilder()
    with pytest.raises(ValueError, match="32 bytes"):
        builder.append([b"\x00" * 32, b"\x00" * 31])
    assert builder.size == 0
    assert builder.append([]) == []


@pytest.mark.parametrize("size", [1, 255, 256, 257, 511, 512, 65_535, 65_536, 65_537, 66_000])
def test_restore_continues_identically(size):
    original = TileBuilder()
    original.append(leaf_hashes(0, size))
    restored = TileBuilder(size, original.partial_tiles())
    assert restored.root == original.root
    assert restored.partial_tiles() == original.partial_tiles()
    for begin, end in [(size, size + 1), (size + 1, size + 300)]:
        assert restored.append(leaf_hashes(begin, end)) == original.append(leaf_hashes(begin, end))
        assert restored.root == original.root


def test_restore_refuses_tiles_that_do_not_match_the_size():
    builder = TileBuilder()
    builder.append(leaf_hashes(0, 70_000))
    tiles = builder.partial_tiles()
    assert TileBuilder(0).root == TileBuilder().root
    with pytest.raises(ValueError, match="needs the partial tile tile/1/001.p/17, missing"):
        TileBuilder(70_000, [tiles[0], tiles[2]])
    with pytest.raises(ValueError, match="needs the partial tile tile/0/273.p/113, got tile/0/273.p/112"):
        TileBuilder(70_001, tiles)  # level 0 now needs width 113
    with pytest.raises(ValueError, match="two partial tiles"):
        TileBuilder(70_000, tiles + tiles[:1])
    with pytest.raises(ValueError, match="no partial tile at level 0"):
        TileBuilder(69_888, tiles)
    smaller = TileBuilder()
    smaller.append(leaf_hashes(0, 65_535))
    with pytest.raises(ValueError, match="no tile level 2"):
        TileBuilder(65_535, smaller.partial_tiles() + tiles[2:])
    with pytest.raises(ValueError, match="must be >= 0"):
        TileBuilder(-1)
    corrupt = bytearray(tiles[0].nodes)
    corrupt[0] ^= 1
    with pytest.raises(ValueError, match="row 1 is not the hash of row 0"):
        TileBuilder(70_000, [Tile(0, 273, 112, bytes(corrupt))] + tiles[1:])
