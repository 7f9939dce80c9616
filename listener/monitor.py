"""`merkle-listener monitor`: follow a log's signed checkpoints and prove the log only grows.

Each poll: fetch the checkpoint, verify its signature with the verifier key, and verify a
consistency proof (RFC 9162 §2.1.4) from the last verified checkpoint to it. The last verified
checkpoint (its signed note) can be kept in a state file, so a monitor run daily with --once
proves the log never rewrote history between runs. Any failure is reported loudly on stderr;
with --once the exit status is 1 for an inconsistency, 2 when the log cannot be read.
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
        # Name the file: the message alone reads as if the server's checkpoint were bad.
        raise ProofVerificationError(f"monitor state {state}: {exc}") from None
    return cp, text


def _save(state: Path | None, note: str) -> None:
    if state is not None:
        tmp = state.with_name(state.name + ".tmp")
        try:
            tmp.write_text(note)
            tmp.replace(state)
        except OSError as exc:
            raise ConfigurationError(f"cannot write monitor state {state}: {exc.strerror}") from None


def check_once(client: Client, last: Checkpoint | None) -> Checkpoint:
    """The current checkpoint, verified and proven to extend `last`. Raises
    ProofVerificationError on any inconsistency, ClientError when the log cannot be read."""
    cp = client.checkpoint()
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
    return cp


def monitor(url: str, log: str, verifier: Verifier, *, once: bool = False, state: Path | None = None,
            interval: float = 5.0, out=sys.stdout, err=sys.stderr) -> int:
    last, note = _load(state, verifier)
    if state is not None and not state.absolute().parent.is_dir():
        # Found out before the first poll, not after the first checkpoint was verified.
        raise ConfigurationError(f"cannot write monitor state {state}: {state.parent} is not a directory")
    with Client(url, log, verifier) as client:
        while True:
            try:
                cp = check_once(client, last)
            except ProofVerificationError as exc:
                print(f"INCONSISTENT: log {log!r} at {url}: {exc}", file=err, flush=True)
                if last is not None:
                    print(f"last verified checkpoint: size {last.size}; keep it as evidence:\n{note}", file=err, flush=True)
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
