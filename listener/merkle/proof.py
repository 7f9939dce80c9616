"""Proof construction from stored complete nodes: RFC 9162 §2.1.3.1 (inclusion) and §2.1.4.1
(consistency), plus the root at any size.

Every function works in two steps so that a database answers in one round trip:

1. plan (pure): which complete nodes are needed, and how each proof hash is folded from them
   (a proof hash is either one complete node or the ephemeral hash of a ragged right subtree);
2. fetch all planned nodes with ONE NodeReader.get_nodes call, then fold.

The plans are exposed (root_plan, inclusion_plan, consistency_plan) for readers that want to
fetch the nodes themselves, e.g. with one SQL query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .hashing import EMPTY_ROOT, hash_children
from .nodes import NodeID, decompose


class NodeReader(Protocol):
    """Anything that can look up hashes of complete nodes."""

    def get_nodes(self, ids: Sequence[NodeID]) -> list[bytes]:
        """Return the hashes of the given COMPLETE nodes, in the order asked."""
        ...


@dataclass(frozen=True)
class ProofPlan:
    """Which nodes to fetch and how to fold them into a list of hashes.

    `ids` are complete nodes, each asked once. Output hash number g is
    fold(hashes[begin:end]) for (begin, end) = groups[g]: a single node when end - begin == 1,
    otherwise the ephemeral root of a ragged subtree decomposed left to right.
    """

    ids: tuple[NodeID, ...]
    groups: tuple[tuple[int, int], ...]

    def assemble(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Fold the fetched `hashes` (one per id, same order) into the planned output hashes."""
        if len(hashes) != len(self.ids):
            raise ValueError(f"got {len(hashes)} node hashes for {len(self.ids)} planned nodes")
        return [fold(hashes[begin:end]) for begin, end in self.groups]

    def run(self, reader: NodeReader) -> list[bytes]:
        """Fetch the planned nodes with one get_nodes call and fold them."""
        return self.assemble(reader.get_nodes(list(self.ids)) if self.ids else [])


class _PlanBuilder:
    def __init__(self) -> None:
        self.ids: list[NodeID] = []
        self.groups: list[tuple[int, int]] = []

    def add(self, ids: list[NodeID]) -> None:
        begin = len(self.ids)
        self.ids.extend(ids)
        self.groups.append((begin, len(self.ids)))

    def plan(self) -> ProofPlan:
        return ProofPlan(tuple(self.ids), tuple(self.groups))


def fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range given its decomposition into complete nodes, left to right.

    The decomposition of [begin, end) with begin aligned to a power of two larger than the range
    has strictly shrinking nodes, so RFC 9162 §2.1.1's split "largest power of two smaller than
    n" is exactly: right-most two first, then each node to the left. Requires len(hashes) >= 1.
    """
    acc = hashes[-1]
    for left in reversed(hashes[:-1]):
        acc = hash_children(left, acc)
    return acc


def _add_path(builder: _PlanBuilder, level: int, index: int, size: int) -> None:
    """Plan the audit path from complete node (level, index) up to the root of a tree of `size`.

    Below level `inner` the path and the right border of the tree are apart, so every sibling is
    complete; at level inner - 1 the right sibling holds leaf size - 1 and may be ragged (folded
    from its decomposition); from `inner` up the path runs along the right border, where only
    left siblings exist (RFC 9162 §2.1.3.1 PATH skips the missing right ones).
    """
    inner = ((index << level) ^ (size - 1)).bit_length()
    h = level
    while h < inner - 1:
        builder.add([(h, (index >> (h - level)) ^ 1)])
        h += 1
    if h == inner - 1:
        sibling = (index >> (h - level)) ^ 1
        builder.add(decompose(sibling << h, min((sibling + 1) << h, size)))
        h += 1
    node = index >> (h - level)
    while node:
        if node & 1:
            builder.add([(h, node - 1)])
        node >>= 1
        h += 1


def root_plan(size: int) -> ProofPlan:
    """Plan MTH(D[0:size]): one group folding the compact range. Requires size >= 0.

    Size 0 plans no group; root_at gives EMPTY_ROOT for it.
    """
    if size < 0:
        raise ValueError(f"tree size must be >= 0, got {size}")
    builder = _PlanBuilder()
    if size:
        builder.add(decompose(0, size))
    return builder.plan()


def inclusion_plan(index: int, size: int) -> ProofPlan:
    """Plan the inclusion proof of leaf `index` in the tree of `size` (RFC 9162 §2.1.3.1).

    Requires 0 <= index < size.
    """
    if not 0 <= index < size:
        raise ValueError(f"inclusion proof needs 0 <= index < size, got index {index}, size {size}")
    builder = _PlanBuilder()
    _add_path(builder, 0, index, size)
    return builder.plan()


def node_path_plan(level: int, index: int, size: int) -> ProofPlan:
    """Plan the audit path from complete node (level, index) to the root of the tree of `size`:
    the tail of the inclusion proof of every leaf under that node (RFC 9162 §2.1.3.1).

    Requires the node to be complete in the tree of `size`: (index + 1) << level <= size.
    """
    if level < 0 or index < 0 or (index + 1) << level > size:
        raise ValueError(f"node ({level}, {index}) is not complete in a tree of size {size}")
    builder = _PlanBuilder()
    _add_path(builder, level, index, size)
    return builder.plan()


def consistency_plan(first: int, second: int) -> ProofPlan:
    """Plan the consistency proof from size `first` to size `second` (RFC 9162 §2.1.4.1).

    Requires 0 <= first <= second; first == 0 and first == second plan an empty proof. The proof
    is the largest complete node ending at `first` (left out when it is the whole old tree, i.e.
    first is a power of two) followed by that node's audit path in the tree of `second`.
    """
    if not 0 <= first <= second:
        raise ValueError(f"consistency proof needs 0 <= first <= second, got first {first}, second {second}")
    builder = _PlanBuilder()
    if first == 0 or first == second:
        return builder.plan()
    level = (first & -first).bit_length() - 1
    index = (first - 1) >> level
    if index:
        builder.add([(level, index)])
    _add_path(builder, level, index, second)
    return builder.plan()


def root_at(reader: NodeReader, size: int) -> bytes:
    """MTH(D[0:size]) from stored complete nodes. Requires 0 <= size <= the reader's tree size."""
    hashes = root_plan(size).run(reader)
    return hashes[0] if hashes else EMPTY_ROOT


def inclusion_proof(reader: NodeReader, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) (RFC 9162 §2.1.3.1). Requires 0 <= index < size <= the reader's size."""
    return inclusion_plan(index, size).run(reader)


def consistency_proof(reader: NodeReader, first: int, second: int) -> list[bytes]:
    """PROOF(first, D[0:second]) (RFC 9162 §2.1.4.1). Requires 0 <= first <= second <= the reader's size."""
    return consistency_plan(first, second).run(reader)


__all__ = [
    "NodeReader",
    "ProofPlan",
    "consistency_plan",
    "consistency_proof",
    "fold",
    "inclusion_plan",
    "inclusion_proof",
    "node_path_plan",
    "root_at",
    "root_plan",
]
