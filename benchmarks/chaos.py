"""The chaos run: steady load on an endpoint that flaps, while workers, the API and Redis are killed
with SIGKILL and started again; at the end, the ledger proves that no acknowledged event was lost.

    python3 benchmarks/chaos.py [--minutes 10] [--rate 30] [--fault-every-s 4] [--drain-s 120] [--seed N]

Starts everything it needs: a redis-server of its own on a free port with an append-only file
(`appendfsync always`: a 202 means the event is on disk), the real `python3 -m gateway serve` and
TWO `python3 -m gateway worker`, and an endpoint in this process (aiohttp, in a thread) that answers
each request at random: 200, a 5xx, no answer within the integration's timeout, a connection reset,
or a body trickled out over longer than the timeout (the gateway decides on the status line). The
endpoint records every request: its `webhook-id`, the load's own number for the event (in the body),
what it did, and the status it answered (none for a timeout or a reset).

The load (aiohttp, this process) posts event k at start + k / rate with `Idempotency-Key: chaos-k`,
as a helpdesk would, and tries again (every 0.25 s, up to `--retry-s` after the sending ends) when
it gets no answer or a 5xx while the API or Redis is down; the id of its 202 goes in the ledger.
Meanwhile a fault every `--fault-every-s` s on average (rounds of: two worker kills, one API kill,
one Redis kill and one outage of the endpoint, in a random order): SIGKILL, then the process is
started again (a worker after up to 1 s, the API at once, Redis after 0.3-1.5 s, on the same port and
directory: it replays its append-only file); an outage answers every request 503 for 1.5-3 s, which
pauses the integration (30 failures in a row), so that held events, probes and the ordered drain
go through the kills too. The faults stop with the sending and the endpoint then answers 200 to
everything; everything drains (`--drain-s` at most).

Checked (exit status 1 when a check fails), from the ledger, the endpoint's log, the admin API
(/admin/integrations, /admin/status, /admin/events and each event's attempts), /metrics and the
Store (leases):
- every id that got a 202 is known and terminal (delivered or dead): lost = 0; one number never got
  two ids (the Idempotency-Key held through the kills);
- nothing stuck: no event pending, in flight, retrying or held; no lease left; nothing scheduled;
- every delivered id reached the endpoint and got a 200 there; every id the endpoint saw is an
  event; the requests of one event all carry the same `webhook-id` (its id);
- each attempt the gateway recorded with an HTTP status was answered with that status by the
  endpoint, and the endpoint saw no more requests for an event than it has attempts recorded;
- /metrics agrees: events accepted = delivered + dead, attempts by outcome = the attempt records,
  events by state = the admin API's counts.
Duplicates (a second 200 for an event, from a worker killed between the answer and its record,
or an answer that came as the timeout struck) are counted, never a failure: delivery is at least
once, and the duplicates carry the same `webhook-id`.

tests/test_chaos.py runs it short (about a minute); `python3 -m benchmarks --only chaos` runs it as
a part of the suite (5 minutes); the long run's figures (10 minutes) are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python3 benchmarks/chaos.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import orjson
import redis
import redis.asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._common import (
    LOG_LEVEL,
    REPO_ROOT,
    Figure,
    Harness,
    Outcome,
    ServedInThread,
    free_port,
    harness,
    options,
    print_table,
    run_main,
)
from gateway.dev import redis_server_binary
from gateway.store import Store

INTEGRATION = "chaos"
TIMEOUT_S = 1.0  # the integration's timeout: the endpoint's timeouts and stalls go past it
TERMINAL = ("delivered", "dead")
NOT_DONE = ("pending", "in_flight", "retrying", "held")
# What the endpoint does, with its weight: most requests are answered 200.
ENDPOINT_FAULTS = {
    "ok": 70,
    "error": 12,  # a 500, 502, 503 or 504 (no Retry-After)
    "timeout": 4,  # no answer until after the integration's timeout
    "reset": 6,  # the connection reset (RST) without an answer
    "slow_body": 6,  # 200, then the body trickled out over longer than the timeout
}
# One round of faults, shuffled: processes killed, and an outage of the endpoint (every request a
# 503 for 1.5-3 s: enough failures in a row to pause the integration, so that held events, probes and
# drains go through the kills too).
PROCESS_FAULTS = ("kill_worker", "kill_worker", "kill_api", "kill_redis", "endpoint_outage")


@dataclass(frozen=True)
class Hit:
    """One request the endpoint received."""

    webhook_id: str
    number: int  # the load's number for the event (-1: none in the body)
    kind: str
    status: int | None  # the status it answered in full; None: no complete answer


class Endpoint(ServedInThread):
    """The flapping endpoint, in a thread with its own loop; records every request."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.hits: list[Hit] = []
        self._rng = rng
        self._lock = threading.Lock()
        self.down_until = 0.0  # monotonic: an outage, every request answered 503 until then
        self.calm = False  # the faults are over: every request answered 200
        kinds = list(ENDPOINT_FAULTS)
        self._kinds, self._weights = kinds, [ENDPOINT_FAULTS[k] for k in kinds]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        try:
            number = int(orjson.loads(body)["n"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            number = -1
        with self._lock:
            kind = "ok" if self.calm else self._rng.choices(self._kinds, self._weights)[0]
            status = self._rng.choice((500, 502, 503, 504)) if kind == "error" else 200
            if time.monotonic() < self.down_until:
                kind, status = "outage", 503
        if kind == "reset":
            self._record(Hit(webhook_id, number, kind, None))
            _reset(request)
            raise web.HTTPBadRequest()  # never sent: the connection is gone
        if kind == "timeout":
            self._record(Hit(webhook_id, number, kind, None))
            await asyncio.sleep(TIMEOUT_S + 1.0)
            return web.Response(status=200, body=b'{"late":true}')
        if kind == "slow_body":
            # The gateway decides on the status line (it reads only the start of a body, for its
            # log): the answer counts from the headers, recorded before they go out.
            self._record(Hit(webhook_id, number, kind, 200))
            stream = web.StreamResponse(status=200, headers={"content-type": "application/json"})
            stream.content_length = 16 * 8
            await stream.prepare(request)
            with contextlib.suppress(ConnectionError):  # the gateway hangs up once it has read enough
                for _ in range(8):
                    await stream.write(b" " * 15 + b"\n")
                    await asyncio.sleep((TIMEOUT_S + 0.5) / 8)
                await stream.write_eof()
            return stream
        self._record(Hit(webhook_id, number, kind, status))
        return web.Response(status=status, body=b'{"ok":true}' if status == 200 else b'{"error":"flap"}')


def _reset(request: web.Request) -> None:
    """Closes the connection with a RST (SO_LINGER 0), as a crashing endpoint or a proxy would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Stack:
    """Redis (append-only, fsync always), `gateway serve` and two `gateway worker`, each of which
    can be killed and started again on the same port, directory and config."""

    def __init__(self, h: Harness, endpoint_url: str, log_level: str, server: str) -> None:
        self.h = h
        self.server = server
        self.redis_port = free_port()
        self.api_port = free_port()
        self.token = secrets.token_urlsafe(24)
        self.redis_dir = h.directory / "redis"
        self.redis_dir.mkdir()
        config = h.directory / "gateway.toml"
        config.write_text(chaos_config(endpoint_url))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        path = os.environ.get("PYTHONPATH")
        self.env.update(
            PYTHONPATH=str(REPO_ROOT) + (os.pathsep + path if path else ""),
            REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            GATEWAY_CONFIG=str(config),
            GATEWAY_ADMIN_TOKEN=self.token,
            GATEWAY_SECRET_KEY=secrets.token_urlsafe(32),
            GATEWAY_LOG_LEVEL=log_level,
        )
        self.redis: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.exits: list[str] = []  # processes that ended on their own (not killed here)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def start_redis(self) -> None:
        args = [
            self.server,
            "--port",
            str(self.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.redis_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        self.redis = self.h.spawn("redis", args)

    async def wait_redis(self, timeout_s: float = 30.0) -> None:
        client = redis.asyncio.Redis(port=self.redis_port, socket_connect_timeout=0.5)
        try:
            await _until(lambda: _pings(client), timeout_s, "Redis answered PING", self.redis)
        finally:
            await client.aclose()

    def start_api(self) -> None:
        args = [sys.executable, "-m", "gateway", "serve", "--port", str(self.api_port)]
        self.api = self.h.spawn("api", args, env=self.env)

    async def wait_api(self, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        async def up() -> bool:
            try:
                async with session.get(self.api_url + "/healthz") as response:
                    return response.status == 200
            except (aiohttp.ClientError, OSError, TimeoutError):
                return False

        await _until(up, timeout_s, "the API answered /healthz", self.api)

    def start_worker(self, slot: int) -> None:
        worker = self.h.spawn(f"worker{slot}", [sys.executable, "-m", "gateway", "worker"], env=self.env)
        if slot < len(self.workers):
            self.workers[slot] = worker
        else:
            self.workers.append(worker)

    def kill(self, process: subprocess.Popen[bytes] | None, name: str) -> None:
        """SIGKILL; a process that had already ended on its own is noted as a failure."""
        assert process is not None
        if process.poll() is not None:
            self.exits.append(f"{name} had exited with {process.returncode} before it was killed")
            return
        process.kill()
        process.wait()

    def ended(self) -> list[str]:
        """The processes of the stack that are not running now, with their exit status."""
        named = [("redis", self.redis), ("api", self.api)]
        named += [(f"worker{k}", w) for k, w in enumerate(self.workers)]
        return [
            f"{name} {'never started' if p is None else f'exited with {p.returncode}'}"
            for name, p in named
            if p is None or p.poll() is not None
        ]


def chaos_config(endpoint_url: str) -> str:
    """One integration on the flapping endpoint. Retries come fast and many (a backoff of at most
    1 s, 40 attempts), so that nearly every event is delivered while the faults go on and the run
    drains in seconds; the lease is the timeout plus 1 s, so a killed worker's attempts come back
    quickly. An outage pauses it (30 failures in a row) and a probe every 0.5-2 s resumes it. A
    stopping worker hands back at once (the kills are SIGKILL anyway)."""
    return f"""\
[gateway]
allowed_networks = ["127.0.0.0/8"]

[worker]
lease_margin_s = 1
reconcile_interval_s = 0.2
shutdown_grace_s = 0

[[integrations]]
name = "{INTEGRATION}"
target = "{endpoint_url}"
timeout_s = {TIMEOUT_S}
failure_threshold = 30
probe_cooldown_s = 0.5
probe_cooldown_max_s = 2
drain_rate_per_s = 200

[integrations.retry]
max_attempts = 40
backoff_base_s = 0.1
backoff_max_s = 1
max_age_s = 86400
"""


async def _pings(client: redis.asyncio.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False


async def _until(
    predicate: Callable[[], Awaitable[bool]],
    timeout_s: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not done within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)


@dataclass
class Load:
    """What the sender saw: the ledger (number -> id of its 202) and the answers that were not one."""

    ledger: dict[int, str] = field(default_factory=dict)
    posted: int = 0
    tries: int = 0  # POSTs sent, first tries and retries
    not_acked: Counter[str] = field(default_factory=Counter)  # by answer: "503", "connection"...
    given_up: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def _post_until_acked(
    session: aiohttp.ClientSession, url: str, run: str, n: int, give_up_at: float, load: Load
) -> None:
    body = orjson.dumps({"n": n, "run": run, "ticket": {"id": n, "status": "open"}})
    headers = {"content-type": "application/json", "idempotency-key": f"chaos-{run}-{n}"}
    while True:
        load.tries += 1
        try:
            async with session.post(url, data=body, headers=headers) as response:
                text = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            load.not_acked[type(exc).__name__] += 1
        else:
            if status == 202:
                event_id = str(orjson.loads(text)["id"])
                first = load.ledger.setdefault(n, event_id)
                if first != event_id:
                    load.problems.append(f"number {n} got two ids: {first} and {event_id}")
                return
            load.not_acked[str(status)] += 1
            if status < 500:
                load.problems.append(f"number {n}: HTTP {status} {text[:200]!r}")
                return
        if time.monotonic() > give_up_at:
            load.given_up.append(n)
            return
        await asyncio.sleep(0.25)


async def send(url: str, rate: float, seconds: float, retry_s: float, load: Load) -> None:
    """Event k at start + k / rate for `seconds`, each tried until a 202 (see the module's doc)."""
    run = secrets.token_hex(4)
    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.monotonic()
        give_up_at = started + seconds + retry_s
        tasks: set[asyncio.Task[None]] = set()
        n = 0
        while (at := started + n / rate) < started + seconds:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            task = asyncio.create_task(_post_until_acked(session, url, run, n, give_up_at, load))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        load.posted = n
        await asyncio.gather(*tasks)


@dataclass
class Faults:
    injected: Counter[str] = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)


async def inject(
    stack: Stack,
    endpoint: Endpoint,
    session: aiohttp.ClientSession,
    rng: random.Random,
    every_s: float,
    until: float,
    *,
    outages: bool = True,
) -> Faults:
    """Kills and restarts until `until` (monotonic): rounds of PROCESS_FAULTS in a random order,
    one every `every_s` s on average."""
    faults = Faults()
    started = time.monotonic()
    kinds: list[str] = []
    while True:
        gap = min(max(rng.expovariate(1 / every_s), 0.5), 3 * every_s)
        if time.monotonic() + gap >= until:
            return faults
        await asyncio.sleep(gap)
        if not kinds:
            kinds = [k for k in PROCESS_FAULTS if outages or k != "endpoint_outage"]
            rng.shuffle(kinds)
        kind = kinds.pop()
        faults.injected[kind] += 1
        faults.log.append(f"{time.monotonic() - started:7.2f} s  {kind}")
        if kind == "kill_worker":
            slot = rng.randrange(len(stack.workers))
            stack.kill(stack.workers[slot], f"worker{slot}")
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            stack.start_worker(slot)
        elif kind == "kill_api":
            stack.kill(stack.api, "api")
            stack.start_api()
            await stack.wait_api(session)
        elif kind == "endpoint_outage":
            endpoint.down_until = time.monotonic() + rng.uniform(1.5, 3.0)
        else:
            stack.kill(stack.redis, "redis")
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            stack.start_redis()
            await stack.wait_redis()


@dataclass
class Verdict:
    """What the end of a run found: the figures and the failed checks."""

    posted: int = 0
    acked: int = 0
    events: int = 0
    delivered: int = 0
    dead: int = 0
    lost: int = 0
    stuck: int = 0
    attempts: int = 0
    requests: int = 0
    duplicates: int = 0  # 200s beyond the first, over every delivered event
    duplicated_events: int = 0
    lost_with_worker: int = 0  # attempts taken back from a killed worker (its lease expired)
    held: int = 0  # attempts that ended with the event held (the integration paused)
    faults: Counter[str] = field(default_factory=Counter)
    not_acked: Counter[str] = field(default_factory=Counter)
    drain_s: float | None = None  # None: not drained within the time allowed
    problems: list[str] = field(default_factory=list)


class Admin:
    def __init__(self, session: aiohttp.ClientSession, stack: Stack) -> None:
        self._session = session
        self._base = stack.api_url + "/admin"
        self._headers = stack.headers

    async def get(self, path: str) -> Any:
        async with self._session.get(self._base + path, headers=self._headers) as response:
            if response.status != 200:
                raise RuntimeError(f"GET /admin{path}: HTTP {response.status} {await response.text()}")
            return orjson.loads(await response.read())

    async def exists(self, event_id: str) -> bool:
        async with self._session.get(f"{self._base}/events/{event_id}", headers=self._headers) as response:
            if response.status not in (200, 404):
                raise RuntimeError(f"GET /admin/events/{event_id}: HTTP {response.status}")
            return response.status == 200

    async def ids(self, state: str) -> list[str]:
        """Every event id in a state, page by page."""
        found: list[str] = []
        cursor = ""
        while True:
            query = f"/events?integration={INTEGRATION}&state={state}&limit=500"
            page = await self.get(query + (f"&cursor={cursor}" if cursor else ""))
            found += [item["id"] for item in page["items"]]
            if not page["next_cursor"]:
                return found
            cursor = page["next_cursor"]

    async def attempts(self, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        gate = asyncio.Semaphore(16)

        async def one(event_id: str) -> tuple[str, list[dict[str, Any]]]:
            async with gate:
                event = await self.get(f"/events/{event_id}")
            return event_id, list(event["attempts"])

        return dict(await asyncio.gather(*(one(i) for i in ids)))


async def metrics(session: aiohttp.ClientSession, stack: Stack) -> dict[tuple[str, tuple[str, ...]], float]:
    """/metrics as (sample name, label values) -> value, for the chaos integration's samples."""
    async with session.get(stack.api_url + "/metrics") as response:
        text = await response.text()
    out: dict[tuple[str, tuple[str, ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("integration", None) == INTEGRATION:
                out[(sample.name, tuple(sorted(labels.values())))] = sample.value
    return out


async def drained(admin: Admin, timeout_s: float) -> float | None:
    """Waits until nothing is left to do; returns how long that took (None: not within timeout_s)."""
    started = time.monotonic()

    async def idle() -> bool:
        try:
            status = await admin.get("/status")
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
            return False
        counts = status["integrations"][0]["counts"]
        return status["queue_depth"] == 0 and not any(counts[s] for s in NOT_DONE)

    try:
        await _until(idle, timeout_s, "drained")
    except RuntimeError:
        return None
    return time.monotonic() - started


async def check(
    stack: Stack, session: aiohttp.ClientSession, load: Load, hits: list[Hit], v: Verdict
) -> None:
    """The ledger against the store (through the admin API and Store), /metrics and the endpoint."""
    admin = Admin(session, stack)
    problems = v.problems
    by_state = {state: await admin.ids(state) for state in (*TERMINAL, *NOT_DONE)}
    state_of = {event_id: state for state, ids in by_state.items() for event_id in ids}
    v.events, v.delivered, v.dead = len(state_of), len(by_state["delivered"]), len(by_state["dead"])
    v.stuck = sum(len(by_state[s]) for s in NOT_DONE)
    if v.stuck:
        problems.append(f"stuck: {', '.join(f'{s} {len(by_state[s])}' for s in NOT_DONE if by_state[s])}")

    # The ledger: every 202 id is an event, and a terminal one.
    acked = set(load.ledger.values())
    v.acked = len(acked)
    # An id not listed may have moved from one state to another between two listings (only when
    # the drain did not end): it is lost only when the event itself is not there.
    missing = [i for i in sorted(acked - state_of.keys()) if not await admin.exists(i)]
    unfinished = sorted(i for i in acked & state_of.keys() if state_of[i] not in TERMINAL)
    v.lost = len(missing) + len(unfinished)
    if missing:
        problems.append(f"lost: {len(missing)} acknowledged ids are not in the store, e.g. {missing[:5]}")
    if unfinished:
        problems.append(f"not terminal: {len(unfinished)} acknowledged ids, e.g. {unfinished[:5]}")
    if len(acked) != len(load.ledger):
        problems.append("two numbers of the load got the same id")

    # Nothing in flight: no lease left, nothing scheduled (Store and the admin API).
    client = redis.asyncio.Redis(port=stack.redis_port)
    try:
        store = Store(client, "gw")
        if leased := await store.leased():
            problems.append(f"{leased} leases left after the drain")
        if scheduled := await store.scheduled([INTEGRATION]):
            problems.append(f"{scheduled} attempts still scheduled after the drain")
    finally:
        await client.aclose()
    status = await admin.get("/status")
    counts = status["integrations"][0]["counts"]
    if status["queue_depth"] or any(counts[s] for s in NOT_DONE):
        problems.append(f"admin status after the drain: {status}")
    if v.drain_s is None:
        problems.append("not drained: the logs and /metrics are not compared while events still move")
        return

    # The endpoint's log against the events and their attempts.
    attempts = await admin.attempts(sorted(state_of))
    records = [a for got in attempts.values() for a in got if a["outcome"] != "replay"]
    v.attempts = len(records)
    v.lost_with_worker = sum(1 for a in records if a["error"] == "lease_expired")
    v.held = sum(1 for a in records if a["outcome"] == "held")
    v.requests = len(hits)
    hits_of: dict[str, list[Hit]] = defaultdict(list)
    ids_of_number: dict[int, set[str]] = defaultdict(set)
    for hit in hits:
        hits_of[hit.webhook_id].append(hit)
        ids_of_number[hit.number].add(hit.webhook_id)
    strangers = sorted(hits_of.keys() - state_of.keys())
    if strangers:
        problems.append(
            f"the endpoint got {len(strangers)} webhook-ids that are no event, e.g. {strangers[:5]}"
        )
    split = {n: ids for n, ids in ids_of_number.items() if len(ids) > 1}
    if split:
        problems.append(
            f"{len(split)} events reached the endpoint under two webhook-ids, e.g. {list(split)[:5]}"
        )
    for n, ids in ids_of_number.items():
        if n in load.ledger and ids != {load.ledger[n]}:
            problems.append(f"number {n}: acknowledged as {load.ledger[n]}, delivered as {sorted(ids)}")
            break
    mismatched = []
    for event_id, got in attempts.items():
        mine = hits_of.get(event_id, [])
        answered = Counter(h.status for h in mine if h.status is not None)
        recorded = Counter(a["status"] for a in got if a["status"] is not None)
        if recorded - answered or len(mine) > len(got):
            mismatched.append(event_id)
        oks = answered[200]
        if state_of[event_id] == "delivered" and oks == 0:
            problems.append(f"{event_id} is delivered but the endpoint never answered it 200")
        if oks > 1:
            v.duplicates += oks - 1
            v.duplicated_events += 1
    if mismatched:
        problems.append(
            f"{len(mismatched)} events' attempt logs disagree with the endpoint's log, e.g. "
            + "; ".join(f"{i}: {attempts[i]} vs {hits_of.get(i)}" for i in mismatched[:2])
        )

    # /metrics against the admin API's counts and the attempt records.
    seen = await metrics(session, stack)
    by_outcome = Counter(a["outcome"] for a in records)
    expected = {
        ("gateway_events_accepted_total", ("relay",)): float(v.events),
        **{("gateway_events", (s,)): float(len(by_state[s])) for s in (*NOT_DONE, "dead")},
        **{
            ("gateway_attempts_total", (o,)): float(by_outcome[o])
            for o in ("delivered", "retrying", "held", "dead")
        },
    }
    for key, want in expected.items():
        if seen.get(key) != want:
            problems.append(f"/metrics {key[0]}{list(key[1])} = {seen.get(key)}, the store says {want:g}")
    if by_outcome["delivered"] != v.delivered or by_outcome["dead"] != v.dead:
        problems.append(f"attempt outcomes {dict(by_outcome)} against {v.delivered} delivered, {v.dead} dead")
    if counts["delivered_24h"] != v.delivered or counts["dead"] != v.dead:
        problems.append(f"admin counts {counts} against {v.delivered} delivered and {v.dead} dead listed")


async def chaos(
    h: Harness,
    *,
    seconds: float,
    rate: float,
    fault_every_s: float,
    drain_s: float,
    retry_s: float,
    seed: int,
    log_level: str = "INFO",
    server: str | None = None,
    outages: bool = True,
) -> Verdict:
    """One run (see the module's doc); the caller owns the harness (its processes and directory).
    `server`: the redis-server (or valkey-server) binary; by default the one `gateway dev` runs."""
    rng = random.Random(seed)
    endpoint = Endpoint(random.Random(rng.random())).start()
    stack = Stack(h, endpoint.url, log_level, server or redis_server_binary())
    v = Verdict()
    load = Load()
    faults = Faults()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            stack.start_redis()
            await stack.wait_redis()
            for slot in range(2):
                stack.start_worker(slot)
            stack.start_api()
            await stack.wait_api(session)
            url = stack.api_url + f"/hooks/{INTEGRATION}"
            sending = asyncio.create_task(send(url, rate, seconds, retry_s, load))
            try:
                faults = await inject(
                    stack, endpoint, session, rng, fault_every_s, time.monotonic() + seconds, outages=outages
                )
                await sending
            finally:
                sending.cancel()
            endpoint.calm = True
            v.problems += stack.exits + stack.ended()
            v.drain_s = await drained(Admin(session, stack), drain_s)
            hits = endpoint.snapshot()
            await check(stack, session, load, hits, v)
            v.problems += stack.ended()
    finally:
        endpoint.stop()
    v.faults = faults.injected + Counter(hit.kind for hit in hits if hit.kind != "ok")
    v.posted, v.not_acked = load.posted, load.not_acked
    v.problems += load.problems
    if load.given_up:
        v.problems.append(f"the load got no 202 for {len(load.given_up)} numbers, e.g. {load.given_up[:5]}")
    if v.problems:
        v.problems.append("faults, in order: " + " | ".join(faults.log))
    return v


def report(v: Verdict, args: argparse.Namespace) -> None:
    print(
        f"\nchaos: {args.rate:g} events/s for {args.minutes:g} min, a process fault every "
        f"{args.fault_every_s:g} s on average{'' if args.outages else ', no outages'} (seed {args.seed}); "
        + ("NOT drained" if v.drain_s is None else f"drained in {v.drain_s:.1f} s")
    )
    rows = [
        ["events posted (numbers)", str(v.posted)],
        ["acknowledged (202 ids in the ledger)", str(v.acked)],
        ["events in the store", str(v.events)],
        ["delivered / dead", f"{v.delivered} / {v.dead}"],
        ["lost (acknowledged, not terminal or gone)", str(v.lost)],
        ["stuck (not terminal after the drain)", str(v.stuck)],
        ["attempts recorded / requests at the endpoint", f"{v.attempts} / {v.requests}"],
        ["duplicates (200s beyond the first) / events", f"{v.duplicates} / {v.duplicated_events}"],
        ["attempts lost with a killed worker (lease expired)", str(v.lost_with_worker)],
        ["attempts that ended held (integration paused)", str(v.held)],
        ["POSTs not acknowledged, by answer", _counts(v.not_acked)],
    ]
    rows += [[f"fault: {kind}", str(n)] for kind, n in sorted(v.faults.items())]
    print_table(["measure", "value"], rows, [False, True])


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {n}" for k, n in counter.most_common()) or "none"


def figures(v: Verdict, args: argparse.Namespace) -> list[Figure]:
    run = f"{args.rate:g}/s for {args.minutes:g} min{'' if args.outages else ', no outages'}"
    process = ", ".join(f"{k} {v.faults[k]}" for k in sorted(set(PROCESS_FAULTS)))
    endpoint = ", ".join(f"{k} {v.faults[k]}" for k in ENDPOINT_FAULTS if k != "ok")
    return [
        Figure(
            "chaos", f"{run}: events acknowledged / delivered / dead", f"{v.acked} / {v.delivered} / {v.dead}"
        ),
        Figure(
            "chaos",
            f"{run}: lost / stuck",
            f"{v.lost} / {v.stuck}",
            target="0 / 0",
            met=not v.lost and not v.stuck,
        ),
        Figure("chaos", f"{run}: duplicates (events)", f"{v.duplicates} ({v.duplicated_events})"),
        Figure("chaos", f"{run}: process faults", process),
        Figure("chaos", f"{run}: endpoint faults", endpoint),
    ]


def parser() -> argparse.ArgumentParser:
    return options(
        ("--minutes", 10.0, "how long to send (and inject faults)"),
        ("--rate", 30.0, "events/s"),
        ("--fault-every-s", 4.0, "mean seconds between process faults"),
        ("--drain-s", 120.0, "the longest wait for the drain"),
        ("--retry-s", 30.0, "the load retries this long after sending"),
        ("--outages", True, "an outage of the endpoint in each round of faults (it pauses the integration)"),
        ("--seed", None, "of the faults (default: a random one, printed)", {"type": int}),
        LOG_LEVEL,
        description=__doc__,
    )


def run(args: argparse.Namespace) -> Outcome:
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    print(f"chaos: seed {args.seed}", file=sys.stderr, flush=True)
    with harness("gateway-bench-chaos-") as h:
        v = asyncio.run(
            chaos(
                h,
                seconds=args.minutes * 60,
                rate=args.rate,
                fault_every_s=args.fault_every_s,
                drain_s=args.drain_s,
                retry_s=args.retry_s,
                seed=args.seed,
                log_level=args.log_level,
                outages=args.outages,
            )
        )
        if v.problems:  # the logs and the append-only file, for a look at what went wrong
            kept = Path(tempfile.mkdtemp(prefix="gateway-chaos-kept-"))
            shutil.copytree(h.directory, kept, dirs_exist_ok=True)
            v.problems.append(f"logs and Redis's append-only file kept in {kept}")
    report(v, args)
    return Outcome(figures=figures(v, args), problems=[f"chaos: {p}" for p in v.problems])


def main() -> int:
    p = parser()
    args = p.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.fault_every_s <= 0:
        p.error("--minutes, --rate and --fault-every-s must be positive")
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
