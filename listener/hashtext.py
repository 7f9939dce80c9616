"""Hashes as text: standard base64, as in C2SP checkpoints and our JSON documents.

Decoding is strict (no stray characters, exactly 32 bytes) and fails with
ProofVerificationError naming the field: a malformed hash is a claim that does not verify.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from listener.errors import ProofVerificationError

HASH_SIZE = 32


def b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def unb64(value: Any, what: str) -> bytes:
    """The 32-byte hash that `value` encodes; `what` names it in the error."""
    if not isinstance(value, str):
        raise ProofVerificationError(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProofVerificationError(f"{what} is not valid base64: {value!r}") from None
    if len(raw) != HASH_SIZE:
        raise ProofVerificationError(f"{what} must be a 32-byte hash, got {len(raw)} bytes")
    return raw
