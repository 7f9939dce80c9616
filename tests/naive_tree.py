"""Test helpers: a naive RFC 9162 reference and a naive tile writer.

Written straight from the RFC text and the merkle.tiles comment, with no cleverness, so that
the SQL functions (and the Python engine) are checked against something obviously right.
Nothing here imports listener.merkle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import psycopg

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split(n: int) -> int:
    """The largest power of two smaller than n (RFC 9162 §2.1.1). Requires n > 1."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes (RFC 9162 §2.1.1)."""
    if not d:
        return EMPTY_ROOT
    if len(d) == 1:
        return d[0]
    k = split(len(d))
    return node(mth(d[:k]), mth(d[k:]))


def path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) (RFC 9162 §2.1.3.1). Requires 0 <= m < len(d)."""
    if len(d) == 1:
        return []
    k = split(len(d))
    if m < k:
        return path(m, d[:k]) + [mth(d[k:])]
    return path(m - k, d[k:]) + [mth(d[:k])]


def subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) (RFC 9162 §2.1.4.1)."""
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = split(n)
    if m <= k:
        return subproof(m, d[:k], b) + [mth(d[k:])]
    return subproof(m - k, d[k:], False) + [mth(d[:k])]


def proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]); empty for m = 0 or m = n. Requires 0 <= m <= len(d)."""
    if m == 0 or m == len(d):
        return []
    return subproof(m, d, True)


def tree_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every complete node of every level: levels[h][i] covers leaves [i*2^h, (i+1)*2^h)."""
    levels = [list(leaves)]
    while len(levels[-1]) >= 2:
        below = levels[-1]
        levels.append([node(below[2 * i], below[2 * i + 1]) for i in range(len(below) // 2)])
    return levels


def naive_tiles(leaves: Sequence[bytes]) -> list[tuple[int, int, int, bytes]]:
    """(level, idx, width, nodes) rows of merkle.tiles for these leaves, cut by the layout."""
    levels = tree_levels(leaves)
    rows = []
    for tl in range(8):
        if 8 * tl >= len(levels) or not levels[8 * tl]:
            break
        base = levels[8 * tl]
        for n in range((len(base) + 255) // 256):
            width = min(256, len(base) - 256 * n)
            body = b""
            for k in range(8):
                count = width >> k
                first = n * (256 >> k)
                row = levels[8 * tl + k][first:first + count] if 8 * tl + k < len(levels) else []
                assert len(row) == count
                body += b"".join(row)
            rows.append((tl, n, width, body))
    return rows


def insert_log(conn: psycopg.Connection, name: str, leaves: Sequence[bytes], *, tiles: bool = True) -> int:
    """Create log `name` holding these leaf hashes: logs row, processed_log rows and tiles."""
    log_id = conn.execute(
        "INSERT INTO merkle.logs (name, origin, tree_size, root) VALUES (%s, %s, %s, %s) RETURNING log_id",
        (name, f"example.test/{name}", len(leaves), mth(leaves)),
    ).fetchone()[0]
    with conn.cursor() as cur:
        with cur.copy(
            "COPY merkle.processed_log (log_id, seq, source_id, source_key, op, leaf_hash, change_id, change_ord)"
            " FROM STDIN"
        ) as copy:
            for seq, h in enumerate(leaves):
                copy.write_row((log_id, seq, 1, f'{{"id":"{seq}"}}', "insert", h, seq, 0))
        if tiles:
            with cur.copy("COPY merkle.tiles (log_id, level, idx, width, nodes) FROM STDIN") as copy:
                for row in naive_tiles(leaves):
                    copy.write_row((log_id, *row))
    return log_id
