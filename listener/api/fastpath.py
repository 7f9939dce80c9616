"""The hot path: GET /v1/logs/<log>/proof/inclusion?index=N answered without the framework.

Inclusion proofs by index at the latest checkpoint are what clients ask for most (and what
docs/benchmarks.md measures). This thin ASGI wrapper answers exactly that shape straight from
LogState and TileStore; ANY other request, and any such request it cannot answer as a plain
200 (unknown log, index out of range, extra parameters, ...), goes to the Starlette app
unchanged, which gives the same documents and all the error handling. The document is
byte-identical to the one app.py builds (tests/test_http.py compares them).
"""

from __future__ import annotations

from binascii import b2a_base64

import orjson

from listener.merkle import inclusion_plan

_PREFIX = "/v1/logs/"
_SUFFIX = "/proof/inclusion"
_HEADERS = [(b"content-type", b"application/json")]


def _b64(h: bytes) -> str:
    return b2a_base64(h, newline=False).decode()


class FastInclusion:
    def __init__(self, app, logs, tiles):
        self.app, self.logs, self.tiles = app, logs, tiles

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path.startswith(_PREFIX) and path.endswith(_SUFFIX):
                body = await self._answer(path[len(_PREFIX):-len(_SUFFIX)], scope["query_string"])
                if body is not None:
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [*_HEADERS, (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)

    async def _answer(self, name: str, query: bytes) -> bytes | None:
        if not query.startswith(b"index=") or not query[6:].isdigit() or query[6:7] == b"0" and len(query) > 7:
            return None
        info = self.logs.logs.get(name)
        if info is None or info.checkpoint_root is None:
            return None
        index, size = int(query[6:]), info.checkpoint_size
        if index >= size:
            return None
        plan = inclusion_plan(index, size)
        try:
            nodes = await self.tiles.nodes(info.log_id, [(0, index), *plan.ids])
        except Exception:  # let the full app answer (and explain) it
            return None
        proof = plan.assemble(nodes[1:])
        return orjson.dumps({
            "type": "inclusion", "log": info.name, "origin": info.origin, "leaf_index": index, "tree_size": size,
            "leaf_hash": _b64(nodes[0]), "root": _b64(info.checkpoint_root), "proof": [_b64(h) for h in proof],
            "signed": True,
        })
