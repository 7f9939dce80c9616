"""merkle.root / inclusion_proof / consistency_proof / leaf_hash (sql/002) against the RFC text.

The tree is written by the naive tile writer in naive_tree.py and every answer is compared
with the naive recursive MTH/PATH/PROOF of RFC 9162.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import psycopg
import pytest

from naive_tree import EMPTY_ROOT, Reference, insert_log, leaf, mth, naive_tiles, path, proof, tree_levels


def sql_root(conn, log, n):
    return conn.execute("SELECT merkle.root(%s, %s)", (log, n)).fetchone()[0]


def sql_inclusion(conn, log, i, n):
    return conn.execute("SELECT merkle.inclusion_proof(%s, %s, %s)", (log, i, n)).fetchone()[0]


def sql_consistency(conn, log, m, n):
    return conn.execute("SELECT merkle.consistency_proof(%s, %s, %s)", (log, m, n)).fetchone()[0]


@contextlib.contextmanager
def raises_sqlstate(state: str) -> Iterator[None]:
    with pytest.raises(psycopg.Error) as exc:
        yield
    assert exc.value.sqlstate == state, exc.value


def random_leaves(count: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [leaf(rnd.randbytes(rnd.randrange(0, 40))) for _ in range(count)]


RFC6962_ENTRIES = [
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
# Roots of the first n of those entries, from the RFC 6962 reference test vectors.
RFC6962_ROOTS = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}


def test_tile_row_offset_matches_its_definition(conn):
    for width in range(1, 257):
        for k in range(9):
            want = sum(width >> i for i in range(k))
            got = conn.execute("SELECT merkle.tile_row_offset(%s, %s)", (width, k)).fetchone()[0]
            assert got == want, (width, k)


def test_rfc6962_reference_roots(conn):
    leaves = [leaf(bytes.fromhex(e)) for e in RFC6962_ENTRIES]
    for n in range(1, 9):
        insert_log(conn, f"rfc{n}", leaves[:n])
        assert sql_root(conn, f"rfc{n}", n).hex() == RFC6962_ROOTS[n]
    # Every smaller size of the 8-leaf log too, not only the current one.
    for n in range(1, 9):
        assert sql_root(conn, "rfc8", n).hex() == RFC6962_ROOTS[n]
    assert sql_root(conn, "rfc8", 0) == EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_every_proof_of_small_trees(conn):
    leaves = random_leaves(40, seed=1)
    insert_log(conn, "small", leaves)
    for n in range(0, 41):
        assert sql_root(conn, "small", n) == mth(leaves[:n])
        for i in range(n):
            assert sql_inclusion(conn, "small", i, n) == path(i, leaves[:n]), (i, n)
        for m in range(0, n + 1):
            assert sql_consistency(conn, "small", m, n) == proof(m, leaves[:n]), (m, n)


def test_every_log_size_up_to_40(conn):
    # Each log holds exactly n leaves, so partial tiles are exactly the right-edge case.
    leaves = random_leaves(40, seed=2)
    for n in (1, 2, 3, 5, 8, 13, 31, 32, 33, 40):
        name = f"size{n}"
        insert_log(conn, name, leaves[:n])
        assert sql_root(conn, name, n) == mth(leaves[:n])
        for i in range(n):
            assert sql_inclusion(conn, name, i, n) == path(i, leaves[:n])
        for m in range(n + 1):
            assert sql_consistency(conn, name, m, n) == proof(m, leaves[:n])


def test_large_log_random_proofs(conn):
    # 70,000 leaves: three tile levels (level-1 tile 1 is partial, level 2 has one hash).
    count = 70_000
    leaves = [leaf(i.to_bytes(8, "big")) for i in range(count)]
    insert_log(conn, "big", leaves)
    ref = Reference(leaves)
    rnd = random.Random(3)
    sizes = [count, count - 1, 65_536, 65_537, 256, 257, 5_000] + [rnd.randrange(1, count + 1) for _ in range(40)]
    for n in sizes:
        assert sql_root(conn, "big", n) == ref.mth(0, n), n
        for i in {0, n - 1, rnd.randrange(n)}:
            assert sql_inclusion(conn, "big", i, n) == ref.path(i, 0, n), (i, n)
        for m in {1, n, rnd.randrange(n + 1), n // 2}:
            assert sql_consistency(conn, "big", m, n) == ref.proof(m, n), (m, n)


def test_leaf_hash(conn):
    leaves = random_leaves(10, seed=4)
    insert_log(conn, "lh", leaves)
    for i, h in enumerate(leaves):
        assert conn.execute("SELECT merkle.leaf_hash('lh', %s)", (i,)).fetchone()[0] == h


def test_node_reads_complete_nodes(conn):
    leaves = random_leaves(600, seed=5)
    log_id = insert_log(conn, "nd", leaves)
    levels = tree_levels(leaves)
    for h, row in enumerate(levels):
        for i in {0, len(row) - 1, len(row) // 2}:
            assert conn.execute("SELECT merkle.node(%s, %s, %s)", (log_id, h, i)).fetchone()[0] == row[i]
    # A node that is not complete is not in the tree: refused, not invented.
    with raises_sqlstate("ML003"):
        conn.execute("SELECT merkle.node(%s, 3, 75)", (log_id,))  # covers leaves 600..607


BAD_CALLS = [
    # (sql, args, sqlstate)
    ("SELECT merkle.root('nosuch', 0)", (), "ML001"),
    ("SELECT merkle.inclusion_proof('nosuch', 0, 1)", (), "ML001"),
    ("SELECT merkle.consistency_proof('nosuch', 0, 1)", (), "ML001"),
    ("SELECT merkle.leaf_hash('nosuch', 0)", (), "ML001"),
    ("SELECT merkle.root(NULL, 1)", (), "22004"),
    ("SELECT merkle.root('bad', NULL)", (), "22004"),
    ("SELECT merkle.root('bad', -1)", (), "22023"),
    ("SELECT merkle.root('bad', 11)", (), "ML002"),
    ("SELECT merkle.inclusion_proof('bad', 0, -1)", (), "22023"),
    ("SELECT merkle.inclusion_proof('bad', -1, 5)", (), "22023"),
    ("SELECT merkle.inclusion_proof('bad', 5, 5)", (), "22023"),
    ("SELECT merkle.inclusion_proof('bad', 0, 0)", (), "22023"),
    ("SELECT merkle.inclusion_proof('bad', 0, 11)", (), "ML002"),
    ("SELECT merkle.inclusion_proof('bad', NULL, 5)", (), "22004"),
    ("SELECT merkle.inclusion_proof('bad', 1, NULL)", (), "22004"),
    ("SELECT merkle.consistency_proof('bad', 6, 5)", (), "22023"),
    ("SELECT merkle.consistency_proof('bad', -1, 5)", (), "22023"),
    ("SELECT merkle.consistency_proof('bad', 0, -1)", (), "22023"),
    ("SELECT merkle.consistency_proof('bad', 3, 11)", (), "ML002"),
    ("SELECT merkle.consistency_proof('bad', NULL, 5)", (), "22004"),
    ("SELECT merkle.consistency_proof('bad', 1, NULL)", (), "22004"),
    ("SELECT merkle.leaf_hash('bad', -1)", (), "22023"),
    ("SELECT merkle.leaf_hash('bad', 10)", (), "ML002"),
    ("SELECT merkle.leaf_hash('bad', NULL)", (), "22004"),
    ("SELECT merkle.node(1, 64, 0)", (), "22023"),
    ("SELECT merkle.node(1, 0, -1)", (), "22023"),
    ("SELECT merkle.node(1, 63, 0)", (), "22023"),
    # Would alias tile 1/2 if the tile key overflowed: a node beyond 2^63 leaves is refused.
    ("SELECT merkle.node(1, 7, %s)", (2**57 + 5,), "22023"),
    ("SELECT merkle.node(1, 0, %s)", (2**63 - 1,), "ML003"),
]


def test_bad_arguments_raise_their_sqlstate(conn):
    insert_log(conn, "bad", random_leaves(10, seed=6))
    for sql, args, state in BAD_CALLS:
        with pytest.raises(psycopg.Error) as exc:
            conn.execute(sql, args)
        assert exc.value.sqlstate == state, (sql, exc.value)
        assert exc.value.diag.message_primary.startswith("merkle: "), sql


def test_unknown_log_message_says_what_to_do(conn):
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT merkle.inclusion_proof('nosuch', 0, 1)")
    assert "nosuch" in exc.value.diag.message_primary
    assert "merkle.logs" in exc.value.diag.message_hint


def test_missing_tile_is_corruption(conn):
    leaves = random_leaves(700, seed=7)
    log_id = insert_log(conn, "broken", leaves)
    assert sql_inclusion(conn, "broken", 5, 700) == path(5, leaves)
    conn.execute("DELETE FROM merkle.tiles WHERE log_id = %s AND level = 0 AND idx = 0", (log_id,))
    with raises_sqlstate("ML003"):
        sql_inclusion(conn, "broken", 5, 700)
    with raises_sqlstate("ML003"):
        sql_consistency(conn, "broken", 3, 700)
    # Proofs that need no node of the lost tile are still served.
    assert sql_inclusion(conn, "broken", 600, 700) == path(600, leaves)


def test_truncated_tile_is_corruption(conn):
    leaves = random_leaves(300, seed=8)
    log_id = insert_log(conn, "short", leaves)
    conn.execute(
        "UPDATE merkle.tiles SET nodes = substring(nodes FROM 1 FOR 32 * 256)"
        " WHERE log_id = %s AND level = 0 AND idx = 0",
        (log_id,),
    )
    with raises_sqlstate("ML003"):
        sql_inclusion(conn, "short", 5, 300)


def test_root_disagreeing_with_logs_root_is_corruption(conn):
    leaves = random_leaves(20, seed=9)
    insert_log(conn, "liar", leaves)
    conn.execute("UPDATE merkle.logs SET root = sha256('x'::bytea) WHERE name = 'liar'")
    with raises_sqlstate("ML003"):
        sql_root(conn, "liar", 20)
    assert sql_root(conn, "liar", 19) == mth(leaves[:19])


def test_missing_processed_log_row_is_corruption(conn):
    insert_log(conn, "gap", random_leaves(5, seed=10))
    conn.execute("DELETE FROM merkle.processed_log WHERE seq = 2")
    with raises_sqlstate("ML003"):
        conn.execute("SELECT merkle.leaf_hash('gap', 2)")


def test_naive_tiles_follow_the_layout():
    # The helper itself: row 0 of each tile is the tlog-tiles tile, widths as in C2SP.
    leaves = random_leaves(70_000 // 100, seed=11)
    rows = naive_tiles(leaves)
    assert [(r[0], r[1], r[2]) for r in rows] == [(0, 0, 256), (0, 1, 256), (0, 2, 188), (1, 0, 2)]
    assert rows[0][3][: 32 * 256] == b"".join(leaves[:256])
    assert len(rows[0][3]) == 32 * 510
