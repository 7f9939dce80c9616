"""A large source transaction's changes in a temporary file, from its receipt until its leaves
are appended.

A transaction is appended only whole, after its Commit (the exactly-once rule), so its changes
are held until then. Past SPILL_BYTES of them, the stream moves them to an unnamed temporary
file (tempfile.TemporaryFile: in $TMPDIR, gone when closed or when the process ends) and the
batch that appends them reads them back in chunks: the listener's memory stays bounded, its
disk holds about the size of the pgoutput messages.

A record is <i4 relation><u4 length><payload>: the index of the Relation in effect when the
change was sent, in the file's own list, or NO_RELATION (a change before its Relation message,
which prepare refuses) or TRUNCATE (the payload is then a u4 index into the file's truncates).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator

from listener.sources import pgoutput as po

# A transaction's changes held in memory (payload bytes plus CHANGE_OVERHEAD each) before it
# moves them to a temporary file.
SPILL_BYTES = 32 * 1024 * 1024
# What one held change costs besides its payload: its tuple, its list slot, the bytes header.
CHANGE_OVERHEAD = 120
READ_BLOCK = 1024 * 1024

NO_RELATION = -1
TRUNCATE = -2
_HEADER = struct.Struct("<iI")
_INDEX = struct.Struct("<I")

Change = tuple[po.Relation | None, "bytes | po.Truncate"]


def held_bytes(changes: list[Change], start: int = 0) -> int:
    """What changes[start:] cost in memory, as SPILL_BYTES counts it."""
    return sum(len(p) if type(p) is bytes else 64 for _, p in changes[start:]) + CHANGE_OVERHEAD * (len(changes) - start)


class SpilledChanges:
    """The first changes of one transaction, in order, in a temporary file. Written by the
    stream while the transaction arrives, then read (any number of times: a batch that failed
    is retried) by the writer's thread; never both at once."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="merkle-listener-txn-")  # noqa: SIM115 - as long as the transaction
        self._relations: list[po.Relation] = []
        self._relation_index: dict[int, int] = {}  # id(Relation) -> index (the list keeps them alive)
        self._truncates: list[po.Truncate] = []
        self.count = 0
        self.size = 0  # bytes in the file
        self.table_oids: set[int] = set()

    def write(self, changes: list[Change]) -> None:
        parts = []
        pack = _HEADER.pack
        index = self._relation_index
        oids = self.table_oids
        for relation, payload in changes:
            if type(payload) is po.Truncate:
                parts.append(pack(TRUNCATE, 4) + _INDEX.pack(len(self._truncates)))
                self._truncates.append(payload)
                oids.update(payload.relation_oids)
                continue
            if relation is None:
                i = NO_RELATION
                oids.add(po.relation_oid_of_change(payload))
            else:
                i = index.get(id(relation))
                if i is None:
                    i = index[id(relation)] = len(self._relations)
                    self._relations.append(relation)
                    oids.add(relation.oid)
            parts.append(pack(i, len(payload)))
            parts.append(payload)
        data = b"".join(parts)
        self._file.write(data)
        # Now, not at the read-back: a buffered file keeps the last bytes of a write that the
        # disk took all but those of, and a full disk must fail the stream, not the batch.
        self._file.flush()
        self.count += len(changes)
        self.size += len(data)

    def chunks(self, size: int, max_bytes: int | None = None) -> Iterator[list[Change]]:
        """The changes in order, `size` at a time, or fewer where their records reach
        `max_bytes` (wide rows: a chunk read back then stays about that large)."""
        f = self._file
        f.seek(0)  # write() flushed every record
        relations, truncates, unpack = self._relations, self._truncates, _HEADER.unpack_from
        data, pos, left = b"", 0, self.size
        out: list[Change] = []
        taken = 0  # bytes of records in out
        limit = max_bytes if max_bytes is not None else float("inf")
        while left or pos < len(data):
            if len(data) - pos < _HEADER.size:
                data, pos, left = _refill(f, data, pos, _HEADER.size, left)
            i, length = unpack(data, pos)
            end = pos + _HEADER.size + length
            if end > len(data):
                data, pos, left = _refill(f, data, pos, end - pos, left)
                end = pos + _HEADER.size + length
            payload = data[pos + _HEADER.size:end]
            taken += end - pos
            pos = end
            if i >= 0:
                out.append((relations[i], payload))
            elif i == TRUNCATE:
                out.append((None, truncates[_INDEX.unpack(payload)[0]]))
            else:
                out.append((None, payload))
            if len(out) == size or taken >= limit:
                yield out
                out, taken = [], 0
        if out:
            yield out

    def close(self) -> None:
        self._file.close()


def _refill(f, data: bytes, pos: int, need: int, left: int) -> tuple[bytes, int, int]:
    """data[pos:] followed by enough of the file for `need` bytes from pos."""
    more = f.read(max(READ_BLOCK, need - (len(data) - pos)))
    if len(data) - pos + len(more) < need:
        raise OSError(f"transaction spill file ends early ({left} bytes expected)")
    return data[pos:] + more, 0, left - len(more)
