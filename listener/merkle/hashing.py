"""RFC 9162 §2.1.1 hashing: leaves and interior nodes are SHA-256 with a one-byte domain prefix.

The prefixes (0x00 for leaves, 0x01 for interior nodes) keep a leaf from ever being read as
an interior node (second-preimage resistance). Everything else in listener.merkle builds on
these three names.
"""

from __future__ import annotations

import hashlib

HASH_SIZE = 32

#: MTH({}) = SHA-256() — the root of the empty tree (RFC 9162 §2.1.1).
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def hash_leaf(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d): the leaf hash of one entry (RFC 9162 §2.1.1)."""
    return _sha256(b"\x00" + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the interior node over two subtree hashes (RFC 9162 §2.1.1)."""
    return _sha256(b"\x01" + left + right).digest()
