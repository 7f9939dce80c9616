"""Publishing signed checkpoints into merkle.checkpoints, refusing any split view.

publish() runs in its OWN transaction on the writer's connection, right after a batch
committed (not inside the batch): signing never lengthens the batch transaction, and a
checkpoint only ever names a tree whose leaves and tiles are already durable. It locks the log's
row (as a batch does), so the (tree_size, root) it signs is the one the tiles hold.

Before signing it checks that the new tree extends every checkpoint published before:

  * the latest row of merkle.checkpoints under the log's origin, and
  * the signer's own memory of what it published under that origin (a small file per origin
    beside the key, written after COMMIT), which survives a database restored from a backup —
    the table does not.

"Extends" means: a consistency proof from the published (size, root) to the current tree,
built from the stored tiles, verifies (RFC 9162 §2.1.4). Anything else raises SigningRefused
and nothing is signed: publishing would show two different logs under one origin. The
refusal is recorded on the log's row for `status`; only a new origin (`log set-origin`) or the
lost leaves coming back end it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import orjson
import psycopg

from listener import merkle
from listener.checkpoint import Checkpoint
from listener.errors import ProcessingError, ProofVerificationError
from listener.note import Signer
from listener.proofs import b64
from listener.store.tiles import TileNodeReader

NOTIFY_CHANNEL = "merkle_checkpoint"


@dataclass(frozen=True)
class Published:
    size: int
    root: bytes
    note: str


class SigningRefused(ProcessingError):
    """The tree does not extend a checkpoint published under the log's origin: nothing is signed."""


def latest(conn: psycopg.Connection, log_id: int, origin: str) -> Published | None:
    row = conn.execute(
        "SELECT tree_size, root, note FROM merkle.checkpoints WHERE log_id = %s AND origin = %s "
        "ORDER BY tree_size DESC LIMIT 1",
        (log_id, origin),
    ).fetchone()
    return None if row is None else Published(row[0], bytes(row[1]), row[2])


def state_file_name(origin: str) -> str:
    """The origin itself, %-escaped to one file name; a digest when that would be too long."""
    name = quote(origin, safe="")
    return f"{name}.json" if len(name) <= 200 else f"sha256-{hashlib.sha256(origin.encode()).hexdigest()}.json"


class StateFile:
    """The signer's memory of the last checkpoint it published under one origin:
    {"origin", "size", "root"} in DIR/<escaped origin>.json.

    Versions before origins could change kept it per log, in DIR/<log>.json, without the origin:
    that memory is of the log's first origin, and is read for it until this one is written."""

    def __init__(self, directory: Path, origin: str, log_name: str, first_origin: str):
        self.path = directory / state_file_name(origin)
        self.origin = origin
        self.legacy = directory / f"{log_name}.json" if origin == first_origin else None
        self.read_from = self.path

    def read(self) -> tuple[int, bytes] | None:
        for path in (self.path, self.legacy):
            if path is None:
                continue
            try:
                doc = orjson.loads(path.read_bytes())
                if doc.get("origin", self.origin) != self.origin:
                    raise ValueError(f"it is for origin {doc['origin']!r}")
                remembered = int(doc["size"]), bytes.fromhex(doc["root"])
                self.read_from = path
                return remembered
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ProcessingError(
                    f"cannot read the last published checkpoint of origin {self.origin!r} from {path} ({exc}); "
                    "restore the file or, if you are sure the database holds everything ever published, delete it"
                ) from None
        return None

    def write(self, size: int, root: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"origin": self.origin, "size": size, "root": root.hex()}))
        os.replace(tmp, self.path)


# What ends a refusal; `status` repeats it (listener/status.py).
WAY_OUT = ("appending goes on unsigned. Either bring the lost leaves back (the database as it was, e.g. the "
           "primary it was copied from), or give the log a new origin with `merkle-listener log set-origin "
           "{log} NEW_ORIGIN` and tell its verifiers that {origin!r} ended at size {size}")


def check_extends(reader: merkle.NodeReader, what: str, origin: str, old_size: int, old_root: bytes, size: int,
                  root: bytes) -> None:
    """Raise SigningRefused unless the tree (size, root) extends (old_size, old_root).

    The message names only what was published, not the growing tree: it stays the same from one
    attempt to the next, so a refusal is reported once."""
    published = f"the checkpoint of origin {origin!r} at size {old_size} (root {b64(old_root)}) that {what} published"
    if old_size > size:
        raise SigningRefused(
            f"refusing to sign: the log has fewer leaves than {published}; the database went back in time "
            "(restored from a backup, or a standby promoted before it had them?). Signing now would show two "
            "different logs under one origin (a split view)"
        )
    try:
        proof = merkle.consistency_proof(reader, old_size, size) if old_size else []
        merkle.verify_consistency(old_size, size, proof, old_root, root)
    except ProofVerificationError:
        raise SigningRefused(
            f"refusing to sign: the log does not extend {published} (its first {old_size} leaves are not those "
            "signed). Signing would "
            "show two different logs under one origin (a split view): the database was restored or altered"
        ) from None


def publish(conn: psycopg.Connection, log_name: str, signer: Signer, state_dir: Path | None) -> Checkpoint | None:
    """Sign and store a checkpoint of the log's current tree under its current origin; None if it
    is already published.

    Runs its own transaction (the connection must not be in one). Raises SigningRefused,
    signing nothing, if the tree does not extend what was published before under that origin;
    the refusal is then recorded on the log's row (record_refusal), and cleared by a signature.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT log_id, tree_size, root, origin, signing_refused IS NOT NULL, "
            "       coalesce((SELECT origin FROM merkle.retired_origins r WHERE r.log_id = l.log_id "
            "                  ORDER BY retired_at LIMIT 1), origin) "
            "  FROM merkle.logs l WHERE name = %s FOR UPDATE", (log_name,)
        ).fetchone()
        if row is None:
            raise ProcessingError(f"log {log_name!r} was dropped while the listener ran")
        log_id, size, root, origin, was_refused, first_origin = row[0], row[1], bytes(row[2]), row[3], row[4], row[5]
        state = StateFile(state_dir, origin, log_name, first_origin) if state_dir is not None else None
        last = latest(conn, log_id, origin)
        if last is not None and last.size == size and last.root == root:
            return None
        reader = TileNodeReader(conn, log_id)
        remembered = state.read() if state is not None else None
        try:
            if last is not None:
                check_extends(reader, "merkle.checkpoints", origin, last.size, last.root, size, root)
            if remembered is not None:
                check_extends(reader, f"this key (per {state.read_from})", origin, remembered[0], remembered[1], size,
                              root)
        except SigningRefused as exc:
            published = max(last.size if last else 0, remembered[0] if remembered else 0)
            raise SigningRefused(f"{exc}; {WAY_OUT.format(log=log_name, origin=origin, size=published)}") from None
        cp = Checkpoint(origin, size, root)
        note = signer.sign(cp.body())
        conn.execute(
            "INSERT INTO merkle.checkpoints (log_id, origin, tree_size, root, note, key_name) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (log_id, origin, size, root, note, signer.name),
        )
        if was_refused:
            conn.execute("UPDATE merkle.logs SET signing_refused = NULL, signing_refused_at = NULL WHERE log_id = %s",
                         (log_id,))
        payload = orjson.dumps({"log": log_name, "size": size, "root": b64(root)}).decode()
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))
    # Published at COMMIT; remembered outside the database only now (a crash before this line
    # leaves the older memory, which the table's row still covers).
    if state is not None:
        state.write(size, root)
    return cp


def record_refusal(conn: psycopg.Connection, log_name: str, reason: str) -> bool:
    """Keep the refusal on the log's row, for `status`; True if it is news (the first, or another reason)."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE merkle.logs SET signing_refused = %(r)s, signing_refused_at = coalesce(signing_refused_at, now()) "
            "WHERE name = %(n)s AND signing_refused IS DISTINCT FROM %(r)s RETURNING 1",
            {"r": reason, "n": log_name}).fetchone()
    return row is not None
