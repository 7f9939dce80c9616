"""merkle.node_path_plan (used by the HTTP hot path): the audit path of a complete node is the
tail of the inclusion proof of every leaf under it."""

from __future__ import annotations

import pytest

from listener import merkle
from listener.merkle.proof import node_path_plan


@pytest.mark.parametrize("size", [256, 300, 511, 512, 1000, 70_000])
def test_node_path_plan_is_the_tail_of_every_leafs_inclusion_plan(size):
    tree = merkle.MemoryTree([merkle.hash_leaf(i.to_bytes(4, "big")) for i in range(size)])
    for t in range(0, size >> 8, max(1, (size >> 8) // 5)):
        tail = node_path_plan(8, t, size).run(tree)
        for index in (t << 8, (t << 8) + 77, (t << 8) + 255):
            proof = merkle.inclusion_proof(tree, index, size)
            assert len(proof) == 8 + len(tail) and proof[8:] == tail


def test_node_path_plan_refuses_incomplete_nodes():
    with pytest.raises(ValueError):
        node_path_plan(8, 1, 300)
