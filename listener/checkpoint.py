"""C2SP tlog-checkpoint bodies: what a signed checkpoint says, and parsing one back.

    <origin>\\n
    <tree size, decimal>\\n
    <root hash, base64>\\n
    [extension lines]

The body is the text of a C2SP signed note (listener.note). Signing and storing happen in
listener.store.checkpoints; this module is pure.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from listener.errors import ProofVerificationError
from listener.hashtext import unb64
from listener.note import Note, Verifier, open_note

_SIZE = re.compile(r"^(0|[1-9][0-9]{0,19})$")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        """The note text (RFC 9162 root as standard base64)."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "".join(line + "\n" for line in lines)


def parse_body(text: str) -> Checkpoint:
    """Parse a checkpoint body. Raises ProofVerificationError when it is not one."""
    if not text.endswith("\n"):
        raise ProofVerificationError("checkpoint body must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise ProofVerificationError("checkpoint body needs an origin, a size and a root line")
    origin, size, root = lines[:3]
    if not origin:
        raise ProofVerificationError("checkpoint origin line is empty")
    if not _SIZE.match(size) or int(size) >= 1 << 63:
        raise ProofVerificationError(f"checkpoint size line {size!r} is not a decimal tree size")
    raw = unb64(root, "checkpoint root line")
    if any(not line for line in lines[3:]):
        raise ProofVerificationError("checkpoint extension lines must not be empty")
    return Checkpoint(origin, int(size), raw, tuple(lines[3:]))


def open_checkpoint(signed: str | bytes, verifiers: list[Verifier], origin: str | None = None) -> tuple[Checkpoint, Note]:
    """Verify a signed checkpoint and parse it. With `origin`, the checkpoint must name it
    (a log's key signs only its own origin's checkpoints). Raises ProofVerificationError."""
    note = open_note(signed, verifiers)
    cp = parse_body(note.text)
    if origin is not None and cp.origin != origin:
        raise ProofVerificationError(f"checkpoint is for origin {cp.origin!r}, want {origin!r}")
    return cp, note
