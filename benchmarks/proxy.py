"""Proxy mode: the latency `gateway serve` adds to a lookup it forwards, and its GETs/s on a cache
miss and on a cache hit, each beside a baseline measured in the same run.

    python3 benchmarks/proxy.py [--rates 100,500] [--rate-seconds 15] [--seconds 5] [--rounds 3]

A proxy integration sits in the path of a helpdesk's sidebar: an agent waits for its answer. What
matters is what the gateway adds to a fast upstream's answer, and how much of a plain reverse
proxy's throughput it keeps while it also keeps a copy of each answer and logs each request.

Starts everything it needs: a redis-server of its own on a free port (no snapshots, no AOF); the
upstream, benchmarks/_upstream.py --record (a raw ASGI app on uvicorn that counts its requests and
answers each 200 with the same `--answer-bytes` JSON body, a user record with its recent tickets);
the real `python3 -m gateway serve` (no worker: a GET needs none), with a config of two proxy
integrations targeting that upstream: "bench" (fresh_ttl_s = 0: every request is forwarded, a miss)
and "bench-fresh" (fresh_ttl_s = 3600: after the first request every answer is a hit, from Redis),
both with stale_ttl_s = 86400, vary_headers = [], queue_on_failure = true, max_response_bytes = 1 MiB,
timeout_s = 5 and allowed_networks = ["127.0.0.0/8"]; and the two baselines, each a process of its
own: a bare aiohttp reverse proxy (`python3 benchmarks/proxy.py bare-proxy`: an aiohttp.web server on
uvloop that forwards each request with one shared aiohttp.ClientSession to the same upstream and
returns its status, headers and body) and the bare Starlette app benchmarks/_hello.py, which answers
GET with the same body from memory.

The lookups: GET /hooks/bench/users?email=user{n}%40example.com, n running through 0..9999 over and
over, so that no two requests in flight are identical (the gateway lets identical concurrent reads
share one upstream call; a sidebar's lookups are of different customers), forwarded by the gateway
and the bare proxy to the upstream's /users?email=...; and, for the hits, one lookup,
GET /hooks/bench-fresh/users?email=jane.doe%40example.com.

Before measuring, two probes: through "bench", 200 with the upstream's body, `x-gateway-cache: miss`
and an `x-gateway-event-id`; through "bench-fresh", a `hit` within 2 s of the first answer.

1. Added latency. An open-loop sender in this process (aiohttp on uvloop; the k-th GET starts at
   start + k / rate, whatever the answers before it) sends the lookups at each of `--rates` for
   `--rate-seconds`: first straight to the upstream, then through the gateway ("bench", misses),
   back to back. Latency is from the send to the whole answer: p50/p95/p99 of each, and the added ms
   at p50 and p99 (gateway - direct). Aim: added <= 1 ms at p50 and <= 5 ms at p99 at 100/s (500/s:
   reported only). Beside them: the API's CPU per request, its idle CPU (measured for 2 s before)
   taken out, and Redis commands per request (INFO commandstats, this benchmark's own taken out).
2. Cache-miss throughput. wrk (a separate process, one thread, `--connections` keep-alive
   connections, as in benchmarks/ingest.py) sends the lookups for `--seconds` after a `--warmup`
   run, through the bare aiohttp proxy then through the gateway ("bench"), in each of `--rounds`
   rounds. Aim: the gateway at 0.70 or more of the bare proxy's requests/s (the median over rounds
   of the per-round ratio). The upstream's CPU % is shown: near 100 % would mean that it, not the
   proxies, set the pace.
3. Cache-hit throughput. The same with the one lookup, through the bare Starlette app then through
   the gateway ("bench-fresh", hits). Aim: 0.70 or more of the bare app.

Checked (exit status 1 when a check fails): every answer, through the gateway and the baselines, is
200 with the upstream's body exactly (wrk compares each body in its Lua `response` hook) and there
are no socket errors; every cache-hit answer says `x-gateway-cache: hit` and the upstream gets no
request during a run of hits; on a miss the upstream gets at least one request per answer; the
probes above; no process exits; the gateway logs no error. Notes, which fail nothing: a miss whose
`x-gateway-cache` is not `miss`, gateway warnings, an open-loop sender behind its schedule, an
upstream busy enough to set the pace. A missed target is reported (MISSED), never a failure.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 benchmarks/proxy.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from benchmarks._common import (
    INTEGRATION,
    CountingRedis,
    Fetched,
    Figure,
    GatewayStack,
    Harness,
    Outcome,
    WrkResult,
    cpu_seconds,
    fetch_open_loop,
    free_port,
    harness,
    logged_warnings,
    median,
    options,
    other_answers,
    padded_json,
    per_event_text,
    percentile,
    print_table,
    redis_memory,
    run_main,
    run_queue_seconds,
    run_wrk,
    start_stack,
    upstream_stats,
    wait_http,
    write_wrk_script,
)

MISS, HIT = INTEGRATION, f"{INTEGRATION}-fresh"  # fresh_ttl_s 0 and 3600
USERS_PATH, USERS = "/users?email=user{n}%40example.com", 10_000  # the misses: n in 0 .. USERS - 1
HIT_PATH = "/users?email=jane.doe%40example.com"
CACHE_HEADER, EVENT_HEADER = "x-gateway-cache", "x-gateway-event-id"
SETTLE_S = 0.5  # after a run: its last requests end, and the gateway writes its log of them in batches
IDLE_S = 2.0  # how long the API's idle CPU is measured
AT_RATE, ADDED_P50_MS, ADDED_P99_MS = 100.0, 1.0, 5.0  # the aim for the added latency
RATIO = 0.70  # the aim: the gateway's GETs/s over its baseline's, on a miss and on a hit
BARE_PROXY = "bare-proxy"  # `python3 benchmarks/proxy.py bare-proxy ...` serves the baseline of part 2


def users(base: str) -> list[str]:
    """The URLs of the misses' lookups under `base`."""
    return [base + USERS_PATH.replace("{n}", str(n)) for n in range(USERS)]


def lookup_answer(size: int) -> bytes:
    """A sidebar lookup's answer: a user record with its recent tickets, JSON of exactly `size` bytes."""
    record = {
        "user": {
            "id": 9911,
            "email": "jane.doe@example.com",
            "name": "Jane Doe",
            "phone": "+44 20 7946 0958",
            "plan": "enterprise",
            "company": {"id": 311, "name": "Example Holdings Ltd", "domain": "example.com", "seats": 250},
            "created_at": "2021-03-14T09:26:53Z",
            "last_seen_at": "2024-10-08T14:30:02Z",
            "tags": ["vip", "eu", "sso"],
        },
        "tickets": [
            {"id": 48213, "subject": "Cannot log in after password reset", "status": "open"},
            {"id": 47980, "subject": "Invoice for September is missing", "status": "solved"},
            {"id": 46702, "subject": "Add two seats to our plan", "status": "closed"},
        ],
        "lifetime_value": {"amount": 182400, "currency": "EUR"},
        "note": "",
    }
    return padded_json(record, size, "an answer", "record")


def proxy_config(upstream_port: int) -> str:
    """Two proxy integrations on the upstream: MISS (no fresh copies) and HIT (fresh for an hour)."""
    text = """\
[gateway]
max_body_bytes = 1048576
allowed_networks = ["127.0.0.0/8"]
"""
    for name, fresh_ttl_s in ((MISS, 0), (HIT, 3600)):
        text += f"""
[[integrations]]
name = "{name}"
target = "http://127.0.0.1:{upstream_port}"
mode = "proxy"
timeout_s = 5

[integrations.proxy]
stale_ttl_s = 86400
fresh_ttl_s = {fresh_ttl_s}
vary_headers = []
queue_on_failure = true
max_response_bytes = 1048576
"""
    return text


# --- The baseline of part 2: a bare aiohttp reverse proxy --------------------------------------------

SESSION = web.AppKey("session", aiohttp.ClientSession)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def bare_proxy_app(upstream: str, timeout_s: float) -> web.Application:
    """Any request to /hooks/{name}/{rest}?{query} is sent on to `upstream`/{rest}?{query} as it came
    (but its hop-by-hop headers) with one shared ClientSession; the upstream's status, headers (but
    hop-by-hop ones) and body are answered."""

    async def session(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as client:
            app[SESSION] = client
            yield

    async def forward(request: web.Request) -> web.Response:
        rest = request.raw_path.split("/", 3)[3]  # "/hooks/{name}/" taken off, the query kept raw
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        body = await request.read()
        url = URL(f"{upstream}/{rest}", encoded=True)
        async with request.app[SESSION].request(
            request.method, url, headers=headers, data=body or None, allow_redirects=False
        ) as answer:
            payload = await answer.read()
            back = CIMultiDict((k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP)
            return web.Response(status=answer.status, headers=back, body=payload)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/hooks/{name}/{rest:.*}", forward)
    return app


def serve_bare_proxy(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"python3 benchmarks/proxy.py {BARE_PROXY}",
        description="The baseline of the cache-miss throughput: a bare aiohttp reverse proxy.",
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="its base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--timeout", type=float, default=5.0, help="total timeout of an upstream request")
    args = p.parse_args(argv)
    app = bare_proxy_app(args.upstream.rstrip("/"), args.timeout)
    web.run_app(
        app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )
    return 0


# --- Probes: what one request through the gateway answers --------------------------------------------


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def probe(api: str, expected: bytes) -> list[str]:
    """Failed checks of a miss through MISS and of a hit through HIT (within 2 s of a first answer)."""
    out = []
    status, headers, body = get(users(f"{api}/hooks/{MISS}")[0])
    if status != 200 or body != expected:
        out.append(
            f"probe {MISS}: answered {status} with {len(body)} bytes ({body[:200]!r}), not the "
            f"upstream's 200 with {len(expected)} bytes"
        )
    if headers.get(CACHE_HEADER) != "miss":
        out.append(f"probe {MISS}: {CACHE_HEADER} is {headers.get(CACHE_HEADER)!r}, not 'miss'")
    if not headers.get(EVENT_HEADER):
        out.append(f"probe {MISS}: no {EVENT_HEADER} header")
    seen: list[str] = []
    deadline = time.monotonic() + 2.0
    while True:
        status, headers, body = get(f"{api}/hooks/{HIT}{HIT_PATH}")
        seen.append(f"{status} {headers.get(CACHE_HEADER)}")
        if status != 200 or body != expected:
            out.append(f"probe {HIT}: answered {status} with {len(body)} bytes ({body[:200]!r})")
            return out
        if headers.get(CACHE_HEADER) == "hit":
            return out
        if time.monotonic() > deadline:
            out.append(f"probe {HIT}: no `{CACHE_HEADER}: hit` within 2 s of a first answer: {seen[:5]}")
            return out
        time.sleep(0.02)


# --- Part 1: added latency, open loop ----------------------------------------------------------------


@dataclass
class LatencyRun:
    rate: float
    seconds: float
    direct: Fetched
    gateway: Fetched
    api_cpu_s: float  # of `gateway serve` during the gateway's run, its idle CPU taken out
    by_command: dict[str, int]  # Redis calls during the gateway's run, this benchmark's own taken out

    def p(self, which: Fetched, q: float) -> float:
        return percentile(sorted(which.answer_ms), q)

    def added(self, q: float) -> float:
        return self.p(self.gateway, q) - self.p(self.direct, q)

    def api_cpu_us(self) -> float:
        """The API's CPU per right answer, in us."""
        return self.api_cpu_s / max(self.gateway.right, 1) * 1e6

    def commands(self) -> float:
        return sum(self.by_command.values()) / max(self.gateway.right, 1)


def idle_cpu(pid: int) -> float:
    """CPU seconds per second that `pid` uses with no request, over IDLE_S."""
    before = cpu_seconds(pid)
    time.sleep(IDLE_S)
    return (cpu_seconds(pid) - before) / IDLE_S


def run_latency(stack: GatewayStack, expected: bytes, rate: float, seconds: float, idle: float) -> LatencyRun:
    direct = uvloop.run(
        fetch_open_loop(
            users(stack.upstream_base), rate, seconds, expect_body=expected, count_header=CACHE_HEADER
        )
    )
    mine = CountingRedis(stack.client)
    mine.reset_stats()
    before, started = cpu_seconds(stack.gateway.pid), time.monotonic()
    through = uvloop.run(
        fetch_open_loop(
            users(f"{stack.api}/hooks/{MISS}"), rate, seconds, expect_body=expected, count_header=CACHE_HEADER
        )
    )
    time.sleep(SETTLE_S)
    api_cpu = cpu_seconds(stack.gateway.pid) - before - idle * (time.monotonic() - started)
    return LatencyRun(rate, seconds, direct, through, api_cpu, mine.others())


# --- Parts 2 and 3: GETs/s under wrk -----------------------------------------------------------------


@dataclass
class Run:
    wrk: WrkResult
    server_cpu_s: float
    server_wait_s: float  # runnable but waiting for a CPU
    upstream_cpu_s: float
    redis_cpu_s: float
    upstream_requests: int  # that the upstream got during the run
    by_command: dict[str, int] | None = None  # gateway only: Redis calls during the run
    redis_bytes: int = 0  # gateway only: how much Redis's used_memory grew during the run


@dataclass
class Target:
    name: str
    url: str
    script: Path
    pid: int
    gateway: bool
    calls_upstream: bool | None  # must each answer reach the upstream? (None: no upstream behind it)
    cache: str | None = None  # gateway only: the x-gateway-cache of its answers
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def cpu_us(self) -> float:
        """CPU per request over the measured runs, in us."""
        return sum(r.server_cpu_s for r in self.runs) / max(sum(r.wrk.requests for r in self.runs), 1) * 1e6


@dataclass(frozen=True)
class Comparison:
    part: str  # "cache miss" / "cache hit"
    base: Target
    gateway: Target

    def ratio(self) -> float:
        """The median over rounds of the per-round ratio of requests/s: each round measures both back
        to back, so the machine's drift between rounds cancels out (as in benchmarks/ingest.py)."""
        pairs = zip(self.gateway.runs, self.base.runs, strict=True)
        return median([a.wrk.rate / b.wrk.rate for a, b in pairs])

    def by_command(self) -> dict[str, int]:
        """The gateway's Redis calls by command over its measured runs."""
        out: dict[str, int] = {}
        for r in self.gateway.runs:
            for command, n in (r.by_command or {}).items():
                out[command] = out.get(command, 0) + n
        return out


def _check_answers(target: Target, result: WrkResult, what: str) -> None:
    target.problems += other_answers(what, result.statuses, 200)
    if result.mismatched:
        target.problems.append(f"{what}: {result.mismatched} answers whose body was not the upstream's")
    if result.socket_errors:
        target.problems.append(f"{what}: {result.socket_errors} socket errors/timeouts")
    if not result.count(200):
        target.problems.append(f"{what}: no 200 answer at all")


def _check(target: Target, run: Run, what: str, connections: int) -> None:
    _check_answers(target, run.wrk, what)
    ok = run.wrk.count(200)
    if target.cache is not None:
        wrong = {v: n for v, n in run.wrk.seen.items() if v != target.cache}
        if wrong:
            count = sum(wrong.values())
            message = f"{what}: {count} answers whose {CACHE_HEADER} was not {target.cache!r}: {wrong}"
            (target.problems if target.cache == "hit" else target.notes).append(message)
    if target.calls_upstream and run.upstream_requests < ok:
        target.problems.append(
            f"{what}: {ok} answers 200 but the upstream got {run.upstream_requests} requests"
        )
    elif target.calls_upstream and run.upstream_requests > ok + connections:
        target.notes.append(f"{what}: the upstream got {run.upstream_requests} requests for {ok} answers")
    elif target.calls_upstream is False and run.upstream_requests:
        target.problems.append(
            f"{what}: the upstream got {run.upstream_requests} requests during a run of hits"
        )


def measure(h: Harness, target: Target, stack: GatewayStack, args: argparse.Namespace) -> None:
    """A warm-up run, then a measured run, of wrk against `target`."""

    def wrk(seconds: float) -> WrkResult:
        return run_wrk(h, target.url, target.script, seconds=seconds, connections=args.connections, threads=1)

    _check_answers(target, wrk(args.warmup), f"{target.name} warm-up")
    time.sleep(SETTLE_S)  # the warm-up's last requests, and the gateway's log of them
    memory_before, _ = redis_memory(stack.client)
    mine = CountingRedis(stack.client)
    mine.reset_stats()
    pids = (target.pid, stack.upstream.pid, stack.server.process.pid)
    requests_before = upstream_stats(stack.upstream_base).requests
    cpu_before = [cpu_seconds(pid) for pid in pids]
    wait_before = run_queue_seconds(target.pid)
    result = wrk(args.seconds)
    time.sleep(SETTLE_S)  # counted: the work of the run's last requests
    server, upstream, redis = (cpu_seconds(pid) - was for pid, was in zip(pids, cpu_before, strict=True))
    requests = upstream_stats(stack.upstream_base).requests - requests_before
    run = Run(result, server, run_queue_seconds(target.pid) - wait_before, upstream, redis, requests)
    if target.gateway:
        run.by_command = mine.others()
        run.redis_bytes = redis_memory(stack.client)[0] - memory_before
    _check(target, run, f"{target.name} run {len(target.runs) + 1}", args.connections)
    target.runs.append(run)
    print(
        f"  {target.name:<18} {result.rate:7.0f} req/s  p50 {result.p50_ms:.2f} ms  "
        f"p99 {result.p99_ms:.2f} ms  {CACHE_HEADER}: {result.seen}",
        file=sys.stderr,
        flush=True,
    )


# --- Reports -----------------------------------------------------------------------------------------


def report_latency(runs: list[LatencyRun], expected: bytes, idle: float) -> None:
    rows: list[list[str]] = []
    for one in runs:
        for via, got in (("direct", one.direct), ("gateway", one.gateway)):
            gateway = got is one.gateway
            ms = sorted(got.answer_ms)
            rows.append(
                [
                    f"{one.rate:g}",
                    f"{one.seconds:g}",
                    via,
                    f"{got.right / got.seconds:.0f}",
                    f"{got.right}/{got.sent}",
                    f"{percentile(ms, 50):.2f}",
                    f"{percentile(ms, 95):.2f}",
                    f"{percentile(ms, 99):.2f}",
                    f"{ms[-1] if ms else float('nan'):.2f}",
                    f"{one.added(50):+.2f}" if gateway else "-",
                    f"{one.added(99):+.2f}" if gateway else "-",
                    ", ".join(f"{k} {v}" for k, v in sorted(got.seen.items())),
                    f"{one.api_cpu_us():.0f} us" if gateway else "-",
                    f"{one.commands():.1f}" if gateway else "-",
                ]
            )
    print(
        f"\nproxy, added latency: GET {USERS_PATH} (n in 0..{USERS - 1}), answered with {len(expected)} "
        f"bytes of JSON, open loop from this process: straight to the upstream, then through "
        f"`gateway serve` ({MISS}: misses)"
    )
    print_table(
        [
            "rate/s",
            "seconds",
            "via",
            "achieved/s",
            "right/sent",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "added p50",
            "added p99",
            CACHE_HEADER,
            "API CPU/req",
            "redis cmds/req",
        ],
        rows,
        [True, True, False, *[True] * 8, False, True, True],
    )
    print(
        f"latency: from the send to the whole answer; right: 200 with the upstream's body; added: gateway - "
        f"direct at the same percentile; API CPU/req: its idle CPU ({idle * 100:.1f} % of a core) taken "
        "out; redis cmds/req: every client's commands during the gateway's run (those run inside Lua "
        "scripts included), this benchmark's own subtracted"
    )


def report_wrk(comparisons: list[Comparison], args: argparse.Namespace) -> None:
    rows = []
    for c in comparisons:
        for t in (c.base, c.gateway):
            requests = max(sum(r.wrk.requests for r in t.runs), 1)
            seconds = sum(r.wrk.seconds for r in t.runs)
            seen: dict[str, int] = {}
            for r in t.runs:
                for value, n in r.wrk.seen.items():
                    seen[value] = seen.get(value, 0) + n
            cpu = [
                sum(r.server_cpu_s for r in t.runs),
                sum(r.upstream_cpu_s for r in t.runs),
                sum(r.redis_cpu_s for r in t.runs),
                sum(r.wrk.cpu_s for r in t.runs),
            ]
            commands = sum(sum(r.by_command.values()) for r in t.runs if r.by_command is not None)
            upstream = f"{sum(r.upstream_requests for r in t.runs)}/{sum(r.wrk.count(200) for r in t.runs)}"
            rows.append(
                [
                    c.part,
                    t.name,
                    f"{median([r.wrk.rate for r in t.runs]):.0f}",
                    " ".join(f"{r.wrk.rate:.0f}" for r in t.runs),
                    f"{median([r.wrk.p50_ms for r in t.runs]):.2f}",
                    f"{median([r.wrk.p99_ms for r in t.runs]):.2f}",
                    f"{sum(r.wrk.requests - r.wrk.count(200) for r in t.runs)}",
                    f"{sum(r.wrk.mismatched for r in t.runs)}",
                    f"{sum(r.wrk.socket_errors for r in t.runs)}",
                    ", ".join(f"{k} {v}" for k, v in sorted(seen.items())),
                    f"{t.cpu_us():.0f} us",
                    "/".join(f"{x / seconds * 100:.0f}" for x in cpu),
                    f"{sum(r.server_wait_s for r in t.runs) / seconds * 100:.0f}",
                    upstream if t.calls_upstream is not None else "-",
                    f"{commands / requests:.1f}" if t.gateway else "-",
                    f"{sum(r.redis_bytes for r in t.runs) / requests:.0f}" if t.gateway else "-",
                    f"{c.ratio():.2f}" if t is c.gateway else "1.00",
                    f"{c.base.cpu_us() / t.cpu_us():.2f}",
                ]
            )
    print(
        f"\nproxy, GETs/s: wrk -t1 -c{args.connections}, {args.seconds} s per run after {args.warmup} s "
        f"warm-up, {args.rounds} rounds (medians); cache miss: GET /hooks/{MISS}{USERS_PATH} (n in "
        f"0..{USERS - 1}), cache hit: GET /hooks/{HIT}{HIT_PATH}"
    )
    print_table(
        [
            "part",
            "target",
            "req/s",
            "each run",
            "p50 ms",
            "p99 ms",
            "non-200",
            "wrong body",
            "sock err",
            CACHE_HEADER,
            "CPU/req",
            "CPU % srv/upstream/redis/wrk",
            "srv CPU wait %",
            "upstream req/200s",
            "redis cmds/req",
            "redis B/req",
            "ratio",
            "CPU ratio",
        ],
        rows,
        [False, False, *[True] * 7, False, *[True] * 8],
    )
    print(
        "ratio: median over rounds of req/s / the baseline's req/s in the same round; CPU ratio: the "
        "baseline's CPU per request / this one's; wrong body: 200 answers whose body was not the "
        "upstream's; upstream req/200s: requests the upstream got during the measured runs / 200 "
        "answers; redis B/req: growth of Redis's used_memory per request (the log of each request, kept "
        "until the workers' retention removes it, as no worker runs here; and on a miss the copies of "
        "request keys not seen before); sums over the measured runs"
    )


def figures(latency: list[LatencyRun], comparisons: list[Comparison], connections: int) -> list[Figure]:
    """Rows of the suite's table: latency via the gateway beside the direct one, then GETs/s."""
    out = []
    for one in latency:
        g, d = one.gateway, one.direct
        row = Figure(
            "proxy",
            f"GET at {one.rate:g}/s for {one.seconds:g} s: p50 / p95 / p99 ms via the gateway "
            "(added p50 / p99)",
            f"{one.p(g, 50):.2f} / {one.p(g, 95):.2f} / {one.p(g, 99):.2f} "
            f"({one.added(50):+.2f} / {one.added(99):+.2f})",
            f"direct {one.p(d, 50):.2f} / {one.p(d, 95):.2f} / {one.p(d, 99):.2f}",
        )
        if one.rate == AT_RATE:
            met = one.added(50) <= ADDED_P50_MS and one.added(99) <= ADDED_P99_MS
            row = Figure(
                row.part,
                row.measure,
                row.value,
                row.baseline,
                "-",
                f"added p50 <= {ADDED_P50_MS:g}, p99 <= {ADDED_P99_MS:g}",
                met,
            )
        out.append(row)
    for c in comparisons:
        ratio = c.ratio()
        out.append(
            Figure(
                "proxy",
                f"{c.part}, wrk -c{connections}: GETs/s via `gateway serve`",
                f"{median([r.wrk.rate for r in c.gateway.runs]):.0f}",
                f"{c.base.name} {median([r.wrk.rate for r in c.base.runs]):.0f}/s",
                f"{ratio:.2f}",
                f"ratio >= {RATIO:.2f}",
                ratio >= RATIO,
            )
        )
    return out


def details(latency: list[LatencyRun], comparisons: list[Comparison], used: int, idle: float) -> list[str]:
    """CPU and Redis's work per request, and Redis's memory, for the suite's text."""
    out = []
    for one in latency:
        right = max(one.gateway.right, 1)
        out.append(
            f"proxy {one.rate:g}/s via the gateway: API CPU {one.api_cpu_us():.0f} us per request "
            f"(idle {idle * 100:.1f} % of a core taken out); Redis calls per request by command: "
            f"{per_event_text(one.by_command, right)}"
        )
    for c in comparisons:
        requests = max(sum(r.wrk.requests for r in c.gateway.runs), 1)
        grown = sum(r.redis_bytes for r in c.gateway.runs)
        out.append(
            f"proxy {c.part}: CPU per request {c.gateway.cpu_us():.0f} us, {c.base.name} "
            f"{c.base.cpu_us():.0f} us; Redis memory {grown / requests:.0f} B per request; Redis calls "
            f"per request by command: {per_event_text(c.by_command(), requests)}"
        )
    proxied = sum(one.gateway.sent for one in latency)
    proxied += sum(r.wrk.requests for c in comparisons for r in c.gateway.runs)
    out.append(
        f"proxy: Redis used_memory {used / 2**20:.1f} MiB at the end, after about {proxied} "
        "measured requests through the gateway (and their warm-ups)"
    )
    return out


# --- The run -----------------------------------------------------------------------------------------


def parse_rates(text: str) -> list[float]:
    """`100,500` -> [100.0, 500.0]; ValueError when not positive numbers."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(text)
    return rates


def parser() -> argparse.ArgumentParser:
    return options(
        ("--rates", "100,500", "part 1: GETs/s of the open-loop sender, comma-separated"),
        ("--rate-seconds", 15.0, "part 1: how long to send at each rate"),
        ("--seconds", 5, "parts 2 and 3: length of each measured wrk run"),
        ("--warmup", 2, "parts 2 and 3: length of the warm-up before a run"),
        ("--connections", 32, "parts 2 and 3: wrk connections"),
        ("--rounds", 3, "parts 2 and 3: rounds of (baseline, gateway)"),
        ("--answer-bytes", 1024, "size of the upstream's JSON answer"),
        ("--log-level", "INFO", "GATEWAY_LOG_LEVEL of the gateway"),
        description=__doc__,
    )


def run(args: argparse.Namespace) -> Outcome:
    """Parts 1 to 3 against one stack; prints their tables; the figures and checks."""
    rates = parse_rates(args.rates)
    expected = lookup_answer(args.answer_bytes)
    outcome = Outcome()
    latency: list[LatencyRun] = []
    with harness("gateway-bench-proxy-") as h:
        answer_file = h.directory / "answer.json"
        answer_file.write_bytes(expected)
        upstream_port, bare_port, hello_port = free_port(), free_port(), free_port()
        stack = start_stack(
            h,
            proxy_config(upstream_port),
            upstream_port,
            args.log_level,
            workers=0,
            upstream_args=["--answer-file", str(answer_file)],
        )
        try:
            bare = h.spawn(
                BARE_PROXY,
                [
                    *h.python("proxy.py"),
                    BARE_PROXY,
                    "--port",
                    str(bare_port),
                    "--upstream",
                    stack.upstream_base,
                ],
            )
            hello = h.spawn(
                "hello",
                [*h.python("_hello.py"), "--port", str(hello_port), "--answer-file", str(answer_file)],
            )
            wait_http(
                f"http://127.0.0.1:{bare_port}/healthz", bare, expect=200, describe=lambda: h.log(BARE_PROXY)
            )
            wait_http(
                f"http://127.0.0.1:{hello_port}/healthz", hello, expect=200, describe=lambda: h.log("hello")
            )
            outcome.problems += probe(stack.api, expected)

            idle = idle_cpu(stack.gateway.pid)
            for base in (
                f"{stack.api}/hooks/{MISS}",
                stack.upstream_base,
            ):  # warm-up: connections, code paths
                uvloop.run(fetch_open_loop(users(base), 100, 1, expect_body=expected))
            for rate in rates:
                print(
                    f"proxy: GETs at {rate:g}/s for {args.rate_seconds:g} s, direct then via the gateway...",
                    file=sys.stderr,
                    flush=True,
                )
                one = run_latency(stack, expected, rate, args.rate_seconds, idle)
                latency.append(one)
                print(
                    f"  p50 {one.p(one.direct, 50):.2f} -> {one.p(one.gateway, 50):.2f} ms, "
                    f"p99 {one.p(one.direct, 99):.2f} -> {one.p(one.gateway, 99):.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )

            misses = write_wrk_script(
                h.directory / "misses.lua",
                None,
                method="GET",
                expect_body=expected,
                count_header=CACHE_HEADER,
                request_path=f"/hooks/{MISS}{USERS_PATH}",
                cycle=USERS,
            )
            hits = write_wrk_script(
                h.directory / "hits.lua", None, method="GET", expect_body=expected, count_header=CACHE_HEADER
            )
            bare_url, hello_url = f"http://127.0.0.1:{bare_port}", f"http://127.0.0.1:{hello_port}"
            comparisons = [
                Comparison(
                    "cache miss",
                    Target("bare aiohttp proxy", bare_url, misses, bare.pid, False, True),
                    Target("gateway (miss)", stack.api, misses, stack.gateway.pid, True, True, "miss"),
                ),
                Comparison(
                    "cache hit",
                    Target(
                        "bare Starlette", f"{hello_url}/hooks/{HIT}{HIT_PATH}", hits, hello.pid, False, None
                    ),
                    Target(
                        "gateway (hit)",
                        f"{stack.api}/hooks/{HIT}{HIT_PATH}",
                        hits,
                        stack.gateway.pid,
                        True,
                        False,
                        "hit",
                    ),
                ),
            ]
            for c in comparisons:
                for n in range(args.rounds):
                    print(f"proxy, {c.part}: round {n + 1}/{args.rounds}", file=sys.stderr, flush=True)
                    for target in (c.base, c.gateway):
                        measure(h, target, stack, args)
            used, _ = redis_memory(stack.client)
        finally:
            stack.client.close()
        others = ((BARE_PROXY, bare.poll()), ("hello", hello.poll()))
        for name, code in [*stack.exited(), *((n, c) for n, c in others if c is not None)]:
            outcome.problems.append(f"{name} exited with {code} during the benchmark: {h.log(name)}")
        logged = logged_warnings(h.log("gateway"))

    report_latency(latency, expected, idle)
    report_wrk(comparisons, args)
    _collect(outcome, latency, comparisons, logged)
    outcome.details += details(latency, comparisons, used, idle)
    for line in outcome.details:
        print(f"  {line}")
    if not outcome.problems:
        print(
            "checks: every answer was 200 with the upstream's body, no socket errors; every hit said "
            f"`{CACHE_HEADER}: hit` and none reached the upstream; every miss did; the probes passed"
        )
    outcome.figures += figures(latency, comparisons, args.connections)
    return outcome


def _collect(
    outcome: Outcome, latency: list[LatencyRun], comparisons: list[Comparison], logged: list[str]
) -> None:
    """The failed checks and notes of every part, and of the gateway's log."""
    for one in latency:
        for via, got in (("direct", one.direct), ("via the gateway", one.gateway)):
            outcome.problems += got.problems(f"proxy {one.rate:g}/s {via}")
            outcome.notes += got.notes(f"proxy {one.rate:g}/s {via}")
        not_miss = {v: n for v, n in one.gateway.seen.items() if v != "miss"}
        if not_miss:
            outcome.notes.append(
                f"proxy {one.rate:g}/s via the gateway: answers whose {CACHE_HEADER} was not "
                f"'miss': {not_miss}"
            )
    for c in comparisons:
        for t in (c.base, c.gateway):
            outcome.problems += t.problems
            outcome.notes += t.notes
        busiest = max((r.upstream_cpu_s / r.wrk.seconds for r in c.base.runs + c.gateway.runs), default=0.0)
        if c.base.calls_upstream and busiest > 0.8:
            outcome.notes.append(
                f"proxy {c.part}: the upstream used up to {busiest * 100:.0f} % of a core: it "
                "may have set the pace"
            )
    warnings = [ln for ln in logged if '"level":"warning"' in ln or " WARNING " in ln]
    errors = [ln for ln in logged if ln not in warnings]
    if errors:
        outcome.problems.append(f"the gateway logged {len(errors)} errors, e.g. {errors[:3]}")
    if warnings:
        outcome.notes.append(f"the gateway logged {len(warnings)} warnings, e.g. {warnings[:3]}")


def main() -> int:
    if sys.argv[1:2] == [BARE_PROXY]:
        return serve_bare_proxy(sys.argv[2:])
    p = parser()
    args = p.parse_args()
    try:
        parse_rates(args.rates)
    except ValueError:
        p.error("--rates must be positive numbers separated by commas")
    if args.rate_seconds <= 0 or args.seconds <= 0 or args.warmup <= 0 or args.rounds <= 0:
        p.error("--rate-seconds, --seconds, --warmup and --rounds must be positive")
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
