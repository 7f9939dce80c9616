"""Routes and handlers of the HTTP API (Starlette). docs/http-api.md describes every endpoint;
openapi.py is the machine-readable form.

Every error is a JSON object {"error": "..."}: 4xx for anything the request got wrong, 503 when
the database cannot be reached (or /readyz is not ready). A 500 would be a bug.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import logging
import os
import re
import time

import orjson
import psycopg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from listener import canonical, merkle, proofs
from listener.api import entries as entries_mod
from listener.api.logstate import LogInfo, LogState
from listener.api.openapi import spec
from listener.api.tilestore import TileStore
from listener.errors import MerkleListenerError, ProofVerificationError
from listener.merkle.tiles import MAX_TILE_LEVEL, TILE_WIDTH, tile_path

log = logging.getLogger("listener.api")

MAX_INDEX = (1 << 63) - 1
MAX_BODY = 1 << 20
FULL_TILE_CACHE = "public, max-age=31536000, immutable"
PARTIAL_TILE_CACHE = "public, max-age=60"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


# -- input parsing -------------------------------------------------------------------------


def _query(request: Request, name: str) -> str | None:
    """A query parameter given at most once: which of two a caller meant is not ours to guess."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"query parameter {name!r} is given {len(values)} times; give it once")
    return values[0] if values else None


def _int_param(request: Request, name: str, *, required: bool = False, default: int | None = None) -> int | None:
    raw = _query(request, name)
    if raw is None:
        if required:
            raise ApiError(400, f"query parameter {name!r} is required")
        return default
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", raw) or int(raw) > MAX_INDEX:
        raise ApiError(400, f"query parameter {name!r} must be a non-negative decimal integer, got {raw!r}")
    return int(raw)


def _hash_param(raw: str, name: str) -> bytes:
    """A 32-byte hash as 64 hex digits or base64 (standard or URL-safe; a '+' read as ' ' is fine)."""
    if re.fullmatch(r"[0-9a-fA-F]{64}", raw):
        return bytes.fromhex(raw)
    text = raw.replace(" ", "+").replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)  # URL-safe base64 usually comes unpadded
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        value = b""
    if len(value) != 32:
        raise ApiError(400, f"{name} must be a 32-byte hash in hex or base64, got {raw!r}")
    return value


def _log(request: Request) -> LogInfo:
    name = request.path_params["log"]
    info = request.app.state.logs.logs.get(name)
    if info is None:
        raise ApiError(404, f"no log named {name!r} (GET /v1/logs lists them)")
    return info


async def _fresh(request: Request, info: LogInfo, size: int) -> LogInfo:
    """The log's info, refreshed once if `size` is beyond what the snapshot knows."""
    if size > info.tree_size:
        state: LogState = request.app.state.logs
        await state.refresh()
        info = state.logs.get(info.name, info)
    return info


async def _size(request: Request, info: LogInfo, name: str = "size") -> tuple[LogInfo, int]:
    size = _int_param(request, name)
    if size is None:
        return info, info.default_size
    info = await _fresh(request, info, size)
    if size > info.tree_size:
        raise ApiError(400, f"{name} {size} is beyond log {info.name!r}'s size {info.tree_size}")
    return info, size


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


# -- proofs --------------------------------------------------------------------------------


async def _inclusion_doc(request: Request, info: LogInfo, index: int, size: int) -> dict:
    tiles: TileStore = request.app.state.tiles
    if not 0 <= index < size:
        raise ApiError(400, f"leaf index {index} is outside 0..{size - 1} (tree size {size})" if size else
                       f"the tree of size 0 has no leaf {index}")
    plan = merkle.inclusion_plan(index, size)
    root_plan = None if size == info.default_size and info.checkpoint_root is not None else merkle.root_plan(size)
    ids = [(0, index), *plan.ids, *(root_plan.ids if root_plan else ())]
    nodes = await tiles.nodes(info.log_id, ids)
    proof = plan.assemble(nodes[1 : 1 + len(plan.ids)])
    root = info.checkpoint_root if root_plan is None else (root_plan.assemble(nodes[1 + len(plan.ids):]) or [merkle.EMPTY_ROOT])[0]
    return {
        "type": "inclusion", "log": info.name, "origin": info.origin, "leaf_index": index, "tree_size": size,
        "leaf_hash": _b64(nodes[0]), "root": _b64(root), "proof": [_b64(h) for h in proof],
        "signed": size == info.checkpoint_size,
    }


async def inclusion(request: Request) -> Response:
    info = _log(request)
    info, size = await _size(request, info)
    raw_hash = _query(request, "leaf_hash")
    index = _int_param(request, "index")
    if (raw_hash is None) == (index is None):
        raise ApiError(400, "give exactly one of 'index' or 'leaf_hash'")
    if raw_hash is not None:
        leaf_hash = _hash_param(raw_hash, "leaf_hash")
        async with request.app.state.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT merkle.leaf_index(%s, %s, %s)", (info.log_id, leaf_hash, size),
            )).fetchone()
        if row[0] is None:
            raise ApiError(404, f"no leaf with hash {_b64(leaf_hash)} in log {info.name!r} at size {size}")
        index = row[0]
    return json_response(await _inclusion_doc(request, info, index, size))


async def consistency(request: Request) -> Response:
    info = _log(request)
    first = _int_param(request, "first", required=True)
    info, second = await _size(request, info, "second")
    if first > second:
        raise ApiError(400, f"need first <= second, got first {first} and second {second}")
    plan, r1, r2 = merkle.consistency_plan(first, second), merkle.root_plan(first), merkle.root_plan(second)
    nodes = await request.app.state.tiles.nodes(info.log_id, [*plan.ids, *r1.ids, *r2.ids])
    a, b = len(plan.ids), len(plan.ids) + len(r1.ids)
    proof = plan.assemble(nodes[:a])
    first_root = (r1.assemble(nodes[a:b]) or [merkle.EMPTY_ROOT])[0]
    second_root = (r2.assemble(nodes[b:]) or [merkle.EMPTY_ROOT])[0]
    return json_response({
        "type": "consistency", "log": info.name, "origin": info.origin, "first": first, "second": second,
        "first_root": _b64(first_root), "second_root": _b64(second_root), "proof": [_b64(h) for h in proof],
    })


# -- entries and lookup ----------------------------------------------------------------------


def _entry_doc(leaf: entries_mod.Leaf) -> dict:
    entry = leaf.entry
    text = None
    if entry is not None:
        try:
            text = entry.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    return {
        "index": leaf.seq, "leaf_hash": _b64(leaf.leaf_hash), "source": leaf.source, "source_key": leaf.source_key,
        "op": leaf.op, "sequenced_at": leaf.sequenced_at,
        "entry": text, "entry_base64": None if entry is None else _b64(entry),
        "entry_matches_leaf": leaf.matches,
    }


async def entry(request: Request) -> Response:
    info = _log(request)
    raw = request.path_params["index"]
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", raw):
        raise ApiError(400, f"entry index must be a non-negative decimal integer, got {raw!r}")
    index = int(raw)
    info = await _fresh(request, info, index + 1)
    if index >= info.tree_size:
        raise ApiError(404, f"log {info.name!r} has no leaf {index} (size {info.tree_size})")
    async with request.app.state.pool.connection() as conn:
        leaves = await entries_mod.leaves(conn, info.log_id, index, index + 1)
    return json_response(_entry_doc(leaves[0]))


async def lookup(request: Request) -> Response:
    info = _log(request)
    source, raw_key = _query(request, "source"), _query(request, "key")
    if not source or raw_key is None:
        raise ApiError(400, "give 'source' (schema.table) and 'key' (a JSON object of the key columns' text values)")
    if "\x00" in source:
        raise ApiError(400, "'source' must not contain a NUL character: no table name does")
    try:
        key = canonical.key_json(orjson.loads(raw_key))
    except (orjson.JSONDecodeError, MerkleListenerError, AttributeError) as exc:
        raise ApiError(400, f"'key' must be a JSON object of column name to text value or null: {exc}") from None
    info, size = await _size(request, info)
    async with request.app.state.pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT seq, op FROM merkle.leaves_by_key(%s, %s, %s, %s)", (info.log_id, source, key, size),
        )).fetchall()
    if not rows:
        raise ApiError(404, f"no leaf of {source} with key {key} in log {info.name!r} at size {size}")
    found = []
    for seq, op in rows:
        doc = await _inclusion_doc(request, info, seq, size)
        doc.update(source=source, source_key=key, op=op)
        found.append(doc)
    return json_response({"log": info.name, "source": source, "source_key": key, "tree_size": size, "leaves": found})


async def verify(request: Request) -> Response:
    """POST a proof document or an entry claim; 200 with verified true/false and the reason."""
    body = await _body(request)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "body must be a JSON object: a proof document or an entry claim")
    try:
        if doc.get("type") == "entry":
            detail = _verify_entry(doc)
        else:
            detail = proofs.verify_document(doc, None)
    except ProofVerificationError as exc:
        return json_response({"verified": False, "reason": str(exc)})
    return json_response({"verified": True, "detail": detail})


def _verify_entry(doc: dict) -> str:
    """{"type": "entry", "entry" (text) or "entry_base64", "leaf_index", "tree_size", "proof", "root"}"""
    given = []  # an entry document gives both: the claim is the entry only if they agree
    if isinstance(doc.get("entry"), str):
        given.append(doc["entry"].encode("utf-8", "surrogatepass"))
    if isinstance(doc.get("entry_base64"), str):
        try:
            given.append(base64.b64decode(doc["entry_base64"], validate=True))
        except (binascii.Error, ValueError):
            raise ProofVerificationError("entry_base64 is not valid base64") from None
    if not given:
        raise ProofVerificationError('an entry claim needs "entry" (text) or "entry_base64"')
    if len(set(given)) > 1:
        raise ProofVerificationError('"entry" and "entry_base64" are two different entries: give one, or both alike')
    data = given[0]
    claim = dict(doc, type="inclusion", leaf_hash=_b64(canonical.leaf_hash_of_entry(data)))
    return proofs.verify_document(claim, None).replace("OK: leaf", "OK: entry of leaf", 1)


async def _body(request: Request) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY:
            raise ApiError(413, f"body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -- logs, checkpoints, tlog-tiles -------------------------------------------------------------


def _log_doc(info: LogInfo) -> dict:
    return {
        "name": info.name, "origin": info.origin, "tree_size": info.tree_size, "root": _b64(info.root),
        "checkpoint": None if info.checkpoint_size is None else {
            "tree_size": info.checkpoint_size, "root": _b64(info.checkpoint_root), "note": info.checkpoint_note,
            "age_seconds": round(max(0.0, time.time() - info.checkpoint_time), 3),
        },
    }


async def list_logs(request: Request) -> Response:
    await request.app.state.logs.refresh()
    return json_response({"logs": [_log_doc(i) for i in sorted(request.app.state.logs.logs.values(), key=lambda i: i.name)]})


async def get_log(request: Request) -> Response:
    return json_response(_log_doc(_log(request)))


async def checkpoint(request: Request) -> Response:
    info = _log(request)
    if info.checkpoint_note is None:
        raise ApiError(404, f"log {info.name!r} has no signed checkpoint under its origin {info.origin!r} yet (the "
                            "listener signs when run with --key)")
    return Response(info.checkpoint_note.encode(), media_type="text/plain; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


_TILE = re.compile(r"(?P<level>entries|0|[1-9][0-9]?)/(?P<index>(?:x[0-9]{3}/)*[0-9]{3})(?:\.p/(?P<width>[1-9][0-9]{0,2}))?")


def _parse_tile(rest: str) -> tuple[int, int, int]:
    """(level, index, width) of "L/N[.p/W]" or "entries/N[.p/W]" (level -1); 404 if malformed."""
    m = _TILE.fullmatch(rest)
    if m is None:
        raise ApiError(404, f"not a tlog-tiles path: tile/{rest}")
    level = -1 if m["level"] == "entries" else int(m["level"])
    index = int(m["index"].replace("x", "").replace("/", ""))
    width = int(m["width"]) if m["width"] else TILE_WIDTH
    if level > MAX_TILE_LEVEL or width >= TILE_WIDTH and m["width"] or index > MAX_INDEX >> 8:
        raise ApiError(404, f"not a tlog-tiles path: tile/{rest}")
    if tile_path(level, index, width) != f"tile/{rest}":  # only the canonical spelling (no x000/ groups)
        raise ApiError(404, f"not the canonical tlog-tiles path: tile/{rest} (want {tile_path(level, index, width)})")
    return level, index, width


async def tile(request: Request) -> Response:
    info = _log(request)
    level, index, width = _parse_tile(request.path_params["rest"])
    cache = FULL_TILE_CACHE if width == TILE_WIDTH else PARTIAL_TILE_CACHE
    if level == -1:
        return await _entry_bundle(request, info, index, width, cache)
    got = await request.app.state.tiles.tiles({(info.log_id, level, index): width})
    found = got.get((info.log_id, level, index))
    if found is None:
        raise ApiError(404, f"tile {level}/{index} of width {width} does not exist (yet) in log {info.name!r}")
    return Response(found.body[: 32 * width], media_type="application/octet-stream", headers={"Cache-Control": cache})


async def _entry_bundle(request: Request, info: LogInfo, index: int, width: int, cache: str) -> Response:
    begin, end = index * TILE_WIDTH, index * TILE_WIDTH + width
    info = await _fresh(request, info, end)
    if end > info.tree_size:
        raise ApiError(404, f"entry bundle {index} of width {width} does not exist (yet): log size {info.tree_size}")
    async with request.app.state.pool.connection() as conn:
        leaves = await entries_mod.leaves(conn, info.log_id, begin, end)
    stale = [leaf.seq for leaf in leaves if not leaf.matches]
    if stale:
        raise ApiError(410, f"entry bundle {index} cannot be rebuilt: the rows of leaves {stale[:10]} changed or went "
                            "since they were logged (only append-only sources keep their entries; docs/http-api.md)")
    try:
        body = entries_mod.bundle([leaf.entry for leaf in leaves])
    except MerkleListenerError as exc:
        raise ApiError(410, str(exc)) from None
    headers = {"Cache-Control": cache, "Vary": "Accept-Encoding"}
    if _accepts_gzip(request.headers.get("accept-encoding", "")):  # tlog-tiles: bundles SHOULD be compressed
        body, headers["Content-Encoding"] = gzip.compress(body, compresslevel=6, mtime=0), "gzip"
    return Response(body, media_type="application/octet-stream", headers=headers)


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header takes gzip (RFC 9110 12.5.3: "gzip;q=0" refuses it)."""
    weights = {}
    for coding in accept_encoding.split(","):
        name, *params = (part.strip() for part in coding.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                weight = float(value) if re.fullmatch(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?", value.strip()) else 0.0
        weights[name.lower()] = weight
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0))) > 0


# -- health and spec -----------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    tiles: TileStore = request.app.state.tiles
    return json_response({"status": "ok", "pid": os.getpid(),
                          "cache": {"tiles": tiles.cached_tiles, "bytes": tiles.cached_bytes,
                                    "queries": tiles.queries, "fetched": tiles.fetched}})


async def readyz(request: Request) -> Response:
    max_age = request.app.state.ready_max_age
    raw = _query(request, "max_age")
    if raw is not None:
        if not re.fullmatch(r"[0-9]{1,10}(\.[0-9]{1,9})?", raw):  # float() takes '1_0', '٣', 'inf'
            raise ApiError(400, f"max_age must be a number of seconds, got {raw!r}")
        max_age = float(raw)
        if not 0 <= max_age < 1e9:
            raise ApiError(400, f"max_age must be between 0 and 1e9 seconds, got {raw!r}")
    state: LogState = request.app.state.logs
    try:
        await state.refresh()
    except psycopg.Error as exc:
        return json_response({"ready": False, "reason": f"database unreachable: {str(exc).strip()}"}, 503)
    # A quiet log's checkpoint may be hours old and still cover every leaf: what is not ready is
    # a log without one, or a leaf that has waited longer than max_age for one (a stalled signer).
    now, unsigned, waiting = time.time(), [], []
    for info in state.logs.values():
        if info.checkpoint_time is None:
            unsigned.append(info.name)
        elif info.uncovered_since is not None and now - info.uncovered_since > max_age:
            waiting.append(info.name)
    if unsigned or waiting:
        reasons = ([f"no checkpoint for log(s) {', '.join(sorted(unsigned))}"] if unsigned else []) + (
            [f"leaves appended over {max_age:g}s ago and not in a checkpoint yet in log(s) {', '.join(sorted(waiting))}"]
            if waiting else [])
        return json_response({"ready": False, "reason": "; ".join(reasons)}, 503)
    return json_response({"ready": True, "logs": len(state.logs)})


async def openapi(request: Request) -> Response:
    return json_response(spec())


# -- errors ----------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> Response:
    return json_response({"error": str(exc)}, exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
    return json_response({"error": detail}, exc.status_code, headers=getattr(exc, "headers", None))


async def _database_error(request: Request, exc: psycopg.Error) -> Response:
    if isinstance(exc, psycopg.OperationalError):
        return json_response({"error": f"database unavailable, retry later: {str(exc).strip()}"}, 503, {"Retry-After": "1"})
    return await _other_error(request, exc)


async def _listener_error(request: Request, exc: MerkleListenerError) -> Response:
    # A node or row the request needs is not stored (e.g. a standby lagging behind).
    return json_response({"error": str(exc)}, 409)


async def _other_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error", extra={"path": request.url.path})
    return json_response({"error": "internal error (a bug: please report it)"}, 500)


def create_app(pool, logs: LogState, tiles: TileStore, ready_max_age: float = 60.0) -> Starlette:
    routes = [
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/openapi.json", openapi),
        Route("/v1/logs", list_logs), Route("/v1/logs/{log}", get_log),
        Route("/v1/logs/{log}/proof/inclusion", inclusion), Route("/v1/logs/{log}/proof/consistency", consistency),
        Route("/v1/logs/{log}/entries/{index}", entry), Route("/v1/logs/{log}/lookup", lookup),
        Route("/v1/verify", verify, methods=["POST"]),
        Route("/{log}/checkpoint", checkpoint), Route("/{log}/tile/{rest:path}", tile),
    ]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, MerkleListenerError: _listener_error,
        psycopg.Error: _database_error, Exception: _other_error,
    })
    app.state.pool, app.state.logs, app.state.tiles, app.state.ready_max_age = pool, logs, tiles, ready_max_age
    return app


def create_asgi(pool, logs: LogState, tiles: TileStore, ready_max_age: float = 60.0):
    """The served application: the hot-path wrapper around the Starlette app."""
    from listener.api.fastpath import FastInclusion

    return FastInclusion(create_app(pool, logs, tiles, ready_max_age), logs, tiles)
