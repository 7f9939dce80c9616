"""Client-side proof verification (RFC 9162 §2.1.3.2 and §2.1.4.2): the public API a log's users
call to check inclusion and consistency without trusting the log.

Every failure raises ProofError (a ProofVerificationError) saying why; a proof that folds to
the wrong hash raises its subclass RootMismatchError carrying both hashes. Proofs must have
exactly the length RFC 9162 implies for the sizes (checked before folding, which replaces the
RFC's in-loop "sn == 0" checks), so no trailing or missing hash is accepted.

    from listener.merkle import hash_leaf, verify_inclusion, verify_consistency, ProofError

    # root and size come from a checkpoint whose signature you checked; proof from the log.
    verify_inclusion(hash_leaf(entry), index, size, proof, root)          # raises ProofError
    verify_consistency(old_size, size, proof, old_root, root)             # raises ProofError
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from listener.errors import ProofVerificationError

from .hashing import EMPTY_ROOT, HASH_SIZE, hash_children
from .proof import consistency_plan, inclusion_plan


class ProofError(ProofVerificationError):
    """The proof does not verify: do not trust the log's claim. The message says why."""


class RootMismatchError(ProofError):
    """The proof folds to `got`, but the trusted root is `want`."""

    def __init__(self, what: str, got: bytes, want: bytes) -> None:
        self.got = got
        self.want = want
        # Base64, as roots appear in checkpoints and proof documents.
        super().__init__(f"{what}: got {base64.b64encode(got).decode()}, want {base64.b64encode(want).decode()}")


def _check_hash(what: str, value: bytes) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != HASH_SIZE:
        length = len(value) if isinstance(value, (bytes, bytearray, memoryview)) else type(value).__name__
        raise ProofError(f"{what} must be a {HASH_SIZE}-byte SHA-256 hash, got {length}")


def _check_proof(kind: str, proof: Sequence[bytes], want_len: int) -> None:
    if len(proof) != want_len:
        raise ProofError(f"{kind} must have exactly {want_len} hashes, got {len(proof)}")
    for i, p in enumerate(proof):
        _check_hash(f"{kind} hash {i}", p)


def root_from_inclusion_proof(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root that `proof` implies for `leaf_hash` at `index` in a tree of `size` (RFC 9162 §2.1.3.2).

    Requires 0 <= index < size; raises ProofError otherwise or when the proof is malformed.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}; need 0 <= index < size")
    _check_hash("leaf hash", leaf_hash)
    _check_proof(f"inclusion proof for leaf {index} in size {size}", proof, len(inclusion_plan(index, size).groups))
    fn, sn, r = index, size - 1, bytes(leaf_hash)
    for p in proof:
        if fn & 1 or fn == sn:
            r = hash_children(p, r)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = hash_children(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # RFC 9162's final check; the exact length checked above guarantees it
        raise AssertionError("root_from_inclusion_proof: bad math, proof length and sizes disagree")
    return r


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `size` whose root is `root`.

    Requires 0 <= index < size. Raises ProofError (RootMismatchError when the proof folds to
    another root); returns None when the proof verifies.
    """
    _check_hash("root", root)
    got = root_from_inclusion_proof(leaf_hash, index, size, proof)
    if got != root:
        raise RootMismatchError(f"inclusion proof for leaf {index} in size {size} gives another root", got, bytes(root))


def verify_consistency(first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes) -> None:
    """Check that the tree of `second` with `second_root` extends the tree of `first` with
    `first_root` (RFC 9162 §2.1.4.2).

    Requires 0 <= first <= second. Size 0 must have EMPTY_ROOT and needs an empty proof; equal
    sizes need an empty proof and equal roots. Raises ProofError (RootMismatchError when a root
    differs); returns None when the proof verifies.
    """
    if not 0 <= first <= second:
        raise ProofError(f"consistency needs 0 <= first <= second, got first {first}, second {second}")
    _check_hash("first root", first_root)
    _check_hash("second root", second_root)
    kind = f"consistency proof from size {first} to {second}"
    _check_proof(kind, proof, len(consistency_plan(first, second).groups))
    if first == 0:
        if first_root != EMPTY_ROOT:
            raise RootMismatchError("the root of the empty tree is SHA-256 of nothing", bytes(first_root), EMPTY_ROOT)
        return
    if first == second:
        if first_root != second_root:
            raise RootMismatchError(f"two roots claimed for size {first}", bytes(second_root), bytes(first_root))
        return
    path = list(proof)
    if first & (first - 1) == 0:
        # The old tree is itself a complete node: RFC 9162 leaves it out of the proof.
        path.insert(0, bytes(first_root))
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if fn & 1 or fn == sn:
            fr = hash_children(c, fr)
            sr = hash_children(c, sr)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = hash_children(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # RFC 9162's final check; the exact length checked above guarantees it
        raise AssertionError("verify_consistency: bad math, proof length and sizes disagree")
    if fr != first_root:
        raise RootMismatchError(f"{kind} gives another root for size {first}", fr, bytes(first_root))
    if sr != second_root:
        raise RootMismatchError(f"{kind} gives another root for size {second}", sr, bytes(second_root))
