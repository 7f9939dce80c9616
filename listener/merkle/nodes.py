"""Node coordinates of a Merkle tree: (level, index) pairs, and ranges decomposed into them.

Node (level, index) covers leaves [index * 2**level, (index + 1) * 2**level):

    level 2:            (2,0)
                    /          \\
    level 1:     (1,0)          (1,1)          (1,2)
                 /   \\          /   \\          /   \\
    level 0:  (0,0) (0,1)  (0,2) (0,3)  (0,4) (0,5)  (0,6)
    leaves:     0     1      2     3      4     5      6

In a tree of size 7 the nodes drawn are the *complete* ones: (index + 1) * 2**level <= 7.
(2,1) would cover leaves 4..7 and does not exist yet; its hash at size 7 is the "ephemeral"
MTH(D[4:7]) that proofs fold from the complete nodes (1,2) and (0,6). Only complete nodes are
stored, and a complete node's hash never changes as the tree grows.
"""

from __future__ import annotations

NodeID = tuple[int, int]


def node_range(level: int, index: int) -> tuple[int, int]:
    """The half-open leaf range [begin, end) that node (level, index) covers."""
    return index << level, (index + 1) << level


def is_complete(level: int, index: int, size: int) -> bool:
    """Whether node (level, index) exists in a tree of `size` leaves, i.e. its range ends <= size."""
    return level >= 0 and index >= 0 and (index + 1) << level <= size


def decompose(begin: int, end: int) -> list[NodeID]:
    """The fewest complete, aligned nodes that exactly cover leaves [begin, end), left to right.

    Requires 0 <= begin <= end. Example: [3, 13) -> (0,3) (2,1) (2,2) (0,12), covering
    leaves 3, 4..7, 8..11 and 12. Concatenating node_range over the result gives the range back.
    For [0, size) this is the tree's compact range (the right edge): one node per set bit of size.
    """
    if not 0 <= begin <= end:
        raise ValueError(f"decompose needs 0 <= begin <= end, got [{begin}, {end})")
    ids: list[NodeID] = []
    while begin < end:
        # Largest node that starts at `begin` (alignment) and still fits before `end`.
        level = (end - begin).bit_length() - 1
        if begin:
            level = min(level, (begin & -begin).bit_length() - 1)
        ids.append((level, begin >> level))
        begin += 1 << level
    return ids
