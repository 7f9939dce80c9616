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
import re
from collections.abc import Mapping, Sequence

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


# The only bytes entry_v1 escapes: '"', '\\' and U+0000..U+001F. None of them occurs inside a
# multi-byte UTF-8 sequence, so escaping can be decided on the bytes.
NEEDS_ESCAPE = re.compile(rb'["\\\x00-\x1f]')


def json_string_of_utf8(raw: bytes) -> bytes:
    """The JSON string of UTF-8 text given as bytes, escaped exactly as entry_v1 escapes it."""
    if NEEDS_ESCAPE.search(raw) is None:
        return b'"' + raw + b'"'
    return _dumps(raw.decode("utf-8"))


class ObjectTemplate:
    """The canonical JSON object of a fixed column set, filled from raw UTF-8 value bytes: the
    fast path of the replication consumer, byte-identical to entry_v1 / key_json.

    `columns` (any order) are sorted once; `encode` takes the values in `self.columns` order,
    each the UTF-8 bytes of PostgreSQL's text output or None for NULL. `head`/`tail` wrap the
    object (entry_template builds an entry's).
    """

    def __init__(self, columns: Sequence[str], head: bytes = b"", tail: bytes = b""):
        _sorted_object({c: None for c in columns}, "row")  # validates the names
        if len(set(columns)) != len(columns):
            raise ProcessingError(f"canonical entry: duplicate column names in {list(columns)}")
        self.columns = tuple(sorted(columns, key=utf8_order))
        self._names = [_dumps(c) + b":" for c in self.columns]
        self._head = head + b"{"
        self._tail = b"}" + tail
        # Fast path: every value present and needing no escape (NEEDS_ESCAPE) fills one
        # %-format: plain_format % tuple(values) == encode(values).
        lit = [self._head, *self._names, self._tail]
        h, *names, t = (part.replace(b"%", b"%%") for part in lit)
        self.plain_format = h + b",".join(name + b'"%b"' for name in names) + t

    def encode(self, values: Sequence[bytes | None]) -> bytes:
        if None not in values and NEEDS_ESCAPE.search(b"".join(values)) is None:
            return self.plain_format % tuple(values)
        quote = json_string_of_utf8
        return self._head + b",".join(
            [name + (b"null" if v is None else quote(v)) for name, v in zip(self._names, values)]
        ) + self._tail


def entry_template(op: str, source: str, columns: Sequence[str]) -> ObjectTemplate:
    """ObjectTemplate whose encode(values) == entry_v1(op, source, dict(zip(columns, values)))
    with the values decoded (and the columns in its sorted order)."""
    head = entry_v1(op, source, {})
    # entry_v1(op, source, {}) is b'{"op":..,"row":{},"source":..,"v":1}': split at the empty row.
    before, after = head.split(b'"row":{}', 1)
    return ObjectTemplate(columns, before + b'"row":', after)
