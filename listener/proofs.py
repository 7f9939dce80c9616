"""Proof documents: what `prove` prints and `verify` checks, as JSON with base64 hashes.

    {"type": "inclusion", "log", "origin", "leaf_index", "tree_size", "leaf_hash", "root",
     "proof": [...], "source", "source_key", "op"}
    {"type": "consistency", "log", "origin", "first", "second", "first_root", "second_root",
     "proof": [...]}

A document checks itself (the proof leads to the roots it names); it is worth something once
those roots are ones you trust, e.g. from signed checkpoints: `verify --root/--checkpoint`
for the root a proof leads to, and for a consistency proof `verify --old-root/--old-checkpoint`
for the root its checker held before.
"""

from __future__ import annotations

from typing import Any

import psycopg

from listener import merkle
from listener.errors import ConfigurationError, ProofVerificationError
from listener.hashtext import b64, unb64
from listener.registry import get_log
from listener.store.tiles import TileNodeReader


def _size(conn: psycopg.Connection, log, size: int | None) -> int:
    if size is None:
        return log.tree_size
    if not 0 <= size <= log.tree_size:
        raise ConfigurationError(f"size {size} is outside log {log.name!r}'s range 0..{log.tree_size}")
    return size


def inclusion(conn: psycopg.Connection, log_name: str, index: int, size: int | None = None) -> dict:
    with conn.transaction():
        log = get_log(conn, log_name)
        asked, size = size, _size(conn, log, size)
        if size == 0:
            raise ConfigurationError(f"log {log.name!r} has no leaves yet" if asked is None else
                                     "the tree of size 0 has no leaves: give a --size larger than the leaf index")
        if not 0 <= index < size:
            raise ConfigurationError(f"leaf index {index} is outside 0..{size - 1} (tree size {size})" if size else
                                     f"the tree of size 0 has no leaf {index}")
        row = conn.execute(
            "SELECT p.leaf_hash, s.table_schema || '.' || s.table_name, p.source_key, p.op "
            "FROM merkle.processed_log p LEFT JOIN merkle.source_names s USING (source_id) "
            "WHERE p.log_id = %s AND p.seq = %s",
            (log.log_id, index),
        ).fetchone()
        reader = TileNodeReader(conn, log.log_id)
        proof = merkle.inclusion_proof(reader, index, size)
        root = merkle.root_at(reader, size)
    leaf_hash, source, key, op = row
    return {
        "type": "inclusion", "log": log.name, "origin": log.origin, "leaf_index": index, "tree_size": size,
        "leaf_hash": b64(leaf_hash), "root": b64(root), "proof": [b64(h) for h in proof],
        "source": source, "source_key": key, "op": op,
    }


def consistency(conn: psycopg.Connection, log_name: str, first: int, second: int) -> dict:
    with conn.transaction():
        log = get_log(conn, log_name)
        second = _size(conn, log, second)
        if not 0 <= first <= second:
            raise ConfigurationError(f"need 0 <= FIRST <= SECOND, got {first} and {second}")
        reader = TileNodeReader(conn, log.log_id)
        proof = merkle.consistency_proof(reader, first, second)
        first_root, second_root = merkle.root_at(reader, first), merkle.root_at(reader, second)
    return {
        "type": "consistency", "log": log.name, "origin": log.origin, "first": first, "second": second,
        "first_root": b64(first_root), "second_root": b64(second_root), "proof": [b64(h) for h in proof],
    }


def _int(doc: dict, key: str) -> int:
    v = doc.get(key)
    if isinstance(v, float) and abs(v) >= 2**63:  # orjson reads a JSON integer past 64 bits as a float
        raise ProofVerificationError(f"field {key!r} must be an integer below 2^63, got one of {len(str(int(v)))} digits")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProofVerificationError(f"field {key!r} must be an integer, got {v!r}")
    return v


def verify_document(doc: Any, trusted_root: bytes | None = None, trusted_first_root: bytes | None = None) -> str:
    """Check a proof document; returns a one-line description, raises ProofVerificationError.

    `trusted_root` is the root the proof must lead to (an inclusion proof's, or a consistency
    proof's second); `trusted_first_root` the root a consistency proof must start from (the
    one its checker held before). A root not given is taken from the document, which the line
    returned then says: the proof holds for those roots, whoever wrote them."""
    if not isinstance(doc, dict) or doc.get("type") not in ("inclusion", "consistency"):
        raise ProofVerificationError('not a proof document: expected a JSON object with "type" inclusion or consistency')
    proof = doc.get("proof")
    if not isinstance(proof, list):
        raise ProofVerificationError('field "proof" must be a list of base64 hashes')
    path = [unb64(h, f"proof[{i}]") for i, h in enumerate(proof)]
    if doc["type"] == "inclusion":
        if trusted_first_root is not None:
            raise ProofVerificationError("an inclusion proof has one root: give it as the trusted root, not the old one")
        index, size = _int(doc, "leaf_index"), _int(doc, "tree_size")
        root = unb64(doc.get("root"), "root")
        merkle.verify_inclusion(unb64(doc.get("leaf_hash"), "leaf_hash"), index, size, path, root)
        _check_trusted(root, trusted_root, "")
        what = f"leaf {index} is in the tree of size {size} (root {b64(root)})"
        untrusted = [] if trusted_root is not None else ["root"]
    else:
        first, second = _int(doc, "first"), _int(doc, "second")
        first_root, root = unb64(doc.get("first_root"), "first_root"), unb64(doc.get("second_root"), "second_root")
        merkle.verify_consistency(first, second, path, first_root, root)
        _check_trusted(first_root, trusted_first_root, f" at size {first}")
        _check_trusted(root, trusted_root, f" at size {second}")
        what = f"the tree of size {second} (root {b64(root)}) extends the tree of size {first} (root {b64(first_root)})"
        untrusted = [name for name, given in (("first_root", trusted_first_root), ("second_root", trusted_root))
                     if given is None]
    if untrusted:
        what += f"; {' and '.join(untrusted)} taken from the proof itself: compare with roots you trust"
    return f"OK: {what}"


def _check_trusted(root: bytes, trusted: bytes | None, where: str) -> None:
    if trusted is not None and trusted != root:
        raise ProofVerificationError(
            f"the proof is valid but for root {b64(root)}{where}, not the trusted root {b64(trusted)}")
