"""Liveness (/healthz: the process answers) and readiness (/readyz: Redis answers, the config was
loaded, and at least one worker sent a heartbeat in the last 10 s)."""

from __future__ import annotations

import asyncio

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import ServiceUnavailable
from gateway.store import Store

OK = b'{"status":"ok"}'


class Readiness:
    """The API process's /healthz and /readyz."""

    def __init__(self, store: Store, timeout_s: float) -> None:
        self._store = store
        self._timeout_s = timeout_s

    async def live(self, request: Request) -> Response:
        return Response(OK, media_type="application/json")

    async def ready(self, request: Request) -> Response:
        try:
            async with asyncio.timeout(self._timeout_s):
                workers = await self._store.live_workers()  # answers only when Redis does
        except (TimeoutError, RedisError, OSError):
            raise ServiceUnavailable("Redis is not reachable") from None
        if workers == 0:
            raise ServiceUnavailable("no worker has sent a heartbeat in the last 10 s")
        return Response(orjson.dumps({"status": "ok", "workers": workers}), media_type="application/json")
