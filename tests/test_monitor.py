"""`merkle-listener monitor` against a log server that misbehaves on purpose: one signing two
histories, one garbling its proofs (a proxy), one lagging behind (a replica), one serving
another origin. The server here holds the log's real key and computes honest or forged answers
from trees in memory; the monitor is the real command."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from listener import merkle
from listener.checkpoint import Checkpoint
from listener.note import Signer
from tests.helpers import cli

ORIGIN = "example.com/audit"


def leaves(n: int, fork: str = "") -> list[bytes]:
    return [hashlib.sha256(f"{fork}leaf {i}".encode()).digest() for i in range(n)]


class FakeLog:
    """Serves /audit/checkpoint (a note signed by `signer` for `size` leaves of `tree`, under
    `origin`) and consistency proofs from `tree`; `garble` proofs answered so far are corrupted."""

    def __init__(self, signer: Signer):
        self.signer, self.origin = signer, ORIGIN
        self.tree, self.size, self.garble, self.root_override = merkle.MemoryTree(leaves(40)), 40, 0, None
        log = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/audit/checkpoint":
                    root = log.root_override or log.tree.root(log.size)
                    self._answer(200, log.signer.sign(Checkpoint(log.origin, log.size, root).body()).encode(), "text/plain")
                elif url.path == "/v1/logs/audit/proof/consistency":
                    q = {k: int(v[0]) for k, v in urllib.parse.parse_qs(url.query).items()}
                    if q["second"] > log.tree.size:
                        return self._answer(400, b'{"error": "size beyond the tree"}', "application/json")
                    proof = [base64.b64encode(h).decode() for h in log.tree.consistency_proof(q["first"], q["second"])]
                    if log.garble > 0:
                        log.garble -= 1
                        proof = ["not base64!"]
                    self._answer(200, json.dumps({"type": "consistency", "proof": proof}).encode(), "application/json")
                else:
                    self._answer(404, b'{"error": "no such path"}', "application/json")

            def _answer(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def note(self, size: int, tree: merkle.MemoryTree | None = None) -> str:
        return self.signer.sign(Checkpoint(self.origin, size, (tree or self.tree).root(size)).body())


@pytest.fixture
def fake():
    log = FakeLog(Signer.generate(ORIGIN))
    yield log
    log.server.shutdown()
    log.server.server_close()


def run(fake: FakeLog, state, *extra: str, once: bool = True):
    args = ["monitor", "audit", "--url", fake.url, "--vkey", str(fake.signer.verifier), "--state", str(state),
            "--interval", "0.05", *extra]
    return cli(*args, *(["--once"] if once else []), timeout=60)


def test_a_split_view_is_kept_as_evidence_and_ends_the_monitor(fake, tmp_path):
    state = tmp_path / "seen"
    state.write_text(fake.note(40, merkle.MemoryTree(leaves(40, "fork "))))
    for once in (True, False):
        out = run(fake, state, once=once)
        assert out.returncode == 1 and "two different signed roots for size 40: a split view" in out.stderr, out
        assert "OK" not in out.stdout
        evidence = (tmp_path / "seen.evidence").read_text()
        assert state.read_text() in evidence and fake.note(40) in evidence and evidence in out.stderr


def test_a_fork_the_server_cannot_prove_is_reported_with_both_notes_but_no_evidence_file(fake, tmp_path):
    state = tmp_path / "seen"
    kept = fake.note(30, merkle.MemoryTree(leaves(30, "fork ")))
    state.write_text(kept)
    out = run(fake, state)
    assert out.returncode == 1 and "did not prove that the checkpoint of size 40 extends the one of size 30" in out.stderr
    assert kept in out.stderr and fake.note(40) in out.stderr, out.stderr
    assert not (tmp_path / "seen.evidence").exists() and state.read_text() == kept


def test_a_garbled_proof_holds_the_monitor_until_the_server_proves_the_checkpoint(fake, tmp_path):
    """Found by review: a proxy garbling one proof stopped every monitor for good, with
    'evidence' against an honest log. Now the checkpoint stays in doubt, and nothing is OK,
    until the server proves it."""
    state = tmp_path / "seen"
    state.write_text(fake.note(30))
    fake.garble = 3
    out = run(fake, state)
    assert out.returncode == 1 and "proof hash is not valid base64" in out.stderr, out.stderr
    # Without --once: in doubt while garbled, then resolved and followed; a split view at the
    # end stops it, so that the test ends.
    fake.garble = 3
    done = threading.Timer(3.0, lambda: setattr(fake, "root_override", hashlib.sha256(b"other").digest()))
    done.start()
    out = run(fake, state, once=False)
    done.join()
    assert out.returncode == 1, out
    said = out.stderr
    assert said.index("did not prove") < said.index("resolved: the server proved the checkpoint of size 40") \
        < said.index("a split view"), said
    assert out.stdout.startswith(f"OK: {ORIGIN} size 40 (+10 leaves, consistent)\n"), out.stdout


def test_a_replica_that_lags_is_not_a_fork(fake, tmp_path):
    """Found by review: a checkpoint older than the last verified one was called a fork."""
    state = tmp_path / "seen"
    ahead = merkle.MemoryTree(leaves(50))
    state.write_text(fake.note(50, ahead))
    out = run(fake, state)  # the replica has 40 leaves: it cannot prove 40 -> 50
    assert out.returncode == 2 and "older than the last verified (50)" in out.stderr and "a replica that lags" \
        in out.stderr, out.stderr
    fake.tree = ahead  # it has the leaves, and its checkpoint lags
    out = run(fake, state)
    assert out.returncode == 0 and "behind: the server serves the checkpoint of size 40" in out.stderr, out
    assert state.read_text() == fake.note(50, ahead) and not (tmp_path / "seen.evidence").exists()
    fake.tree = merkle.MemoryTree(leaves(50, "fork "))  # an older checkpoint of another history
    fake.size = 40
    out = run(fake, state)
    assert out.returncode == 1 and "did not prove" in out.stderr, out.stderr


def test_another_origin_ends_the_monitor_with_or_without_once(fake, tmp_path):
    state = tmp_path / "seen"
    state.write_text(fake.note(30))
    fake.origin = "example.com/other"  # the state's origin is followed
    out = run(fake, state, once=False)
    assert out.returncode == 1 and "retired the old origin" in out.stderr, out
    state.unlink()
    fake.origin = ORIGIN
    for pinned in (("--origin", "example.com/other"),):  # --origin is followed from the first checkpoint
        out = run(fake, state, *pinned, once=False)
        assert out.returncode == 1 and "retired the old origin" in out.stderr, out
        assert not (tmp_path / "seen.evidence").exists()
