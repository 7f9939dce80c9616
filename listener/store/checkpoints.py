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
and nothing is signed: publishing would show two different logs under one origin. So does an
origin that another log has or had, one the key's memory says was retired, and a memory that
cannot be read. The writer records a refusal on the log's row for `status`
(record_refusal) and goes on appending; only a new origin (`log set-origin`) or the lost
leaves coming back end it.

At every attempt, the key's memory of each origin the log retired is marked retired: a database
restored from before the retirement (whose merkle.retired_origins does not know it) cannot have
the key sign the retired origin again.
"""

from __future__ import annotations

import hashlib
import logging
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

log = logging.getLogger("listener.run")


@dataclass(frozen=True)
class Published:
    size: int
    root: bytes
    note: str


class SigningRefused(ProcessingError):
    """Nothing is signed: the tree does not extend what was published under the log's origin, or
    the origin may not be signed (another log's, retired), or the key's memory cannot be read.
    `published_size`: the size known to have been published under the origin, if any."""

    def __init__(self, message: str, published_size: int | None = None, *, origin: str | None = None,
                 way_out: bool = False):
        super().__init__(message)
        self.published_size, self.origin, self.way_out = published_size, origin, way_out


def latest(conn: psycopg.Connection, log_id: int, origin: str) -> Published | None:
    row = conn.execute(
        "SELECT tree_size, root, note FROM merkle.checkpoints WHERE log_id = %s AND origin = %s "
        "ORDER BY tree_size DESC LIMIT 1",
        (log_id, origin),
    ).fetchone()
    return None if row is None else Published(row[0], bytes(row[1]), row[2])


def state_file_name(origin: str) -> str:
    """origin-<the origin, %-escaped>.json, or digest-sha256-<hex>.json when that would be too
    long. The dash keeps both apart from an earlier version's <log>.json: a log's name has none."""
    name = quote(origin, safe="")
    if len(name) > 200:
        return f"digest-sha256-{hashlib.sha256(origin.encode()).hexdigest()}.json"
    return f"origin-{name}.json"


class StateFile:
    """The signer's memory of the last checkpoint it published under one origin:
    {"origin", "size", "root"[, "retired": true]} in DIR/origin-<escaped origin>.json.

    Versions before origins could change kept it per log, in DIR/<log>.json, without the origin:
    that memory is of the log's first origin, and is read for it until this one is written."""

    def __init__(self, directory: Path, origin: str, log_name: str, first_origin: str):
        self.path = directory / state_file_name(origin)
        self.origin = origin
        self.legacy = directory / f"{log_name}.json" if origin == first_origin else None
        self.read_from = self.path

    def load(self) -> dict | None:
        """The memory as stored; None if the key never signed under this origin."""
        for path in (self.path, self.legacy):
            if path is None:
                continue
            try:
                doc = orjson.loads(path.read_bytes())
                if not isinstance(doc, dict) or doc.get("origin", self.origin) != self.origin:
                    raise ValueError(f"it is not of origin {self.origin!r}")
                if "size" in doc:
                    int(doc["size"]), bytes.fromhex(doc["root"])
                self.read_from = path
                return doc
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SigningRefused(
                    f"refusing to sign: cannot read the key's memory of origin {self.origin!r} from {path} ({exc}); "
                    "restore the file or, if you are sure the database holds everything ever published, delete it"
                ) from None
        return None

    def read(self) -> tuple[int, bytes] | None:
        """(size, root) last published under this origin; SigningRefused if the origin is retired."""
        doc = self.load()
        if doc is not None and doc.get("retired"):
            raise SigningRefused(
                f"refusing to sign: this key has retired origin {self.origin!r} (per {self.read_from}): the log went "
                "on under a later origin, and this database is from before that (restored from a backup?). Give "
                "the log a new origin with `merkle-listener log set-origin`, one it never had",
                doc.get("size"))
        return None if doc is None or "size" not in doc else (int(doc["size"]), bytes.fromhex(doc["root"]))

    def write(self, size: int | None, root: bytes | None, *, retired: bool = False) -> None:
        doc = {"origin": self.origin}
        if size is not None:
            doc.update(size=size, root=root.hex())
        if retired:
            doc["retired"] = True
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(doc))
        os.replace(tmp, self.path)

    def retire(self) -> int | None:
        """Mark the memory retired (made if the key never signed under this origin); returns the
        size it remembers. An unreadable memory is left as it is, for the operator."""
        try:
            doc = self.load()
        except SigningRefused:
            return None
        size = doc.get("size") if doc is not None else None
        if doc is None or not doc.get("retired"):
            self.write(size, bytes.fromhex(doc["root"]) if size is not None else None, retired=True)
        return size


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
            "different logs under one origin (a split view)", old_size, way_out=True)
    try:
        proof = merkle.consistency_proof(reader, old_size, size) if old_size else []
        merkle.verify_consistency(old_size, size, proof, old_root, root)
    except ProofVerificationError:
        raise SigningRefused(
            f"refusing to sign: the log does not extend {published} (its first {old_size} leaves are not those "
            "signed). Signing would show two different logs under one origin (a split view): the database was "
            "restored or altered", old_size, way_out=True) from None


def _check_origin_is_this_logs(conn: psycopg.Connection, log_id: int, log_name: str, origin: str) -> None:
    """An origin names one log: the same key signing two logs under it would show two histories.
    (`log create` and `log set-origin` refuse a taken origin; an earlier version did not, and a
    log that shared one keeps it after the other left it: it is retired for both.)"""
    other = conn.execute(
        "SELECT format('log %%s has', name) FROM merkle.logs WHERE origin = %(o)s AND log_id <> %(l)s "
        "UNION ALL SELECT format('log %%s%%s retired', log_name, CASE WHEN log_id IS NULL THEN ' (dropped since)' END) "
        "  FROM merkle.retired_origins WHERE origin = %(o)s AND log_id IS DISTINCT FROM %(l)s LIMIT 1",
        {"o": origin, "l": log_id}).fetchone()
    if other is not None:
        raise SigningRefused(
            f"refusing to sign: {other[0]} origin {origin!r} too, and one origin names one log; give log {log_name} "
            f"another origin with `merkle-listener log set-origin {log_name} NEW_ORIGIN`")


def publish(conn: psycopg.Connection, log_name: str, signer: Signer, state_dir: Path | None) -> Checkpoint | None:
    """Sign and store a checkpoint of the log's current tree under its current origin; None if it
    is already published.

    Runs its own transaction (the connection must not be in one). Raises SigningRefused,
    signing nothing (see above); a signature clears a recorded refusal.
    """
    retired: list[tuple[str, int | None]] = []
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT log_id, tree_size, root, origin, signing_refused IS NOT NULL FROM merkle.logs WHERE name = %s "
                "FOR UPDATE", (log_name,)
            ).fetchone()
            if row is None:
                raise ProcessingError(f"log {log_name!r} was dropped while the listener ran")
            log_id, size, root, origin, was_refused = row[0], row[1], bytes(row[2]), row[3], row[4]
            # Read after the lock, in a statement of its own: one that waited for a `log set-origin`
            # would see the retired origins as they were before it.
            retired = conn.execute("SELECT origin, published_size FROM merkle.retired_origins WHERE log_id = %s "
                                   "ORDER BY retired_at", (log_id,)).fetchall()
            first_origin = retired[0][0] if retired else origin
            last = latest(conn, log_id, origin)
            if last is not None and last.size == size and last.root == root:
                return None
            state = StateFile(state_dir, origin, log_name, first_origin) if state_dir is not None else None
            reader = TileNodeReader(conn, log_id)
            try:
                _check_origin_is_this_logs(conn, log_id, log_name, origin)
                remembered = state.read() if state is not None else None
                if last is not None:
                    check_extends(reader, "merkle.checkpoints", origin, last.size, last.root, size, root)
                if remembered is not None:
                    check_extends(reader, f"this key (per {state.read_from})", origin, remembered[0], remembered[1],
                                  size, root)
            except SigningRefused as exc:
                published = max(last.size if last else 0, exc.published_size or 0) if last or exc.published_size else None
                message = str(exc)
                if exc.way_out:
                    message += f"; {WAY_OUT.format(log=log_name, origin=origin, size=published)}"
                raise SigningRefused(message, published, origin=origin) from None
            cp = Checkpoint(origin, size, root)
            note = signer.sign(cp.body())
            conn.execute(
                "INSERT INTO merkle.checkpoints (log_id, origin, tree_size, root, note, key_name) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (log_id, origin, size, root, note, signer.name),
            )
            if was_refused:
                conn.execute("UPDATE merkle.logs SET signing_refused = NULL, signing_refused_at = NULL, "
                             "signing_refused_size = NULL WHERE log_id = %s", (log_id,))
            payload = orjson.dumps({"log": log_name, "size": size, "root": b64(root)}).decode()
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))
        # Published at COMMIT; remembered outside the database only now (a crash before this line
        # leaves the older memory, which the table's row still covers).
        if state is not None:
            state.write(size, root)
        return cp
    finally:
        if state_dir is not None and retired:
            _remember_retirements(conn, state_dir, log_name, retired)


def _remember_retirements(conn: psycopg.Connection, state_dir: Path, log_name: str,
                          retired: list[tuple[str, int | None]]) -> None:
    """Mark the key's memory of each origin the log retired, at every attempt (a listener may
    have stopped before it could): a database restored from before a retirement cannot have the
    origin signed again. The size the key published under one goes to merkle.retired_origins,
    where `status` shows it as the size its verifiers are to be told. Never raises: it runs
    after the attempt, whose signature or refusal is what the writer must learn of."""
    for origin, known in retired:
        memory = StateFile(state_dir, origin, log_name, retired[0][0])
        try:
            remembered = memory.retire()
            if remembered is not None and (known is None or remembered > known):
                with conn.transaction():
                    conn.execute("UPDATE merkle.retired_origins SET published_size = greatest(published_size, %s) "
                                 "WHERE origin = %s AND log_id = (SELECT log_id FROM merkle.logs WHERE name = %s)",
                                 (remembered, origin, log_name))
        except (OSError, psycopg.Error) as exc:
            if memory.path not in _unmarked:  # once per process: this runs every interval
                _unmarked.add(memory.path)
                log.error("cannot mark the key's memory of a retired origin; tried again at every checkpoint",
                          extra={"log": log_name, "origin": origin, "memory": str(memory.path),
                                 "error": str(exc).strip()})


# The memories of retired origins that could not be marked, each reported once.
_unmarked: set[Path] = set()


def record_refusal(conn: psycopg.Connection, log_name: str, exc: SigningRefused) -> None:
    """Keep the refusal on the log's row, for `status` and `log set-origin`, unless the log has
    another origin by now (then the refusal is of one retired meanwhile)."""
    with conn.transaction():
        conn.execute(
            "UPDATE merkle.logs SET signing_refused = %(r)s, signing_refused_at = coalesce(signing_refused_at, now()), "
            "       signing_refused_size = greatest(signing_refused_size, %(s)s) "
            "WHERE name = %(n)s AND origin = %(o)s AND signing_refused IS DISTINCT FROM %(r)s",
            {"r": str(exc), "s": exc.published_size, "n": log_name, "o": exc.origin})
