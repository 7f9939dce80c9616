"""`merkle-listener monitor`: follow a log's signed checkpoints and prove the log only grows.

Each poll: fetch the checkpoint, verify its signature with the verifier key, and verify a
consistency proof (RFC 9162 §2.1.4) from the last verified checkpoint to it. The last verified
checkpoint (its signed note) can be kept in a state file, so a monitor run daily with --once
proves the log never rewrote history between runs. An inconsistency is reported loudly on
stderr with both signed notes as evidence (also kept beside the state file) and ends the
monitor with exit status 1; a log that cannot be read is reported, and ends a --once run with
exit status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from listener.checkpoint import Checkpoint, open_checkpoint
from listener.client import Client, ClientError
from listener.errors import ConfigurationError, ProofVerificationError
from listener.note import Verifier


def _load(state: Path | None, verifier: Verifier) -> tuple[Checkpoint | None, str | None]:
    if state is None or not state.exists():
        return None, None
    try:
        text = state.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read monitor state {state}: {exc.strerror}") from None
    try:
        cp, _ = open_checkpoint(text, [verifier])
    except ProofVerificationError as exc:
        # Name the file, and exit 2, not 1: the server's log is not what is wrong.
        raise ConfigurationError(f"monitor state {state} is not a checkpoint this key signed: {exc}") from None
    return cp, text


def _save(path: Path | None, text: str) -> None:
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(text)
            tmp.replace(path)
        except OSError as exc:
            raise ConfigurationError(f"cannot write monitor state {path}: {exc.strerror}") from None


class Inconsistent(ProofVerificationError):
    """A checkpoint that verified, signed by the log's key, that does not extend the last one:
    the two signed notes together are the evidence."""

    def __init__(self, message: str, note: str):
        super().__init__(message)
        self.note = note


def check_once(client: Client, last: Checkpoint | None) -> Checkpoint:
    """The current checkpoint, verified and proven to extend `last`. Raises
    ProofVerificationError on any inconsistency, ClientError when the log cannot be read."""
    cp = client.checkpoint()
    try:
        _extends(client, last, cp)
    except ProofVerificationError as exc:
        raise Inconsistent(str(exc), client.last_note) from None
    return cp


def _extends(client: Client, last: Checkpoint | None, cp: Checkpoint) -> None:
    if last is not None:
        if cp.origin != last.origin:
            # Not a proof of anything: the log's operator retired the origin (`log set-origin`,
            # after the database went back behind a checkpoint). Following on is the verifier's call.
            raise ProofVerificationError(
                f"origin changed from {last.origin!r} to {cp.origin!r}: the log's operator retired the old origin "
                "(after its database went back behind a published checkpoint?); ask them why, keep the last "
                "checkpoint, and follow the new origin only deliberately, with a new monitor state")
        if cp.size == last.size and cp.root != last.root:
            raise ProofVerificationError(f"two different signed roots for size {cp.size}: a split view")
        client.verify_consistency(last, cp)


def monitor(url: str, log: str, verifier: Verifier, *, once: bool = False, state: Path | None = None,
            origin: str | None = None, interval: float = 5.0, out=sys.stdout, err=sys.stderr) -> int:
    last, note = _load(state, verifier)
    if state is not None and not state.absolute().parent.is_dir():
        # Found out before the first poll, not after the first checkpoint was verified.
        raise ConfigurationError(f"cannot write monitor state {state}: {state.parent} is not a directory")
    if origin is not None and last is not None and last.origin != origin:
        raise ConfigurationError(f"monitor state {state} follows origin {last.origin!r}, not --origin {origin!r}")
    with Client(url, log, verifier, origin=origin) as client:
        while True:
            try:
                cp = check_once(client, last)
            except Inconsistent as exc:
                # Proof that the log's key signed two histories: the monitor's whole purpose. It
                # stops here, so that no later checkpoint reads as if all were well.
                print(f"INCONSISTENT: log {log!r} at {url}: {exc}", file=err, flush=True)
                evidence = (f"last verified checkpoint (size {last.size}):\n{note}\n"
                            f"the checkpoint the server then signed, which does not extend it:\n{exc.note}")
                print(f"keep both signed notes as evidence:\n{evidence}", file=err, flush=True)
                if state is not None:
                    kept = state.with_name(state.name + ".evidence")
                    _save(kept, evidence)
                    print(f"(kept in {kept})", file=err, flush=True)
                return 1
            except ProofVerificationError as exc:
                # A checkpoint that does not verify (a bad signature, another origin than
                # --origin): not signed by the log's key, so no evidence against it.
                print(f"INCONSISTENT: log {log!r} at {url}: {exc}", file=err, flush=True)
                if once:
                    return 1
            except ClientError as exc:
                print(f"cannot read log {log!r} at {url}: {exc}", file=err, flush=True)
                if once:
                    return 2
            else:
                grew = "" if last is None else f" (+{cp.size - last.size} leaves, consistent)"
                print(f"OK: {cp.origin} size {cp.size}{grew}", file=out, flush=True)
                last, note = cp, client.last_note
                _save(state, note)
                if once:
                    return 0
            time.sleep(interval)
