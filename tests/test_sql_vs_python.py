"""SQL (sql/002) against the Python engine (listener.merkle) over tiles written by listener.store.

The Python TileBuilder produces the tiles, write_tiles stores them, and then for the same
arguments the SQL functions, the Python proofs over TileNodeReader and the naive RFC reference
must agree, and listener.merkle's verifiers must accept what SQL returns.
"""

from __future__ import annotations

import random

import psycopg
import pytest

from listener.errors import ProcessingError
from listener.merkle import (
    EMPTY_ROOT,
    Tile,
    TileBuilder,
    consistency_proof,
    hash_leaf,
    inclusion_proof,
    root_at,
    verify_consistency,
    verify_inclusion,
)
from listener.store.tiles import TileNodeReader, load_partial_tiles, write_tiles
from naive_tree import Reference, naive_tiles

COUNT = 6_000


def new_log(conn: psycopg.Connection, name: str) -> int:
    return conn.execute(
        "INSERT INTO merkle.logs (name, origin) VALUES (%s, %s) RETURNING log_id", (name, f"example.test/{name}")
    ).fetchone()[0]


def set_size(conn: psycopg.Connection, log_id: int, builder: TileBuilder) -> None:
    conn.execute(
        "UPDATE merkle.logs SET tree_size = %s, root = %s WHERE log_id = %s", (builder.size, builder.root, log_id)
    )


def stored_tiles(conn: psycopg.Connection, log_id: int) -> list[tuple[int, int, int, bytes]]:
    rows = conn.execute(
        "SELECT level, idx, width, nodes FROM merkle.tiles WHERE log_id = %s ORDER BY level, idx", (log_id,)
    ).fetchall()
    return [(level, idx, width, bytes(nodes)) for level, idx, width, nodes in rows]


@pytest.fixture
def grown(conn):
    """A log of COUNT leaves appended by TileBuilder in uneven batches, tiles via write_tiles."""
    log_id = new_log(conn, "grown")
    rnd = random.Random(42)
    leaves = [hash_leaf(i.to_bytes(4, "big")) for i in range(COUNT)]
    builder = TileBuilder()
    done = 0
    while done < COUNT:
        batch = leaves[done : done + rnd.choice([1, 3, 17, 255, 256, 700])]
        with conn.transaction():
            write_tiles(conn, log_id, builder.append(batch))
            set_size(conn, log_id, builder)
        done += len(batch)
    return log_id, leaves, builder


def test_written_tiles_equal_the_naive_layout(conn, grown):
    log_id, leaves, _ = grown
    assert stored_tiles(conn, log_id) == naive_tiles(leaves)


def test_sql_equals_python_on_6000_leaves(conn, grown):
    log_id, leaves, builder = grown
    reader = TileNodeReader(conn, log_id)
    ref = Reference(leaves)
    rnd = random.Random(7)
    sizes = [COUNT, 1, 256, 257, 4096, 5000] + [rnd.randrange(1, COUNT + 1) for _ in range(30)]
    for n in sizes:
        root = conn.execute("SELECT merkle.root('grown', %s)", (n,)).fetchone()[0]
        assert root == root_at(reader, n) == ref.mth(0, n)
        for i in {0, n - 1, rnd.randrange(n)}:
            got = conn.execute("SELECT merkle.inclusion_proof('grown', %s, %s)", (i, n)).fetchone()[0]
            assert got == inclusion_proof(reader, i, n)
            verify_inclusion(leaves[i], i, n, got, root)
        for m in {1, n, rnd.randrange(n + 1), n // 2}:
            got = conn.execute("SELECT merkle.consistency_proof('grown', %s, %s)", (m, n)).fetchone()[0]
            assert got == consistency_proof(reader, m, n)
            verify_consistency(m, n, got, ref.mth(0, m), root)
    assert conn.execute("SELECT merkle.root('grown', 0)").fetchone()[0] == EMPTY_ROOT


def test_load_partial_tiles_restores_the_builder(conn, grown):
    log_id, leaves, builder = grown
    for size in (COUNT, 5000, 4096, 257, 1, 0):
        partial = load_partial_tiles(conn, log_id, size)
        restored = TileBuilder(size, partial)
        assert restored.root == Reference(leaves).mth(0, size)
        if size == COUNT:
            assert partial == builder.partial_tiles()
    assert [(t.level, t.index, t.width) for t in load_partial_tiles(conn, log_id, 5000)] == [(0, 19, 136), (1, 0, 19)]


def test_restored_builder_continues_the_same_tree(conn):
    log_id = new_log(conn, "resume")
    leaves = [hash_leaf(b"r%d" % i) for i in range(1500)]
    first = TileBuilder()
    write_tiles(conn, log_id, first.append(leaves[:700]))
    set_size(conn, log_id, first)
    second = TileBuilder(700, load_partial_tiles(conn, log_id, 700))
    write_tiles(conn, log_id, second.append(leaves[700:]))
    set_size(conn, log_id, second)
    assert stored_tiles(conn, log_id) == naive_tiles(leaves)
    assert conn.execute("SELECT merkle.root('resume', 1500)").fetchone()[0] == Reference(leaves).mth(0, 1500)


def test_load_partial_tiles_refuses_a_missing_tile(conn, grown):
    log_id, _, _ = grown
    conn.execute("DELETE FROM merkle.tiles WHERE log_id = %s AND level = 1", (log_id,))
    with pytest.raises(ProcessingError, match="tile 1/0"):
        load_partial_tiles(conn, log_id, COUNT)


def test_write_tiles_bulk_path_and_replay(conn):
    # Many tiles at once take the COPY path; writing the same tiles again changes nothing.
    log_id = new_log(conn, "bulk")
    leaves = [hash_leaf(b"b%d" % i) for i in range(300 * 256 + 5)]
    tiles = TileBuilder().append(leaves)
    assert len(tiles) > 300
    write_tiles(conn, log_id, tiles)
    write_tiles(conn, log_id, tiles)
    assert stored_tiles(conn, log_id) == naive_tiles(leaves)


def test_write_tiles_refuses_to_shrink_or_change_a_tile(conn):
    log_id = new_log(conn, "fork")
    builder = TileBuilder()
    write_tiles(conn, log_id, builder.append([hash_leaf(b"a%d" % i) for i in range(10)]))
    before = stored_tiles(conn, log_id)
    narrower = TileBuilder().append([hash_leaf(b"a%d" % i) for i in range(9)])
    with pytest.raises(ProcessingError, match="0/0"):
        write_tiles(conn, log_id, narrower)
    other = TileBuilder().append([hash_leaf(b"z%d" % i) for i in range(10)])
    with pytest.raises(ProcessingError, match="0/0"):
        write_tiles(conn, log_id, other)
    assert stored_tiles(conn, log_id) == before
    # The bulk path refuses the same way and writes nothing either.
    many = TileBuilder().append([hash_leaf(b"y%d" % i) for i in range(60 * 256)])
    with pytest.raises(ProcessingError):
        write_tiles(conn, log_id, many)
    assert stored_tiles(conn, log_id) == before


def test_tile_node_reader_caches_full_tiles_only(conn, grown):
    log_id, leaves, _ = grown
    reader = TileNodeReader(conn, log_id, cache_tiles=2)
    assert reader.get_nodes([(0, 5), (0, 5999), (8, 3), (0, 300)]) == [
        leaves[5], leaves[5999], Reference(leaves).mth(3 * 256, 4 * 256), leaves[300]
    ]
    # Full tiles 0/0 and 0/1 were cached (the bound is 2); partial tiles 0/23 and 1/0 were not.
    assert set(reader._full) == {(0, 0), (0, 1)}
    conn.execute("DELETE FROM merkle.tiles WHERE log_id = %s AND level = 0 AND idx = 0", (log_id,))
    assert reader.get_nodes([(0, 7)]) == [leaves[7]]  # served from the cache
    with pytest.raises(ProcessingError, match=r"\(1, 3000\)"):
        TileNodeReader(conn, log_id).get_nodes([(0, 5998), (1, 3000)])
    with pytest.raises(ProcessingError, match=r"\(3, 750\)"):
        reader.get_nodes([(3, 750)])  # leaves 6000..6007: beyond the stored tree


def test_tile_dataclass_round_trips_through_the_table(conn):
    log_id = new_log(conn, "rt")
    tile = TileBuilder().append([hash_leaf(b"x")])[0]
    assert isinstance(tile, Tile)
    write_tiles(conn, log_id, [tile])
    assert load_partial_tiles(conn, log_id, 1) == [tile]
