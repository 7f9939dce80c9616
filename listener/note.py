"""C2SP signed-note with Ed25519: keys in the vkey/skey text formats, signing and opening notes.

A signed note is UTF-8 text ending in a newline, a blank line, then signature lines:

    <text ending in \\n>
    \\n
    — <key name> base64(key hash (4 bytes) || Ed25519 signature (64 bytes))\\n

The key hash is the first 4 bytes of SHA-256(<name> || "\\n" || 0x01 || public key), the
0x01 byte naming Ed25519. Keys as text:

    verifier key  <name>+<key hash, 8 hex digits>+base64(0x01 || 32-byte public key)
    signer key    PRIVATE+KEY+<name>+<key hash>+base64(0x01 || 32-byte private seed)

This module knows nothing about checkpoints (listener.checkpoint) or the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from listener.errors import ConfigurationError, ProofVerificationError

ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash and a space start every signature line
_PRIVATE = "PRIVATE+KEY+"


def check_key_name(name: str) -> None:
    """Key names are non-empty UTF-8 without '+' or whitespace (they end at a space in a
    signature line and at '+' in a key)."""
    if not name or "+" in name or any(ch.isspace() for ch in name) or any(ord(ch) < 0x20 for ch in name):
        raise ConfigurationError(f"key name {name!r} is not valid: use a non-empty name without '+' or spaces")


def key_hash(name: str, public: bytes) -> int:
    """The 32-bit key hash: SHA-256(name || "\\n" || 0x01 || public key)[:4], big-endian."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()
    return struct.unpack(">I", digest[:4])[0]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Verifier:
    """One Ed25519 verifier key of a signed note."""

    name: str
    hash: int
    public: bytes

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """Parse "<name>+<hash>+<base64>". Raises ConfigurationError on a malformed key or a
        hash that does not match the name and public key."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise ConfigurationError(f"verifier key {vkey!r} is not <name>+<hash>+<base64 key>")
        name, hash_hex, b64 = parts
        check_key_name(name)
        raw = _decode_key(b64, "verifier key")
        if len(hash_hex) != 8:
            raise ConfigurationError(f"verifier key {vkey!r}: the key hash must be 8 hex digits")
        try:
            h = int(hash_hex, 16)
        except ValueError:
            raise ConfigurationError(f"verifier key {vkey!r}: the key hash must be 8 hex digits") from None
        if h != key_hash(name, raw):
            raise ConfigurationError(f"verifier key {vkey!r}: its key hash does not match its name and key")
        return cls(name, h, raw)

    def __str__(self) -> str:
        return f"{self.name}+{self.hash:08x}+{base64.b64encode(bytes([ALG_ED25519]) + self.public).decode()}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """One Ed25519 signer key (keep it secret: the file is written 0600)."""

    name: str
    seed: bytes

    @classmethod
    def generate(cls, name: str) -> Signer:
        check_key_name(name)
        seed = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return cls(name, seed)

    @classmethod
    def parse(cls, skey: str) -> Signer:
        """Parse "PRIVATE+KEY+<name>+<hash>+<base64>"; the hash must match the derived public key."""
        text = skey.strip()
        if not text.startswith(_PRIVATE):
            raise ConfigurationError("not a signer key: it must start with PRIVATE+KEY+ (see `merkle-listener keygen`)")
        parts = text[len(_PRIVATE):].split("+", 2)
        if len(parts) != 3:
            raise ConfigurationError("signer key is not PRIVATE+KEY+<name>+<hash>+<base64 key>")
        name, hash_hex, b64 = parts
        check_key_name(name)
        signer = cls(name, _decode_key(b64, "signer key"))
        if hash_hex != f"{signer.verifier.hash:08x}":
            raise ConfigurationError("signer key: its key hash does not match its name and key; the file is damaged")
        return signer

    @property
    def verifier(self) -> Verifier:
        public = _raw_public(Ed25519PrivateKey.from_private_bytes(self.seed).public_key())
        return Verifier(self.name, key_hash(self.name, public), public)

    def __str__(self) -> str:
        b64 = base64.b64encode(bytes([ALG_ED25519]) + self.seed).decode()
        return f"{_PRIVATE}{self.name}+{self.verifier.hash:08x}+{b64}"

    def sign(self, text: str) -> str:
        """The signed note of `text` with this key's one signature line."""
        check_note_text(text)
        sig = Ed25519PrivateKey.from_private_bytes(self.seed).sign(text.encode())
        blob = struct.pack(">I", self.verifier.hash) + sig
        return f"{text}\n{SIG_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"


def _decode_key(b64: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{what}: the key is not valid base64") from None
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise ConfigurationError(f"{what}: only Ed25519 keys (algorithm byte 0x01, 32 bytes) are supported")
    return raw[1:]


def check_note_text(text: str) -> None:
    """Note text is non-empty, ends in a newline and holds no control character but newlines."""
    if not text.endswith("\n"):
        raise ConfigurationError("note text must end with a newline")
    if any((ord(ch) < 0x20 and ch != "\n") or ord(ch) == 0x7F for ch in text):
        raise ConfigurationError("note text must not contain control characters other than newline")


@dataclass(frozen=True)
class Note:
    """An opened note: its text and the names of the known keys whose signatures verified."""

    text: str
    verified_by: tuple[str, ...]


def open_note(signed: str | bytes, verifiers: list[Verifier]) -> Note:
    """Split a signed note and verify its signatures against `verifiers`.

    Succeeds when at least one signature by a known key verifies; signatures by unknown keys
    are ignored (C2SP signed-note). Raises ProofVerificationError, saying why, otherwise:
    malformed note, a bad signature by a known key, or no signature by a known key.
    """
    if isinstance(signed, bytes):
        try:
            signed = signed.decode("utf-8")
        except UnicodeDecodeError:
            raise ProofVerificationError("the signed note is not valid UTF-8") from None
    split = signed.rfind("\n\n")
    if split < 0 or not signed.endswith("\n"):
        raise ProofVerificationError("malformed signed note: no blank line before the signature lines")
    text, sig_block = signed[: split + 1], signed[split + 2 :]
    try:
        check_note_text(text)
    except ConfigurationError as exc:
        raise ProofVerificationError(f"malformed signed note: {exc}") from None
    by_key = {(v.name, v.hash): v for v in verifiers}
    good: list[str] = []
    for line in sig_block.splitlines():
        if not line.startswith(SIG_PREFIX):
            raise ProofVerificationError(f"malformed signature line {line!r}: it must start with '— '")
        try:
            name, b64 = line[len(SIG_PREFIX):].split(" ")
            blob = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error):
            raise ProofVerificationError(f"malformed signature line {line!r}") from None
        if len(blob) < 5:
            raise ProofVerificationError(f"malformed signature line {line!r}: signature too short")
        verifier = by_key.get((name, struct.unpack(">I", blob[:4])[0]))
        if verifier is None:
            continue
        if not verifier.verify(text.encode(), blob[4:]):
            raise ProofVerificationError(f"the signature by {name} does not verify: the note was altered or forged")
        good.append(name)
    if not good:
        known = ", ".join(sorted({v.name for v in verifiers})) or "none given"
        raise ProofVerificationError(f"the note carries no signature by a known key (known: {known})")
    return Note(text, tuple(good))
