"""The upstream of benchmarks/http_clients.py: answers 200 `{"ok":true}` to any request.

A raw ASGI callable (no framework) on uvicorn with uvloop and httptools, one process: about the
cheapest Python HTTP/1.1 server there is, so that the clients, not the server, set the pace. The
benchmark also measures this server alone with wrk, and its CPU use during each client's run.

    python3 benchmarks/_upstream.py --port 8080
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b'{"ok":true}'
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
}
END = {"type": "http.response.body", "body": BODY}


async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the whole request body
        message = await receive()
        more = bool(message.get("more_body", False))
    await send(START)
    await send(END)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", lifespan="off",
                access_log=False, log_level="warning", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
