"""Pure decoder of the logical replication stream: CopyData frames and pgoutput messages.

No I/O: listener/sources/replication.py reads CopyData payloads off the socket and hands
them here. Two layers, as the PostgreSQL protocol docs describe them:

    CopyData 'w' XLogData       (start_lsn, wal_end, send_time, pgoutput message)
             'k' keepalive      (wal_end, send_time, reply_requested)
    pgoutput (proto_version 1)  B Begin · C Commit · R Relation · I/U/D Insert/Update/Delete
                                T Truncate · Y Type · O Origin · M Message

("Logical Replication Message Formats" and "Streaming Replication Protocol" in the
PostgreSQL manual.) Tuple values arrive as the type's text output ('t'), NULL ('n') or
"unchanged TOASTed value" ('u', no data): UNCHANGED marks the latter so that it can never
be hashed as if it were a value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from listener.errors import ProcessingError

# Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000


class _Unchanged:
    """An unchanged TOASTed value: the server did not send it."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()
Value = str | None | _Unchanged


# -- replication protocol frames --------------------------------------------------------


class XLogData(NamedTuple):
    start_lsn: int
    wal_end: int
    send_time: int
    payload: bytes


class Keepalive(NamedTuple):
    wal_end: int
    send_time: int
    reply_requested: bool


_XLOG = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!Qq?")
_STATUS = struct.Struct("!cQQQq?")


def decode_copy_data(data: bytes) -> XLogData | Keepalive:
    """One CopyData payload of a START_REPLICATION stream."""
    kind = data[:1]
    if kind == b"w":
        start, end, ts = _XLOG.unpack_from(data, 1)
        return XLogData(start, end, ts, bytes(data[1 + _XLOG.size:]))
    if kind == b"k":
        end, ts, reply = _KEEPALIVE.unpack_from(data, 1)
        return Keepalive(end, ts, reply)
    raise ProcessingError(f"replication stream: unexpected CopyData message {kind!r}; is this a logical slot?")


def standby_status(written: int, flushed: int, applied: int, now_us: int, reply: bool = False) -> bytes:
    """A Standby Status Update ('r'); now_us is microseconds since the Unix epoch."""
    return _STATUS.pack(b"r", written, flushed, applied, now_us - PG_EPOCH_OFFSET_US, reply)


def lsn_to_int(lsn: str) -> int:
    """'16/B374D848' -> int. Inverse of int_to_lsn."""
    hi, _, lo = lsn.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# -- pgoutput messages ------------------------------------------------------------------


class Begin(NamedTuple):
    final_lsn: int  # the commit record's LSN
    commit_time: int
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: int
    end_lsn: int  # end of the commit record: the transaction's position in the stream
    commit_time: int


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    part_of_key: bool


@dataclass(frozen=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


class Insert(NamedTuple):
    relation_oid: int
    new: tuple[Value, ...]


class Update(NamedTuple):
    relation_oid: int
    old: tuple[Value, ...] | None  # the old key ('K') or whole old row ('O'), if sent
    old_kind: str | None
    new: tuple[Value, ...]


class Delete(NamedTuple):
    relation_oid: int
    old: tuple[Value, ...]
    old_kind: str


@dataclass(frozen=True)
class Truncate:
    options: int  # bit 1: CASCADE, bit 2: RESTART IDENTITY
    relation_oids: tuple[int, ...]


@dataclass(frozen=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True)
class TypeInfo:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True)
class Message:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgoutputMessage = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Origin | TypeInfo | Message


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: struct.Struct):
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values

    def byte(self) -> str:
        ch = self.buf[self.pos:self.pos + 1]
        if not ch:
            raise IndexError("end of message")
        self.pos += 1
        return chr(ch[0])

    def cstring(self) -> str:
        end = self.buf.index(b"\x00", self.pos)
        text = self.buf[self.pos:end].decode("utf-8")
        self.pos = end + 1
        return text

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise IndexError("end of message")
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data


_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_COLUMN_TAIL = struct.Struct("!Ii")


_unpack_i16 = _I16.unpack_from
_unpack_i32 = _I32.unpack_from
_unpack_u32 = _U32.unpack_from


def _tuple_at(buf: bytes, pos: int, raw: bool = False) -> tuple[tuple[Value, ...], int]:
    """TupleData at buf[pos:]: (values, position after it). The consumer reads Inserts with
    insert_new_values instead; this serves Updates, Deletes and `decode`.
    With raw, text values stay UTF-8 bytes."""
    (n,) = _unpack_i16(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    for _ in range(n):
        kind = buf[pos]
        if kind == 116:  # 't': text output of the value
            (length,) = _unpack_i32(buf, pos + 1)
            pos += 5
            end = pos + length
            if end > len(buf):
                raise IndexError("end of message")
            append(buf[pos:end] if raw else buf[pos:end].decode("utf-8"))
            pos = end
        elif kind == 110:  # 'n': NULL
            append(None)
            pos += 1
        elif kind == 117:  # 'u': unchanged TOASTed value, not sent
            append(UNCHANGED)
            pos += 1
        else:
            # 'b' (binary) only comes with the `binary` option, which the listener never sets.
            raise ProcessingError(f"pgoutput: tuple column kind {chr(kind)!r} is not supported (start without 'binary')")
    return tuple(values), pos


def insert_new_values(payload: bytes) -> list:
    """The new tuple of an Insert message ('I', relation OID, 'N', TupleData) as raw values:
    UTF-8 bytes of the text output, None or UNCHANGED. The consumer's hot path: no message
    object, and one length check at the end instead of one per column (a truncated value
    leaves the position past the end). Raises ProcessingError for a malformed message."""
    try:
        if payload[5] != 78:
            raise ValueError("Insert without its new tuple")
        (n,) = _unpack_i16(payload, 6)
        pos = 8
        values: list = []
        append = values.append
        for _ in range(n):
            kind = payload[pos]
            if kind == 116:  # 't'
                end = pos + 5 + _unpack_i32(payload, pos + 1)[0]
                append(payload[pos + 5:end])
                pos = end
            elif kind == 110:  # 'n'
                append(None)
                pos += 1
            elif kind == 117:  # 'u': an UPDATE sent as an INSERT (row filters) may carry it
                append(UNCHANGED)
                pos += 1
            else:
                # 'b' (binary) only comes with the `binary` option, which the listener never sets.
                raise ValueError(f"tuple column kind {chr(kind)!r} is not supported (start without 'binary')")
        if pos != len(payload):
            raise ValueError("length does not match its columns")
    except (struct.error, IndexError, ValueError) as exc:
        raise ProcessingError(f"pgoutput: truncated or malformed Insert message: {exc}") from exc
    return values


def relation_oid_of_change(payload: bytes) -> int:
    """The relation OID of an Insert, Update or Delete message (bytes 1..4)."""
    return _unpack_u32(payload, 1)[0]


def _tuple(r: _Reader, raw: bool) -> tuple[Value, ...]:
    values, r.pos = _tuple_at(r.buf, r.pos, raw)
    return values


def decode(payload: bytes, raw: bool = False) -> PgoutputMessage:
    """Decode one pgoutput message (proto_version 1, the payload of an XLogData frame).
    With raw, tuple values are the UTF-8 bytes of the text output instead of str.

    Raises ProcessingError for a truncated or unknown message: the stream cannot be trusted
    past it.
    """
    r = _Reader(payload)
    try:
        kind = r.byte()
        if kind == "B":
            return Begin(*r.unpack(_BEGIN))
        if kind == "C":
            return Commit(*r.unpack(_COMMIT))
        if kind == "R":
            (oid,) = r.unpack(_U32)
            namespace = r.cstring()
            name = r.cstring()
            identity = r.byte()
            (ncols,) = r.unpack(_I16)
            cols = []
            for _ in range(ncols):
                (flags,) = r.unpack(_U8)
                col_name = r.cstring()
                type_oid, typmod = r.unpack(_COLUMN_TAIL)
                cols.append(Column(col_name, type_oid, typmod, bool(flags & 1)))
            return Relation(oid, namespace, name, identity, tuple(cols))
        if kind == "I":
            (oid,) = r.unpack(_U32)
            if r.byte() != "N":
                raise ProcessingError("pgoutput: Insert without its new tuple")
            values = _tuple(r, raw)
            if r.pos != len(payload):
                raise ValueError("trailing bytes")
            return Insert(oid, values)
        if kind == "U":
            (oid,) = r.unpack(_U32)
            sub = r.byte()
            old = old_kind = None
            if sub in ("K", "O"):
                old_kind, old = sub, _tuple(r, raw)
                sub = r.byte()
            if sub != "N":
                raise ProcessingError("pgoutput: Update without its new tuple")
            return Update(oid, old, old_kind, _tuple(r, raw))
        if kind == "D":
            (oid,) = r.unpack(_U32)
            sub = r.byte()
            if sub not in ("K", "O"):
                raise ProcessingError("pgoutput: Delete without its old key or row")
            return Delete(oid, _tuple(r, raw), sub)
        if kind == "T":
            (n,) = r.unpack(_I32)
            (options,) = r.unpack(_U8)
            oids = tuple(r.unpack(_U32)[0] for _ in range(n))
            return Truncate(options, oids)
        if kind == "O":
            (lsn,) = r.unpack(_U64)
            return Origin(lsn, r.cstring())
        if kind == "Y":
            (oid,) = r.unpack(_U32)
            return TypeInfo(oid, r.cstring(), r.cstring())
        if kind == "M":
            (flags,) = r.unpack(_U8)
            (lsn,) = r.unpack(_U64)
            prefix = r.cstring()
            (length,) = r.unpack(_I32)
            return Message(bool(flags & 1), lsn, prefix, bytes(r.take(length)))
    except (struct.error, IndexError, ValueError) as exc:
        raise ProcessingError(f"pgoutput: truncated or malformed message {payload[:1]!r}: {exc}") from exc
    raise ProcessingError(
        f"pgoutput: unknown message type {kind!r}; start the stream with proto_version '1' "
        "(streaming of in-progress transactions is not used)"
    )
