"""`merkle-listener status`: logs, sizes, roots, queued changes and their age, slot health."""

from __future__ import annotations

import base64
from dataclasses import replace

import psycopg
from psycopg import sql

from listener import relink
from listener.registry import list_logs, list_sources, missing_capture, missing_capture_message, retired_origins
from listener.sources import slot_health
from listener.sources.trigger import outbox_columns, outbox_name


_PARTITION_WARNING = ("{table} is partitioned or a partition: trigger mode captures only rows inserted into it by "
                      "name, not through another level of its partition tree; remove the source and add the "
                      "partitioned table with --mode replication")


def collect(conn: psycopg.Connection) -> dict:
    logs = []
    moved = {m.source_id: m for m in relink.moved_sources(conn)}
    for log in list_logs(conn):
        sources = []
        # A table back under a new OID (restored from pg_dump) is shown as it is now.
        registered = [replace(s, table_oid=moved[s.source_id].new_oid)
                      if s.source_id in moved and moved[s.source_id].new_oid is not None else s
                      for s in list_sources(conn, log.log_id)]
        # Without their outbox or publication (a data-only restore).
        missing = {s.source_id for s in missing_capture(conn, log.name, registered)}
        for s in registered:
            if s.mode == "replication":
                sources.append(slot_health.source_status(conn, log.name, s))
                continue
            if s.source_id in missing:
                queued, oldest = 0, None
            else:
                queued, oldest = conn.execute(sql.SQL(
                    "SELECT count(*), extract(epoch FROM now() - min({}))::float8 FROM {}"
                ).format(sql.Identifier(outbox_columns(s).queued_at), outbox_name(s.source_id))).fetchone()
            capturing = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = %s AND tgname = %s)",
                (s.table_oid, f"merkle_capture_{s.source_id}"),
            ).fetchone()[0]
            partitioned, partition = conn.execute(
                "SELECT relkind = 'p', relispartition FROM pg_class WHERE oid = %s", (s.table_oid,)).fetchone() or (
                False, False)
            sources.append({
                "table": s.qualified, "mode": s.mode, "capturing": capturing, "append_only": s.append_only,
                "doorbell": s.doorbell,
                "queued": queued, "oldest_queued_seconds": round(oldest, 3) if oldest is not None else None,
                # Registered by an earlier version, which allowed it: rows written through
                # another level of the partition tree fire no trigger of this table.
                "warning": _PARTITION_WARNING.format(table=s.qualified) if partitioned or partition else None,
            })
        for s, shown in zip(registered, sources):
            m = moved.get(s.source_id)
            if s.source_id in missing:
                # Its recovery (remove, add again) also settles a table that moved or was dropped.
                shown["error"] = missing_capture_message(log.name, s)
            elif m is not None and m.new_oid is not None:
                shown["error"] = (f"table {s.qualified} came back under a new OID ({m.old_oid} -> {m.new_oid}: the "
                                  "database was restored from a dump?), and the source's checks, the DDL guard and "
                                  "`source remove` go by the old one: run `merkle-listener init` to point it at its "
                                  "table again")
            elif not conn.execute("SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = %s)", (s.table_oid,)).fetchone()[0]:
                shown["warning"] = (f"table {s.qualified} no longer exists (dropped): its leaves stay in the log; "
                                    f"`merkle-listener source remove {log.name} {s.qualified}` unregisters it")
            elif m is not None:
                shown["warning"] = (f"OID {s.table_oid} of table {s.qualified} names another table now, and its "
                                    "table was not found (the database was restored from a dump?): remove the "
                                    "source and add it again")
        ages = [s["oldest_queued_seconds"] for s in sources if s["oldest_queued_seconds"] is not None]
        refused, refused_at, writer_error, writer_error_at = conn.execute(
            "SELECT signing_refused, signing_refused_at, writer_error, writer_error_at FROM merkle.logs "
            "WHERE log_id = %s", (log.log_id,)).fetchone()
        logs.append({
            "name": log.name, "origin": log.origin, "tree_size": log.tree_size, "paused": log.paused,
            "writer_error": writer_error, "writer_error_since": writer_error_at.isoformat() if writer_error_at else None,
            "signing_refused": refused, "signing_refused_since": refused_at.isoformat() if refused_at else None,
            "retired_origins": [{"origin": r.origin, "published_size": r.published_size, "tree_size": r.tree_size,
                                 "retired_at": r.retired_at.isoformat()} for r in retired_origins(conn, log.log_id)],
            "root": base64.b64encode(log.root).decode(), "root_hex": log.root.hex(),
            "queued": sum(s["queued"] for s in sources),
            "oldest_queued_seconds": max(ages) if ages else None,
            "sources": sources,
            "slot": slot_health.collect(conn, log.log_id, log.name),
        })
    return {"logs": logs}


def has_errors(report: dict) -> bool:
    """A replication slot that is missing, lost or moved past the log, a publication changed by
    hand, a source's table back under a new OID, or a source without its outbox or publication (a
    data-only restore): changes are not being captured, or not checked, until the user recovers.
    Or the listener refuses to sign the log's tree, or its writer is stopped by an error it keeps
    running into. `status` exits 3, for monitoring scripts."""
    return any(log.get("slot") and (log["slot"]["level"] == "error" or log["slot"]["publication_problem"])
               or any(s.get("error") for s in log["sources"]) or log["signing_refused"] or log["writer_error"]
               for log in report["logs"])


def render(report: dict) -> str:
    if not report["logs"]:
        return "no logs yet: create one with `merkle-listener log create NAME`"
    lines = []
    for log in report["logs"]:
        age = "" if log["oldest_queued_seconds"] is None else f", oldest {log['oldest_queued_seconds']:.3f} s ago"
        lines.append(f"log {log['name']}  size {log['tree_size']}  root {log['root']}")
        if log["paused"]:
            lines.append(f"  PAUSED: nothing is appended until `merkle-listener log resume {log['name']}`")
        lines.append(f"  origin {log['origin']}; queued {log['queued']}{age}")
        for old in log["retired_origins"]:
            ended = ("no checkpoint of it known" if old["published_size"] is None
                     else f"its last checkpoint at size {old['published_size']}")
            lines.append(f"  retired origin {old['origin']} ({ended}; retired at {old['retired_at']}, "
                         f"log size {old['tree_size']})")
        if log["writer_error"]:
            lines.append(f"  error: since {log['writer_error_since']}, the listener cannot append to this log "
                         f"(nothing after the change it is stuck on is logged): {log['writer_error']}")
        if log["signing_refused"]:
            lines.append(f"  error: since {log['signing_refused_since']}, {log['signing_refused']}")
        for s in log["sources"]:
            flags = [s["mode"], "capturing" if s["capturing"] else "capture stopped"]
            if s["append_only"]:
                flags.append("append-only")
            if s.get("doorbell") is False:
                flags.append("no doorbell: polled every 0.1 s")
            if s["mode"] == "replication":
                flags.append(f"events {', '.join(s['events'])}")
                waiting = (f"backfill rows to append {s['queued']}; " if s["queued"] else "") + (
                    "its changes come through the slot (its lag below)")
            else:
                waiting = f"queued {s['queued']}"
            lines.append(f"  source {s['table']} ({', '.join(flags)}): {waiting}")
            if s.get("warning"):
                lines.append(f"  warning: {s['warning']}")
            if s.get("error"):
                lines.append(f"  error: {s['error']}")
        if log.get("slot"):
            lines.extend(slot_health.render(log["slot"]))
    return "\n".join(lines)
