"""The canonical entry encoding, version 1: the bytes a leaf hash commits to.

An entry is the UTF-8 JSON object

    {"op":"insert","row":{"<col>":"<text>"|null,...},"source":"<schema>.<table>","v":1}

with the keys of every object sorted by their UTF-8 bytes, no whitespace, and strings
escaped as RFC 8785 §3.2.2.2 does (which is also what PostgreSQL's `to_json(text)` does).
Each column value is PostgreSQL's text output of the value (the type's output function)
under the pinned settings of `listener.store.connect.PINNED_SETTINGS`, or JSON null.
The full specification, with test vectors, is docs/canonical-entry.md.

This module builds the bytes in Python, for the replication consumer (pgoutput's text
values are exactly those outputs). `listener.canonical_sql` builds the same bytes in SQL
for trigger capture; tests prove the two byte-identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import orjson

from listener.errors import ProcessingError

ENTRY_VERSION = 1
OPS = frozenset({"insert", "update", "delete", "truncate", "backfill"})

# RFC 9162 §2.1.1: leaf hashes are domain-separated from interior nodes by this prefix.
LEAF_PREFIX = b"\x00"


def utf8_order(name: str) -> bytes:
    """Sort key of object keys: their UTF-8 bytes (= code point order, not UTF-16 order)."""
    return name.encode("utf-8")


def entry_v1(op: str, source: str, row: Mapping[str, str | None]) -> bytes:
    """The canonical entry of one row change.

    Requires op in OPS; source = "<schema>.<table>" from the raw (unquoted) names; row maps
    each column name of the source's registered column set (for a delete: its key columns)
    to the value's PostgreSQL text output under the pinned settings, or None for NULL.
    """
    if op not in OPS:
        raise ProcessingError(f"canonical entry: op {op!r} is not one of {sorted(OPS)}; fix the caller")
    if not isinstance(source, str) or not source:
        raise ProcessingError(f"canonical entry: source must be a non-empty '<schema>.<table>' string, got {source!r}")
    # Insertion order is kept by orjson: build every object already sorted.
    doc = {"op": op, "row": _sorted_object(row, "row"), "source": source, "v": ENTRY_VERSION}
    return _dumps(doc)


def key_json(key: Mapping[str, str | None]) -> str:
    """The source key: canonical JSON object of the key columns, as stored in processed_log.

    Same rules as the entry's "row": keys sorted by UTF-8 bytes, values text output or null.
    """
    return _dumps(_sorted_object(key, "key")).decode("utf-8")


def leaf_hash_of_entry(entry: bytes) -> bytes:
    """RFC 9162 §2.1.1 leaf hash: SHA-256(0x00 || entry). Works for entry-column bytes too."""
    if not isinstance(entry, (bytes, bytearray, memoryview)):
        raise ProcessingError(f"leaf hash: entry must be bytes, got {type(entry).__name__}")
    return hashlib.sha256(LEAF_PREFIX + bytes(entry)).digest()


def _sorted_object(values: Mapping[str, str | None], what: str) -> dict[str, str | None]:
    if not isinstance(values, Mapping):
        raise ProcessingError(f"canonical entry: {what} must be a mapping of column name to text, got {type(values).__name__}")
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise ProcessingError(f"canonical entry: {what} column names must be non-empty strings, got {name!r}")
        if value is not None and not isinstance(value, str):
            raise ProcessingError(
                f"canonical entry: {what} column {name!r} has a {type(value).__name__}; "
                "pass PostgreSQL's text output of the value (a str) or None for NULL"
            )
    return {name: values[name] for name in sorted(values, key=utf8_order)}


def _dumps(doc: object) -> bytes:
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError as e:
        # Lone surrogates cannot be UTF-8; PostgreSQL text never holds them.
        raise ProcessingError(f"canonical entry: a value is not valid Unicode text ({e}); fix the caller") from e
