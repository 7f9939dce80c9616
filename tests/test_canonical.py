"""The canonical entry in Python: escaping identical to PostgreSQL, key order, refused input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener import canonical
from listener.errors import ProcessingError


def test_orjson_escapes_every_code_point_as_postgresql_to_json(conn):
    # Every Unicode scalar value PostgreSQL text can hold (all but NUL and surrogates), at once.
    text = "".join(chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF)
    want = conn.execute("SELECT to_json(%s::text)::text", (text,)).fetchone()[0]
    got = canonical.key_json({"k": text})
    assert got == '{"k":' + want + "}"


def test_escapes_are_rfc8785():
    assert canonical.key_json({"k": '"\\\b\f\n\r\t\x01\x1f\x7f/\u2028é\U0001F600'}) == (
        '{"k":"\\"\\\\\\b\\f\\n\\r\\t\\u0001\\u001f\x7f/\u2028é\U0001F600"}'
    )


def test_keys_sorted_by_utf8_bytes_not_utf16():
    # UTF-16 order (RFC 8785's) would put U+1F600 (a surrogate pair, 0xD83D...) before U+FF61.
    key = canonical.key_json({"\U0001F600": "1", "\uff61": "2", "é": "3", "a": "4", "Z": "5"})
    assert key == '{"Z":"5","a":"4","é":"3","\uff61":"2","\U0001F600":"1"}'


def test_entry_layout_and_null():
    assert canonical.entry_v1("update", "s.t", {"b": None, "a": ""}) == (
        b'{"op":"update","row":{"a":"","b":null},"source":"s.t","v":1}'
    )
    assert canonical.entry_v1("truncate", "s.t", {}) == b'{"op":"truncate","row":{},"source":"s.t","v":1}'


@pytest.mark.parametrize(
    "args, match",
    [
        (("INSERT", "s.t", {}), "op 'INSERT' is not one of"),
        (("upsert", "s.t", {}), "op 'upsert'"),
        (("insert", "", {}), "source must be"),
        (("insert", None, {}), "source must be"),
        (("insert", "s.t", {"a": 1}), "column 'a' has a int"),
        (("insert", "s.t", {"a": b"x"}), "column 'a' has a bytes"),
        (("insert", "s.t", {1: "x"}), "names must be non-empty strings"),
        (("insert", "s.t", {"": "x"}), "names must be non-empty strings"),
        (("insert", "s.t", [("a", "x")]), "row must be a mapping"),
        (("insert", "s.t", {"a": "\ud800"}), "not valid Unicode"),
    ],
)
def test_bad_input_is_refused(args, match):
    with pytest.raises(ProcessingError, match=match):
        canonical.entry_v1(*args)


def test_leaf_hash_requires_bytes():
    with pytest.raises(ProcessingError, match="must be bytes"):
        canonical.leaf_hash_of_entry("text")  # type: ignore[arg-type]


@given(row=st.dictionaries(
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=6),
    st.none() | st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12),
    max_size=6))
def test_template_from_utf8_bytes_equals_entry_v1(row):
    template = canonical.entry_template("update", "s.t", list(row))
    raw = [None if row[c] is None else row[c].encode() for c in template.columns]
    assert template.encode(raw) == canonical.entry_v1("update", "s.t", row)
    assert canonical.ObjectTemplate(list(row)).encode(raw).decode() == canonical.key_json(row)
