"""The command line as a user meets it: bad input refused with nothing written, proofs that
verify offline, the demo, and the embedded server's lifecycle."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from listener import registry
from listener.embedded import EmbeddedPostgres
from tests.helpers import ROOT, cli, environment, start_listener

# The command line's behaviour, which no PostgreSQL version between the ends changes.
pytestmark = pytest.mark.oldest_and_newest


def _footprint(conn) -> tuple:
    return conn.execute(
        "SELECT (SELECT count(*) FROM merkle.sources), (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal), "
        "(SELECT count(*) FROM pg_class WHERE relnamespace = 'merkle'::regnamespace), "
        "(SELECT count(*) FROM pg_proc WHERE pronamespace = 'merkle'::regnamespace)"
    ).fetchone()


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "does not exist"),
    (["items", "--key", "sku"], "unique"),
    (["items", "--columns", "id,nope"], "nope"),
    (["items; DROP TABLE items"], "contains 2 SQL statements"),
    (["items", "--where", "1=1; DROP TABLE items"], "contains 2 SQL statements"),
    (["items", "--where", "(SELECT 1) = 1"], "contains a subquery"),
    (["items", "--where", "random() > 0.5"], "contains a function call (random())"),
    (["items", "--where", "sku = $1"], "contains a parameter ($1)"),
    (["items", "--entry-column", "sku"], "bytea"),
])
def test_bad_source_input_is_refused_and_nothing_is_written(conn, dsn, args, message):
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, sku text, qty int)")
    registry.create_log(conn, "audit")
    before = _footprint(conn)
    out = cli("source", "add", "audit", *args, dsn=dsn)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert "Traceback" not in out.stderr
    assert _footprint(conn) == before
    assert conn.execute("SELECT to_regclass('items')").fetchone()[0] == "items"


def test_unknown_log_and_bad_log_name(conn, dsn):
    out = cli("source", "add", "nolog", "items", dsn=dsn)
    assert out.returncode == 2 and "no log named 'nolog'" in out.stderr
    out = cli("log", "create", "Bad-Name", dsn=dsn)
    assert out.returncode == 2 and "error:" in out.stderr


def test_run_with_an_unknown_log_says_so_in_one_line(conn, dsn):
    cli("log", "create", "audit", dsn=dsn, check=True)
    out = cli("run", "--log", "audti", dsn=dsn)
    assert out.returncode == 2, out.stderr
    assert "no such log(s): audti" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_global_options_may_follow_the_command(conn, dsn):
    cli("log", "create", "audit", dsn=dsn, check=True)
    out = cli("status", "--dsn", dsn, "--log-level", "error", check=True)
    assert out.stdout.startswith("log audit  size 0")
    out = cli("--dsn", "host=/nonexistent", "log", "list", "--dsn", dsn, check=True)  # the later one wins
    assert "audit" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "--poll", "0"], "--poll must be more than 0 and less than 1e6 seconds"),
    (["run", "--poll", "inf"], "--poll must be more than 0 and less than 1e6 seconds"),
    (["run", "--connect-wait", "-1"], "--connect-wait must be at least 0 and less than 1e6 seconds"),
    (["run", "--connect-wait", "nan"], "--connect-wait must be at least 0 and less than 1e6 seconds"),
    (["log", "create", "x", "--origin", ""], "the origin must be a non-empty line"),
    (["prove", "inclusion", "audit", "0"], "log 'audit' has no leaves yet"),
    (["prove", "inclusion", "audit", "5", "--size", "0"], "the tree of size 0 has no leaves"),
])
def test_more_bad_input_is_refused_with_a_message(conn, dsn, args, message):
    cli("log", "create", "audit", dsn=dsn, check=True)
    out = cli(*args, dsn=dsn)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.parametrize("value", ["0", "-5"])
def test_run_refuses_a_batch_of_no_rows(conn, dsn, value):
    """Found by review: `--max-batch 0` appended nothing, silently, and a negative value made
    every batch fail."""
    out = cli("run", "--max-batch", value, dsn=dsn)
    assert out.returncode == 2, out.stderr
    assert "--max-batch must be at least 1" in out.stderr


def test_prove_and_verify_round_trip_and_tampering_is_caught(conn, dsn, tmp_path):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    cli("log", "create", "audit", dsn=dsn, check=True)
    cli("source", "add", "audit", "notes", "--append-only", dsn=dsn, check=True)
    conn.execute("INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 300) g")
    proc = subprocess.Popen([sys.executable, "-m", "listener", "--dsn", dsn, "run"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while conn.execute("SELECT tree_size FROM merkle.logs").fetchone()[0] < 300:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    status = json.loads(cli("status", "--json", dsn=dsn, check=True).stdout)
    assert status["logs"][0]["tree_size"] == 300 and status["logs"][0]["queued"] == 0

    inc = tmp_path / "inc.json"
    inc.write_text(cli("prove", "inclusion", "audit", "123", "--size", "250", dsn=dsn, check=True).stdout)
    assert cli("verify", str(inc), check=True).stdout.startswith("OK: leaf 123")
    doc = json.loads(inc.read_text())
    assert doc["source"] == "public.notes" and doc["source_key"] == '{"id":"124"}'
    doc["proof"][0] = doc["proof"][1]
    out = cli("verify", "-", input=json.dumps(doc))
    assert out.returncode == 1 and out.stderr.startswith("FAILED")

    cons = cli("prove", "consistency", "audit", "17", "300", dsn=dsn, check=True).stdout
    first_root, second_root = json.loads(cons)["first_root"], json.loads(cons)["second_root"]
    said = cli("verify", "-", input=cons, check=True).stdout
    assert said.startswith(f"OK: the tree of size 300 (root {second_root}) extends the tree of size 17 "
                           f"(root {first_root}); first_root and second_root taken from the proof itself")
    assert cli("verify", "-", "--root", second_root, "--size", "300", input=cons).returncode == 0
    assert cli("verify", "-", "--root", first_root, "--size", "300", input=cons).returncode == 1
    # The auditor's question: does the log now extend the root I trusted at size 17?
    said = cli("verify", "-", "--old-root", first_root, "--old-size", "17", "--root", second_root, "--size", "300",
               input=cons, check=True).stdout
    assert "taken from the proof" not in said
    earlier = json.loads(cli("prove", "inclusion", "audit", "3", "--size", "17", dsn=dsn, check=True).stdout)["root"]
    assert earlier == first_root
    # A proof from a forked history: valid in itself, but not from the root the auditor held.
    forked = json.loads(cli("prove", "consistency", "audit", "18", "300", dsn=dsn, check=True).stdout)
    forked["first"] = 17
    out = cli("verify", "-", "--old-root", first_root, "--old-size", "17", input=json.dumps(forked))
    assert out.returncode == 1 and out.stderr.startswith("FAILED"), out.stdout + out.stderr
    cons18 = cli("prove", "consistency", "audit", "18", "300", dsn=dsn, check=True).stdout
    out = cli("verify", "-", "--old-root", first_root, "--old-size", "18", input=cons18)
    assert out.returncode == 1 and f"not the trusted root {first_root}" in out.stderr, out.stderr
    out = cli("verify", "-", "--old-root", first_root, "--old-size", "17", input=cons18)
    assert out.returncode == 1 and "the proof's first is 18 but the root you trust" in out.stderr, out.stderr
    out = cli("verify", str(inc), "--old-root", first_root, "--old-size", "17")
    assert out.returncode == 2 and "for consistency proofs" in out.stderr
    out = cli("verify", "-", "--root", second_root, input=cons)
    assert out.returncode == 2 and "--root and --size go together" in out.stderr, out.stderr
    for empty in (("--root", "", "--size", "300"), ("--old-root", "", "--old-size", "17")):  # $ROOT unset
        out = cli("verify", "-", *empty, input=cons)
        assert out.returncode in (1, 2) and "OK" not in out.stdout, out.stdout + out.stderr

    out = cli("prove", "inclusion", "audit", "300", dsn=dsn)
    assert out.returncode == 2 and "outside" in out.stderr

    # Found by review: a root alone does not say which tree it is of. Leaf 2 of the tree of
    # size 3, its proof relabelled as leaf 1 of size 2, verified against size 3's root, and
    # verify said "leaf 1 is in the tree of size 2".
    small = json.loads(cli("prove", "inclusion", "audit", "2", "--size", "3", dsn=dsn, check=True).stdout)
    relabelled = json.dumps(dict(small, leaf_index=1, tree_size=2))
    out = cli("verify", "-", "--root", small["root"], "--size", "3", input=relabelled)
    assert out.returncode == 1 and "the proof's tree_size is 2 but the root you trust" in out.stderr, out.stdout + out.stderr


def test_demo_runs_and_every_check_holds(pg_server):
    out = cli("demo", "--rows", "60", dsn=pg_server.dsn(), timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every check held" in out.stdout and "FAILED" not in out.stdout
    assert "public.payments feeds log 'demo' through logical replication" in out.stdout
    assert "OK: the update's leaf hash recomputed from the row equals the logged one" in out.stdout
    assert "taken from the proof itself" not in out.stdout  # checked against roots the demo saw
    # The commands it suggests run from the user's shell as printed, whatever is on PATH.
    ml = re.search(r"explore it: (.*) db start", out.stdout).group(1)
    assert subprocess.run([*shlex.split(ml), "--help"], capture_output=True, env=environment({"PATH": "/usr/bin:/bin"}),
                          ).returncode == 0, ml
    psql = re.search(r"^ +(.*) \"\$\(.* db url --database merkle_demo\)\" +# then: SELECT", out.stdout, re.M).group(1)
    assert subprocess.run([*shlex.split(psql), "--version"], capture_output=True).returncode == 0, psql
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM pg_replication_slots WHERE database = 'merkle_demo'").fetchone()[0] == 0
        # A demo killed midway leaves its slot, which would keep its database from being dropped.
        with psycopg.connect(pg_server.dsn("merkle_demo"), autocommit=True) as demo:
            demo.execute("SELECT pg_create_logical_replication_slot('merkle_demo', 'pgoutput')")
    out = cli("demo", "--rows", "20", dsn=pg_server.dsn(), timeout=180)
    assert out.returncode == 0 and "every check held" in out.stdout, out.stdout + out.stderr


def _embedded_env(home: Path | None) -> dict:
    """The environment of a command that must use the embedded server (in `home`), whatever
    the caller's environment points at."""
    env: dict = {var: None for var in ("DATABASE_URL", "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE",
                                       "PGHOSTADDR")}
    if home is not None:
        env["MERKLE_LISTENER_HOME"] = str(home)
    return env


def test_the_embedded_server_lives_in_a_path_with_spaces_quotes_and_url_characters():
    """A home like macOS's ".../Application Support/merkle-listener": the server starts, its
    URL (percent-encoded) connects and the commands work. A path that pg_ctl's shell would
    read ($, `, ", backslash) is refused before anything is made."""
    base = Path(tempfile.mkdtemp(prefix="ml-"))  # short: the socket stays in the home
    home = base / "App Support" / "o'brien #1 & 50%"
    env = _embedded_env(home)
    try:
        cli("db", "start", env=env, check=True)
        try:
            url = cli("db", "url", env=env, check=True).stdout.strip()
            assert "App%20Support/o%27brien%20%231%20%26%2050%25/run" in url, url
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT current_setting('unix_socket_directories')").fetchone()[0] == str(
                    home / "run")
            cli("init", env=env, check=True)
            cli("log", "create", "audit", env=env, check=True)
            assert cli("log", "list", env=env, check=True).stdout.startswith("audit")
        finally:
            cli("db", "stop", env=env, check=True)
        for bad in ("a$HOME", "a`id`", 'a"b', "a\\b"):
            out = cli("init", env={**env, "MERKLE_LISTENER_HOME": str(base / bad)})
            assert out.returncode == 2 and "which pg_ctl's shell would read" in out.stderr, out.stderr
            assert not (base / bad).exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_embedded_server_lives_in_a_path_with_a_comma():
    """libpq's host and the server's unix_socket_directories are comma-separated lists: the
    socket went to the part before the comma, so the server did not start (after initdb)."""
    base = Path(tempfile.mkdtemp(prefix="ml-"))
    home = base / "Smith, J"
    env = _embedded_env(home)
    try:
        cli("db", "start", env=env, check=True)
        try:
            url = cli("db", "url", env=env, check=True).stdout.strip()
            with psycopg.connect(url) as conn:
                assert "," not in conn.execute("SELECT current_setting('unix_socket_directories')").fetchone()[0]
            cli("init", env=env, check=True)
        finally:
            cli("db", "stop", env=env, check=True)
        assert not EmbeddedPostgres(home).socket_dir.exists()  # the socket's directory in /tmp goes too
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(EmbeddedPostgres(home).socket_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a system user: root only")
def test_processes_that_start_at_once_as_root_all_get_the_servers_system_user():
    """On a fresh machine, test workers (or two commands) create the server's system user at
    the same moment: useradd fails for all but one, and none of them may fail for it."""
    name = f"ml_race_{os.getpid()}"
    code = f"from listener.embedded import _ensure_os_user; _ensure_os_user({name!r})"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
        said = [p.communicate(timeout=60)[1] for p in procs]
        failures = [text for p, text in zip(procs, said) if p.returncode != 0]
        assert failures == []
        assert pwd.getpwnam(name).pw_shell == "/usr/sbin/nologin"
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_embedded_server_lifecycle_and_orphan_adoption(tmp_path):
    home = tmp_path / "home"
    env = _embedded_env(home)
    assert cli("init", env=env, check=True).stdout.startswith("schema merkle at version")
    server = EmbeddedPostgres(home)
    assert not server.state().running, "a command that started the server on demand must stop it"

    # A listener killed with SIGKILL leaves its server running: the next command adopts and stops it.
    proc = subprocess.Popen([sys.executable, "-m", "listener", "run"], cwd=ROOT, env=environment(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (server.state().running and server.owner_file.exists()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # `db stop` would pull the server from under the listener: refused unless --force.
    refused = cli("db", "stop", env=env)
    assert refused.returncode == 2 and f"in use by the merkle-listener command that started it (pid {proc.pid})" \
        in refused.stderr, refused.stderr
    assert server.state().running
    proc.kill()
    proc.wait()
    assert server.state().orphaned
    assert "orphaned" in cli("db", "status", env=env).stdout
    cli("status", env=env, check=True)
    assert not server.state().running

    proc = subprocess.Popen([sys.executable, "-m", "listener", "run"], cwd=ROOT, env=environment(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (server.state().running and server.owner_file.exists()):
            assert time.monotonic() < deadline + 60
            time.sleep(0.1)
        assert cli("db", "stop", "--force", env=env, check=True).stdout.strip() == "stopped"
        assert not server.state().running
    finally:
        proc.kill()
        proc.wait()

    assert "started" in cli("db", "start", env=env, check=True).stdout
    url = cli("db", "url", env=env, check=True).stdout.strip()
    assert url.startswith("postgresql://") and str(server.socket_dir) in url
    cli("log", "list", env=env, check=True)
    assert server.state().running, "`db start` leaves the server running"
    # An ALTER SYSTEM cannot take away what the project relies on: its command line wins.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_level = 'replica'")
        conn.execute("ALTER SYSTEM SET listen_addresses = '*'")
    assert cli("db", "stop", env=env, check=True).stdout.strip() == "stopped"
    cli("db", "start", env=env, check=True)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT current_setting('wal_level'), current_setting('listen_addresses')").fetchone() == (
            "logical", "")
        conn.execute("ALTER SYSTEM RESET ALL")
    assert cli("db", "stop", env=env, check=True).stdout.strip() == "stopped"
    assert cli("db", "status", env=env).returncode == 3


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_monitor_refuses_an_interval_that_is_not_positive_and_finite(value):
    """A negative or infinite --interval ended in a traceback from time.sleep after the first poll."""
    out = cli("monitor", "audit", "--url", "http://127.0.0.1:1", "--vkey", "a+b+c", "--interval", value)
    assert out.returncode == 2, out.stderr
    assert out.stderr == "error: --interval must be more than 0 and less than 1e6 seconds\n", out.stderr


@pytest.mark.parametrize("args, message", [
    (["--cache-mb", "-1"], "--cache-mb must be >= 0"),
    (["--ready-max-age", "-1"], "--ready-max-age must be between 0 and 1e9 seconds"),
    (["--ready-max-age", "nan"], "--ready-max-age must be between 0 and 1e9 seconds"),
])
def test_serve_refuses_negative_sizes_and_ages(args, message):
    """Both were accepted: the server started, caching nothing or never ready."""
    out = cli("serve", "--http", "127.0.0.1:1", *args, dsn="host=/nonexistent")
    assert out.returncode == 2 and out.stderr == f"error: {message}\n", out.stderr


@pytest.mark.parametrize("args, env, source", [
    (["--dsn", "garbage", "log", "list"], {}, "--dsn"),
    (["serve"], {"DATABASE_URL": "dbname"}, "DATABASE_URL"),
    (["--dsn", "nosuch=1", "demo"], {}, "--dsn"),
])
def test_a_malformed_connection_string_is_refused_naming_its_source(args, env, source):
    """It was reported as a bare "database error" (and `serve` retried it forever)."""
    out = cli(*args, env=env, timeout=30)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: the connection string from {source} is not valid: "), out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["verify", ""], "error: no proof file given: name a file written by `prove`, or - for standard input\n"),
    (["bench", "tree", "--leaves", "0"], "error: --leaves must be at least 1\n"),
])
def test_empty_or_zero_arguments_are_refused_in_one_line(args, message):
    """`verify ''` said "cannot read .: Is a directory"; `bench --leaves 0` ran the default size."""
    out = cli(*args, timeout=30)
    assert (out.returncode, out.stderr, out.stdout) == (2, message, "")


def test_a_data_dir_that_cannot_be_a_directory_is_refused_in_one_line(tmp_path):
    """A --data-dir naming a file ended in a FileExistsError traceback."""
    (tmp_path / "a-file").write_text("")
    env = _embedded_env(None)
    for data_dir in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        out = cli("--data-dir", str(data_dir), "status", env=env)
        assert out.returncode == 2, out.stderr
        assert out.stderr == (f"error: cannot use {data_dir} as the embedded PostgreSQL's directory: a file is in "
                              "the way; give --data-dir (or MERKLE_LISTENER_HOME) a directory that may be created "
                              "there, or --dsn for your own PostgreSQL\n"), out.stderr


def test_demo_with_few_rows_still_holds_and_refuses_none(pg_server):
    """Fewer than 42 committed orders ended in a TypeError traceback (the demo proves the
    42nd); --rows 0 or --writers 0 ran, then failed without saying why."""
    out = cli("demo", "--rows", "3", "--writers", "1", dsn=pg_server.dsn(), timeout=180)
    assert out.returncode == 0 and "every check held" in out.stdout, out.stdout + out.stderr
    for args in (["--rows", "0"], ["--writers", "0"], ["--rows", "-5"]):
        out = cli("demo", *args, dsn=pg_server.dsn())
        assert out.returncode == 2 and out.stderr == "error: --rows and --writers must be at least 1\n", out.stderr
        assert out.stdout == ""


def test_every_positional_argument_has_help():
    """`prove inclusion --help` and others listed bare `log`, `index`, `first`, `second`."""
    import argparse

    from listener.cli import build_parser

    def bare(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from bare(sub, [*path, name])
            elif not action.option_strings and not action.help:
                yield " ".join([*path, action.dest])

    assert list(bare(build_parser(), [])) == []


def test_run_refuses_a_state_dir_that_cannot_be_a_directory(conn, dsn, tmp_path):
    """Every writer retried forever, saying to restore or delete a state file."""
    cli("log", "create", "audit", dsn=dsn, check=True)
    key = tmp_path / "audit.key"
    cli("keygen", "example.com/audit", "--out", str(key), check=True)
    (tmp_path / "a-file").write_text("")
    for state_dir in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        out = cli("run", "--key", str(key), "--state-dir", str(state_dir), dsn=dsn, timeout=30)
        assert out.returncode == 2, out.stderr
        assert out.stderr == (f"error: cannot use {state_dir} as the signer's state directory: a file is in the way; "
                              "give --state-dir a directory (kept with the key)\n"), out.stderr


def test_run_without_logs_says_how_to_create_one(conn, dsn):
    """A first `run` before any `log create` printed nothing at all."""
    listener = start_listener(dsn)
    try:
        listener.wait_for("no logs yet: create one with `merkle-listener log create NAME`", timeout=30)
    finally:
        listener.stop()


def test_source_list_names_each_source_s_log(conn, dsn):
    """It printed the log's internal id, which no other command takes."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    for log, table in (("first", "a"), ("second", "b")):
        cli("log", "create", log, dsn=dsn, check=True)
        cli("source", "add", log, table, "--append-only", dsn=dsn, check=True)
    lines = cli("source", "list", dsn=dsn, check=True).stdout.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["public.a", "log first"], ["public.b", "log second"]]


def test_demo_commits_an_order_whatever_the_rows_and_the_wal_level(conn, dsn):
    """Without logical replication, writer 0's first transaction is drawn to roll back: with
    --rows 1 --writers 1 no order was committed, and the report failed on OFFSET -1."""
    from listener import demo

    conn.execute(demo.SCHEMA)
    totals = demo._write_concurrently(dsn, 1, 1, False)
    assert totals["rows"] == 2 and conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 1, totals


def test_run_refuses_bad_options_before_making_the_signer_s_state_directory(conn, dsn, tmp_path):
    """The state directory was made before --max-batch, --poll, --checkpoint-interval and
    --http were checked: a refused command left it behind."""
    cli("log", "create", "audit", dsn=dsn, check=True)
    key = tmp_path / "audit.key"
    cli("keygen", "example.com/audit", "--out", str(key), check=True)
    for bad in (["--max-batch", "0"], ["--poll", "0"], ["--checkpoint-interval", "-1"], ["--http", "nohost"]):
        out = cli("run", "--key", str(key), "--state-dir", str(tmp_path / "new" / "state"), *bad, dsn=dsn, timeout=30)
        assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr
        assert not (tmp_path / "new").exists(), bad
