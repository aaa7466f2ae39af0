"""Requests/s of three async HTTP clients POSTing to a fast local upstream: why gateway/delivery.py
uses aiohttp.

    python3 benchmarks/http_clients.py [--seconds 10] [--concurrency 32] [--rounds 3]

Starts its upstream, benchmarks/_upstream.py (a raw ASGI callable on uvicorn, uvloop + httptools,
answering 200 `{"ok":true}`), in a separate process on a free loopback port. In this process, on
uvloop like `gateway worker`, each client POSTs a 500-byte JSON body (Content-Type:
application/json) from `--concurrency` tasks for `--seconds`, after a `--warmup` on the same client,
and reads each whole answer, which must be 200:

  httpx          httpx.AsyncClient with its default transport (httpcore)
  httpx-aiohttp  httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(...))
  aiohttp        aiohttp.ClientSession, as gateway/delivery.py uses it

Every client may keep `--concurrency` connections open (httpx's default keeps only 20 alive, which
would make it reconnect; that is not what is measured here). The order of the clients rotates
between rounds and the table shows the median over `--rounds`.

Columns: client CPU/req is this process's CPU time per request (the client's own cost, and less
sensitive to a busy machine than requests/s); upstream CPU % is of one core during the run: near
100 % would mean the upstream, not the client, set the pace. The first row is the upstream alone
under wrk (one thread, same connections, body and duration): the ceiling any client can reach here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 benchmarks/http_clients.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import httpx
import uvloop
from httpx_aiohttp import AiohttpTransport

from benchmarks._common import (
    BODY_BYTES,
    Harness,
    cpu_seconds,
    free_port,
    harness,
    median,
    options,
    print_table,
    run_wrk,
    wait_http,
    webhook_body,
    write_wrk_script,
)

HEADERS = {"content-type": "application/json"}
Send = Callable[[], Awaitable[int]]
ClientFactory = Callable[[str, bytes, int], contextlib.AbstractAsyncContextManager[Send]]


def httpx_send(client: httpx.AsyncClient, url: str, body: bytes) -> Send:
    """One POST of `body` to `url` through an httpx client, whatever its transport."""

    async def send() -> int:
        response = await client.post(url, content=body, headers=HEADERS)
        return response.status_code

    return send


@contextlib.asynccontextmanager
async def httpx_default(url: str, body: bytes, concurrency: int) -> AsyncIterator[Send]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        yield httpx_send(client, url, body)


@contextlib.asynccontextmanager
async def httpx_aiohttp(url: str, body: bytes, concurrency: int) -> AsyncIterator[Send]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=10) as client:
        yield httpx_send(client, url, body)


@contextlib.asynccontextmanager
async def plain_aiohttp(url: str, body: bytes, concurrency: int) -> AsyncIterator[Send]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def send() -> int:
            async with session.post(url, data=body, headers=HEADERS) as response:
                await response.read()
                return response.status

        yield send


CLIENTS: dict[str, ClientFactory] = {
    "httpx": httpx_default,
    "httpx-aiohttp": httpx_aiohttp,
    "aiohttp": plain_aiohttp,
}
BASELINE = "aiohttp"


@dataclass
class Run:
    requests: int
    failed: int
    seconds: float
    client_cpu_s: float
    upstream_cpu_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@dataclass
class Client:
    name: str
    runs: list[Run] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def drive(send: Send, concurrency: int, seconds: float, failures: list[str]) -> tuple[int, int, float]:
    """`concurrency` tasks send requests back to back until `seconds` have passed; returns
    (requests answered 200, requests failed, seconds from start to the last answer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    ok = failed = 0

    async def task() -> None:
        nonlocal ok, failed
        while loop.time() < deadline:
            try:
                status = await send()
            except Exception as exc:  # counted and reported: a benchmark must not hide errors
                failed += 1
                if len(failures) < 5:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if status == 200:
                ok += 1
            else:
                failed += 1
                if len(failures) < 5:
                    failures.append(f"HTTP {status}")

    started = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(concurrency)))
    return ok, failed, time.perf_counter() - started


async def measure(client: Client, url: str, body: bytes, upstream_pid: int, args: argparse.Namespace) -> None:
    async with CLIENTS[client.name](url, body, args.concurrency) as send:
        await drive(send, args.concurrency, args.warmup, client.failures)
        cpu, upstream = time.process_time(), cpu_seconds(upstream_pid)
        ok, failed, seconds = await drive(send, args.concurrency, args.seconds, client.failures)
        run = Run(ok, failed, seconds, time.process_time() - cpu, cpu_seconds(upstream_pid) - upstream)
    client.runs.append(run)
    print(
        f"  {client.name:<14} {run.rate:8.0f} req/s  (upstream CPU {run.upstream_cpu_s / seconds:.0%})",
        file=sys.stderr,
        flush=True,
    )


async def run_clients(
    clients: list[Client], url: str, body: bytes, upstream_pid: int, args: argparse.Namespace
) -> None:
    for n in range(args.rounds):
        print(f"round {n + 1}/{args.rounds}", file=sys.stderr, flush=True)
        order = clients[n % len(clients) :] + clients[: n % len(clients)]
        for client in order:
            await measure(client, url, body, upstream_pid, args)


def upstream_ceiling(
    h: Harness, url: str, body: bytes, upstream_pid: int, args: argparse.Namespace
) -> list[str]:
    script = write_wrk_script(h.directory / "post.lua", body)
    run_wrk(h, url, script, seconds=args.warmup, connections=args.concurrency, threads=1)
    before = cpu_seconds(upstream_pid)
    result = run_wrk(h, url, script, seconds=args.seconds, connections=args.concurrency, threads=1)
    upstream_cpu = cpu_seconds(upstream_pid) - before
    failed = result.not_2xx() + result.socket_errors
    return [
        "(upstream alone, wrk)",
        f"{result.rate:.0f}",
        f"{result.rate:.0f}",
        f"{failed}",
        "-",
        f"{upstream_cpu / result.seconds:.0%}",
        "-",
    ]


def main() -> int:
    args = options(
        ("--seconds", 10.0, "length of each measured run"),
        ("--warmup", 2.0, "warm-up before each run, same client"),
        ("--concurrency", 32, "concurrent request tasks per client"),
        ("--rounds", 3, "rounds over all clients"),
        BODY_BYTES,
        description=__doc__,
    ).parse_args()
    body = webhook_body(args.body_bytes)
    clients = [Client(name) for name in CLIENTS]

    with harness("gateway-bench-clients-") as h:
        port = free_port()
        upstream = h.spawn("upstream", [*h.python("_upstream.py"), "--port", str(port)])
        url = f"http://127.0.0.1:{port}/hook"
        wait_http(url, upstream, expect=200, describe=lambda: h.log("upstream"))
        ceiling = upstream_ceiling(h, url, body, upstream.pid, args)
        uvloop.run(run_clients(clients, url, body, upstream.pid, args))
        if upstream.poll() is not None:
            raise RuntimeError(f"the upstream exited during the benchmark: {h.log('upstream')}")

    base = median([run.rate for run in next(c for c in clients if c.name == BASELINE).runs])
    rows = [ceiling]
    for c in clients:
        rates = [run.rate for run in c.runs]
        seconds = sum(run.seconds for run in c.runs)
        requests = sum(run.requests for run in c.runs)
        rows.append(
            [
                c.name,
                f"{median(rates):.0f}",
                " ".join(f"{x:.0f}" for x in rates),
                f"{sum(run.failed for run in c.runs)}",
                f"{sum(run.client_cpu_s for run in c.runs) / requests * 1e6:.0f} us",
                f"{sum(run.upstream_cpu_s for run in c.runs) / seconds:.0%}",
                f"{median(rates) / base:.2f}",
            ]
        )
    print(
        f"\nhttp clients: POST {len(body)}-byte JSON to a local upstream, {args.concurrency} concurrent "
        f"tasks, uvloop, {args.seconds:.0f} s per run after {args.warmup:.0f} s warm-up, "
        f"{args.rounds} rounds (medians)"
    )
    print_table(
        ["client", "req/s", "each run", "failed", "client CPU/req", "upstream CPU", f"vs {BASELINE}"],
        rows,
        [False, True, True, True, True, True, True],
    )
    problems = [f"{c.name}: {f}" for c in clients for f in c.failures]
    for p in problems:
        print(f"CHECK FAILED {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
