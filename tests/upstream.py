"""A real upstream HTTP server on a loopback port, in a thread, that records what it receives.

Its answer is set per test: `upstream.script([...])` gives one reply per request in order (the
last one repeats), each a status, or (status, headers), or a Reply with a delay or a hold.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


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


class Upstream:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.received: list[Received] = []
        self._replies: list[Reply] = [Reply()]
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
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

    def start(self) -> Upstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock)
        await site.start()

    def stop(self) -> None:
        if self._loop.is_closed():  # stopped already (a test took the endpoint down)
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        # Handlers still waiting (a reply that hangs) would be destroyed pending with the loop.
        asyncio.run_coroutine_threadsafe(_cancel_others(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

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


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
