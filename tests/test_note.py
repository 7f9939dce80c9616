"""C2SP signed notes: the published known answer, an independent Ed25519 implementation
(PyNaCl, libsodium), key formats and tampering."""

from __future__ import annotations

import base64

import nacl.signing
import pytest

from listener.checkpoint import Checkpoint, open_checkpoint, parse_body
from listener.errors import ConfigurationError, ProofVerificationError
from listener.note import Signer, Verifier, open_note

# Known answer of the C2SP signed-note / sumdb note documentation (shared/testdata/rfc6962/README.md).
VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
SIG_LINE = "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
SIGNED = TEXT + "\n" + SIG_LINE + "\n"


def test_known_answer_verifies():
    note = open_note(SIGNED, [Verifier.parse(VKEY)])
    assert note.text == TEXT and note.verified_by == ("PeterNeumann",)


def test_known_answer_signs_byte_for_byte():
    signer = Signer.parse(SKEY)
    assert str(signer.verifier) == VKEY
    assert str(signer) == SKEY
    assert signer.sign(TEXT) == SIGNED  # Ed25519 is deterministic


def test_independent_ed25519_agrees():
    """libsodium (PyNaCl) checks our signature, and signs what we verify."""
    signer = Signer.generate("example.com/log")
    signed = signer.sign("example.com/log\n5\n" + base64.b64encode(bytes(32)).decode() + "\n")
    text, sig_line = signed.split("\n\n")
    blob = base64.b64decode(sig_line.split(" ")[2])
    nacl.signing.VerifyKey(signer.verifier.public).verify(text.encode() + b"\n", blob[4:])

    sk = nacl.signing.SigningKey(signer.seed)
    sig = sk.sign(b"hello\n").signature
    line = "\u2014 example.com/log " + base64.b64encode(blob[:4] + sig).decode()
    assert open_note("hello\n\n" + line + "\n", [signer.verifier]).verified_by == ("example.com/log",)
    assert bytes(sk.verify_key) == signer.verifier.public


@pytest.mark.parametrize("mutate", [
    lambda s: s.replace("cryptography", "cryptographY"),
    lambda s: s.replace("x08go", "x08gp"),
])
def test_tampered_note_fails(mutate):
    with pytest.raises(ProofVerificationError):
        open_note(mutate(SIGNED), [Verifier.parse(VKEY)])


def test_unknown_key_is_not_enough():
    other = Signer.generate("PeterNeumann").verifier  # same name, other key
    with pytest.raises(ProofVerificationError, match="no signature by a known key"):
        open_note(SIGNED, [other])


@pytest.mark.parametrize("bad", [
    "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong hash
    "PeterNeumann+c74f20a3+ApJc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong algorithm byte
    "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    "PeterNeumann+c74f20a3",
])
def test_bad_verifier_keys_refused(bad):
    with pytest.raises(ConfigurationError):
        Verifier.parse(bad)


def test_checkpoint_round_trip():
    signer = Signer.generate("log.example")
    cp = Checkpoint("log.example/audit", 10_000_000, bytes(range(32)))
    assert cp.body() == "log.example/audit\n10000000\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
    got, _ = open_checkpoint(signer.sign(cp.body()), [signer.verifier], origin="log.example/audit")
    assert got == cp
    with pytest.raises(ProofVerificationError, match="origin"):
        open_checkpoint(signer.sign(cp.body()), [signer.verifier], origin="other")


@pytest.mark.parametrize("body", ["o\n01\nAAAA\n", "o\n1\n", "o\n-1\n" + "A" * 43 + "=\n", "\n1\n" + "A" * 43 + "=\n"])
def test_bad_checkpoint_bodies(body):
    with pytest.raises(ProofVerificationError):
        parse_body(body)


def test_keygen_writes_a_private_file_and_prints_the_verifier(tmp_path):
    import os
    import stat

    from tests.helpers import cli

    r = cli("keygen", "example.com/audit", "--out", str(tmp_path / "audit.key"))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "audit.key").st_mode) == 0o600
    signer = Signer.parse((tmp_path / "audit.key").read_text())
    assert r.stdout.strip() == str(signer.verifier) and signer.name == "example.com/audit"
    again = cli("keygen", "example.com/audit", "--out", str(tmp_path / "audit.key"))
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert Signer.parse((tmp_path / "audit.key").read_text()) == signer
