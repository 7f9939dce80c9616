"""Pure RFC 9162 Merkle tree math: hashing, node coordinates, C2SP tlog-tiles, the bounded
right edge (TileBuilder), proofs from stored nodes, and client-side verification.

No I/O here: the store reads and writes tiles, this package only computes them.
"""

from .hashing import EMPTY_ROOT, HASH_SIZE, hash_children, hash_leaf
from .memory import MemoryTree
from .nodes import NodeID, decompose, is_complete, node_range
from .proof import (
    NodeReader,
    ProofPlan,
    consistency_plan,
    consistency_proof,
    fold,
    inclusion_plan,
    inclusion_proof,
    root_at,
    root_plan,
)
from .tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    Tile,
    TileBuilder,
    TileReader,
    entries_path,
    partial_width,
    row_offset,
    tile_for_node,
    tile_path,
)
from .verify import (
    ProofError,
    RootMismatchError,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "MemoryTree",
    "NodeID",
    "NodeReader",
    "ProofError",
    "ProofPlan",
    "RootMismatchError",
    "Tile",
    "TileBuilder",
    "TileReader",
    "consistency_plan",
    "consistency_proof",
    "decompose",
    "entries_path",
    "fold",
    "hash_children",
    "hash_leaf",
    "inclusion_plan",
    "inclusion_proof",
    "is_complete",
    "node_range",
    "partial_width",
    "root_at",
    "root_from_inclusion_proof",
    "root_plan",
    "row_offset",
    "tile_for_node",
    "tile_path",
    "verify_consistency",
    "verify_inclusion",
]
