"""A real upstream HTTP server on a loopback port, in a thread, that records what it receives.

Its answer is set per test: `upstream.script([...])` gives one reply per request in order (the
last one repeats), each a status, or (status, headers), or a Reply with a delay or a hold.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from benchmarks._common import ServedInThread


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"ok":true}'
    delay_s: float = 0.0
    hold: threading.Event | None = None  # answer only once this is set
    endless: bool = False  # send the headers, then body bytes that never end


class Upstream(ServedInThread):
    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.received: list[Received] = []
        self._replies: list[Reply] = [Reply()]
        self._lock = threading.Lock()
        self.responder: Callable[[Received], Reply] | None = None
        self.active = 0  # requests being answered now
        self.max_active = 0  # the most answered at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, replies: list[int | tuple[int, dict[str, str]] | Reply]) -> None:
        out = []
        for r in replies:
            if isinstance(r, Reply):
                out.append(r)
            elif isinstance(r, tuple):
                out.append(Reply(r[0], r[1]))
            else:
                out.append(Reply(r))
        with self._lock:
            self._replies = out

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = Received(
            request.method,
            request.path_qs,
            {k.lower(): v for k, v in request.headers.items()},
            await request.read(),
            time.monotonic(),
        )
        with self._lock:
            self.received.append(record)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if self.responder is not None:
                reply = self.responder(record)
            else:
                reply = self._replies[0] if len(self._replies) == 1 else self._replies.pop(0)
        try:
            return await self._reply(request, reply)
        finally:
            with self._lock:
                self.active -= 1

    async def _reply(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.hold is not None:
            hold = reply.hold
            await asyncio.get_running_loop().run_in_executor(None, hold.wait, 60)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.endless:
            stream = web.StreamResponse(status=reply.status, headers=reply.headers)
            await stream.prepare(request)
            for _ in range(600):  # a minute at most, in case the client never hangs up
                await stream.write(b"x" * 1024)
                await asyncio.sleep(0.1)
            return stream
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def ids(self) -> list[str]:
        with self._lock:
            return [r.webhook_id for r in self.received]

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"upstream received {self.count()} requests, expected {n}")
            time.sleep(0.01)
        with self._lock:
            return list(self.received)
