"""Publishing signed checkpoints into merkle.checkpoints, refusing any split view.

publish() runs in its OWN transaction on the writer's connection, right after a batch
committed (not inside the batch): signing never lengthens the batch transaction, and a
checkpoint only ever names a tree whose leaves and tiles are already durable. It locks the log's
row (as a batch does), so the (tree_size, root) it signs is the one the tiles hold.

Before signing it checks that the new tree extends every checkpoint published before:

  * the latest row of merkle.checkpoints, and
  * the signer's own memory of what it published (a small file per log beside the key, written
    after COMMIT), which survives a database restored from a backup — the table does not.

"Extends" means: a consistency proof from the published (size, root) to the current tree,
built from the stored tiles, verifies (RFC 9162 §2.1.4). Anything else raises
ProcessingError and nothing is signed: publishing would show two different logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


def latest(conn: psycopg.Connection, log_id: int) -> Published | None:
    row = conn.execute(
        "SELECT tree_size, root, note FROM merkle.checkpoints WHERE log_id = %s ORDER BY tree_size DESC LIMIT 1",
        (log_id,),
    ).fetchone()
    return None if row is None else Published(row[0], bytes(row[1]), row[2])


class StateFile:
    """The signer's memory of the last checkpoint it published for one log: {"size", "root"}."""

    def __init__(self, directory: Path, log_name: str):
        self.path = directory / f"{log_name}.json"

    def read(self) -> tuple[int, bytes] | None:
        try:
            doc = orjson.loads(self.path.read_bytes())
            return int(doc["size"]), bytes.fromhex(doc["root"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProcessingError(
                f"cannot read the last published checkpoint from {self.path} ({exc}); restore the file or, "
                "if you are sure the database holds everything ever published, delete it"
            ) from None

    def write(self, size: int, root: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"size": size, "root": root.hex()}))
        os.replace(tmp, self.path)


def check_extends(reader: merkle.NodeReader, what: str, old_size: int, old_root: bytes, size: int, root: bytes) -> None:
    """Raise ProcessingError unless the tree (size, root) extends (old_size, old_root)."""
    if old_size > size:
        raise ProcessingError(
            f"refusing to sign: the log has {size} leaves but {what} already published a checkpoint at size "
            f"{old_size}; the database went back in time (restored from a backup?). Signing now would show two "
            "different logs (a split view): restore the lost leaves, or retire this key and start a new log"
        )
    try:
        proof = merkle.consistency_proof(reader, old_size, size) if old_size else []
        merkle.verify_consistency(old_size, size, proof, old_root, root)
    except ProofVerificationError as exc:
        raise ProcessingError(
            f"refusing to sign: the tree of size {size} (root {b64(root)}) does not extend the checkpoint of size "
            f"{old_size} (root {b64(old_root)}) that {what} published ({exc}). Signing would show two different "
            "logs (a split view): the database was restored or altered; investigate before signing again"
        ) from None


def publish(conn: psycopg.Connection, log_name: str, origin: str, signer: Signer, state_dir: Path | None) -> Checkpoint | None:
    """Sign and store a checkpoint of the log's current tree; None if it is already published.

    Runs its own transaction (the connection must not be in one). Raises ProcessingError,
    signing nothing, if the tree does not extend what was published before.
    """
    state = StateFile(state_dir, log_name) if state_dir is not None else None
    with conn.transaction():
        row = conn.execute(
            "SELECT log_id, tree_size, root FROM merkle.logs WHERE name = %s FOR UPDATE", (log_name,)
        ).fetchone()
        if row is None:
            raise ProcessingError(f"log {log_name!r} was dropped while the listener ran")
        log_id, size, root = row[0], row[1], bytes(row[2])
        last = latest(conn, log_id)
        if last is not None and last.size == size and last.root == root:
            return None
        reader = TileNodeReader(conn, log_id)
        if last is not None:
            check_extends(reader, "merkle.checkpoints", last.size, last.root, size, root)
        remembered = state.read() if state is not None else None
        if remembered is not None:
            check_extends(reader, f"this key (per {state.path})", remembered[0], remembered[1], size, root)
        cp = Checkpoint(origin, size, root)
        note = signer.sign(cp.body())
        conn.execute(
            "INSERT INTO merkle.checkpoints (log_id, tree_size, root, note, key_name) VALUES (%s, %s, %s, %s, %s)",
            (log_id, size, root, note, signer.name),
        )
        payload = orjson.dumps({"log": log_name, "size": size, "root": b64(root)}).decode()
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))
    # Published at COMMIT; remembered outside the database only now (a crash before this line
    # leaves the older memory, which the table's row still covers).
    if state is not None:
        state.write(size, root)
    return cp
