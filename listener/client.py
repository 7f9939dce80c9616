"""A Python client of the merkle-listener HTTP API that trusts nothing it is sent.

    from listener.client import Client
    from listener.note import Verifier

    c = Client("http://127.0.0.1:8080", "audit", Verifier.parse(VKEY))
    cp = c.checkpoint()                    # signed note verified with VKEY, origin checked
    c.verify_inclusion(index=42, checkpoint=cp)   # proof fetched, checked against cp.root
    c.verify_consistency(old_cp, cp)       # cp's tree extends old_cp's
    c.lookup("public.orders", {"id": "7"}, checkpoint=cp)   # every leaf of that row, each proven
    c.entry(42)                            # the entry recomputed from the current row

Every method that returns something verifiable verifies it first and raises
ProofVerificationError when it does not; HTTP errors raise ClientError with the server's
JSON message. Standard library only (http.client), one connection kept alive.
"""

from __future__ import annotations

import http.client
import urllib.parse
from dataclasses import dataclass

import orjson

from listener import merkle
from listener.checkpoint import Checkpoint, open_checkpoint
from listener.errors import MerkleListenerError, ProofVerificationError
from listener.hashtext import unb64
from listener.note import Verifier


class ClientError(MerkleListenerError):
    """The server answered with an error status (its message is included) or not at all."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


@dataclass(frozen=True)
class VerifiedInclusion:
    index: int
    tree_size: int
    leaf_hash: bytes
    root: bytes


class Client:
    def __init__(self, base_url: str, log: str, verifier: Verifier | None = None, *, origin: str | None = None,
                 timeout: float = 10.0):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ClientError(0, f"base URL must be http(s)://host[:port][/prefix], got {base_url!r}")
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname, url.port
        self._prefix = url.path.rstrip("/")
        self.log, self.verifier, self.origin, self.timeout = log, verifier, origin, timeout
        self._conn: http.client.HTTPConnection | None = None
        self.last_note: str | None = None  # the signed note text of the last checkpoint()
        self.last_headers: dict[str, str] = {}  # response headers of the last request

    # -- transport ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
        """One request on the kept-alive connection (reopened once if the server closed it)."""
        for attempt in (0, 1):
            if self._conn is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._conn = cls(self._host, self._port, timeout=self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self._conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = self._conn.getresponse()
                body = resp.read()
                self.last_headers = dict(resp.getheaders())
                return resp.status, body, resp.getheader("Content-Type", "")
            except (http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt:
                    raise ClientError(0, f"cannot reach {self._host}:{self._port}: {exc}") from None
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> dict:
        status, body, _ = self.request("GET", path)
        return self._json(status, body)

    def _json(self, status: int, body: bytes):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ClientError(status, f"not JSON: {body[:200]!r}") from None
        if status >= 400:
            raise ClientError(status, doc.get("error", body.decode(errors="replace")) if isinstance(doc, dict) else str(doc))
        return doc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the log ---------------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """The latest checkpoint, its signature verified (requires a verifier)."""
        if self.verifier is None:
            raise ClientError(0, "give the log's verifier key to check checkpoints")
        status, body, _ = self.request("GET", f"/{self.log}/checkpoint")
        if status != 200:
            self._json(status, body)
        cp, _ = open_checkpoint(body, [self.verifier], self.origin)
        self.last_note = body.decode()
        return cp

    def tile(self, level: int, index: int, width: int = merkle.TILE_WIDTH) -> bytes:
        """Raw C2SP tile bytes (level -1: an entry bundle)."""
        status, body, _ = self.request("GET", f"/{self.log}/{merkle.tile_path(level, index, width)}")
        if status != 200:
            self._json(status, body)
        return body

    def inclusion_proof(self, *, index: int | None = None, leaf_hash: bytes | None = None, size: int | None = None) -> dict:
        q = {"index": index, "leaf_hash": leaf_hash.hex() if leaf_hash else None, "size": size}
        query = urllib.parse.urlencode({k: v for k, v in q.items() if v is not None})
        return self.get_json(f"/v1/logs/{self.log}/proof/inclusion?{query}")

    def verify_inclusion(self, *, index: int | None = None, leaf_hash: bytes | None = None,
                         checkpoint: Checkpoint | None = None) -> VerifiedInclusion:
        """Fetch and check an inclusion proof against the checkpoint's root (default: the
        latest verified checkpoint)."""
        cp = checkpoint or self.checkpoint()
        doc = self.inclusion_proof(index=index, leaf_hash=leaf_hash, size=cp.size)
        return self._check_inclusion(doc, cp, index, leaf_hash)

    def _check_inclusion(self, doc: dict, cp: Checkpoint, index: int | None, leaf_hash: bytes | None) -> VerifiedInclusion:
        got_index, got_hash = doc.get("leaf_index"), unb64(doc.get("leaf_hash"), "leaf_hash")
        if (index is not None and got_index != index) or (leaf_hash is not None and got_hash != leaf_hash):
            raise ProofVerificationError("the server proved another leaf than the one asked for")
        if doc.get("tree_size") != cp.size:
            raise ProofVerificationError(f"proof for size {doc.get('tree_size')}, want the checkpoint's {cp.size}")
        proof = [unb64(h, "proof hash") for h in doc.get("proof") or []]
        if not isinstance(got_index, int):
            raise ProofVerificationError("leaf_index is not an integer")
        merkle.verify_inclusion(got_hash, got_index, cp.size, proof, cp.root)
        return VerifiedInclusion(got_index, cp.size, got_hash, cp.root)

    def verify_consistency(self, old: Checkpoint, new: Checkpoint) -> None:
        """Check that `new`'s tree extends `old`'s; raises ProofVerificationError if not."""
        if new.origin != old.origin:
            raise ProofVerificationError(f"the checkpoints are of two logs: origin {old.origin!r}, then {new.origin!r}")
        if new.size < old.size:
            raise ProofVerificationError(f"the log shrank: checkpoint size {new.size} after {old.size}")
        doc = self.get_json(f"/v1/logs/{self.log}/proof/consistency?first={old.size}&second={new.size}")
        proof = [unb64(h, "proof hash") for h in doc.get("proof") or []]
        merkle.verify_consistency(old.size, new.size, proof, old.root, new.root)

    def entry(self, index: int) -> dict:
        """The leaf, its source and key, and the entry recomputed from the current row."""
        return self.get_json(f"/v1/logs/{self.log}/entries/{index}")

    def lookup(self, source: str, key: dict, *, checkpoint: Checkpoint | None = None) -> list[VerifiedInclusion]:
        """Every leaf of the row with `key` in `source`, each inclusion verified."""
        cp = checkpoint or self.checkpoint()
        query = urllib.parse.urlencode({"source": source, "key": orjson.dumps(key).decode(), "size": cp.size})
        doc = self.get_json(f"/v1/logs/{self.log}/lookup?{query}")
        return [self._check_inclusion(leaf, cp, None, None) for leaf in doc.get("leaves", [])]

    def verify_remote(self, document: dict) -> dict:
        """POST /v1/verify: the server's verdict (use the local methods to trust nothing)."""
        status, body, _ = self.request("POST", "/v1/verify", orjson.dumps(document))
        return self._json(status, body)
