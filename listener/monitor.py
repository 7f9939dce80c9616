"""`merkle-listener monitor`: follow a log's signed checkpoints and prove the log only grows.

Each poll: fetch the checkpoint, verify its signature with the verifier key, and verify a
consistency proof (RFC 9162 §2.1.4) between the last verified checkpoint and it. The last
verified checkpoint (its signed note) can be kept in a state file, so a monitor run daily with
--once proves the log never rewrote history between runs.

What a poll can find, and what the monitor does:
- a split view (two signed roots for one size): proof in itself that the log's key signed two
  histories. Both notes are printed, kept in STATE.evidence, and the monitor exits 1.
- a signed checkpoint the server does not prove consistent with the last one (a failed or
  malformed proof): printed with both notes; --once exits 1. Without --once the monitor asks
  again at every poll and says nothing is OK until the server proves it, since a garbled
  answer (a proxy) and a second history look alike until then.
- an older checkpoint that is consistent with the last (a lagging replica): said, and the last
  one is kept.
- another origin than the one followed: exits 1, with or without --once.
- a checkpoint that does not verify, or a log that cannot be read: said; --once exits 1 or 2.
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


class SplitView(ProofVerificationError):
    """Two signed roots for one size."""


class Unproven(ProofVerificationError):
    """A signed checkpoint the server did not prove consistent with the last verified one."""


class OtherOrigin(ProofVerificationError):
    """A checkpoint of another origin than the one followed."""


def _prove(client: Client, a: Checkpoint, b: Checkpoint) -> None:
    """That the smaller of two checkpoints is a prefix of the larger, by the server's proof."""
    older, newer = (a, b) if a.size <= b.size else (b, a)
    if older.size == newer.size:
        if older.root != newer.root:
            raise SplitView(f"two different signed roots for size {older.size}: a split view")
        return
    try:
        client.verify_consistency(older, newer)
    except ClientError as exc:
        if newer is b:
            raise
        # A server whose log is behind what was verified cannot prove up to it: a replica that
        # lags, as far as anyone can tell from here.
        raise ClientError(0, f"the server serves the checkpoint of size {b.size}, older than the last verified "
                             f"({a.size}), and cannot prove it a prefix of it (a replica that lags?): {exc}") from None
    except ProofVerificationError as exc:
        raise Unproven(f"the server did not prove that the checkpoint of size {newer.size} extends the one of size "
                       f"{older.size} ({exc}); unless it can, the log's key signed two histories") from None


def _check_origin(cp: Checkpoint, expected: str | None) -> None:
    if expected is not None and cp.origin != expected:
        # Not a proof of anything: the log's operator may have retired the origin (`log
        # set-origin`, after the database went back behind a checkpoint), or the URL names
        # another log. Following a new origin is the verifier's call, with a new state.
        raise OtherOrigin(
            f"the checkpoint is of origin {cp.origin!r}, not {expected!r}: the log's operator retired the old origin "
            "(after its database went back behind a published checkpoint?) or this is another log; ask them why, "
            "keep the last checkpoint, and follow the new origin only deliberately, with a new monitor state")


def monitor(url: str, log: str, verifier: Verifier, *, once: bool = False, state: Path | None = None,
            origin: str | None = None, interval: float = 5.0, out=sys.stdout, err=sys.stderr) -> int:
    last, note = _load(state, verifier)
    if state is not None and not state.absolute().parent.is_dir():
        # Found out before the first poll, not after the first checkpoint was verified.
        raise ConfigurationError(f"cannot write monitor state {state}: {state.parent} is not a directory")
    if origin is not None and last is not None and last.origin != origin:
        raise ConfigurationError(f"monitor state {state} follows origin {last.origin!r}, not --origin {origin!r}")

    def say(text: str) -> None:
        print(text, file=err, flush=True)

    def both_notes(other: str) -> str:
        return f"last verified checkpoint (size {last.size}):\n{note}\nthe checkpoint the server signed:\n{other}"

    suspect: tuple[Checkpoint, str] | None = None  # signed, and not proven consistent with `last`
    with Client(url, log, verifier) as client:
        while True:
            try:
                if suspect is not None:
                    fresh = suspect[1]
                    _prove(client, last, suspect[0])
                    say(f"resolved: the server proved the checkpoint of size {suspect[0].size} consistent with the "
                        "last verified one")
                    suspect = None
                cp = client.checkpoint()
                fresh = client.last_note
                _check_origin(cp, origin or (last.origin if last is not None else None))
                if last is not None:
                    _prove(client, last, cp)
            except SplitView as exc:
                # Both notes prove it to anyone: nothing the monitor sees later can undo it.
                evidence = both_notes(fresh)
                say(f"INCONSISTENT: log {log!r} at {url}: {exc}\nkeep both signed notes as evidence:\n{evidence}")
                if state is not None:
                    kept = state.with_name(state.name + ".evidence")
                    _save(kept, evidence)
                    say(f"(kept in {kept})")
                return 1
            except Unproven as exc:
                if suspect is None:
                    suspect = (cp, fresh)
                say(f"INCONSISTENT: log {log!r} at {url}: {exc}\n{both_notes(suspect[1])}")
                if once:
                    return 1
            except OtherOrigin as exc:
                say(f"INCONSISTENT: log {log!r} at {url}: {exc}")
                return 1
            except ProofVerificationError as exc:
                # Not signed by the log's key (or not a checkpoint): no evidence against the log.
                say(f"INCONSISTENT: log {log!r} at {url}: {exc}")
                if once:
                    return 1
            except ClientError as exc:
                say(f"cannot read log {log!r} at {url}: {exc}")
                if once:
                    return 2
            else:
                if last is not None and cp.size < last.size:
                    say(f"behind: the server serves the checkpoint of size {cp.size}, older than the last verified "
                        f"({last.size}) and consistent with it (a replica that lags?); keeping size {last.size}")
                else:
                    grew = "" if last is None else f" (+{cp.size - last.size} leaves, consistent)"
                    print(f"OK: {cp.origin} size {cp.size}{grew}", file=out, flush=True)
                    last, note = cp, fresh
                    _save(state, note)
                if once:
                    return 0
            time.sleep(interval)
