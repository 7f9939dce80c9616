"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json."""

from __future__ import annotations

from functools import cache

from listener import __version__


def _param(name: str, where: str = "query", *, required: bool = False, schema: dict | None = None, doc: str = "") -> dict:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema or {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, "description": doc}


_LOG = _param("log", "path", schema={"type": "string", "pattern": "^[a-z][a-z0-9_]{0,62}$"}, doc="log name")
_HASH = {"type": "string", "description": "base64 SHA-256 hash"}
_ERROR = {"description": "bad request or unknown resource",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_BYTES = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def _json(ref: str, doc: str) -> dict:
    return {"description": doc, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _get(summary: str, params: list, ok: dict, *extra: str) -> dict:
    responses = {"200": ok, "400": _ERROR, "404": _ERROR}
    for code in extra:
        responses[code] = _ERROR
    return {"get": {"summary": summary, "parameters": params, "responses": responses}}


@cache
def spec() -> dict:
    inclusion = {"type": "object", "required": ["type", "leaf_index", "tree_size", "leaf_hash", "root", "proof"], "properties": {
        "type": {"const": "inclusion"}, "log": {"type": "string"}, "origin": {"type": "string"},
        "leaf_index": {"type": "integer"}, "tree_size": {"type": "integer"}, "leaf_hash": _HASH, "root": _HASH,
        "proof": {"type": "array", "items": _HASH}, "signed": {"type": "boolean"}}}
    consistency = {"type": "object", "required": ["type", "first", "second", "first_root", "second_root", "proof"], "properties": {
        "type": {"const": "consistency"}, "log": {"type": "string"}, "origin": {"type": "string"},
        "first": {"type": "integer"}, "second": {"type": "integer"}, "first_root": _HASH, "second_root": _HASH,
        "proof": {"type": "array", "items": _HASH}}}
    size = _param("size", doc="tree size (default: the latest signed checkpoint's)")
    tile_path = _param("rest", "path", schema={"type": "string"},
                       doc="C2SP tlog-tiles: <L>/<N>[.p/<W>] or entries/<N>[.p/<W>], N as x001/x234/067")
    return {
        "openapi": "3.1.0",
        "info": {"title": "merkle-listener", "version": __version__,
                 "description": "Proofs, entries and signed checkpoints of tamper-evident PostgreSQL tables (RFC 9162, "
                                "C2SP tlog-tiles, tlog-checkpoint, signed-note). See docs/http-api.md."},
        "paths": {
            "/healthz": _get("the process is up", [], _json("Status", "ok")),
            "/readyz": _get("database reachable, every log has a checkpoint, and no leaf has waited longer than max_age for one",
                            [_param("max_age", schema={"type": "number", "minimum": 0}, doc="seconds")],
                            _json("Status", "ready"), "503"),
            "/openapi.json": _get("this document", [], {"description": "OpenAPI 3.1"}),
            "/v1/logs": _get("every log with its size and latest checkpoint", [], _json("Logs", "logs")),
            "/v1/logs/{log}": _get("one log", [_LOG], _json("Log", "the log")),
            "/v1/logs/{log}/proof/inclusion": _get(
                "inclusion proof (RFC 9162 §2.1.3) by leaf index or leaf hash",
                [_LOG, _param("index"), _param("leaf_hash", schema={"type": "string"}, doc="hex or base64"), size],
                _json("InclusionProof", "the proof"), "409"),
            "/v1/logs/{log}/proof/consistency": _get(
                "consistency proof (RFC 9162 §2.1.4) between two sizes",
                [_LOG, _param("first", required=True), _param("second", doc="default: latest checkpoint size")],
                _json("ConsistencyProof", "the proof"), "409"),
            "/v1/logs/{log}/entries/{index}": _get(
                "a leaf, its source and key, and its canonical entry recomputed from the current row",
                [_LOG, _param("index", "path")], _json("Entry", "the entry"), "409"),
            "/v1/logs/{log}/lookup": _get(
                "every leaf of a source row, by key, with inclusion proofs",
                [_LOG, _param("source", required=True, schema={"type": "string"}, doc="schema.table"),
                 _param("key", required=True, schema={"type": "string"}, doc='JSON object, e.g. {"id":"1"}'), size],
                _json("Lookup", "the leaves"), "409"),
            "/v1/verify": {"post": {
                "summary": "verify a proof document or an entry claim; the answer says why not",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": _json("Verdict", "verdict"), "400": _ERROR, "413": _ERROR}}},
            "/{log}/checkpoint": _get("C2SP tlog-checkpoint signed note", [_LOG],
                                      {"description": "signed note", "content": {"text/plain": {"schema": {"type": "string"}}}}),
            "/{log}/tile/{rest}": _get("C2SP tlog-tiles tile or entry bundle", [_LOG, tile_path],
                                       {"description": "tile bytes", **_BYTES}, "410"),
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Status": {"type": "object"},
            "Log": {"type": "object", "properties": {"name": {"type": "string"}, "origin": {"type": "string"},
                                                     "tree_size": {"type": "integer"}, "root": _HASH,
                                                     "checkpoint": {"type": ["object", "null"]}}},
            "Logs": {"type": "object", "properties": {"logs": {"type": "array", "items": {"$ref": "#/components/schemas/Log"}}}},
            "InclusionProof": inclusion,
            "ConsistencyProof": consistency,
            "Entry": {"type": "object", "properties": {
                "index": {"type": "integer"}, "leaf_hash": _HASH, "source": {"type": ["string", "null"]},
                "source_key": {"type": "string"}, "op": {"type": "string"}, "sequenced_at": {"type": "string"},
                "entry": {"type": ["string", "null"]}, "entry_base64": {"type": ["string", "null"]},
                "entry_matches_leaf": {"type": "boolean"}}},
            "Lookup": {"type": "object", "properties": {"leaves": {"type": "array", "items": inclusion}}},
            "Verdict": {"type": "object", "required": ["verified"], "properties": {
                "verified": {"type": "boolean"}, "detail": {"type": "string"}, "reason": {"type": "string"}}},
        }},
    }
