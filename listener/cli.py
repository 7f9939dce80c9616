"""`merkle-listener …`: the command line.

Database target, in order: --dsn, DATABASE_URL, libpq's PG* variables, else the embedded
PostgreSQL under --data-dir (default: the user's data directory), started on demand and
stopped again on exit by the command that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import signal
import sys
import warnings
from base64 import b64encode
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import orjson
import psycopg

from listener import __version__, jsonlog
from listener.embedded import EmbeddedPostgres, default_data_dir
from listener.errors import (CaptureGapWarning, ConfigurationError, MerkleListenerError, ProofVerificationError,
                             why_no_directory)
from listener.store.connect import open_session, options_string, resolve

EMBEDDED_DATABASE = "merkle"

EPILOG = """\
First steps (embedded PostgreSQL, nothing to install):
  merkle-listener demo                      # a guided run on two sample tables
  merkle-listener init                      # create schema merkle
  merkle-listener log create audit
  merkle-listener source add audit public.orders --append-only --backfill
  merkle-listener run                       # sequence changes as they commit
  merkle-listener prove inclusion audit 0 > proof.json && merkle-listener verify proof.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merkle-listener",
        description="Make PostgreSQL tables tamper-evident: every committed change becomes a leaf "
        "of an RFC 9162 Merkle tree, with inclusion and consistency proofs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"merkle-listener {__version__}")
    _global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="manage the embedded PostgreSQL").add_subparsers(dest="db_command", required=True)
    db.add_parser("start", help="start it and leave it running")
    ds = db.add_parser("stop", help="stop it (refused while a running command, such as `run`, started it and "
                                    "uses it: stop that command instead, which stops the server as it exits)")
    ds.add_argument("--force", action="store_true", help="stop it even while the command that started it runs")
    db.add_parser("status", help="say whether it runs")
    du = db.add_parser("url", help="print a DSN for psql and psycopg (starts nothing)")
    du.add_argument("--database", default=EMBEDDED_DATABASE, help=f"database name (default {EMBEDDED_DATABASE})")

    sub.add_parser("init", help="create or upgrade schema merkle (idempotent; as a superuser it also installs the "
                   "DDL guard)")

    gd = sub.add_parser("guard", help="the DDL guard's event triggers, which refuse DDL that would let changes "
                        "to a source escape its log").add_subparsers(dest="guard_command", required=True)
    gd.add_parser("install", help="as a superuser: install or repair the guard, in schema merkle_guard, out of the "
                  "reach of schema merkle's owner")
    gd.add_parser("status", help="say whether the guard is complete and out of the schema owner's reach "
                  "(exit 3 if not)")

    lg = sub.add_parser("log", help="create, list, pause, resume, re-origin and drop logs").add_subparsers(dest="log_command", required=True)
    lc = lg.add_parser("create", help="create a log")
    lc.add_argument("name", help="[a-z][a-z0-9_]*")
    lc.add_argument("--origin", help="checkpoint origin line (default: merkle-listener/NAME)")
    lg.add_parser("list", help="list logs")
    lo = lg.add_parser("set-origin", help="give a log a new checkpoint origin, retiring its current one (the way "
                       "out when signing is refused: the database went back behind a published checkpoint)",
                       description="Retire the log's origin and give it a new one. Checkpoints begin again under "
                       "the new origin, signing the whole tree as it is; the old origin's checkpoints stay in "
                       "merkle.checkpoints. Verifiers and witnesses key a log by its origin: tell them the old one "
                       "ended, and at which size. A retired origin is never given to a log again.")
    lo.add_argument("name", help="the log's name")
    lo.add_argument("origin", help="the new origin line, e.g. example.com/audit/2 (a verifier will be told it)")
    for verb, what in (("pause", "stop appending to a log (changes stay queued)"), ("resume", "resume a paused log")):
        lp = lg.add_parser(verb, help=what)
        lp.add_argument("name", help="the log's name")
    ld = lg.add_parser("drop", help="delete a log: its leaves, tiles, sources, capture objects, publication and slot")
    ld.add_argument("name", help="the log's name")
    ld.add_argument("--yes", action="store_true", help="confirm: the log and its proofs are gone for good")

    src = sub.add_parser("source", help="register tables as sources of a log").add_subparsers(dest="source_command", required=True)
    sa = src.add_parser("add", help="capture TABLE's committed changes as leaves of LOG (trigger mode: inserts; "
                                    "replication mode: the --events chosen, and TRUNCATE)")
    sa.add_argument("log", help="the log's name")
    sa.add_argument("table", help="table name, optionally schema-qualified")
    sa.add_argument("--key", help="comma-separated unique key columns (default: the primary key)")
    sa.add_argument("--columns", help="comma-separated columns to hash (default: all but generated ones)")
    sa.add_argument("--where", help="row filter: column references, constants, casts and operators only")
    sa.add_argument("--entry-column", help="a NOT NULL bytea column holding the entry bytes to log as is")
    sa.add_argument("--backfill", action="store_true", help="also log the rows already in the table, in key order")
    sa.add_argument("--append-only", action="store_true", help="refuse UPDATE, DELETE and TRUNCATE on the table")
    sa.add_argument("--mode", choices=["trigger", "replication"], default="trigger",
                    help="capture with a statement trigger (default) or the log's logical replication slot")
    sa.add_argument("--events", help="replication mode: comma-separated insert,update,delete to log (default insert; "
                                     "TRUNCATE is logged too unless --truncate refuse or --append-only)")
    sa.add_argument("--truncate", choices=["log", "refuse"],
                    help="replication mode: log TRUNCATE as a leaf (default) or refuse it")
    sa.add_argument("--no-doorbell", dest="doorbell", action="store_false",
                    help="trigger mode: send no NOTIFY after captured statements, so writers may use two-phase "
                         "commit (PREPARE TRANSACTION); the listener polls the outbox every 0.1 s instead")
    sl = src.add_parser("list", help="list sources")
    sl.add_argument("log", nargs="?", help="only this log's sources (default: every log's)")
    sd = src.add_parser("doorbell", help="trigger mode: turn the NOTIFY after captured statements on or off "
                                         "(off lets writers use two-phase commit)")
    sd.add_argument("log", help="the log's name")
    sd.add_argument("table", help="a trigger-mode source table of the log")
    sd.add_argument("state", choices=["on", "off"],
                    help="off: writers may use two-phase commit, the listener polls the outbox every 0.1 s")
    sr = src.add_parser("remove", help="stop capturing TABLE")
    sr.add_argument("log", help="the log's name")
    sr.add_argument("table", help="a source table of the log")
    sr.add_argument("--wait", type=float, default=10.0, metavar="S",
                    help="replication mode: wait up to S seconds (default 10) for a running listener to log what "
                         "was committed before the table left the publication; exit 3 if it has not yet")

    rp = sub.add_parser("run", help="sequence captured changes into the logs until stopped (Ctrl-C)")
    rp.add_argument("--log", action="append", dest="logs", metavar="NAME", help="only this log (repeatable)")
    rp.add_argument("--poll", type=float, default=1.0,
                    help="safety poll interval in seconds, > 0 (default 1): a drain even without a doorbell")
    rp.add_argument("--max-batch", type=int, default=50_000,
                    help="trigger mode: at most this many rows per batch transaction; a larger statement is spread "
                         "over several (default 50000)")
    rp.add_argument("--key", type=Path, help="signer key file (from `keygen`): publish signed checkpoints")
    rp.add_argument("--checkpoint-interval", type=int, default=1000, metavar="MS",
                    help="at most one checkpoint per log every MS milliseconds (default 1000)")
    rp.add_argument("--state-dir", type=Path,
                    help="where the signer remembers its last checkpoint per origin (default: KEY.published/)")
    rp.add_argument("--http", metavar="HOST:PORT", help="also serve the HTTP API (see docs/http-api.md)")
    rp.add_argument("--connect-wait", type=float, default=60, metavar="SECONDS",
                    help="at start, wait up to this long for a server that cannot be reached yet or is starting or "
                         "recovering (default 60; 0: fail at once); once running, it reconnects whatever the wait")

    kg = sub.add_parser("keygen", help="create an Ed25519 signer key for checkpoints; prints the verifier key")
    kg.add_argument("name", help="key name, usually the log's origin (no spaces, no '+')")
    kg.add_argument("--out", type=Path, help="private key file (default: NAME.key, '/' as '_'); never overwritten")

    sv = sub.add_parser("serve", help="serve the HTTP API read-only (may point at a replica)")
    sv.add_argument("--http", metavar="HOST:PORT", default="127.0.0.1:8080",
                    help="listen address (default 127.0.0.1:8080; port 0: one the system chooses, logged at info level)")
    sv.add_argument("--cache-mb", type=int, default=256, help="memory for cached tiles in MB (default 256)")
    sv.add_argument("--preload", action="store_true",
                    help="fill the tile cache before listening (upper levels first, up to --cache-mb)")
    sv.add_argument("--workers", type=int, default=1,
                    help="server processes sharing the port (SO_REUSEPORT), each with its own cache (default 1)")
    sv.add_argument("--worker-of-serve", action="store_true", help=argparse.SUPPRESS)  # one of --workers' processes
    sv.add_argument("--ready-max-age", type=float, default=60.0, metavar="SECONDS",
                    help="/readyz fails when a leaf has waited longer for a checkpoint (default 60)")

    mo = sub.add_parser(
        "monitor", help="follow a log's checkpoints over HTTP; verify signatures and consistency",
        description="Follow a log's signed checkpoints: verify each one's signature, and a consistency proof from "
                    "the last one verified to it (the log only grew).",
        epilog="Exit status: 0 with --once when the checkpoint verified and extends the last (or is an older one "
               "the server proves a prefix of it: a replica that lags); 1 on a split view (two signed roots for one "
               "size: both notes are printed and kept in STATE.evidence) or another origin, with or without --once, "
               "and with --once on a checkpoint the server does not prove consistent or that does not verify; 2 "
               "with --once when the log cannot be read, and on a wrong option or state file. Without --once an "
               "unproven checkpoint is asked about again at every poll, and nothing is OK until it is proven.")
    mo.add_argument("log", help="the log's name on that server")
    mo.add_argument("--url", required=True, help="base URL of the HTTP API, e.g. http://127.0.0.1:8080")
    mo.add_argument("--vkey", required=True, help="verifier key text, or @FILE")
    mo.add_argument("--once", action="store_true", help="check the current checkpoint against the last seen, then exit")
    mo.add_argument("--state", type=Path, help="file remembering the last verified checkpoint (default: none)")
    mo.add_argument("--origin", help="the log's origin (its checkpoints' first line), e.g. example.com/audit: a "
                                     "checkpoint of another is refused. Without it, the first checkpoint's is followed")
    mo.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")

    st = sub.add_parser("status", help="logs, sizes, roots, queued changes")
    st.add_argument("--json", action="store_true", help="print JSON")

    pr = sub.add_parser("prove", help="print a proof as JSON").add_subparsers(dest="proof_type", required=True)
    pi = pr.add_parser("inclusion", help="leaf INDEX is in the tree of size N")
    pi.add_argument("log", help="the log's name")
    pi.add_argument("index", type=int, help="the leaf's index, from 0")
    pi.add_argument("--size", type=int, help="tree size (default: current)")
    pc = pr.add_parser("consistency", help="the tree of size SECOND extends the one of size FIRST")
    pc.add_argument("log", help="the log's name")
    pc.add_argument("first", type=int, help="the older tree size (one whose root you trust)")
    pc.add_argument("second", type=int, help="the newer tree size, at most the log's")

    vf = sub.add_parser(
        "verify", help="check a proof JSON or a signed checkpoint offline (no database)",
        description="Check a proof document (as `prove` or the HTTP API writes it) against roots you trust, or a "
                    "signed checkpoint against the log's verifier key. A root is trusted at a size: give --root with "
                    "--size, or a signed checkpoint, which names both.",
        epilog="Exit status: 0 when it verified; 1 when it did not (the reason follows FAILED:); 2 on a usage "
               "error (an unreadable file, options that do not fit the document).")
    vf.add_argument("file", help="a proof document (JSON) or a signed checkpoint (text), or - for standard input")
    vf.add_argument("--root", help="base64 root you trust at --size; the proof must lead to it")
    vf.add_argument("--size", type=int, help="the tree size at which you trust --root: an inclusion proof's "
                                             "tree_size, a consistency proof's second, must be it")
    vf.add_argument("--checkpoint", type=Path, help="a signed checkpoint file: verify it (with --vkey) and use its "
                                                    "size and root as --size and --root")
    vf.add_argument("--old-root", help="consistency proofs: base64 root you trusted at --old-size; the proof must "
                                       "start from it (this is what shows that the log only grew since)")
    vf.add_argument("--old-size", type=int, help="consistency proofs: the tree size at which you trusted --old-root "
                                                 "(the proof's first)")
    vf.add_argument("--old-checkpoint", type=Path, help="consistency proofs: a signed checkpoint at size FIRST; verify "
                                                        "it (with --vkey) and use its size and root as --old-size "
                                                        "and --old-root")
    vf.add_argument("--vkey", help="verifier key text, or @FILE: checks a signed checkpoint (the file, or "
                                   "--checkpoint and --old-checkpoint)")

    dm = sub.add_parser("demo", help="a guided run: two tables, concurrent writers, proofs verified")
    dm.add_argument("--rows", type=int, default=200, help="rows per writer (default 200)")
    dm.add_argument("--writers", type=int, default=4, help="concurrent writers (default 4)")

    bp = sub.add_parser("bench", help="benchmarks printing ratios against limits measured in the same run")
    bp.add_argument("what", choices=["tree", "sql", "capture", "http", "replication"],
                    help="tree: Merkle append vs hashlib; sql: proofs from SQL; capture: trigger-mode writers and "
                         "latency; http: proofs/s over HTTP; replication: the pgoutput stream (docs/benchmarks.md)")
    bp.add_argument("--leaves", type=int, help="log size for `tree`, `sql` and `http` (default per benchmark)")
    bp.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    _describe(p)
    _global_options_after_the_command(p)
    return p


def _global_options(p: argparse.ArgumentParser, after_command: bool = False) -> None:
    def option(name: str, help: str, default=None, **kw) -> None:
        if after_command:  # listed in the main --help only; when absent, the main parser's value stands
            help, default = argparse.SUPPRESS, argparse.SUPPRESS
        p.add_argument(name, help=help, default=default, **kw)

    option("--dsn", "PostgreSQL connection string (default: $DATABASE_URL, PG* variables, else embedded)")
    option("--data-dir", "embedded PostgreSQL home (default: $MERKLE_LISTENER_HOME or the user data dir)", type=Path)
    option("--log-level", "structured (JSON) log level on stderr (default: warning; `run` uses info)",
           default="warning", choices=["debug", "info", "warning", "error"])


def _global_options_after_the_command(parser: argparse.ArgumentParser) -> None:
    """Let every command take --dsn, --data-dir and --log-level after its name too (as users
    type them); given there, they win over the ones before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _global_options_after_the_command(command)
                if not any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
                    _global_options(command, after_command=True)


def _describe(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand's own --help the one-line help it has in its parent's list."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                _describe(sub)


def _target(args: argparse.Namespace):
    """Where to connect, with a malformed connection string refused up front: psycopg's own
    message names neither where the string came from nor that it is the string's fault, and
    `serve` would retry it forever."""
    target = resolve(args.dsn)
    if target.dsn:
        try:
            psycopg.conninfo.conninfo_to_dict(target.dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(
                f"the connection string from {target.described_as} is not valid: {str(exc).strip()}; give a URL "
                "(postgresql://user@host:port/dbname) or key=value pairs (host=... dbname=...)") from None
    return target


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    """Yield a DSN; for the embedded server, run it for the duration if it was not running."""
    target = _target(args)
    if not target.embedded:
        yield target.dsn
        return
    server = EmbeddedPostgres(args.data_dir or default_data_dir())
    with server.running():
        _ensure_database(server)
        yield server.dsn(EMBEDDED_DATABASE)


def _ensure_database(server: EmbeddedPostgres) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DATABASE,)).fetchone():
            admin.execute(f"CREATE DATABASE {EMBEDDED_DATABASE}")


def connect(dsn: str, *, autocommit: bool = True) -> psycopg.Connection:
    try:
        return open_session(dsn, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ConfigurationError(f"cannot connect to PostgreSQL: {str(exc).strip()}") from None


def _checked(conn: psycopg.Connection) -> psycopg.Connection:
    from listener.store import migrate

    migrate.check_version(conn)
    return conn


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    from listener.sources.validate import parse_column_list

    return parse_column_list(value)


def _events(value: str | None) -> list[str] | None:
    # Not a column list: event names get their own messages (replication_setup.normalize_events).
    return None if value is None else [e.strip().lower() for e in value.split(",")]


def _print_json(obj) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- commands ----------------------------------------------------------------------------


def cmd_db(args) -> int:
    server = EmbeddedPostgres(args.data_dir or default_data_dir())
    if args.db_command == "start":
        started = server.start(owned=False)
        _ensure_database(server)
        print(("started" if started else "already running") + f": {server.dsn(EMBEDDED_DATABASE)}")
    elif args.db_command == "stop":
        st = server.state()
        if st.running and st.owner_pid is not None and not st.orphaned and not args.force:
            raise ConfigurationError(
                f"the embedded PostgreSQL is in use by the merkle-listener command that started it (pid "
                f"{st.owner_pid}), which stops it as it exits: stop that command (Ctrl-C, or kill {st.owner_pid}), "
                "or run `db stop --force` to stop the server under it")
        print("stopped" if server.stop() else "not running")
    elif args.db_command == "status":
        st = server.state()
        if st.running:
            owner = "left running by `db start`" if st.owner_pid is None else (
                f"orphaned (its owner, pid {st.owner_pid}, is gone)" if st.orphaned else f"owned by pid {st.owner_pid}")
            print(f"running (pid {st.pid}, {owner}) in {server.pgdata}")
        else:
            print(f"not running ({'not created yet' if not server.initialized() else server.pgdata})")
            return 3
    elif args.db_command == "url":
        print(server.dsn(args.database))
    return 0


def cmd_init(args) -> int:
    from listener import registry, relink
    from listener.store import guard, migrate

    with database(args) as dsn, connect(dsn, autocommit=False) as conn:
        # A migration warns when it cannot do all it would (the DDL guard needs a superuser).
        guard_missing: list[str] = []
        conn.add_notice_handler(partial(_print_warning, guard_missing))
        handed_over: list[str] = []
        guard_installed: list[str] = []
        # After a restore from pg_dump; first, as a superuser's migration reinstalls the guard,
        # which copies only the sources whose tables it finds.
        relinked, unresolved = relink.relink(conn)
        conn.commit()
        applied = migrate.apply(conn, handed_over, guard_installed)
        conn.commit()
        version = migrate.current_version(conn)
        guard_state = guard.state(conn)
        guard_schema = conn.execute("SELECT to_regnamespace('merkle_guard') IS NOT NULL").fetchone()[0]
        no_capture = [(lg.name, s) for lg in registry.list_logs(conn)
                      for s in registry.missing_capture(conn, lg.name, registry.list_sources(conn, lg.log_id))]
        conn.commit()
    print(f"schema merkle at version {version}" + (f" (applied {', '.join(f'{m.version:03d}_{m.name}' for m in applied)})" if applied else " (up to date)"))
    owner = guard_state.schema_owner
    if handed_over:
        print(f"handed {len(handed_over)} object(s) in schema merkle to its owner, role {owner}, which the "
              "listener runs as (what a superuser's upgrade or `source add` made was the superuser's)")
    for line in guard_installed:
        print(f"DDL guard: {line}")
    for m in relinked:
        print(f"{relink.describe(m)}: its table came back under a new OID (a restore from pg_dump)")
    for m in unresolved:
        if m.source_id not in {s.source_id for _, s in no_capture}:  # said below, with the commands
            print(f"warning: {relink.describe(m)}: remove the source and add it again", file=sys.stderr)
    for name, s in no_capture:
        print(f"warning: log {name}: {registry.missing_capture_message(name, s)}", file=sys.stderr)
    if guard_state.replaceable_by:
        print(f"warning: the DDL guard's event triggers call functions of role {', '.join(guard_state.replaceable_by)}, "
              "which can replace them with code that runs in the session of whoever runs DDL, superusers included: "
              "as a superuser, run `merkle-listener guard install` now (docs/replication.md, \"The DDL guard on a "
              "role's schema\")", file=sys.stderr)
    elif guard_missing and not guard_state.complete:
        print("warning: the DDL guard is not installed: it needs a superuser, who installs it with "
              "`merkle-listener guard install` on this database (docs/replication.md, \"The DDL guard on a role's "
              "schema\")", file=sys.stderr)
    elif not guard_state.complete and guard_schema and not any(t.function for t in guard_state.triggers):
        # Restored by a role that may not create event triggers: the guard's schema came back, not its triggers.
        print("warning: schema merkle_guard is here but the DDL guard's event triggers are not (a restore by a role "
              "that may not create them?): nothing refuses DDL that would make capture incomplete; as a superuser, "
              "run `merkle-listener guard install`", file=sys.stderr)
    elif not guard_state.complete and any(t.function for t in guard_state.triggers):
        # Installed by a superuser for an earlier version: a role's upgrade cannot bring it up to date.
        print("warning: the DDL guard installed in this database is incomplete or another version's "
              "(`merkle-listener guard status` says which part): as a superuser, run `merkle-listener guard "
              "install` to bring it up to date", file=sys.stderr)
    return 0


def _print_warning(guard_missing: list[str], diag: psycopg.errors.Diagnostic) -> None:
    """Print a migration's warning; those of the guard's event triggers are summed up by init
    (their hints' statements would run the owner's functions in everyone's DDL)."""
    if diag.severity_nonlocalized != "WARNING":
        return
    if "CREATE EVENT TRIGGER" in (diag.message_hint or ""):
        guard_missing.append(diag.message_primary)
        return
    hint = f" ({diag.message_hint})" if diag.message_hint else ""
    print(f"warning: {diag.message_primary}{hint}", file=sys.stderr)


def cmd_guard(args) -> int:
    from listener.store import guard, migrate

    with database(args) as dsn, connect(dsn, autocommit=False) as conn:
        if args.guard_command == "install":
            # Not _checked(): it reads merkle.schema_version, and guard.install reads no table of
            # the schema's owner that it has not checked first.
            migrate.check_server(conn)
            done = guard.install(conn)
            conn.commit()
            for line in done:
                print(f"DDL guard: {line}")
        state = guard.state(conn)
        conn.commit()
    if state is None:
        raise ConfigurationError("there is no schema merkle in this database: run `merkle-listener init` first")
    return _print_guard_state(state) if args.guard_command == "status" else 0


def _print_guard_state(state) -> int:
    for t in state.triggers:
        if t.function is None:
            line = "missing"
        else:
            line = ("enabled always" if t.enabled else "NOT ENABLE ALWAYS (it may be skipped, or is disabled)") + f", calls {t.function} of role {t.function_owner}"
            if not t.present:
                line += ", not this version's guard"
            elif not t.as_shipped:
                line += ", CHANGED from this version's"
        print(f"{t.trigger.name:<28} {line}")
    if state.replaceable_by:
        print(f"guard UNSAFE: role {', '.join(state.replaceable_by)} owns functions the event triggers call and can run "
              "code through them in the session of whoever runs DDL: as a superuser, run `merkle-listener guard install`")
        return 3
    if not state.complete:
        print("guard incomplete or changed: as a superuser, run `merkle-listener guard install`")
        return 3
    print(f"guard complete: its functions are in schema merkle_guard; schema merkle belongs to role {state.schema_owner}")
    return 0


def cmd_log(args) -> int:
    from listener import registry

    with database(args) as dsn, connect(dsn) as conn:
        _checked(conn)
        if args.log_command == "create":
            log = registry.create_log(conn, args.name, args.origin)
            print(f"created log {log.name!r} (origin {log.origin!r})")
        elif args.log_command == "set-origin":
            retired = registry.set_origin(conn, args.name, args.origin)
            ended = ("no checkpoint of it is known here (if one was published, the signer's memory beside its key, "
                     "KEY.published/, has the last)" if retired.published_size is None
                     else f"its last checkpoint known here is at size {retired.published_size}")
            print(f"log {args.name!r}: origin {retired.origin!r} retired ({ended}; the log has "
                  f"{retired.tree_size} leaves); checkpoints are signed under {args.origin!r} from now on.\n"
                  f"Tell the log's verifiers that {retired.origin!r} ended"
                  + ("" if retired.published_size is None else f" at size {retired.published_size}")
                  + f" and that the log goes on as {args.origin!r}: a monitor that follows it stops at the change "
                  "of origin, as it should.")
        elif args.log_command in ("pause", "resume"):
            log = registry.set_paused(conn, args.name, args.log_command == "pause")
            print(f"log {log.name!r} {'paused' if log.paused else 'resumed'}")
        elif args.log_command == "drop":
            from listener.sources.replication_setup import drop_log

            if not args.yes:
                raise ConfigurationError(f"`log drop {args.name}` deletes the log and every proof of it: "
                                         "add --yes to confirm")
            dropped = drop_log(conn, args.name, dsn=dsn)
            print(f"dropped log {args.name!r} (size {dropped['tree_size']}; sources "
                  f"{', '.join(dropped['sources']) or 'none'}; its publication and slot, if any)")
        else:
            for log in registry.list_logs(conn):
                state = "\tpaused" if log.paused else ""
                print(f"{log.name}\tsize {log.tree_size}\troot {b64encode(log.root).decode()}\torigin {log.origin}{state}")
    return 0


def _warn_if_two_phase_commit(conn, table: str, log_name: str) -> None:
    """PostgreSQL refuses PREPARE TRANSACTION after a NOTIFY: say so where two-phase commit is on."""
    allowed = int(conn.execute("SELECT current_setting('max_prepared_transactions')").fetchone()[0])
    conn.commit()
    if allowed > 0:
        print(f"warning: this server allows two-phase commit (max_prepared_transactions = {allowed}). The capture "
              f"trigger of {table} sends a NOTIFY, after which PostgreSQL refuses PREPARE TRANSACTION: if writers "
              f"of {table} use two-phase commit (XA), run "
              f"`merkle-listener source doorbell {shlex.quote(log_name)} {shlex.quote(table)} off`.",
              file=sys.stderr)


def _warn_of_unlogged_events(conn, source) -> None:
    """What a replication source lets through without a leaf: the events it does not log (it
    logs inserts only by default), and on a partitioned table, the UPDATEs that move a row to
    another partition, which pgoutput sends as a DELETE and an INSERT."""
    unlogged = [e.upper() for e in ("update", "delete") if e not in source.events]
    if unlogged and not source.append_only:
        print(f"warning: {' and '.join(unlogged)} on {source.qualified} "
              f"{'leaves' if len(unlogged) == 1 else 'leave'} no leaf (this source logs "
              f"{', '.join(source.events)}). Add it with --events insert,update,delete to log them, or with "
              "--append-only to refuse them.", file=sys.stderr)
    partitioned = conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = %s", (source.table_oid,)).fetchone()
    conn.commit()
    if partitioned and partitioned[0] and "update" in source.events and not {"insert", "delete"} <= set(source.events):
        print(f"warning: an UPDATE that moves a row of {source.qualified} to another partition reaches the stream "
              "as a DELETE and an INSERT, not an update: with --events lacking insert or delete, such an UPDATE "
              "is logged in part or not at all (docs/replication.md, Partitioned sources).", file=sys.stderr)


@contextlib.contextmanager
def _gap_warnings_printed():
    """Print each CaptureGapWarning raised in the block (what is not in the log, and how to get
    it there) to stderr once the block has succeeded; the list yielded holds them then."""
    gaps: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CaptureGapWarning)
        yield gaps
    gaps.extend(str(w.message) for w in caught if issubclass(w.category, CaptureGapWarning))
    for gap in gaps:
        print(f"warning: {gap}", file=sys.stderr)


def cmd_source(args) -> int:
    from listener import registry

    with database(args) as dsn, connect(dsn, autocommit=False) as conn:
        _checked(conn)
        conn.commit()
        if args.source_command == "add":
            with _gap_warnings_printed():
                source, queued = registry.add_source(
                    conn, args.log, args.table, key=_split(args.key), columns=_split(args.columns), where=args.where,
                    entry_column=args.entry_column, append_only=args.append_only, backfill=args.backfill,
                    mode=args.mode, events=_events(args.events), truncate=args.truncate, dsn=dsn,
                    doorbell=args.doorbell,
                )
            registry.forget_writer_error(conn, args.log)
            extra = f"; {queued} existing rows queued" if args.backfill else ""
            if source.mode == "replication":
                extra += f"; {source.mode} mode, events {', '.join(source.events)}"
            if not source.doorbell:
                extra += "; no doorbell: polled every 0.1 s"
            print(f"{source.qualified} now feeds log {args.log!r} (key {', '.join(source.key_columns)}; "
                  f"columns {', '.join(source.columns)}{'; append-only' if source.append_only else ''}{extra})")
            if source.mode == "trigger" and source.doorbell:
                _warn_if_two_phase_commit(conn, source.qualified, args.log)
            if source.mode == "trigger" and not source.append_only:
                print(f"warning: in trigger mode only INSERTs are logged; UPDATE, DELETE and TRUNCATE on "
                      f"{source.qualified} leave no leaf. Add the source with --append-only to refuse them, "
                      "or with --mode replication --events insert,update,delete to log them.",
                      file=sys.stderr)
            if source.mode == "replication":
                _warn_of_unlogged_events(conn, source)
        elif args.source_command == "list":
            log_id = registry.get_log(conn, args.log).log_id if args.log else None
            names = {lg.log_id: lg.name for lg in registry.list_logs(conn)}  # users know logs by name
            for s in registry.list_sources(conn, log_id):
                doorbell = (f"\tdoorbell {'on' if s.doorbell else 'off'}" if s.mode == "trigger"
                            else f"\tevents {','.join(s.events)}")
                print(f"{s.qualified}\tlog {names[s.log_id]}\tmode {s.mode}\tkey {','.join(s.key_columns)}\t"
                      f"columns {','.join(s.columns)}\tfilter {s.row_filter or '-'}\tappend-only {s.append_only}"
                      f"{doorbell}")
            conn.commit()
        elif args.source_command == "doorbell":
            source = registry.set_doorbell(conn, args.log, args.table, args.state == "on")
            print(f"{source.qualified}: doorbell {args.state}"
                  + ("" if source.doorbell else "; the listener polls its outbox every 0.1 s, and its writers "
                     "may use two-phase commit"))
            if source.doorbell:
                # From their next statement on, open transactions that insert can no longer prepare.
                _warn_if_two_phase_commit(conn, source.qualified, args.log)
        else:
            if args.wait < 0:
                raise ConfigurationError("--wait must be >= 0 seconds")
            with conn.transaction():
                source = registry.named_now(conn, [registry.find_source(conn, registry.get_log(conn, args.log),
                                                                        args.table)])[0]
                missing = registry.missing_capture(conn, args.log, [source])
            with _gap_warnings_printed() as gaps:
                queued = registry.remove_source(conn, args.log, args.table, dsn=dsn, wait=args.wait)
            if queued == 0:
                registry.forget_writer_error(conn, args.log)
            if queued < 0:
                from listener.sources.replication_setup import pending_message

                print(pending_message(conn, args.log, args.table))
                return 3
            if queued:
                print(f"capture of {args.table} stopped; {queued} queued changes will still be logged by "
                      "`merkle-listener run`; run `source remove` again afterwards to finish")
            elif missing:
                gone = (f"its log's publication merkle_{args.log}" if source.mode == "replication"
                        else f"its outbox merkle.outbox_{source.source_id}")
                print(f"{args.table} removed from log {args.log!r}; {gone} did not exist (a data-only restore?), "
                      "so no change of it was left to log")
            else:
                print(f"{args.table} removed from log {args.log!r}")
            # Its options are gone with its registration: say how to add it again as it was. With
            # changes of it not in the log (since a restore, or a slot gone), logging its rows anew.
            if missing or gaps:
                print("to add it again as it was, logging its rows as they are now: "
                      f"{registry.add_command(args.log, source, backfill=True)}")
            else:
                print(f"to add it again as it was: {registry.add_command(args.log, source)}")
    return 0


def cmd_run(args) -> int:
    import anyio

    from listener.runner import RunOptions, run

    # Checked first: _load_signer makes the signer's state directory, which a refusal should
    # not leave behind (nor start the embedded server for nothing).
    if args.checkpoint_interval < 0:
        raise ConfigurationError("--checkpoint-interval must be >= 0 milliseconds")
    if args.max_batch < 1:
        raise ConfigurationError("--max-batch must be at least 1")
    if not 0 < args.poll < 1e6:  # inf (or nan) would fail in the first sleep
        raise ConfigurationError("--poll must be more than 0 and less than 1e6 seconds")
    if args.http:
        from listener.api.server import parse_address

        parse_address(args.http)
    if not 0 <= args.connect_wait < 1e6:
        raise ConfigurationError("--connect-wait must be at least 0 and less than 1e6 seconds")
    with database(args) as dsn:
        _wait_for_database(dsn, args.connect_wait)
        signer, state_dir = _load_signer(args.key, args.state_dir)
        opts = RunOptions(dsn=dsn, logs=args.logs, poll_interval=args.poll, max_batch=args.max_batch,
                          signer=signer, state_dir=state_dir, checkpoint_interval=args.checkpoint_interval / 1000,
                          http=args.http)
        anyio.run(_until_signal, _RUN_STOPPING, run, opts)
    return 0


def _wait_for_database(dsn: str, wait: float) -> None:
    """Connect and check the schema; while the server cannot be reached yet, or is starting,
    stopping or recovering (a supervisor starting the listener with the database, or during a
    restart), retry for up to `wait` seconds. Anything else is an error at once."""
    import logging

    from listener.store.connect import wait_for_server

    def attempt() -> None:
        with psycopg.connect(dsn, autocommit=True, options=options_string(), application_name="merkle-listener") as conn:
            _checked(conn)

    def on_retry(exc: Exception, delay: float) -> None:
        logging.getLogger("listener.run").warning(
            "PostgreSQL cannot be reached yet; retrying", extra={"error": str(exc).strip(), "retry_in_s": delay})

    try:
        wait_for_server(attempt, wait, on_retry)
    except psycopg.OperationalError as exc:
        waited = f" (waited {wait:g} s; --connect-wait sets how long)" if wait else ""
        raise ConfigurationError(f"cannot connect to PostgreSQL{waited}: {str(exc).strip()}") from None


def _load_signer(key: Path | None, state_dir: Path | None):
    if key is None:
        if state_dir is not None:
            raise ConfigurationError("--state-dir needs --key")
        return None, None
    from listener.note import Signer

    try:
        text = key.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read signer key {key}: {exc.strerror}") from None
    signer = Signer.parse(text)
    state_dir = state_dir or key.with_name(key.name + ".published")
    # Made now, as StateFile.write would: a path that cannot be a directory is refused here,
    # not retried forever by every writer with a message about restoring a state file.
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        why = why_no_directory(exc)
        raise ConfigurationError(f"cannot use {state_dir} as the signer's state directory: {why}; give --state-dir "
                                 "a directory (kept with the key)") from None
    return signer, state_dir


def _read_vkey(value: str | None):
    from listener.note import Verifier

    if not value:
        raise ConfigurationError("give the log's verifier key with --vkey (text, or @FILE)")
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read verifier key {value[1:]}: {exc.strerror}") from None
    return Verifier.parse(value)


def cmd_keygen(args) -> int:
    import os

    from listener.note import Signer

    signer = Signer.generate(args.name)
    out = args.out or Path(args.name.replace("/", "_") + ".key")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{out} exists already; keys are never overwritten (pick another --out)") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create {out}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(str(signer) + "\n")
    print(signer.verifier)
    print(f"private key written to {out} (mode 0600); give the verifier key above to everyone who checks the log",
          file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    import anyio

    from listener.api.server import parse_address, refuse_a_port_in_use, serve_http

    host, port = parse_address(args.http)
    try:
        import uvloop  # noqa: F401  (a faster event loop: measured in docs/benchmarks.md)

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    if args.workers < 1:
        raise ConfigurationError("--workers must be >= 1")
    if args.workers > 1 and port == 0:
        raise ConfigurationError("--workers shares one port between the processes: give --http a port other than 0")
    # The same bounds the API puts on /readyz?max_age=; a negative cache size silently cached nothing.
    if args.cache_mb < 0:
        raise ConfigurationError("--cache-mb must be >= 0")
    if not 0 <= args.ready_max_age < 1e9:
        raise ConfigurationError("--ready-max-age must be between 0 and 1e9 seconds")
    if not args.worker_of_serve and port != 0:
        refuse_a_port_in_use(host, port)  # before the workers take it
    with database(args) as dsn, _workers(args, dsn):
        anyio.run(_until_signal, "stopping", partial(serve_http, shares_port=True), dsn, args.http, args.cache_mb,
                  args.ready_max_age, args.preload, backend_options=options)
    return 0


@contextlib.contextmanager
def _workers(args, dsn: str) -> Iterator[None]:
    """The other `--workers - 1` server processes, stopped when this one stops."""
    import subprocess

    cmd = [sys.executable, "-m", "listener", "--dsn", dsn, "--log-level", args.log_level, "serve", "--http", args.http,
           "--cache-mb", str(args.cache_mb), "--ready-max-age", str(args.ready_max_age), "--worker-of-serve"]
    cmd += ["--preload"] if args.preload else []
    procs = [subprocess.Popen(cmd) for _ in range(args.workers - 1)]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def cmd_monitor(args) -> int:
    from listener.monitor import monitor

    # time.sleep refuses a negative one and inf; 0 would poll the server in a busy loop.
    if not 0 < args.interval < 1e6:
        raise ConfigurationError("--interval must be more than 0 and less than 1e6 seconds")
    return monitor(args.url, args.log, _read_vkey(args.vkey), once=args.once, state=args.state, origin=args.origin,
                   interval=args.interval)


# A large batch can take seconds to commit: why nothing seems to happen after Ctrl-C.
_RUN_STOPPING = ("stopping once the work in flight is done (a batch being appended commits first; a second signal "
                 "abandons it, and it is rolled back)")


async def _until_signal(stopping: str, fn, *args) -> None:
    """Run fn until SIGINT or SIGTERM, logging `stopping` when one comes."""
    import anyio

    try:
        async with anyio.create_task_group() as tg:
            async def stop_on_signal():
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        logging.getLogger("listener").info(stopping)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal)
            await tg.start(fn, *args)
    except BaseExceptionGroup as group:
        # fn's own error (a port in use, a schema to upgrade, a log that does not exist) is
        # said as one message, not as a traceback of the task groups it went through.
        while len(group.exceptions) == 1 and isinstance(group.exceptions[0], BaseExceptionGroup):
            group = group.exceptions[0]
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], MerkleListenerError):
            raise group.exceptions[0] from None
        raise


def cmd_status(args) -> int:
    from listener.status import collect, has_errors, render

    with database(args) as dsn, connect(dsn) as conn:
        _checked(conn)
        report = collect(conn)
    if args.json:
        _print_json(report)
    else:
        print(render(report))
    return 3 if has_errors(report) else 0


def cmd_prove(args) -> int:
    from listener import proofs

    with database(args) as dsn, connect(dsn, autocommit=False) as conn:
        _checked(conn)
        conn.commit()
        if args.proof_type == "inclusion":
            doc = proofs.inclusion(conn, args.log, args.index, args.size)
        else:
            doc = proofs.consistency(conn, args.log, args.first, args.second)
    _print_json(doc)
    return 0


def cmd_verify(args) -> int:
    """A proof document (JSON) or a signed checkpoint (text); a proof may be checked against the
    root of a signed checkpoint (--checkpoint with --vkey) or a root trusted at a size."""
    from listener import proofs
    from listener.checkpoint import open_checkpoint

    if not args.file:  # Path("") is ".": "cannot read .: Is a directory" would puzzle
        raise ConfigurationError("no proof file given: name a file written by `prove`, or - for standard input")
    raw = sys.stdin.buffer.read() if args.file == "-" else _read_file(Path(args.file))
    proof_options = [flag for flag, value in (("--root", args.root), ("--size", args.size), ("--checkpoint", args.checkpoint),
                                              ("--old-root", args.old_root), ("--old-size", args.old_size),
                                              ("--old-checkpoint", args.old_checkpoint)) if value is not None]
    if "\n\n\u2014 ".encode() in raw:  # a signed note: text, blank line, "— " signature lines
        if proof_options:
            raise ConfigurationError(f"{args.file} is a signed checkpoint, checked with --vkey alone; "
                                     f"{', '.join(proof_options)} are for proofs")
        cp, note = open_checkpoint(raw, [_read_vkey(args.vkey)])
        print(f"OK: checkpoint of {cp.origin} at size {cp.size}, root {proofs.b64(cp.root)}, "
              f"signed by {', '.join(note.verified_by)}")
        return 0
    if "\r\n\r\n\u2014 ".encode() in raw:
        raise ProofVerificationError(f"{args.file} is a signed checkpoint with CRLF line ends, which no signature "
                                     "covers: a signed note's lines end in LF (was it copied through a Windows tool?)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProofVerificationError(
            f"{args.file} is neither a signed checkpoint (text, a blank line, then lines starting '\u2014 ') nor a "
            f"proof document (JSON: {exc})") from None
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind not in ("inclusion", "consistency"):
        proofs.verify_document(doc)  # says what a proof document is
    if kind == "inclusion" and any(flag.startswith("--old-") for flag in proof_options):
        raise ConfigurationError("--old-root, --old-size and --old-checkpoint are for consistency proofs; an inclusion "
                                 "proof has one root: give it with --root and --size, or --checkpoint")
    if args.vkey and not (args.checkpoint or args.old_checkpoint):
        raise ConfigurationError("--vkey checks a signed checkpoint: give one with --checkpoint (or --old-checkpoint), "
                                 "or verify the checkpoint file itself")
    trusted = _trusted_root(args.root, args.size, args.checkpoint, args.vkey, doc,
                            "tree_size" if kind == "inclusion" else "second", "--root", "--size", "--checkpoint")
    trusted_first = _trusted_root(args.old_root, args.old_size, args.old_checkpoint, args.vkey, doc, "first",
                                  "--old-root", "--old-size", "--old-checkpoint")
    print(proofs.verify_document(doc, trusted, trusted_first))
    return 0


def _trusted_root(root: str | None, size: int | None, checkpoint: Path | None, vkey: str | None, doc: dict,
                  size_key: str, root_flag: str, size_flag: str, checkpoint_flag: str) -> bytes | None:
    """The root given by `root_flag` (base64, trusted at `size_flag`) or `checkpoint_flag` (a
    signed checkpoint), or None; the document's `size_key` must be that size: a root alone
    does not say which tree it is of, and a proof for another size could be made to lead to it."""
    from listener import proofs
    from listener.checkpoint import open_checkpoint

    if (root is None) != (size is None) and checkpoint is None:
        raise ConfigurationError(f"{root_flag} and {size_flag} go together: the root you trust and the tree size you "
                                 "trust it at (or give a signed checkpoint, which names both)")
    trusted = proofs.unb64(root, root_flag) if root is not None else None  # "" is a bad root, not none
    where = f"{root_flag} and {size_flag}"
    if checkpoint is not None:
        cp, _ = open_checkpoint(_read_file(checkpoint), [_read_vkey(vkey)])
        if trusted is not None and trusted != cp.root:
            raise ProofVerificationError(f"{root_flag} and the root of {checkpoint_flag} differ")
        if size is not None and size != cp.size:
            raise ProofVerificationError(f"{size_flag} is {size} but the checkpoint of {checkpoint_flag} is at size {cp.size}")
        if doc.get("origin", cp.origin) != cp.origin:
            raise ProofVerificationError(f"the proof names log origin {doc.get('origin')!r} but the checkpoint of "
                                         f"{checkpoint_flag} is of {cp.origin!r}")
        print(f"OK: checkpoint of {cp.origin} at size {cp.size} signed by a known key")
        trusted, size, where = cp.root, cp.size, f"the checkpoint of {checkpoint_flag}"
    if size is not None and doc.get(size_key) != size:
        raise ProofVerificationError(
            f"the proof's {size_key} is {doc.get(size_key)!r} but the root you trust ({where}) is at size {size}; "
            f"ask for a proof at size {size}")
    return trusted


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None


def cmd_demo(args) -> int:
    from listener.demo import run_demo

    if args.rows < 1 or args.writers < 1:
        raise ConfigurationError("--rows and --writers must be at least 1")
    target = _target(args)
    if target.embedded:
        server = EmbeddedPostgres(args.data_dir or default_data_dir())
        with server.running():
            return run_demo(server.dsn(), rows=args.rows, writers=args.writers)
    return run_demo(target.dsn, rows=args.rows, writers=args.writers)


def cmd_bench(args) -> int:
    from listener.bench import main as bench_main

    if args.leaves is not None and args.leaves < 1:  # 0 would silently run the default size
        raise ConfigurationError("--leaves must be at least 1")
    return bench_main(args)


COMMANDS = {
    "db": cmd_db, "init": cmd_init, "guard": cmd_guard, "log": cmd_log, "source": cmd_source, "run": cmd_run, "status": cmd_status,
    "prove": cmd_prove, "verify": cmd_verify, "demo": cmd_demo, "bench": cmd_bench,
    "keygen": cmd_keygen, "serve": cmd_serve, "monitor": cmd_monitor,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level
    if args.command == "run" and "--log-level" not in (argv if argv is not None else sys.argv):
        level = "info"
    jsonlog.setup(level)
    # SIGTERM unwinds like Ctrl-C so an embedded server started here is stopped (`run` handles both itself).
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return COMMANDS[args.command](args)
    except ProofVerificationError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except MerkleListenerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"database error: {str(exc).strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
