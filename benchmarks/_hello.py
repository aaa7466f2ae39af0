"""The baseline of benchmarks/ingest.py and benchmarks/proxy.py: a bare Starlette app served exactly
as `gateway serve` is.

A Route POST /hooks/{name} that reads the request body (as any webhook receiver must) and answers 202
with a JSON body about the size of the gateway's `{"id": ...}` (ingest.py), and a Route GET
/hooks/{name}/{rest} that answers 200 with the bytes of `--answer-file` as JSON (proxy.py: what the
gateway answers from its cache). The uvicorn settings are those of gateway/cli.py `serve`: uvloop,
httptools, no access log, log level warning, one process.

    python3 benchmarks/_hello.py --port 8080 [--answer-file PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ANSWER = b'{"id":"00000000000000000000000000"}'
LOOKUP = b'{"ok":true}'  # GET's answer without --answer-file


async def hook(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, 202, media_type="application/json")


async def ready(request: Request) -> Response:
    return Response(b'{"ok":true}', media_type="application/json")


def make_app(lookup: bytes = LOOKUP) -> Starlette:
    """The app; its GET /hooks/{name}/{rest} answers `lookup`."""

    async def look_up(request: Request) -> Response:
        return Response(lookup, media_type="application/json")

    return Starlette(
        routes=[
            Route("/hooks/{name}", hook, methods=["POST"]),
            Route("/hooks/{name}/{rest:path}", look_up, methods=["GET"]),
            Route("/healthz", ready),
        ]
    )


app = make_app()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer-file", help="what GET /hooks/{name}/{rest} answers (JSON)")
    args = parser.parse_args()
    served = make_app(Path(args.answer_file).read_bytes()) if args.answer_file else app
    # Keep in step with gateway/cli.py `serve`.
    uvicorn.run(
        served,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
