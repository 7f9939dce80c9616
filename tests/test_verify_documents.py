"""`merkle-listener verify` on documents that are not what they claim, offline (no database)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from listener import merkle
from tests.helpers import cli

LEAVES = [hashlib.sha256(b"leaf %d" % i).digest() for i in range(5)]


def inclusion(index: int = 2, size: int = 5) -> dict:
    tree = merkle.MemoryTree(LEAVES)
    b64 = lambda h: base64.b64encode(h).decode()  # noqa: E731
    return {"type": "inclusion", "leaf_index": index, "tree_size": size, "leaf_hash": b64(LEAVES[index]),
            "root": b64(tree.root(size)), "proof": [b64(h) for h in tree.inclusion_proof(index, size)]}


def test_an_honest_document_verifies():
    out = cli("verify", "-", input=json.dumps(inclusion()))
    assert out.returncode == 0 and out.stdout.startswith("OK: leaf 2 is in the tree of size 5"), out.stderr


@pytest.mark.parametrize("field, raw, message", [
    ("tree_size", "18446744073709551616", "field 'tree_size' must be an integer below 2^63, got one of 20 digits"),
    ("leaf_index", "1" + "0" * 30, "field 'leaf_index' must be an integer below 2^63, got one of 31 digits"),
    ("leaf_index", "true", "field 'leaf_index' must be an integer, got True"),
    ("tree_size", "5.0", "field 'tree_size' must be an integer, got 5.0"),
])
def test_a_field_that_is_not_an_integer_is_named(field, raw, message):
    """Found by review: integers past 64 bits were reported as floats (1.8446744073709552e+19)."""
    text = json.dumps(inclusion()).replace(f'"{field}": {inclusion()[field]}', f'"{field}": {raw}')
    assert raw in text
    out = cli("verify", "-", input=text)
    assert out.returncode == 1 and out.stderr == f"FAILED: {message}\n", out.stderr
