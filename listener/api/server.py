"""Run the HTTP API inside the caller's anyio task group: `run --http` and `serve`.

One psycopg pool (autocommit, pinned settings) serves every read; LogState keeps the logs'
snapshot fresh; TileStore caches tiles. uvicorn runs without its own signal handling: the
caller's task group owns shutdown (cancellation).
"""

from __future__ import annotations

import contextlib
import logging
import socket

import anyio
import psycopg
import uvicorn
from psycopg_pool import AsyncConnectionPool

from listener.api.app import create_asgi
from listener.api.logstate import LogState
from listener.api.tilestore import TileStore
from listener.errors import ConfigurationError
from listener.store import migrate
from listener.store.connect import RUN_SEARCH_PATH, options_string

log = logging.getLogger("listener.api")


def parse_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" (an IPv6 host in brackets) -> (host, port). Raises ConfigurationError."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"--http wants HOST:PORT (e.g. 127.0.0.1:8080), got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the caller handles SIGINT/SIGTERM by cancelling our task group


def refuse_a_port_in_use(host: str, port: int) -> None:
    """Raise ConfigurationError when something listens on host:port already. A bind without
    SO_REUSEPORT fails there even when the other listener set it: without this check a
    second server of the same user (another database's, say) would silently share the
    port, the kernel spreading connections over both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror} (another merkle-listener "
                                     "serve or run --http?)") from None


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, so `serve --workers N` processes share the port
    (the kernel spreads connections over them). Raises ConfigurationError if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it: without it a keep-alive client waits ~40 ms (Nagle against
    # delayed ACK) whenever a response leaves in two writes (headers, then body).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def _serve(server: _Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit:  # uvicorn exits when it cannot start
        raise ConfigurationError("the HTTP server could not start (see the log above)") from None


def _check_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True, options=options_string()) as conn:
        migrate.check_version(conn)


async def serve_http(dsn: str, address: str, cache_mb: int = 256, ready_max_age: float = 60.0, preload: bool = False, *,
                     pool_size: int = 4, shares_port: bool = False, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; task_status.started() once the socket listens. `shares_port`:
    the port is taken by this server's other processes (`serve --workers`), which checked
    that it was free."""
    host, port = parse_address(address)
    if not shares_port and port != 0:
        refuse_a_port_in_use(host, port)
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]  # port 0: the one the system chose, which the log line below names
    pool = AsyncConnectionPool(
        dsn, min_size=pool_size, max_size=pool_size, open=False,
        kwargs={"autocommit": True, "options": options_string(search_path=RUN_SEARCH_PATH),
                "application_name": "merkle-listener-http"},
    )
    await pool.open(wait=True, timeout=30)
    try:
        # A schema without this version's migrations would fail some requests (a lookup
        # calls merkle.leaves_by_key from sql/017): refuse to start, saying what to run.
        await anyio.to_thread.run_sync(_check_schema, dsn)
        logs = LogState(pool)
        tiles = TileStore(pool, cache_mb << 20)
        async with anyio.create_task_group() as tg:
            await tg.start(logs.run, dsn)
            await tg.start(tiles.run)
            if preload:
                loaded = await tiles.preload()
                log.info("tile cache preloaded", extra={"tiles": loaded, "bytes": tiles.cached_bytes})
            app = create_asgi(pool, logs, tiles, ready_max_age)
            config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                    http="httptools", lifespan="off", loop="none")
            server = _Server(config)
            tg.start_soon(_serve, server, sock)
            while not server.started:
                await anyio.sleep(0.01)
            log.info("HTTP API listening", extra={"address": f"{host}:{port}"})
            task_status.started()
    finally:
        sock.close()
        with anyio.CancelScope(shield=True):
            await pool.close()
