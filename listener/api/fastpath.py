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
from collections import OrderedDict

import orjson

from listener.merkle import inclusion_plan
from listener.merkle.proof import node_path_plan
from listener.merkle.tiles import TILE_HEIGHT, TILE_WIDTH, row_offset

_PREFIX = "/v1/logs/"
_SUFFIX = "/proof/inclusion"
_HEADERS = [(b"content-type", b"application/json")]
# Byte offset of row k in a full tile's nodes.
_ROW = [32 * row_offset(TILE_WIDTH, k) for k in range(TILE_HEIGHT)]
# Upper proof parts kept: (log_id, size, level-0 tile index) -> folded hashes (~16 x 32 bytes).
UPPER_CACHE = 100_000


def _b64(h: bytes) -> str:
    return b2a_base64(h, newline=False).decode()


class FastInclusion:
    def __init__(self, app, logs, tiles):
        self.app, self.logs, self.tiles = app, logs, tiles
        self._upper: OrderedDict[tuple[int, int, int], list[bytes]] = OrderedDict()

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
        try:
            if (index >> TILE_HEIGHT) < (size >> TILE_HEIGHT):
                leaf, proof = await self._in_full_tile(info.log_id, index, size)
            else:
                plan = inclusion_plan(index, size)
                nodes = await self.tiles.nodes(info.log_id, [(0, index), *plan.ids])
                leaf, proof = nodes[0], plan.assemble(nodes[1:])
        except Exception:  # let the full app answer (and explain) it
            return None
        return orjson.dumps({
            "type": "inclusion", "log": info.name, "origin": info.origin, "leaf_index": index, "tree_size": size,
            "leaf_hash": _b64(leaf), "root": _b64(info.checkpoint_root), "proof": [_b64(h) for h in proof],
            "signed": True,
        })

    async def _in_full_tile(self, log_id: int, index: int, size: int) -> tuple[bytes, list[bytes]]:
        """Leaf `index` lies in a full level-0 tile t: its proof is the 8 siblings inside the
        tile (rows 0..7, all complete) followed by the audit path of node (8, t) in the tree of
        `size` (RFC 9162 §2.1.3.1: PATH within a complete subtree, then the subtree's path).
        The second part is the same for every leaf of t at this size, so it is cached."""
        t = index >> TILE_HEIGHT
        key = (log_id, size, t)
        upper = self._upper.get(key)
        wanted = {(log_id, 0, t): TILE_WIDTH}
        if upper is None:
            plan = node_path_plan(TILE_HEIGHT, t, size)
            hashes = await self.tiles.nodes(log_id, list(plan.ids))
            upper = plan.assemble(hashes)
            self._upper[key] = upper
            if len(self._upper) > UPPER_CACHE:
                self._upper.popitem(last=False)
        tile = (await self.tiles.tiles(wanted))[(log_id, 0, t)]
        nodes, j = tile.nodes, index & (TILE_WIDTH - 1)
        leaf = nodes[32 * j : 32 * j + 32]
        lower = []
        for k in range(TILE_HEIGHT):
            start = _ROW[k] + 32 * ((j >> k) ^ 1)
            lower.append(nodes[start : start + 32])
        return leaf, lower + upper
