"""`merkle-listener demo`: two sample tables, concurrent writers, a listener, proofs verified.

orders is captured by its statement trigger (append-only), payments through the log's logical
replication slot, with its updates logged too (trigger mode as well when the server's
wal_level is not logical). Runs against database `merkle_demo` on the given server (recreated
on every run), so it never touches other data; the slot is dropped again before the demo
ends, since a slot nobody reads keeps the server's WAL. Prints what a user would check and
exits 0 only if every check held.
"""

from __future__ import annotations

import random
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

import anyio
import psycopg

from listener import canonical, embedded, merkle, proofs, registry
from listener.runner import RunOptions, connect, run
from listener.store import migrate

DEMO_DB = "merkle_demo"

SCHEMA = """
CREATE TABLE orders (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer   text NOT NULL,
    amount     numeric(12, 2) NOT NULL,
    placed_at  timestamptz NOT NULL DEFAULT now(),
    note       text
);
CREATE TABLE payments (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    order_id   bigint NOT NULL,
    amount     numeric(12, 2) NOT NULL,
    method     text NOT NULL
);
-- Updates are logged from the whole row: pgoutput then sends every value, TOASTed ones too.
ALTER TABLE payments REPLICA IDENTITY FULL;
"""

CUSTOMERS = ["Ada", "Grace", "Edsger", "Barbara", "Tony", "Frances", "Ken", "Radia", "Zoë", "Łukasz"]


def _dsn_for(admin_dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=dbname)


def _step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run_demo(admin_dsn: str, *, rows: int = 200, writers: int = 4) -> int:
    _step(f"creating database {DEMO_DB} with tables orders and payments")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        _drop_slots(admin)  # a database with a slot cannot be dropped
        admin.execute(f"DROP DATABASE IF EXISTS {DEMO_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DEMO_DB}")
        logical = admin.execute("SHOW wal_level").fetchone()[0] == "logical"
    dsn = _dsn_for(admin_dsn, DEMO_DB)
    with connect(dsn) as conn:
        migrate.apply(conn)
        conn.commit()
        conn.execute(SCHEMA)
        conn.commit()
        log = registry.create_log(conn, "demo", "example.com/merkle-listener/demo")
        source, _ = registry.add_source(conn, "demo", "orders", append_only=True)
        print(f"   {source.qualified} feeds log 'demo' by its statement trigger (key {', '.join(source.key_columns)}, "
              "append-only: UPDATE and DELETE are refused)")
        if logical:
            source, _ = registry.add_source(conn, "demo", "payments", mode="replication",
                                            events=["insert", "update", "delete"], dsn=dsn)
            print(f"   {source.qualified} feeds log 'demo' through logical replication (slot merkle_demo; "
                  "inserts, updates and deletes logged)")
        else:
            source, _ = registry.add_source(conn, "demo", "payments")
            print(f"   {source.qualified} feeds log 'demo' by its statement trigger (inserts logged; this server's "
                  "wal_level is not logical, so the demo leaves logical replication out)")

    committed = anyio.run(_run_writers_with_listener, dsn, rows, writers, logical)

    with connect(dsn) as conn:
        return _report(conn, log.name, committed)


async def _run_writers_with_listener(dsn: str, rows: int, writers: int, logical: bool) -> dict:
    result: dict = {}
    async with anyio.create_task_group() as tg:
        await tg.start(run, RunOptions(dsn=dsn, poll_interval=0.5))
        _step(f"listener running; {writers} writers insert and update concurrently (some transactions roll back)")
        started = time.perf_counter()
        result = await anyio.to_thread.run_sync(_write_concurrently, dsn, rows, writers, logical)
        print(f"   {result['rows']} changes committed ({result['updates']} of them updates of payments), "
              f"{result['rolled_back']} rolled back, in {time.perf_counter() - started:.2f} s")
        deadline = time.monotonic() + 60
        while await anyio.to_thread.run_sync(_tree_size, dsn) < result["rows"]:
            if time.monotonic() > deadline:
                break
            await anyio.sleep(0.05)
        result["sequenced_after"] = time.perf_counter() - started
        if logical:
            # While the listener runs: `source remove` waits for it to have logged what came before.
            removed = await anyio.to_thread.run_sync(_remove_payments, dsn)
            print("   payments left the log again, and its slot with it (a slot nobody reads keeps the server's "
                  "WAL); its leaves stay" if removed else "   FAILED: payments could not be removed")
            result["removed"] = removed
        tg.cancel_scope.cancel()
    return result


def _remove_payments(dsn: str) -> bool:
    with connect(dsn) as conn:
        return registry.remove_source(conn, "demo", "payments", dsn=dsn, wait=30) == 0


def _drop_slots(admin: psycopg.Connection) -> None:
    """Drop the demo database's slots (of an earlier run that was killed), ending a listener
    that still streams one."""
    deadline = time.monotonic() + 10
    while True:
        admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                      "WHERE database = %s AND active_pid IS NOT NULL", (DEMO_DB,))
        try:
            admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                          (DEMO_DB,))
            return
        except psycopg.errors.ObjectInUse:  # its walsender has not exited yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _tree_size(dsn: str) -> int:
    return _tree_state(dsn)[0]


def _tree_state(dsn: str) -> tuple[int, bytes]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT tree_size, root FROM merkle.logs WHERE name = 'demo'").fetchone()


def _write_concurrently(dsn: str, rows: int, writers: int, updates_logged: bool) -> dict:
    totals = {"rows": 0, "updates": 0, "rolled_back": 0, "midway": None}
    lock = threading.Lock()

    def writer(n: int) -> None:
        rnd = random.Random(n)
        done = rolled = updates = 0
        with psycopg.connect(dsn) as conn:
            for i in range(rows):
                with conn.transaction():
                    customer = rnd.choice(CUSTOMERS)
                    amount = f"{rnd.randint(100, 99999) / 100:.2f}"
                    order_id = conn.execute(
                        "INSERT INTO orders (customer, amount, note) VALUES (%s, %s, %s) RETURNING id",
                        (customer, amount, f"writer {n}, order {i}"),
                    ).fetchone()[0]
                    payment_id = conn.execute(
                        "INSERT INTO payments (order_id, amount, method) VALUES (%s, %s, %s) RETURNING id",
                        (order_id, amount, rnd.choice(["card", "transfer", "cash"])),
                    ).fetchone()[0]
                    changes = 2
                    if updates_logged and rnd.random() < 0.2:
                        conn.execute("UPDATE payments SET method = 'refunded' WHERE id = %s", (payment_id,))
                        changes += 1
                    # Writer 0's first transaction commits even when drawn to roll back: with
                    # --rows 1 there would be no order to prove otherwise.
                    if rnd.random() < 0.1 and (n, i) != (0, 0):
                        rolled += changes
                        raise psycopg.Rollback()
                    done += changes
                    updates += changes - 2
                if n == 0 and i == rows // 2:
                    with lock:  # a root seen while the log grew: its later roots must extend it
                        totals["midway"] = _tree_state(dsn)
        with lock:
            totals["rows"] += done
            totals["updates"] += updates
            totals["rolled_back"] += rolled

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return totals


def _report(conn: psycopg.Connection, log_name: str, committed: dict) -> int:
    ok = True
    log = registry.get_log(conn, log_name)
    _step(f"log {log.name!r}: {log.tree_size} leaves, sequenced {committed['sequenced_after']:.2f} s after the writers started")
    print(f"   root {proofs.b64(log.root)}")
    seqs = conn.execute(
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq), "
        "count(DISTINCT (source_id, change_id, change_ord)) FROM merkle.processed_log WHERE log_id = %s",
        (log.log_id,),
    ).fetchone()
    exact = seqs[0] == committed["rows"] == seqs[1] == seqs[4] and seqs[2] == 0 and seqs[3] == seqs[0] - 1
    ok &= exact
    print(f"   {'OK' if exact else 'FAILED'}: {committed['rows']} committed changes, {seqs[0]} leaves, "
          "seq gap-free, no change twice, none of the rolled-back ones")
    ok &= committed.get("removed", True)

    # The 42nd committed order (ids of rolled-back rows are gaps, so not min(id) + 41), or the
    # last one when a small --rows committed fewer.
    order_id = conn.execute(
        "SELECT id FROM orders ORDER BY id OFFSET LEAST(41, (SELECT count(*) - 1 FROM orders)) LIMIT 1").fetchone()[0]
    _step(f"inclusion proof for the row orders.id = {order_id}")
    key = canonical.key_json({"id": str(order_id)})
    index = conn.execute(
        "SELECT seq FROM merkle.leaves_by_key(%s, 'public.orders', %s, %s)", (log.log_id, key, 2**63 - 1),
    ).fetchone()[0]
    conn.commit()
    doc = proofs.inclusion(conn, log.name, index)
    print(f"   leaf index {index}, key {key}, {len(doc['proof'])} hashes in the proof")
    # Recompute the leaf from the row as it is now: it still matches because orders is append-only.
    row = conn.execute(
        "SELECT id::text, customer, amount::text, placed_at::text, note FROM orders WHERE id = %s", (order_id,)
    ).fetchone()
    entry = canonical.entry_v1("insert", "public.orders", dict(zip(["id", "customer", "amount", "placed_at", "note"], row)))
    print(f"   entry {entry.decode()}")
    recomputed = merkle.hash_leaf(entry)
    same = proofs.b64(recomputed) == doc["leaf_hash"]
    ok &= same
    print(f"   {'OK' if same else 'FAILED'}: the leaf hash recomputed from the row equals the logged one")
    ok &= _verify(doc, log.root)

    if committed["updates"]:
        ok &= _check_an_update(conn, log)

    first, first_root = committed["midway"] or (0, merkle.EMPTY_ROOT)
    _step(f"consistency proof from size {first}, whose root the demo saw while the writers wrote, "
          f"to size {log.tree_size}")
    conn.commit()
    ok &= _verify(proofs.consistency(conn, log.name, first, log.tree_size), log.root, first_root)

    _step("a tampered proof must fail")
    bad = dict(doc, leaf_index=doc["leaf_index"] ^ 1) if doc["tree_size"] > 1 else dict(doc, root=proofs.b64(bytes(32)))
    rejected = not _verify(bad, quiet=True)
    ok &= rejected
    print(f"   {'OK' if rejected else 'FAILED'}: a proof for the wrong index is rejected")
    conn.commit()

    _step("done: " + ("every check held" if ok else "SOME CHECKS FAILED"))
    ml, psql = _commands()
    print(f"   explore it: {ml} db start")
    print(f'              {ml} --dsn "$({ml} db url --database {DEMO_DB})" status')
    print(f'              {psql} "$({ml} db url --database {DEMO_DB})"   # then: SELECT * FROM merkle.processed_log LIMIT 5;')
    print(f"              {ml} db stop")
    return 0 if ok else 1


def _commands() -> tuple[str, str]:
    """How to type merkle-listener and psql in the user's shell: by name where that finds
    these ones, else by path (the README installs into a virtual environment it does not
    activate, and the wheel's psql is on no PATH)."""
    here = Path(sys.executable).parent / "merkle-listener"
    found = shutil.which("merkle-listener")
    if found and Path(found).resolve() == here.resolve():
        ml = "merkle-listener"
    elif here.exists():
        ml = shlex.quote(str(here))
    else:
        ml = f"{shlex.quote(sys.executable)} -m listener"
    psql = embedded.bin_dir() / "psql"
    on_path = shutil.which("psql")
    return ml, ("psql" if on_path and Path(on_path).resolve() == psql.resolve() else shlex.quote(str(psql)))


def _check_an_update(conn: psycopg.Connection, log) -> bool:
    """A refunded payment has two leaves, its insert and its update; the update's is recomputed
    from the row as it is now."""
    row = conn.execute("SELECT id::text, order_id::text, amount::text, method FROM payments "
                       "WHERE method = 'refunded' ORDER BY id LIMIT 1").fetchone()
    key = canonical.key_json({"id": row[0]})
    _step(f"the leaves of the refunded payment {row[0]}, logged through the slot")
    leaves = conn.execute("SELECT seq, op, leaf_hash FROM merkle.processed_log WHERE log_id = %s AND source_key = %s "
                          "ORDER BY seq", (log.log_id, key)).fetchall()
    conn.commit()
    print(f"   {', '.join(f'{op} at leaf {seq}' for seq, op, _ in leaves)}")
    entry = canonical.entry_v1("update", "public.payments", dict(zip(["id", "order_id", "amount", "method"], row)))
    print(f"   entry {entry.decode()}")
    same = [op for _, op, _ in leaves] == ["insert", "update"] and merkle.hash_leaf(entry) == bytes(leaves[1][2])
    print(f"   {'OK' if same else 'FAILED'}: the update's leaf hash recomputed from the row equals the logged one")
    return same and _verify(proofs.inclusion(conn, log.name, leaves[-1][0]), log.root)


def _verify(doc: dict, root: bytes | None = None, first_root: bytes | None = None, quiet: bool = False) -> bool:
    try:
        msg = proofs.verify_document(doc, root, first_root)
    except Exception as exc:  # noqa: BLE001 - any failure is reported as a failed check
        if not quiet:
            print(f"   FAILED: {exc}")
        return False
    if not quiet:
        print(f"   {msg}")
    return True
