"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from gateway.store import Store

OK = b'{"status":"ok"}'


class Health:
    def __init__(self, store: Store, timeout_s: float) -> None:
        self._store = store
        self._timeout_s = timeout_s

    async def live(self, request: Request) -> Response:
        return Response(OK, media_type="application/json")

    async def ready(self, request: Request) -> Response:
        try:
            async with asyncio.timeout(self._timeout_s):
                reachable = await self._store.ping()
        except TimeoutError:
            reachable = False
        if not reachable:
            return Response(
                b'{"error":"unavailable","detail":"Redis is not reachable"}',
                503,
                media_type="application/json",
            )
        return Response(OK, media_type="application/json")
