"""The HTTP API end to end, as a client sees it: signed checkpoints, byte-exact tlog-tiles,
proofs verified with the client library, entries, lookups, errors, health, the monitor."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse

import orjson
import psycopg
import pytest

from listener import canonical, merkle
from listener.checkpoint import Checkpoint, open_checkpoint
from listener.client import ClientError
from listener.errors import ProofVerificationError
from listener.runner import connect
from tests.helpers import cli
from tests.http_server import ORDERS, http_log  # noqa: F401  (fixture)

# The HTTP API over a log's rows: plain queries, alike on every version between the ends.
pytestmark = pytest.mark.oldest_and_newest


def leaf_hashes(dsn: str) -> list[bytes]:
    with psycopg.connect(dsn) as conn:
        return [bytes(r[0]) for r in conn.execute("SELECT leaf_hash FROM merkle.processed_log ORDER BY seq")]


def test_checkpoint_and_tiles_are_byte_exact(http_log):
    hashes = leaf_hashes(http_log.dsn)
    with http_log.client() as c:
        cp = c.checkpoint()
        assert cp.size == len(hashes) == ORDERS + 2
        assert cp.root == merkle.MemoryTree(hashes).root()
        assert c.tile(0, 0) == b"".join(hashes[:256])
        assert c.tile(0, 2, cp.size - 512) == b"".join(hashes[512:])
        assert c.tile(0, 2, 3) == b"".join(hashes[512:515])  # an older partial tile: a prefix
        tree = merkle.MemoryTree(hashes)
        assert c.tile(1, 0, 2) == tree.get_nodes([(8, 0), (8, 1)])[0] + tree.get_nodes([(8, 1)])[0]
        status, body, ctype = c.request("GET", "/audit/tile/0/000")
        assert (status, ctype) == (200, "application/octet-stream")
        # Entry bundles of canonical entries, each hashing to its leaf.
        bundle = c.tile(-1, 0)
        entries, pos = [], 0
        while pos < len(bundle):
            n = int.from_bytes(bundle[pos:pos + 2], "big")
            entries.append(bundle[pos + 2:pos + 2 + n])
            pos += 2 + n
        assert [canonical.leaf_hash_of_entry(e) for e in entries] == hashes[:256]
        assert orjson.loads(entries[1])["row"] == {"amount": "1.50", "customer": 'customer "1\n', "id": "1"}
        c.request("GET", "/audit/tile/0/000")
        assert c.last_headers["cache-control"] == "public, max-age=31536000, immutable"
        c.request("GET", "/audit/tile/0/002.p/3")
        assert c.last_headers["cache-control"] == "public, max-age=60"
        c.request("GET", "/audit/checkpoint")
        assert c.last_headers["content-type"].startswith("text/plain")
    # tlog-tiles: entry bundles SHOULD be compressed at the HTTP layer, for clients that accept it.
    import gzip
    import urllib.request

    asked = urllib.request.Request(http_log.url + "/audit/tile/entries/000", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(asked, timeout=30) as answer:
        assert answer.headers["Content-Encoding"] == "gzip" and answer.headers["Vary"] == "Accept-Encoding"
        compressed = answer.read()
    assert gzip.decompress(compressed) == bundle and len(compressed) < len(bundle) / 2
    for refused in ("gzip;q=0, identity", "identity", "*;q=0", "br"):
        asked = urllib.request.Request(http_log.url + "/audit/tile/entries/000", headers={"Accept-Encoding": refused})
        with urllib.request.urlopen(asked, timeout=30) as answer:
            assert "Content-Encoding" not in answer.headers and answer.read() == bundle, refused
    asked = urllib.request.Request(http_log.url + "/audit/tile/entries/000", headers={"Accept-Encoding": "br, *;q=0.5"})
    with urllib.request.urlopen(asked, timeout=30) as answer:
        assert answer.headers["Content-Encoding"] == "gzip"


def test_inclusion_and_consistency_proofs_verify(http_log):
    hashes = leaf_hashes(http_log.dsn)
    with http_log.client() as c:
        cp = c.checkpoint()
        for index in (0, 1, 255, 256, 511, cp.size - 1):
            got = c.verify_inclusion(index=index, checkpoint=cp)
            assert got.leaf_hash == hashes[index]
        assert c.verify_inclusion(leaf_hash=hashes[300], checkpoint=cp).index == 300
        old = Checkpoint(cp.origin, 100, merkle.MemoryTree(hashes[:100]).root())
        c.verify_consistency(old, cp)
        forged = Checkpoint(cp.origin, 100, hashlib.sha256(b"x").digest())
        with pytest.raises(merkle.ProofError):
            c.verify_consistency(forged, cp)
        doc = c.inclusion_proof(index=5, size=300)
        assert doc["tree_size"] == 300 and doc["signed"] is False
        assert base64.b64decode(doc["root"]) == merkle.MemoryTree(hashes[:300]).root()
        merkle.verify_inclusion(hashes[5], 5, 300, [base64.b64decode(h) for h in doc["proof"]],
                                merkle.MemoryTree(hashes[:300]).root())


def test_entries_and_lookup(http_log):
    with http_log.client() as c:
        e = c.entry(7)
        assert e["source"] == "public.orders" and e["op"] == "insert" and e["source_key"] == '{"id":"7"}'
        assert e["entry_matches_leaf"] is True
        assert canonical.leaf_hash_of_entry(e["entry"].encode()) == base64.b64decode(e["leaf_hash"])
        found = c.lookup("public.orders", {"id": "7"})
        assert [f.index for f in found] == [7]
        # notes is not append-only: after an UPDATE the recomputed entry no longer matches.
        with connect(http_log.dsn, autocommit=True) as conn:
            seq = conn.execute("SELECT seq FROM merkle.processed_log WHERE source_key = '{\"id\":\"2\"}' "
                               "AND source_id = (SELECT source_id FROM merkle.sources WHERE table_name = 'notes')").fetchone()[0]
            assert c.entry(seq)["entry_matches_leaf"] is True
            conn.execute("UPDATE notes SET body = 'changed' WHERE id = 2")
        e = c.entry(seq)
        assert e["entry_matches_leaf"] is False and "changed" in e["entry"]


def test_post_verify(http_log):
    with http_log.client() as c:
        doc = c.inclusion_proof(index=3)
        assert c.verify_remote(doc)["verified"] is True
        doc["leaf_index"] = 4
        verdict = c.verify_remote(doc)
        assert verdict["verified"] is False and "root" in verdict["reason"]
        e = c.entry(3)
        claim = {"type": "entry", "entry": e["entry"], **{k: v for k, v in c.inclusion_proof(index=3).items() if k != "type"}}
        assert c.verify_remote(claim)["verified"] is True
        claim["entry"] = e["entry"].replace("customer", "Customer")
        assert c.verify_remote(claim)["verified"] is False
        status, body, _ = c.request("POST", "/v1/verify", b"{not json")
        assert status == 400 and "error" in orjson.loads(body)


def test_an_entry_claim_with_two_different_entries_is_refused(http_log):
    """Found by review: with "entry" and "entry_base64" both given, one was verified and the
    other ignored, so a claim about another entry came back verified."""
    with http_log.client() as c:
        e = c.entry(5)
        proof = {k: v for k, v in c.inclusion_proof(index=5).items() if k != "type"}
        both = {"type": "entry", "entry": e["entry"], "entry_base64": e["entry_base64"], **proof}
        assert c.verify_remote(both)["verified"] is True  # an entry document's two forms, alike
        for forged in ({"entry_base64": base64.b64encode(b"other").decode()}, {"entry": "other"}):
            verdict = c.verify_remote({**both, **forged})
            assert verdict["verified"] is False and "two different entries" in verdict["reason"], verdict


def test_a_leaf_hash_in_unpadded_url_safe_base64_is_found(http_log):
    with http_log.client() as c:
        leaf_hash = c.inclusion_proof(index=6)["leaf_hash"]
        for form in (leaf_hash, base64.urlsafe_b64encode(base64.b64decode(leaf_hash)).decode().rstrip("="),
                     leaf_hash.rstrip("=")):
            status, body, _ = c.request("GET", "/v1/logs/audit/proof/inclusion?leaf_hash=" + urllib.parse.quote(form))
            assert status == 200 and orjson.loads(body)["leaf_index"] == 6, (form, body)


@pytest.mark.parametrize("path, status", [
    ("/v1/logs/audit/proof/inclusion?index=-1", 400),
    ("/v1/logs/audit/proof/inclusion?index=99999999", 400),
    ("/v1/logs/audit/proof/inclusion?index=1&leaf_hash=AA", 400),
    ("/v1/logs/audit/proof/inclusion?leaf_hash=" + "00" * 32, 404),
    ("/v1/logs/audit/proof/consistency?first=10&second=5", 400),
    ("/v1/logs/audit/proof/inclusion?index=0&size=0", 400),
    ("/readyz?max_age=" + urllib.parse.quote("\u0663"), 400),  # float() reads it as 3
    ("/readyz?max_age=1_000", 400),
    ("/v1/logs/audit/proof/inclusion?index=1&index=2", 400),  # which one was meant is not ours to guess
    ("/v1/logs/audit/lookup?source=public.orders&source=public.notes&key=" + urllib.parse.quote('{"id":"1"}'), 400),
    ("/v1/logs/nope/proof/inclusion?index=1", 404),
    ("/v1/logs/audit/entries/abc", 400),
    ("/v1/logs/audit/entries/100000", 404),
    ("/v1/logs/audit/lookup?source=public.orders&key=" + urllib.parse.quote("[1]"), 400),
    ("/v1/logs/audit/lookup?source=public.ord%00ers&key=" + urllib.parse.quote('{"id":"1"}'), 400),  # was a 500
    ("/audit/tile/0/x000/001", 404),
    ("/audit/tile/0/5", 404),
    ("/audit/tile/0/001.p/256", 404),
    ("/audit/tile/3/000", 404),
    ("/audit/tile/entries/009", 404),
    ("/no/such/path", 404),
])
def test_bad_input_is_a_json_4xx(http_log, path, status):
    with http_log.client() as c:
        got, body, ctype = c.request("GET", path)
    assert got == status and ctype == "application/json" and orjson.loads(body)["error"]


def test_health_and_openapi(http_log):
    with http_log.client() as c:
        assert c.get_json("/healthz")["status"] == "ok"
        assert c.get_json("/readyz")["ready"] is True
        spec = c.get_json("/openapi.json")
        assert spec["openapi"].startswith("3.") and "/v1/logs/{log}/proof/inclusion" in spec["paths"]


def test_monitor_and_verify_cli(http_log, tmp_path):
    vkey = str(http_log.signer.verifier)
    state = tmp_path / "seen"
    ok = cli("monitor", "audit", "--url", http_log.url, "--vkey", vkey, "--once", "--state", str(state))
    assert ok.returncode == 0 and "OK: example.com/audit" in ok.stdout, ok.stderr
    # A checkpoint of the same key with another history: the monitor must refuse loudly.
    state.write_text(http_log.signer.sign(Checkpoint("example.com/audit", 10, hashlib.sha256(b"fork").digest()).body()))
    bad = cli("monitor", "audit", "--url", http_log.url, "--vkey", vkey, "--once", "--state", str(state))
    assert bad.returncode == 1 and "INCONSISTENT" in bad.stderr
    # Two roots signed for the server's size: both notes are the evidence, printed and kept
    # beside the state file, and the monitor stops, with or without --once.
    with http_log.client() as c:
        size = c.checkpoint().size
    forged = http_log.signer.sign(Checkpoint("example.com/audit", size, hashlib.sha256(b"fork").digest()).body())
    for once in (("--once",), ()):
        state.write_text(forged)
        split = cli("monitor", "audit", "--url", http_log.url, "--vkey", vkey, "--interval", "0.1", "--state",
                    str(state), *once, timeout=60)
        assert split.returncode == 1 and "a split view" in split.stderr and "OK" not in split.stdout, split
        evidence = (tmp_path / "seen.evidence").read_text()
        kept, served = evidence.split("the checkpoint the server signed:\n")
        assert forged in kept and kept.startswith(f"last verified checkpoint (size {size}):")
        served_cp, _ = open_checkpoint(served, [http_log.signer.verifier], "example.com/audit")
        assert served_cp.size == size and evidence in split.stderr
    wrong_key = cli("monitor", "audit", "--url", http_log.url, "--once",
                    "--vkey", str(type(http_log.signer).generate("example.com/audit").verifier))
    assert wrong_key.returncode == 1 and "no signature by a known key" in wrong_key.stderr

    with http_log.client() as c:
        c.checkpoint()
        (tmp_path / "cp").write_text(c.last_note)
        cp = c.checkpoint()
        (tmp_path / "proof.json").write_bytes(orjson.dumps(c.inclusion_proof(index=9, size=cp.size)))
    r = cli("verify", str(tmp_path / "cp"), "--vkey", vkey)
    assert r.returncode == 0 and "signed by example.com/audit" in r.stdout, r.stderr
    r = cli("verify", str(tmp_path / "proof.json"), "--checkpoint", str(tmp_path / "cp"), "--vkey", vkey)
    assert r.returncode == 0 and "leaf 9 is in the tree" in r.stdout, r.stderr

    # An auditor who kept the checkpoint at size 10 checks that today's one extends it.
    cons = cli("prove", "consistency", "audit", "10", str(cp.size), dsn=http_log.dsn, check=True).stdout
    root10 = base64.b64decode(json.loads(cons)["first_root"])
    (tmp_path / "cp10").write_text(http_log.signer.sign(Checkpoint("example.com/audit", 10, root10).body()))
    both = ("--old-checkpoint", str(tmp_path / "cp10"), "--checkpoint", str(tmp_path / "cp"), "--vkey", vkey)
    r = cli("verify", "-", *both, input=cons)
    assert r.returncode == 0 and "extends the tree of size 10" in r.stdout and "taken from" not in r.stdout, r.stderr
    # ... and one holding a signed checkpoint of another history at size 10 is told so.
    fork = http_log.signer.sign(Checkpoint("example.com/audit", 10, hashlib.sha256(b"fork").digest()).body())
    (tmp_path / "cp10").write_text(fork)
    r = cli("verify", "-", *both, input=cons)
    assert r.returncode == 1 and "not the trusted root" in r.stderr and "at size 10" in r.stderr, r.stderr
    r = cli("verify", "-", "--old-checkpoint", str(tmp_path / "cp"), "--vkey", vkey, input=cons)
    assert r.returncode == 1 and "ask for a proof at size" in r.stderr, r.stderr


def test_monitor_names_a_bad_state_file(http_log, tmp_path):
    """A --state in a missing directory ended in a traceback after the checkpoint was verified;
    an unreadable state file was reported as if the server's note were malformed."""
    vkey = str(http_log.signer.verifier)
    missing = tmp_path / "nodir" / "seen"
    out = cli("monitor", "audit", "--url", http_log.url, "--vkey", vkey, "--once", "--state", str(missing))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr == f"error: cannot write monitor state {missing}: {missing.parent} is not a directory\n"
    garbage = tmp_path / "garbage"
    garbage.write_text("not a note\n")
    out = cli("monitor", "audit", "--url", http_log.url, "--vkey", vkey, "--once", "--state", str(garbage))
    # Exit 2, not 1 (an inconsistency of the log): the file is what is wrong.
    assert out.returncode == 2 and out.stderr.startswith(
        f"error: monitor state {garbage} is not a checkpoint this key signed: "), out.stderr


def test_monitor_pins_the_origin_it_is_given(http_log, tmp_path):
    """Found by review: a fresh state file followed whatever origin the server presented (a
    key may sign several logs). With --origin, a checkpoint of another is refused."""
    vkey = str(http_log.signer.verifier)
    state = tmp_path / "seen"
    monitor = ("monitor", "audit", "--url", http_log.url, "--vkey", vkey, "--once", "--state", str(state))
    out = cli(*monitor, "--origin", "example.com/other")
    assert out.returncode == 1 and "example.com/other" in out.stderr and not state.exists(), out.stdout + out.stderr
    assert cli(*monitor, "--origin", "example.com/audit").returncode == 0
    out = cli(*monitor, "--origin", "example.com/other")
    assert out.returncode == 2 and f"monitor state {state} follows origin 'example.com/audit'" in out.stderr, out.stderr
    with http_log.client() as c:
        cp = c.checkpoint()
        other = Checkpoint("example.com/other", cp.size, cp.root)
        with pytest.raises(ProofVerificationError, match="two logs"):
            c.verify_consistency(other, cp)


def test_verify_refuses_options_that_do_not_fit_the_document(http_log, tmp_path):
    """Found by review: options that did not apply were ignored (a checkpoint 'verified'
    against --root), and a checkpoint that was not a note was called 'not JSON'."""
    vkey = str(http_log.signer.verifier)
    with http_log.client() as c:
        cp = c.checkpoint()
        (tmp_path / "cp").write_text(c.last_note)
        (tmp_path / "proof.json").write_bytes(orjson.dumps(c.inclusion_proof(index=9, size=cp.size)))
    checkpoint, proof = str(tmp_path / "cp"), str(tmp_path / "proof.json")
    out = cli("verify", checkpoint, "--vkey", vkey, "--root", "AAAA")
    assert out.returncode == 2 and "is a signed checkpoint, checked with --vkey alone; --root are for proofs" \
        in out.stderr, out.stderr
    out = cli("verify", proof, "--vkey", vkey)
    assert out.returncode == 2 and "--vkey checks a signed checkpoint" in out.stderr, out.stderr
    (tmp_path / "crlf").write_bytes(c.last_note.replace("\n", "\r\n").encode())
    out = cli("verify", str(tmp_path / "crlf"), "--vkey", vkey)
    assert out.returncode == 1 and "CRLF line ends" in out.stderr, out.stderr
    (tmp_path / "unsigned").write_text(c.last_note.split("\n\n")[0] + "\n")
    out = cli("verify", str(tmp_path / "unsigned"), "--vkey", vkey)
    assert out.returncode == 1 and "is neither a signed checkpoint" in out.stderr, out.stderr
    (tmp_path / "other.json").write_text('{"type": "receipt"}')
    out = cli("verify", str(tmp_path / "other.json"), "--checkpoint", checkpoint, "--vkey", vkey)
    assert out.returncode == 1 and "not a proof document" in out.stderr, out.stderr
    out = cli("verify", proof, "--checkpoint", checkpoint, "--size", str(cp.size - 1), "--vkey", vkey)
    assert out.returncode == 1 and f"--size is {cp.size - 1} but the checkpoint" in out.stderr, out.stderr
    doc = orjson.loads((tmp_path / "proof.json").read_bytes())
    assert doc["origin"] == "example.com/audit"
    out = cli("verify", "-", "--checkpoint", checkpoint, "--vkey", vkey, input=json.dumps(dict(doc, origin="evil.example/log")))
    assert out.returncode == 1 and "names log origin 'evil.example/log'" in out.stderr, out.stderr


# -- fuzzing: whatever is sent, the answer is JSON or the resource, never a 5xx -------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEGMENT = st.one_of(
    st.sampled_from(["audit", "v1", "logs", "tile", "entries", "checkpoint", "proof", "inclusion", "consistency",
                     "lookup", "verify", "0", "000", "x001", "001.p", "255", "256", "-1", "healthz", "readyz",
                     "openapi.json", "x000", "entries", "9" * 25, "nope"]),
    st.text(min_size=0, max_size=12),
)
_VALUE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["", "0", "1", "601", "602", "603", "AA==", "00" * 32, "+" * 44, '{"id":"7"}', "public.orders",
                     "1e3", "nan", "inf", "-0", " 1", "0x10", "\x00", "public.orders\x00"]),
    st.text(max_size=20),
)
_PARAMS = st.dictionaries(st.sampled_from(["index", "size", "leaf_hash", "first", "second", "source", "key", "max_age",
                                           "x"]), _VALUE, max_size=4)


def _target(segments, params) -> str:
    path = "/" + "/".join(urllib.parse.quote(s, safe="") for s in segments)
    return path + ("?" + urllib.parse.urlencode(params) if params else "")


def _check(c, method, target, body=None):
    status, payload, ctype = c.request(method, target, body)
    if target.startswith("/readyz") and status == 503:
        return
    assert status < 500, (method, target, status, payload[:300])
    if status >= 400:
        assert ctype == "application/json" and "error" in orjson.loads(payload), (target, payload[:200])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "GET", "GET", "POST", "PUT", "DELETE"]),
       segments=st.lists(_SEGMENT, min_size=1, max_size=6), params=_PARAMS)
def test_fuzz_paths_never_5xx(http_log, method, segments, params):
    with http_log.client() as c:
        _check(c, method, _target(segments, params))


_ROUTES = ["/v1/logs/{log}/proof/inclusion", "/v1/logs/{log}/proof/consistency", "/v1/logs/{log}/lookup",
           "/v1/logs/{log}/entries/{index}", "/{log}/tile/{rest}", "/{log}/checkpoint", "/v1/logs/{log}", "/readyz"]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(_ROUTES), log=st.sampled_from(["audit", "audit", "nope"]), index=_VALUE,
       rest=st.one_of(st.from_regex(r"(entries|[0-9]{1,2})/(x[0-9]{3}/){0,7}[0-9]{3}(\.p/[0-9]{1,4})?", fullmatch=True),
                      st.text(max_size=30)),
       params=_PARAMS)
def test_fuzz_routes_never_5xx(http_log, route, log, index, rest, params):
    path = route.replace("{log}", urllib.parse.quote(log)).replace("{index}", urllib.parse.quote(index, safe=""))
    path = path.replace("{rest}", urllib.parse.quote(rest, safe="/."))
    with http_log.client() as c:
        _check(c, "GET", path + ("?" + urllib.parse.urlencode(params) if params else ""))


_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=10),
              st.sampled_from(["inclusion", "consistency", "entry", "AA==", "A" * 43 + "="])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "proof", "leaf_index", "tree_size", "leaf_hash", "root", "first", "second",
                         "first_root", "second_root", "entry", "entry_base64"]), inner, max_size=8),
    max_leaves=20,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(_JSONISH.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)))
def test_fuzz_post_verify_never_5xx(http_log, body):
    with http_log.client() as c:
        _check(c, "POST", "/v1/verify", body)


def test_hot_path_document_equals_the_full_apps(http_log):
    """GET ...?index=N is answered by listener/api/fastpath.py; with an explicit size the
    Starlette handler answers: the documents must be identical."""
    with http_log.client() as c:
        size = c.checkpoint().size
        for index in [*range(0, size, 7), size - 1]:  # full tiles (cached upper part) and the partial one
            fast = c.get_json(f"/v1/logs/audit/proof/inclusion?index={index}")
            full = c.get_json(f"/v1/logs/audit/proof/inclusion?index={index}&size={size}")
            assert fast == full
        assert c.request("GET", "/v1/logs/audit/proof/inclusion?index=007")[0] == 400


def test_serve_read_only_with_two_workers(http_log):
    """`serve --workers 2`: two processes share the port; both answer from the same database."""
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT
    from tests.http_server import free_port

    for _ in range(3):  # the workers share a port chosen here, which another test may take first
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "listener", "--dsn", http_log.dsn, "serve", "--http",
                                 f"127.0.0.1:{port}", "--workers", "2", "--preload"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            break
        if proc.returncode == 2 and "Address already in use" in proc.communicate()[1]:
            continue
        break
    try:
        from listener.client import Client

        pids, deadline = set(), time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            c = Client(f"http://127.0.0.1:{port}", "audit", http_log.signer.verifier)
            try:
                health = c.get_json("/healthz")
                pids.add(health["pid"])
                assert health["cache"]["tiles"] >= 3  # preloaded
                assert c.checkpoint().size == ORDERS + 2
            except ClientError:
                time.sleep(0.1)
            finally:
                c.close()
        assert len(pids) == 2
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode in (0, -15), err


def test_a_second_server_on_a_port_in_use_is_refused(http_log):
    """The port of `run --http` (SO_REUSEPORT, for `serve --workers`) is not shared with a
    second server, which would have answered half of the connections silently."""
    from tests.helpers import cli

    port = http_log.url.rsplit(":", 1)[1]
    for extra in ([], ["--workers", "2"]):
        out = cli("serve", "--http", f"127.0.0.1:{port}", *extra, dsn=http_log.dsn, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use (another "
                              "merkle-listener serve or run --http?)\n"), out.stderr
    with http_log.client() as c:
        assert c.checkpoint().size >= ORDERS + 2


def test_workers_refuse_port_0():
    """Each worker would get a port of its own from the system: one port is what --workers shares."""
    from tests.helpers import cli

    out = cli("serve", "--http", "127.0.0.1:0", "--workers", "2", dsn="postgresql:///nowhere")
    assert out.returncode == 2 and "give --http a port other than 0" in out.stderr, out.stderr


def test_serve_refuses_a_schema_that_lacks_a_migration(conn, dsn):
    """A `serve` upgraded before `init` ran would answer some requests with errors (a lookup
    calls merkle.leaves_by_key, from sql/017): it refuses to start and says what to run."""
    from listener.store import migrate
    from tests.helpers import cli

    last = migrate.migrations()[-1].version
    conn.execute("DELETE FROM merkle.schema_version WHERE version = %s", (last,))
    out = cli("serve", "--http", "127.0.0.1:0", dsn=dsn, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"lacks migration(s) [{last}]: run `merkle-listener init`" in out.stderr


def test_readyz_fails_for_a_leaf_left_unsigned_not_for_a_quiet_log(conn, dsn, tmp_path):
    """Found by review: /readyz failed for any log quiet for max_age (its checkpoint, though
    covering every leaf, was 'old'), so a probe flapped on idle logs and could not tell them
    from a stalled signer. Now it fails when a leaf waits longer than max_age for a checkpoint."""
    import time

    from listener import registry
    from listener.note import Signer
    from tests.helpers import start_listener

    conn.execute("CREATE TABLE quiet (id int PRIMARY KEY)")
    registry.create_log(conn, "quiet", "example.com/quiet")
    registry.add_source(conn, "quiet", "quiet")
    conn.execute("INSERT INTO quiet VALUES (1)")
    signer = Signer.generate("example.com/quiet")
    (tmp_path / "key").write_text(str(signer) + "\n")
    # One checkpoint now, then none for ten minutes: the later leaves wait, as behind a stalled signer.
    listener = start_listener(dsn, "--key", str(tmp_path / "key"), "--checkpoint-interval", "600000",
                              "--http", "127.0.0.1:0")
    try:
        from listener.client import Client

        with Client(listener.http_url(), "quiet", signer.verifier, origin="example.com/quiet") as c:
            deadline = time.monotonic() + 30
            while (c.get_json("/v1/logs/quiet").get("checkpoint") or {}).get("tree_size") != 1:
                assert time.monotonic() < deadline, "no first checkpoint"
                time.sleep(0.1)
            time.sleep(1.5)  # older than max_age=1, yet it covers every leaf
            assert c.get_json("/readyz?max_age=1")["ready"] is True
            conn.execute("INSERT INTO quiet VALUES (2)")
            while c.get_json("/v1/logs/quiet")["tree_size"] != 2:
                assert time.monotonic() < deadline, "the leaf was not appended"
                time.sleep(0.1)
            assert c.get_json("/readyz?max_age=60")["ready"] is True  # the leaf has waited less
            time.sleep(1.5)
            status, body, _ = c.request("GET", "/readyz?max_age=1")
            assert status == 503, body
            assert orjson.loads(body)["reason"] == ("leaves appended over 1s ago and not in a checkpoint yet "
                                                     "in log(s) quiet"), body
    finally:
        listener.stop()
