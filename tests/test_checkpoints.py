"""Signed checkpoints in merkle.checkpoints: published after growth, announced on
merkle_checkpoint, and never signed for a tree that does not extend what was published."""

from __future__ import annotations

import hashlib

import orjson
import psycopg
import pytest

from listener import merkle, registry
from listener.checkpoint import open_checkpoint
from listener.errors import ProcessingError
from listener.note import Signer
from listener.proofs import b64
from listener.store.checkpoints import publish
from listener.store.tiles import write_tiles


def leaves(tag: str, n: int) -> list[bytes]:
    return [merkle.hash_leaf(f"{tag}{i}".encode()) for i in range(n)]


def set_tree(conn: psycopg.Connection, log_id: int, hashes: list[bytes]) -> bytes:
    """Replace the stored tree of a log by the tree of `hashes` (as a restore or an attacker would)."""
    conn.execute("DELETE FROM merkle.tiles WHERE log_id = %s", (log_id,))
    tree = merkle.TileBuilder()
    write_tiles(conn, log_id, tree.append(hashes))
    conn.execute("UPDATE merkle.logs SET tree_size = %s, root = %s WHERE log_id = %s", (tree.size, tree.root, log_id))
    return tree.root


@pytest.fixture
def setup(conn, dsn, tmp_path):
    log = registry.create_log(conn, "audit", "example.com/audit")
    signer = Signer.generate("example.com/audit")
    with psycopg.connect(dsn) as wconn:  # the writer's connection (autocommit off)
        yield conn, wconn, log, signer, tmp_path / "state"


def test_publish_signs_stores_and_notifies(setup, dsn):
    conn, wconn, log, signer, state = setup
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN merkle_checkpoint")
        root = set_tree(conn, log.log_id, leaves("a", 1000))
        cp = publish(wconn, "audit", signer, state)
        assert (cp.size, cp.root) == (1000, root)
        assert publish(wconn, "audit", signer, state) is None  # nothing new
        note = next(listener.notifies(timeout=5))
    assert note.channel == "merkle_checkpoint"
    assert orjson.loads(note.payload) == {"log": "audit", "size": 1000, "root": b64(root)}
    size, root_sql, text, _ = conn.execute("SELECT * FROM merkle.latest_checkpoint('audit')").fetchone()
    got, _ = open_checkpoint(text, [signer.verifier], origin="example.com/audit")
    assert (got.size, got.root, size, bytes(root_sql)) == (1000, root, 1000, root)

    set_tree(conn, log.log_id, leaves("a", 1500))  # an extension: signed
    assert publish(wconn, "audit", signer, state).size == 1500
    assert conn.execute("SELECT count(*) FROM merkle.checkpoints").fetchone()[0] == 2


def test_refuses_a_tree_that_rewrites_published_leaves(setup):
    conn, wconn, log, signer, state = setup
    set_tree(conn, log.log_id, leaves("a", 300))
    publish(wconn, "audit", signer, None)
    forked = leaves("a", 300)
    forked[7] = hashlib.sha256(b"changed").digest()
    set_tree(conn, log.log_id, forked + leaves("b", 10))
    with pytest.raises(ProcessingError, match="split view"):
        publish(wconn, "audit", signer, None)
    assert conn.execute("SELECT max(tree_size) FROM merkle.checkpoints").fetchone()[0] == 300


def test_refuses_after_a_restore_that_lost_the_checkpoint_row(setup):
    """The database (checkpoints included) goes back to size 200; it then grows differently.
    Only the signer's own memory beside its key still knows size 300 was published."""
    conn, wconn, log, signer, state = setup
    set_tree(conn, log.log_id, leaves("a", 300))
    publish(wconn, "audit", signer, state)
    conn.execute("DELETE FROM merkle.checkpoints")
    set_tree(conn, log.log_id, leaves("a", 200))
    with pytest.raises(ProcessingError, match="back in time"):
        publish(wconn, "audit", signer, state)
    set_tree(conn, log.log_id, leaves("a", 200) + leaves("other", 150))
    with pytest.raises(ProcessingError, match="does not extend"):
        publish(wconn, "audit", signer, state)
    assert conn.execute("SELECT count(*) FROM merkle.checkpoints").fetchone()[0] == 0
    # Regrown with the same leaves, it is an extension again.
    set_tree(conn, log.log_id, leaves("a", 320))
    assert publish(wconn, "audit", signer, state).size == 320


def test_writer_signs_at_most_once_per_interval(setup):
    """The writer's checkpoint step (listener/runner.py): growth inside the interval waits."""
    import anyio

    from listener.runner import RunOptions, _Checkpoints

    conn, wconn, log, signer, state = setup

    async def scenario() -> list[int]:
        cps = _Checkpoints(RunOptions(dsn="", signer=signer, state_dir=state, checkpoint_interval=30.0),
                           wconn, "audit")
        set_tree(conn, log.log_id, leaves("a", 10))
        await cps.maybe_publish()  # the first one: signed at once
        set_tree(conn, log.log_id, leaves("a", 20))
        await cps.maybe_publish()  # within the interval: not yet, but pending
        assert cps.pending and 29 < cps.wait_limit(60.0) <= 30
        cps.last -= 30  # the interval has passed
        await cps.maybe_publish()
        return [r[0] for r in conn.execute("SELECT tree_size FROM merkle.checkpoints ORDER BY tree_size")]

    assert anyio.run(scenario) == [10, 20]


def _writer_step(signer, state, wconn):
    from listener.runner import RunOptions, _Checkpoints

    return _Checkpoints(RunOptions(dsn="", signer=signer, state_dir=state, checkpoint_interval=0.0), wconn, "audit")


def test_a_refusal_is_kept_for_status_and_a_new_origin_ends_it(setup, caplog):
    """The writer does not stop on a refusal: it records it once, and signs again only under a
    new origin, from the tree as it is; the old origin's checkpoints stay where they were."""
    import anyio

    from listener import status

    conn, wconn, log, signer, state = setup
    cps = _writer_step(signer, state, wconn)
    set_tree(conn, log.log_id, leaves("a", 300))
    anyio.run(cps.maybe_publish)
    conn.execute("DELETE FROM merkle.checkpoints")  # the database went back: only the key's memory knows
    set_tree(conn, log.log_id, leaves("b", 200))
    with caplog.at_level("ERROR", logger="listener.run"):
        for _ in range(3):
            anyio.run(cps.maybe_publish)  # no exception: the writer goes on appending
    assert [r.getMessage() for r in caplog.records] == ["signing refused; appending goes on unsigned"]
    assert conn.execute("SELECT count(*) FROM merkle.checkpoints").fetchone()[0] == 0
    report = status.collect(conn)
    shown = status.render(report)
    assert status.has_errors(report)
    assert "error: since" in shown and "at size 300" in shown and "log set-origin audit NEW_ORIGIN" in shown, shown

    retired = registry.set_origin(conn, "audit", "example.com/audit/2")
    assert (retired.origin, retired.tree_size, retired.published_size) == ("example.com/audit", 200, 300)  # the key's
    anyio.run(cps.maybe_publish)
    size, root, text, _ = conn.execute("SELECT * FROM merkle.latest_checkpoint('audit')").fetchone()
    got, _ = open_checkpoint(text, [signer.verifier], origin="example.com/audit/2")
    assert (got.size, got.root) == (200, bytes(root)) and size == 200
    report = status.collect(conn)
    assert not status.has_errors(report) and report["logs"][0]["signing_refused"] is None
    assert "retired origin example.com/audit (its last checkpoint at size 300;" in status.render(report)
    assert sorted(p.name for p in state.iterdir()) == ["origin-example.com%2Faudit%2F2.json", "origin-example.com%2Faudit.json"]
    # The old origin's memory is kept: a log that grew to extend it again still may not sign it,
    # since it is retired and never given back.
    with pytest.raises(Exception, match="log audit retired origin 'example.com/audit': one origin names one log"):
        registry.set_origin(conn, "audit", "example.com/audit")


def test_set_origin_refuses_bad_input_and_writes_nothing(setup):
    conn, _, log, _, _ = setup
    for bad, says in (("", "non-empty line"), ("two\nlines", "no control characters"),
                      ("example.com/audit", "has origin 'example.com/audit' already")):
        with pytest.raises(Exception, match=says):
            registry.set_origin(conn, "audit", bad)
    with pytest.raises(Exception, match="no log named 'nope'"):
        registry.set_origin(conn, "nope", "x")
    assert conn.execute("SELECT origin FROM merkle.logs").fetchall() == [("example.com/audit",)]
    assert conn.execute("SELECT count(*) FROM merkle.retired_origins").fetchone()[0] == 0


def test_a_memory_kept_by_an_earlier_version_is_of_the_first_origin(setup):
    """Before origins could change, the key's memory was a file per log, without its origin."""
    conn, wconn, log, signer, state = setup
    state.mkdir()
    published = leaves("a", 300)
    tree = merkle.MemoryTree()
    tree.append(published)
    (state / "audit.json").write_bytes(orjson.dumps({"size": 300, "root": merkle.root_at(tree, 300).hex()}))
    set_tree(conn, log.log_id, leaves("b", 200))
    with pytest.raises(ProcessingError, match=r"per .*/audit\.json\).*back in time"):
        publish(wconn, "audit", signer, state)
    set_tree(conn, log.log_id, published + leaves("c", 5))  # the lost leaves came back
    assert publish(wconn, "audit", signer, state).size == 305
    conn.execute("DELETE FROM merkle.checkpoints")  # and went back again: the memory is now under its origin
    set_tree(conn, log.log_id, leaves("b", 200))
    with pytest.raises(ProcessingError, match=r"per .*/origin-example\.com%2Faudit\.json\).*back in time"):
        publish(wconn, "audit", signer, state)
    registry.set_origin(conn, "audit", "example.com/audit/2")
    assert publish(wconn, "audit", signer, state).origin == "example.com/audit/2"


def test_a_memory_of_another_origin_is_not_taken_for_this_one(setup):
    conn, wconn, log, signer, state = setup
    state.mkdir()
    (state / "origin-example.com%2Faudit.json").write_bytes(orjson.dumps({"origin": "other", "size": 1, "root": "00" * 32}))
    set_tree(conn, log.log_id, leaves("a", 10))
    with pytest.raises(ProcessingError, match="it is not of origin 'example.com/audit'"):
        publish(wconn, "audit", signer, state)
