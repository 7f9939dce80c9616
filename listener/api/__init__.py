"""The HTTP API: C2SP tlog-tiles per log, JSON proofs and entries, health, OpenAPI.

    server.py     uvicorn inside the caller's anyio task group (`run --http`, `serve`)
    app.py        routes and handlers (Starlette), every error a JSON body
    logstate.py   the logs and their latest checkpoints, refreshed on NOTIFY and by polling
    tilestore.py  tiles from merkle.tiles: an LRU of immutable content, coalesced fetches
    entries.py    canonical entries recomputed from the current source rows
    openapi.py    the OpenAPI 3.1 description served at /openapi.json

Reads only: the server never writes, so it can point at a hot standby.
"""
