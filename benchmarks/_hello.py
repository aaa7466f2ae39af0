"""The baseline of benchmarks/ingest.py: a bare Starlette app served exactly as `gateway serve` is.

One Route, POST /hooks/{name}, that reads the request body (as any webhook receiver must) and answers
202 with a JSON body about the size of the gateway's `{"id": ...}`. The uvicorn settings are those of
gateway/cli.py `serve`: uvloop, httptools, no access log, log level warning, one process.

    python3 benchmarks/_hello.py --port 8080
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ANSWER = b'{"id":"00000000000000000000000000"}'


async def hook(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, 202, media_type="application/json")


async def ready(request: Request) -> Response:
    return Response(b'{"ok":true}', media_type="application/json")


app = Starlette(routes=[Route("/hooks/{name}", hook, methods=["POST"]), Route("/healthz", ready)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Keep in step with gateway/cli.py `serve`.
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
