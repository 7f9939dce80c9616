"""What the server knows about each log: its id, origin, tree size and latest checkpoint.

Refreshed by one task: on every NOTIFY merkle_checkpoint (when LISTEN works, i.e. not on a
hot standby) and at least every `poll` seconds. Handlers read the snapshot without a query;
one that needs a size beyond it calls refresh() once before refusing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.store.checkpoints import NOTIFY_CHANNEL
from listener.store.connect import options_string

log = logging.getLogger("listener.api")

_QUERY = """
SELECT l.log_id, l.name, l.origin, l.tree_size, l.root, c.tree_size, c.root, c.note,
       extract(epoch FROM c.created_at)::float8,
       (SELECT extract(epoch FROM p.sequenced_at)::float8 FROM merkle.processed_log p
         WHERE p.log_id = l.log_id AND p.seq = coalesce(c.tree_size, 0) AND l.tree_size > coalesce(c.tree_size, 0))
  FROM merkle.logs l
  LEFT JOIN LATERAL (SELECT tree_size, root, note, created_at FROM merkle.checkpoints k
                      WHERE k.log_id = l.log_id AND k.origin = l.origin ORDER BY tree_size DESC LIMIT 1) c ON true
"""


@dataclass(frozen=True)
class LogInfo:
    log_id: int
    name: str
    origin: str
    tree_size: int
    root: bytes
    checkpoint_size: int | None
    checkpoint_root: bytes | None
    checkpoint_note: str | None
    checkpoint_time: float | None
    uncovered_since: float | None = None  # when the first leaf no checkpoint covers was appended

    @property
    def default_size(self) -> int:
        """Proofs are for the latest signed checkpoint when there is one."""
        return self.checkpoint_size if self.checkpoint_size is not None else self.tree_size


class LogState:
    def __init__(self, pool: AsyncConnectionPool, poll: float = 1.0):
        self.pool = pool
        self.poll = poll
        self.logs: dict[str, LogInfo] = {}
        self.refreshed_at = 0.0
        self._lock = anyio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            async with self.pool.connection() as conn:
                rows = await (await conn.execute(_QUERY)).fetchall()
            self.logs = {
                r[1]: LogInfo(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], None if r[6] is None else bytes(r[6]), r[7], r[8],
                                r[9])
                for r in rows
            }
            self.refreshed_at = time.time()

    async def run(self, dsn: str, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the snapshot fresh until cancelled."""
        await self.refresh()
        task_status.started()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        dsn, autocommit=True, options=options_string(), application_name="merkle-listener-http") as aconn:
                    await aconn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while True:
                        with anyio.move_on_after(self.poll):
                            async for _ in aconn.notifies(timeout=self.poll):
                                break
                        await self.refresh()
            except psycopg.OperationalError as exc:
                # The connection was lost (a server restart, say): listen again after a pause.
                log.warning("LISTEN connection lost; listening again", extra={"error": str(exc).strip()})
                await anyio.sleep(self.poll)
                continue
            except psycopg.Error as exc:
                # A hot standby refuses LISTEN: poll only.
                log.info("no LISTEN on this server; polling for checkpoints", extra={"error": str(exc).strip()})
                while True:
                    await anyio.sleep(self.poll)
                    try:
                        await self.refresh()
                    except psycopg.Error as exc2:
                        log.warning("cannot refresh log state", extra={"error": str(exc2).strip()})
