"""An in-memory Merkle tree that keeps every complete node: the NodeReader for tests and benchmarks.

It grows level by level like TileBuilder but never forgets a node, so memory grows with the
log; the listener itself uses TileBuilder (bounded right edge) and reads nodes from PostgreSQL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .nodes import NodeID
from .proof import NodeReader, consistency_proof, inclusion_proof, root_at


class MemoryTree(NodeReader):
    """All complete nodes of a tree, level by level: levels[h][i] is node (h, i)."""

    def __init__(self, leaf_hashes: Sequence[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        self.append(leaf_hashes)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def append(self, leaf_hashes: Sequence[bytes]) -> None:
        """Append leaf hashes (32 bytes each) and every interior node they complete."""
        if any(len(h) != 32 for h in leaf_hashes):
            raise ValueError("every leaf hash must be 32 bytes")
        sha = hashlib.sha256
        self.levels[0].extend(leaf_hashes)
        h = 0
        while len(self.levels[h]) > 1:
            row = self.levels[h]
            if h + 1 == len(self.levels):
                self.levels.append([])
            above = self.levels[h + 1]
            start = 2 * len(above)  # children of the nodes already above are hashed
            above.extend(sha(b"\x01" + row[i] + row[i + 1]).digest() for i in range(start, len(row) - 1, 2))
            h += 1

    def get_nodes(self, ids: Sequence[NodeID]) -> list[bytes]:
        """Hashes of complete nodes, in the order asked. Raises ValueError for a node not complete."""
        out = []
        for level, index in ids:
            if level < 0 or index < 0 or level >= len(self.levels) or index >= len(self.levels[level]):
                raise ValueError(f"node ({level}, {index}) is not complete in a tree of size {self.size}")
            out.append(self.levels[level][index])
        return out

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first `size` leaves (default: all). Requires 0 <= size <= self.size."""
        return root_at(self, self.size if size is None else self._check_size(size))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.3.1 proof. Requires 0 <= index < size <= self.size."""
        return inclusion_proof(self, index, self.size if size is None else self._check_size(size))

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.4.1 proof. Requires 0 <= first <= second <= self.size."""
        return consistency_proof(self, first, self.size if second is None else self._check_size(second))

    def _check_size(self, size: int) -> int:
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} is outside this tree of size {self.size}")
        return size
