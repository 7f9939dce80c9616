"""What a log's origin guards: one origin names one log's history, to every verifier.

A refusal to sign is recorded for `status` with the size the verifiers were shown; `log
set-origin` retires an origin for good (in the database, and in the key's memory once the key
signs under the next one, so that a backup from before cannot have it signed again); an origin
another log has or had is refused, by the commands and by the signer; the key's memory of
an earlier version (a file per log) is read for the log's first origin only, even when
`log set-origin` commits while a checkpoint waits for the log's row.
"""

from __future__ import annotations

import threading
import time

import anyio
import orjson
import psycopg
import pytest

from listener import merkle, registry, status
from listener.errors import ConfigurationError
from listener.note import Signer
from listener.runner import RunOptions, _Checkpoints
from listener.store import checkpoints
from listener.store.checkpoints import SigningRefused, publish
from tests.helpers import cli, start_listener
from tests.test_checkpoints import leaves, set_tree

# Signing and the key's memory: no PostgreSQL version between the ends changes them.
pytestmark = pytest.mark.oldest_and_newest


@pytest.fixture
def signer():
    return Signer.generate("example.com/key")


def _writer_step(wconn, name: str, signer, state) -> _Checkpoints:
    return _Checkpoints(RunOptions(dsn="", signer=signer, state_dir=state, checkpoint_interval=0.0), wconn, name)


def _signed_then_restored(conn, log_id: int, step: _Checkpoints, published: list[bytes], now: list[bytes]) -> None:
    """The writer signs the tree of `published`; then the database goes back (its checkpoints
    too) and holds the tree of `now`: only the key's memory knows what was published."""
    set_tree(conn, log_id, published)
    anyio.run(step.maybe_publish)
    conn.execute("DELETE FROM merkle.checkpoints")
    set_tree(conn, log_id, now)


def _signed_then_set_origin(conn, wconn, log_id: int, signer, state, first: list[bytes], new: str,
                            then: list[bytes]) -> None:
    """The tree of `first` signed under the log's origin; `log set-origin` to `new`; the tree of `then`."""
    set_tree(conn, log_id, first)
    publish(wconn, "audit", signer, state)
    registry.set_origin(conn, "audit", new)
    set_tree(conn, log_id, then)


def _back_before_set_origin(conn, log_id: int, old: str, new: str, now: list[bytes]) -> None:
    """The rows of a backup from before `log set-origin` (from old to new) restored; it then
    grows to the tree of `now`."""
    conn.execute("DELETE FROM merkle.retired_origins")
    conn.execute("DELETE FROM merkle.checkpoints WHERE origin = %s", (new,))
    conn.execute("UPDATE merkle.logs SET origin = %s WHERE log_id = %s", (old, log_id))
    set_tree(conn, log_id, now)


def _legacy_memory(state, log_name: str, hashes: list[bytes]) -> None:
    """The key's memory as an earlier version kept it: DIR/<log>.json, without the origin."""
    state.mkdir(exist_ok=True)
    tree = merkle.MemoryTree()
    tree.append(hashes)
    (state / f"{log_name}.json").write_bytes(orjson.dumps({"size": len(hashes), "root": merkle.root_at(tree, len(hashes)).hex()}))


def test_an_origin_names_one_log(conn):
    registry.create_log(conn, "a", "example.com/a")
    registry.create_log(conn, "b", "example.com/b")
    with pytest.raises(ConfigurationError, match="log a has origin 'example.com/a': one origin names one log"):
        registry.set_origin(conn, "b", "example.com/a")
    with pytest.raises(ConfigurationError, match="log a has origin 'example.com/a'"):
        registry.create_log(conn, "c", "example.com/a")
    registry.set_origin(conn, "a", "example.com/a/2")
    with pytest.raises(ConfigurationError, match="log a retired origin 'example.com/a'"):
        registry.set_origin(conn, "b", "example.com/a")
    with pytest.raises(ConfigurationError, match="log a retired origin 'example.com/a'"):
        registry.create_log(conn, "c", "example.com/a")
    assert conn.execute("SELECT name, origin FROM merkle.logs ORDER BY name").fetchall() == [
        ("a", "example.com/a/2"), ("b", "example.com/b")]


def test_two_logs_under_one_origin_from_an_earlier_version_are_not_signed(conn, dsn, signer, tmp_path):
    """`log create --origin` took any origin before: the signer refuses both logs, even when
    their writers publish at the same moment (the key's memory is written only after COMMIT)."""
    a = registry.create_log(conn, "a", "example.com/a")
    b = registry.create_log(conn, "b", "example.com/b")
    conn.execute("UPDATE merkle.logs SET origin = 'example.com/a'")
    set_tree(conn, a.log_id, leaves("a", 5))
    set_tree(conn, b.log_id, leaves("b", 5))
    results = {}

    def run(name):
        with psycopg.connect(dsn) as wconn:
            try:
                results[name] = publish(wconn, name, signer, tmp_path / "state")
            except SigningRefused as exc:
                results[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, SigningRefused) and "origin 'example.com/a' too" in str(r) for r in results.values()), results
    assert conn.execute("SELECT count(*) FROM merkle.checkpoints").fetchone()[0] == 0


def test_the_size_verifiers_saw_outlives_the_refusal(conn, dsn, signer, tmp_path):
    """After a restore only the key's memory knows what was published (300): the refusal records
    it, `log set-origin` keeps it with the retired origin, and `status` shows it."""
    log = registry.create_log(conn, "audit", "example.com/audit")
    state = tmp_path / "state"
    with psycopg.connect(dsn) as wconn:
        step = _writer_step(wconn, "audit", signer, state)
        _signed_then_restored(conn, log.log_id, step, leaves("a", 300), leaves("a", 100) + leaves("x", 100))
        anyio.run(step.maybe_publish)
    report = status.collect(conn)
    assert status.has_errors(report) and "ended at size 300" in status.render(report)
    retired = registry.set_origin(conn, "audit", "example.com/audit/2")
    assert (retired.tree_size, retired.published_size) == (200, 300)
    shown = status.render(status.collect(conn))
    assert "retired origin example.com/audit (its last checkpoint at size 300; retired at" in shown, shown


@pytest.fixture
def went_back(conn, dsn, signer, tmp_path):
    """Log audit, signed at size 30 by a writer of this key, then gone back to another tree of 20."""
    log = registry.create_log(conn, "audit", "example.com/audit")
    with psycopg.connect(dsn) as wconn:
        step = _writer_step(wconn, "audit", signer, tmp_path / "state")
        _signed_then_restored(conn, log.log_id, step, leaves("a", 30), leaves("b", 20))
        yield step


def test_a_refusal_is_not_recorded_for_an_origin_retired_meanwhile(conn, went_back, monkeypatch):
    record = checkpoints.record_refusal

    def operator_first(c, name, exc):
        registry.set_origin(conn, "audit", "example.com/audit/2")  # between the refusal and its record
        return record(c, name, exc)

    monkeypatch.setattr(checkpoints, "record_refusal", operator_first)
    anyio.run(went_back.maybe_publish)
    log_report = status.collect(conn)["logs"][0]
    assert (log_report["origin"], log_report["signing_refused"]) == ("example.com/audit/2", None)


def test_every_listener_says_that_signing_is_refused(went_back, caplog):
    anyio.run(went_back.maybe_publish)
    caplog.clear()
    restarted = _Checkpoints(went_back.opts, went_back.conn, "audit")
    with caplog.at_level("ERROR", logger="listener.run"):
        anyio.run(restarted.maybe_publish)
    assert [r.getMessage() for r in caplog.records] == ["signing refused; appending goes on unsigned"]


def test_a_backup_from_before_set_origin_cannot_have_the_retired_origin_signed(conn, dsn, signer, tmp_path):
    """A published to 100, retired for B, B published to 120; then a backup from before the
    retirement comes back (its merkle.retired_origins knows nothing of it) and grows otherwise."""
    log = registry.create_log(conn, "audit", "A")
    state = tmp_path / "state"
    with psycopg.connect(dsn) as wconn:
        _signed_then_set_origin(conn, wconn, log.log_id, signer, state, leaves("x", 100), "B",
                                leaves("x", 100) + leaves("y", 20))
        publish(wconn, "audit", signer, state)
        _back_before_set_origin(conn, log.log_id, "A", "B", leaves("x", 100) + leaves("z", 10))
        with pytest.raises(SigningRefused, match="this key has retired origin 'A'"):
            publish(wconn, "audit", signer, state)
        # B's memory says 120 of another history: B cannot be taken either; a new origin can.
        registry.set_origin(conn, "audit", "C")
        assert publish(wconn, "audit", signer, state).origin == "C"
    assert conn.execute("SELECT origin, tree_size FROM merkle.checkpoints ORDER BY created_at").fetchall() == [
        ("A", 100), ("C", 110)]


def test_set_origin_while_a_checkpoint_waits_reads_the_old_memory_for_the_old_origin_only(conn, dsn, signer,
                                                                                         tmp_path):
    """An earlier version's memory (ahead of the restored tree) refuses the first origin. The
    operator's `log set-origin` commits while a checkpoint waits for the log's row: it is signed
    under the new origin, not refused by the first origin's memory."""
    log = registry.create_log(conn, "audit", "example.com/audit")
    state = tmp_path / "state"
    _legacy_memory(state, "audit", leaves("a", 300))
    set_tree(conn, log.log_id, leaves("b", 200))
    with psycopg.connect(dsn) as wconn, psycopg.connect(dsn) as operator:
        with pytest.raises(SigningRefused, match=r"per .*/audit\.json\)"):
            publish(wconn, "audit", signer, state)
        operator.execute("SELECT 1")  # its transaction holds the log's row until it commits
        registry.set_origin(operator, "audit", "example.com/audit/2")
        result = {}
        waiting = threading.Thread(target=lambda: result.update(cp=publish(wconn, "audit", signer, state)))
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive(), "the checkpoint did not wait for the log's row"
        operator.commit()
        waiting.join(30)
    assert result["cp"].origin == "example.com/audit/2"


def test_an_origin_spelled_like_a_log_name_has_a_memory_of_its_own(conn, dsn, signer, tmp_path):
    """An earlier version's memory of log b is DIR/b.json; a log whose origin is 'b' must
    neither read it nor write over it."""
    audit = registry.create_log(conn, "audit", "example.com/audit")
    b = registry.create_log(conn, "b", "merkle-listener/b")
    state = tmp_path / "state"
    _legacy_memory(state, "b", [])
    registry.set_origin(conn, "audit", "b")
    set_tree(conn, audit.log_id, leaves("a", 10))
    set_tree(conn, b.log_id, leaves("b", 10))
    with psycopg.connect(dsn) as wconn:
        assert publish(wconn, "audit", signer, state).origin == "b"
        assert publish(wconn, "b", signer, state).origin == "merkle-listener/b"
    # (audit's first origin, never signed, is remembered as retired: a backup cannot have it signed.)
    assert sorted(p.name for p in state.iterdir()) == [
        "b.json", "origin-b.json", "origin-example.com%2Faudit.json", "origin-merkle-listener%2Fb.json"]


def test_an_unreadable_memory_is_a_refusal_that_status_shows(rconn, tmp_path):
    dsn = rconn.info.dsn
    rconn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    cli("log", "create", "a", dsn=dsn, check=True)
    cli("source", "add", "a", "t", dsn=dsn, check=True)
    key = tmp_path / "a.key"
    cli("keygen", "merkle-listener/a", "--out", str(key), check=True)
    state = tmp_path / "a.key.published"
    state.mkdir()
    (state / checkpoints.state_file_name("merkle-listener/a")).write_text("{not json")
    listener = start_listener(dsn, "--key", str(key), "--checkpoint-interval", "100")
    try:
        listener.wait_for("signing refused")
        rconn.execute("INSERT INTO t SELECT i, 'x' FROM generate_series(1, 6) i")
        from tests.test_replication import wait_for_size

        wait_for_size(rconn, "a", 6, listener=listener)
        st = cli("status", dsn=dsn)
    finally:
        said = listener.stop()
    assert "writer stopped on error" not in said, said
    assert st.returncode == 3 and "cannot read the key's memory of origin 'merkle-listener/a'" in st.stdout, st.stdout


def test_an_origin_with_a_control_character_is_refused_by_name(rconn):
    dsn = rconn.info.dsn
    cli("log", "create", "a", dsn=dsn, check=True)
    for bad in ("a\u0085b", "a\tb", "a\x7fb"):
        out = cli("log", "set-origin", "a", bad, dsn=dsn)
        assert out.returncode == 2 and out.stderr.startswith("error: the origin must be a non-empty line"), out.stderr
        out = cli("log", "create", "b", "--origin", bad, dsn=dsn)
        assert out.returncode == 2 and out.stderr.startswith("error: the origin must be a non-empty line"), out.stderr


def test_two_logs_that_shared_an_origin_are_untangled_as_the_refusal_says(conn, dsn, signer, tmp_path):
    """Logs a and b share origin X (an earlier version allowed it): both are refused. Once b
    moves away, X is retired for a too (b may have been signed under it): a is told to move away
    as well, and can."""
    a = registry.create_log(conn, "a", "example.com/a")
    b = registry.create_log(conn, "b", "example.com/b")
    conn.execute("UPDATE merkle.logs SET origin = 'example.com/x'")
    set_tree(conn, a.log_id, leaves("a", 5))
    set_tree(conn, b.log_id, leaves("b", 5))
    state = tmp_path / "state"
    with psycopg.connect(dsn) as wconn:
        for name in ("a", "b"):
            with pytest.raises(SigningRefused, match=f"give log {name} another origin"):
                publish(wconn, name, signer, state)
        assert registry.set_origin(conn, "b", "example.com/b/2").published_size is None
        assert publish(wconn, "b", signer, state).origin == "example.com/b/2"
        with pytest.raises(SigningRefused, match="log b retired origin 'example.com/x' too.*"
                                                 "`merkle-listener log set-origin a NEW_ORIGIN`"):
            publish(wconn, "a", signer, state)
        registry.set_origin(conn, "a", "example.com/a/2")
        assert publish(wconn, "a", signer, state).origin == "example.com/a/2"
    assert conn.execute("SELECT log_name, origin FROM merkle.retired_origins ORDER BY retired_at").fetchall() == [
        ("b", "example.com/x"), ("a", "example.com/x")]


def test_an_origin_verifiers_saw_outlives_its_log(conn, dsn, signer, tmp_path):
    """`log drop` keeps the origins its log was signed under (and those it retired): a new log
    signing another history under one would be a split view, whether or not the key's memory
    is at hand. A log that was never signed leaves its origin free."""
    from listener.sources.replication_setup import drop_log

    log = registry.create_log(conn, "audit")
    set_tree(conn, log.log_id, leaves("a", 10))
    with psycopg.connect(dsn) as wconn:
        publish(wconn, "audit", signer, tmp_path / "state")
        registry.set_origin(conn, "audit", "example.com/audit/2")
        publish(wconn, "audit", signer, tmp_path / "state")
    drop_log(conn, "audit", dsn=dsn)
    for origin in ("merkle-listener/audit", "example.com/audit/2"):
        with pytest.raises(ConfigurationError, match=rf"origin '{origin}' was log audit's \(dropped since\).*"
                                                     "pick another with --origin"):
            registry.create_log(conn, "audit", origin)
    registry.create_log(conn, "unsigned")
    drop_log(conn, "unsigned", dsn=dsn)
    assert registry.create_log(conn, "unsigned").origin == "merkle-listener/unsigned"


def test_the_size_the_key_published_reaches_the_retired_origin(conn, dsn, signer, tmp_path):
    """The key published 300; the restored backup has the checkpoint at 100; the operator runs
    `log set-origin` before any listener refused. What verifiers are to be told (300) comes from
    the key's memory at the listener's next attempt."""
    log = registry.create_log(conn, "audit", "O")
    state = tmp_path / "state"
    with psycopg.connect(dsn) as wconn:
        set_tree(conn, log.log_id, leaves("a", 100))
        publish(wconn, "audit", signer, state)
        set_tree(conn, log.log_id, leaves("a", 300))
        publish(wconn, "audit", signer, state)
        conn.execute("DELETE FROM merkle.checkpoints WHERE tree_size = 300")  # not in the backup
        set_tree(conn, log.log_id, leaves("a", 200))
        assert registry.set_origin(conn, "audit", "O2").published_size == 100  # all the database knows
        publish(wconn, "audit", signer, state)
    assert status.collect(conn)["logs"][0]["retired_origins"][0]["published_size"] == 300


def test_a_retirement_is_remembered_by_the_key_even_when_nothing_new_is_signed(conn, dsn, signer, tmp_path,
                                                                                monkeypatch):
    """A listener stopped between a checkpoint's COMMIT and marking the retired origin in the
    key's memory: the next attempt marks it, though the checkpoint is current."""
    log = registry.create_log(conn, "audit", "O")
    state = tmp_path / "state"
    with psycopg.connect(dsn) as wconn:
        _signed_then_set_origin(conn, wconn, log.log_id, signer, state, leaves("a", 10), "O2", leaves("a", 12))
        retire = checkpoints.StateFile.retire
        monkeypatch.setattr(checkpoints.StateFile, "retire", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            publish(wconn, "audit", signer, state)
        monkeypatch.setattr(checkpoints.StateFile, "retire", retire)
        assert publish(wconn, "audit", signer, state) is None  # restarted: nothing new to sign
        _back_before_set_origin(conn, log.log_id, "O", "O2", leaves("a", 10) + leaves("z", 5))
        with pytest.raises(SigningRefused, match="this key has retired origin 'O'"):
            publish(wconn, "audit", signer, state)


def test_a_later_refusal_of_another_kind_keeps_the_published_size(went_back, conn):
    anyio.run(went_back.maybe_publish)
    memory = went_back.opts.state_dir / checkpoints.state_file_name("example.com/audit")
    memory.write_text("{torn")
    went_back.last = float("-inf")
    anyio.run(went_back.maybe_publish)
    assert "cannot read the key's memory" in status.render(status.collect(conn))
    assert registry.set_origin(conn, "audit", "example.com/audit/2").published_size == 30


def test_a_long_origin_is_remembered_apart_from_one_spelled_like_its_digest():
    long = "example.com/" + "x" * 300
    digest = checkpoints.state_file_name(long)
    assert digest.startswith("digest-sha256-") and len(digest) < 255
    assert checkpoints.state_file_name(digest.removeprefix("digest-").removesuffix(".json")) != digest


def test_an_origin_refused_for_the_log_stays_taken_when_it_is_dropped(conn, dsn, signer, tmp_path):
    """The key published under the origin, but the database does not know how far (an unreadable
    memory): the refusal alone keeps the origin taken after `log drop`."""
    from listener.sources.replication_setup import drop_log

    log = registry.create_log(conn, "audit", "O")
    state = tmp_path / "state"
    state.mkdir()
    (state / checkpoints.state_file_name("O")).write_text("{torn")
    set_tree(conn, log.log_id, leaves("a", 3))
    with psycopg.connect(dsn) as wconn:
        anyio.run(_writer_step(wconn, "audit", signer, state).maybe_publish)
    drop_log(conn, "audit", dsn=dsn)
    with pytest.raises(ConfigurationError, match="origin 'O' was log audit's"):
        registry.create_log(conn, "other", "O")
    with pytest.raises(ConfigurationError, match=r"pick another$"):  # set-origin takes it as an argument
        registry.set_origin(conn, registry.create_log(conn, "third").name, "O")


def test_a_memory_that_cannot_be_marked_retired_neither_hides_a_refusal_nor_fails_a_signature(
        conn, dsn, signer, tmp_path, monkeypatch, caplog):
    log = registry.create_log(conn, "audit", "O")
    state = tmp_path / "state"

    def full_disk(self):
        raise OSError(28, "No space left on device")

    with psycopg.connect(dsn) as wconn:
        _signed_then_set_origin(conn, wconn, log.log_id, signer, state, leaves("a", 10), "O2", leaves("a", 12))
        monkeypatch.setattr(checkpoints.StateFile, "retire", full_disk)
        with caplog.at_level("ERROR", logger="listener.run"):
            assert publish(wconn, "audit", signer, state).origin == "O2"
            assert publish(wconn, "audit", signer, state) is None
        assert [r.getMessage() for r in caplog.records] == [
            "cannot mark the key's memory of a retired origin; tried again at every checkpoint"]
        conn.execute("DELETE FROM merkle.checkpoints")  # and the database went back
        set_tree(conn, log.log_id, leaves("b", 5))
        with pytest.raises(SigningRefused, match="fewer leaves"):
            publish(wconn, "audit", signer, state)


def test_a_log_whose_origin_is_not_the_keys_name_is_said_once(conn, dsn, tmp_path):
    """C2SP tlog-checkpoint: the key name SHOULD match the origin. Found by review: `run --key`
    signs every log with one key, and nothing said so; now the listener warns, once per origin."""
    for name, origin in (("same", "example.com/same"), ("other", "example.com/other")):
        conn.execute(f"CREATE TABLE t_{name} (id int PRIMARY KEY)")
        registry.create_log(conn, name, origin)
        registry.add_source(conn, name, f"t_{name}")
    key = tmp_path / "key"
    key.write_text(str(Signer.generate("example.com/same")) + "\n")
    listener = start_listener(dsn, "--key", str(key), "--checkpoint-interval", "0")
    try:
        for i in range(1, 4):
            conn.execute("INSERT INTO t_same VALUES (%s)", (i,))
            conn.execute("INSERT INTO t_other VALUES (%s)", (i,))
            deadline = time.monotonic() + 30
            while conn.execute("SELECT count(*) FROM merkle.checkpoints WHERE tree_size = %s", (i,)).fetchone()[0] < 2:
                assert time.monotonic() < deadline, "the two logs were not signed"
                time.sleep(0.05)
    finally:
        said = listener.stop()
    warnings = [orjson.loads(line) for line in said.splitlines() if "the signer key's name" in line]
    assert [(w["log"], w["origin"], w["key_name"]) for w in warnings] == [
        ("other", "example.com/other", "example.com/same")], said[-3000:]
