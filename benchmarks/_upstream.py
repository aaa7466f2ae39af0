"""The upstream of benchmarks/http_clients.py and benchmarks/drain.py: answers 200 `{"ok":true}` to
any request (with `--answer-file PATH`, that file's bytes as JSON instead: benchmarks/proxy.py).

A raw ASGI callable (no framework) on uvicorn with uvloop and httptools, one process: about the
cheapest Python HTTP/1.1 server there is, so that the clients, not the server, set the pace. The
benchmark also measures this server alone with wrk, and its CPU use during each client's run.

    python3 benchmarks/_upstream.py --port 8080 [--record] [--answer-file PATH] [--hang-s SECONDS]

With `--record` it also counts every request and keeps, in arrival order, the `webhook-id` header of
those that carry one (the gateway sets it on every attempt) and its arrival time (time.time(), when
the request's body was read), and answers `GET /_stats?from=K` with `{"requests": total so far (this
request not included), "recorded": ids kept so far, "ids": the kept ids from the K-th on, "times":
their arrival times}`:
how drain.py checks that each event arrived exactly once, and in order, and how latency.py measures
the end-to-end latency of each event.

With `--hang-s S` it is an endpoint that hangs (benchmarks/fairness.py): each request, once its
body is read, waits S seconds before its answer, or until the client gives up and closes the
connection; `GET /_stats` answers `{"requests": total so far, "active": requests waiting now,
"max_active": the most that waited at once}`: how many attempts the gateway had out to it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import uvicorn

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

BODY = b'{"ok":true}'
STATS_PATH = "/_stats"


def answer(body: bytes) -> tuple[Message, Message]:
    """The two ASGI messages of a 200 answer with `body` as JSON."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


async def _read_body(receive: Receive) -> None:
    more = True
    while more:  # read the whole request body
        message = await receive()
        more = bool(message.get("more_body", False))


def plain_app(body: bytes = BODY) -> App:
    """Answers 200 with `body` to any request."""
    start, end = answer(body)

    async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await _read_body(receive)
        await send(start)
        await send(end)

    return app


class RecordingApp:
    """`plain_app`, plus a request count and the webhook-id of each request, served at /_stats."""

    def __init__(self, body: bytes = BODY) -> None:
        self.start, self.end = answer(body)
        self.requests = 0
        self.ids: list[bytes] = []
        self.times: list[float] = []  # arrival time of each kept id (time.time())

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await _read_body(receive)
        arrived = time.time()
        if scope["method"] == "GET" and scope["path"] == STATS_PATH:
            await self._stats(scope, send)
            return
        self.requests += 1
        for key, value in scope["headers"]:
            if key == b"webhook-id":
                self.ids.append(value)
                self.times.append(arrived)
                break
        await send(self.start)
        await send(self.end)

    async def _stats(self, scope: MutableMapping[str, Any], send: Send) -> None:
        query: bytes = scope["query_string"]
        start = int(query.removeprefix(b"from=")) if query.startswith(b"from=") else 0
        ids = [i.decode() for i in self.ids[start:]]
        times = self.times[start:]
        body = orjson.dumps(
            {"requests": self.requests, "recorded": len(self.ids), "ids": ids, "times": times}
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class HangingApp:
    """An endpoint that never answers in time: each request waits `hang_s` (or until its client
    disconnects) before its answer; counts the requests waiting at once, served at /_stats."""

    def __init__(self, hang_s: float, body: bytes = BODY) -> None:
        self.hang_s = hang_s
        self.start, self.end = answer(body)
        self.requests = 0
        self.active = 0
        self.max_active = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await _read_body(receive)
        if scope["method"] == "GET" and scope["path"] == STATS_PATH:
            counts = {"requests": self.requests, "active": self.active, "max_active": self.max_active}
            start, end = answer(orjson.dumps(counts))
            await send(start)
            await send(end)
            return
        self.requests += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            # With the body read, the next message is the client's disconnect (uvicorn): a request
            # the client gave up on no longer counts as waiting.
            message = await asyncio.wait_for(receive(), self.hang_s)
        except TimeoutError:
            message = {}
        finally:
            self.active -= 1
        if message.get("type") == "http.disconnect":
            return
        await send(self.start)
        await send(self.end)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", action="store_true", help="count requests, keep webhook-ids (/_stats)")
    parser.add_argument("--answer-file", help='answer this file\'s bytes (JSON) instead of {"ok":true}')
    parser.add_argument("--hang-s", type=float, help="wait this long before each answer (see above)")
    args = parser.parse_args()
    body = Path(args.answer_file).read_bytes() if args.answer_file else BODY
    target: App
    if args.hang_s is not None:
        target = HangingApp(args.hang_s, body)
    else:
        target = RecordingApp(body) if args.record else plain_app(body)
    uvicorn.run(
        target,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
