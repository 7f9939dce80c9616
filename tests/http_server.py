"""A module-scoped log served over HTTP: `merkle-listener run --key … --http …` in a
subprocess, on an append-only table `orders` and an updatable table `notes`."""

from __future__ import annotations

import itertools
import os
import socket
import time
from dataclasses import dataclass

import psycopg
import pytest

from listener import registry
from listener.client import Client, ClientError
from listener.note import Signer
from listener.runner import connect
from tests.conftest import TEMPLATE
from tests.helpers import start_listener

ORDERS = 600
_counter = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HttpLog:
    dsn: str
    url: str
    signer: Signer
    key_file: str
    listener: object

    def client(self) -> Client:
        return Client(self.url, "audit", self.signer.verifier, origin="example.com/audit")

    def wait_for_size(self, size: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                try:
                    if c.checkpoint().size >= size:
                        return
                except ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"no checkpoint of size {size} within {timeout}s:\n{self.listener.stop()}")
                time.sleep(0.05)


@pytest.fixture(scope="module")
def http_log(pg_server, tmp_path_factory):
    name = f"h{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
    dsn = pg_server.dsn(name)
    with connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12,2))")
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        registry.create_log(conn, "audit", "example.com/audit")
        registry.add_source(conn, "audit", "orders", append_only=True)
        registry.add_source(conn, "audit", "notes")
        conn.execute("INSERT INTO orders SELECT i, 'customer \"' || i || E'\\n', i * 1.5 FROM generate_series(0, %s) i",
                     (ORDERS - 1,))
        conn.execute("INSERT INTO notes VALUES (1, 'first'), (2, 'second')")
    signer = Signer.generate("example.com/audit")
    key_file = tmp_path_factory.mktemp("key") / "audit.key"
    key_file.write_text(str(signer) + "\n")
    # Port 0: the system's choice, read from the log; a port chosen here could be taken by
    # another test worker before the listener binds it.
    listener = start_listener(dsn, "--key", str(key_file), "--checkpoint-interval", "50", "--http", "127.0.0.1:0")
    log = HttpLog(dsn, listener.http_url(), signer, str(key_file), listener)
    try:
        log.wait_for_size(ORDERS + 2)
        yield log
    finally:
        listener.stop()
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
