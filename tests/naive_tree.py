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


class Reference:
    """RFC 9162's recursive definitions over D = leaves, on half-open ranges [lo, hi).

    MTH values are memoised by range: the recursion is the RFC's, only not recomputed.
    """

    def __init__(self, leaves: Sequence[bytes]):
        self.d = list(leaves)
        self._mth: dict[tuple[int, int], bytes] = {}

    def mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) (RFC 9162 §2.1.1)."""
        if hi - lo == 0:
            return EMPTY_ROOT
        if hi - lo == 1:
            return self.d[lo]
        got = self._mth.get((lo, hi))
        if got is None:
            k = split(hi - lo)
            got = self._mth[(lo, hi)] = node(self.mth(lo, lo + k), self.mth(lo + k, hi))
        return got

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        """PATH(m, D[lo:hi]) (RFC 9162 §2.1.3.1). Requires 0 <= m < hi - lo."""
        if hi - lo == 1:
            return []
        k = split(hi - lo)
        if m < k:
            return self.path(m, lo, lo + k) + [self.mth(lo + k, hi)]
        return self.path(m - k, lo + k, hi) + [self.mth(lo, lo + k)]

    def subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        """SUBPROOF(m, D[lo:hi], b) (RFC 9162 §2.1.4.1)."""
        if m == hi - lo:
            return [] if b else [self.mth(lo, hi)]
        k = split(hi - lo)
        if m <= k:
            return self.subproof(m, lo, lo + k, b) + [self.mth(lo + k, hi)]
        return self.subproof(m - k, lo + k, hi, False) + [self.mth(lo, lo + k)]

    def proof(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[0:n]); empty for m = 0 or m = n. Requires 0 <= m <= n."""
        if m == 0 or m == n:
            return []
        return self.subproof(m, 0, n, True)


def mth(d: Sequence[bytes]) -> bytes:
    return Reference(d).mth(0, len(d))


def path(m: int, d: Sequence[bytes]) -> list[bytes]:
    return Reference(d).path(m, 0, len(d))


def proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    return Reference(d).proof(m, len(d))


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
