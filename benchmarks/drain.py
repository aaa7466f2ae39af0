"""Held events: Redis memory per held event, and the drain rate of one worker after a resume.

    python3 benchmarks/drain.py [--events 100000] [--body-bytes 500] [--profile FILE]

Starts everything it needs: a redis-server of its own on a free port (no snapshots, no AOF), the
upstream, benchmarks/_upstream.py --record (a raw ASGI app on uvicorn answering 200, which counts
requests and keeps each webhook-id in arrival order), the real `python3 -m gateway serve` and ONE
`python3 -m gateway worker`, with a temporary config whose one integration, "bench", targets that
upstream (allowed_networks = ["127.0.0.0/8"], drain_rate_per_s = 100000 so the rate limit is not
what is measured) and a random GATEWAY_ADMIN_TOKEN. Then:

1. pauses "bench" through the admin API (POST /admin/integrations/bench/pause) and records Redis's
   used_memory (INFO memory);
2. ingests `--events` webhooks (a `--body-bytes` JSON body) through the real ingress with wrk (one
   thread, `--connections` keep-alive connections) and a Lua script that sends exactly that many
   POSTs: after the last one it sends only GET /healthz, and it stops once every POST was answered.
   The held events are then counted (ZCARD of gw:st:bench:held), which must equal the 202 answers;
3. records used_memory again: Redis memory per held event, and the same minus the body ("beyond its
   body"), with a breakdown from MEMORY USAGE of a sample of events: the event hash, the request
   string (JSON head + body), and the rest (the held index entry, the keyspace's entries for two
   keys, allocator rounding);
4. baseline: a plain aiohttp ClientSession in this process (uvloop) POSTs the same body to the same
   upstream `--events` times SERIALLY (one request at a time, as the drain sends them to keep the
   order), with the headers the worker sends: requests/s;
5. resumes "bench" through the admin API and measures the drain: the time from the resume to the
   moment no event is held or in flight, events/s over all of it and over its middle (from 10 % to
   90 % delivered, without the start and the tail).

Checked (exit status 1 when a check fails): every POST was answered 202 with no socket error; the
held index holds as many events as 202 answers, and no event went to the delivery queue; after the
drain every held event is delivered (ZCARD delivered == held, nothing dead, retrying, held or in
flight), each with exactly one attempt in its attempt log; the upstream received exactly that many
requests, with as many distinct webhook-ids, which are the held ids in the held index's order.

Aims of the issue, reported beside the figures: a drain of 1,000 events/s or more with one worker,
and at most 1 KiB of Redis memory per held event beyond its body.

The worker logs at `--log-level` (default INFO, the gateway's default: one line per attempt).
`--profile FILE` runs `py-spy record -r 200 -f raw` on the worker during the drain (FILE gets
collapsed stacks, flamegraph.pl input; py-spy pauses the worker for each sample, which slows it by a
few %).

Rows besides rates: "time per event" is the drain's wall time per event, beside the mean HTTP
attempt as the worker timed it (from the attempt records: it includes whatever the worker's event
loop ran during the attempt, such as the previous event's record); CPU per event is the CPU time the worker
used per event (steadier than rates on a busy machine), CPU % is of one core, and "wait" is the time
the worker (or, for the baseline, this process) was runnable but had no CPU (Linux schedstat): high
values mean the machine, not the process, set the pace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

if __package__ in (None, ""):  # run as `python3 benchmarks/drain.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import redis
import uvloop

from benchmarks._common import (
    Harness,
    cpu_seconds,
    free_port,
    harness,
    print_table,
    run_queue_seconds,
    start_stack,
    webhook_body,
)
from gateway.keys import Keys

NAME = "bench"
KEYS = Keys("gw")  # the gateway's default prefix; GATEWAY_KEY_PREFIX is removed from its environment
HELD = KEYS.state_index(NAME, "held")
STATES = ("held", "in_flight", "pending", "retrying", "delivered", "dead")
MEMORY_SAMPLES = 200
CONFIG = """\
[gateway]
max_body_bytes = 1048576
allowed_networks = ["127.0.0.0/8"]

[[integrations]]
name = "{name}"
target = "http://127.0.0.1:{port}/hook"
drain_rate_per_s = {rate}
"""

# One wrk thread sends exactly `limit` POSTs, then only GET /healthz (which stores nothing) until
# every POST is answered; then it stops, and writes `done_path` so that the benchmark ends wrk (whose
# main thread would otherwise sleep for all of -d). A POST is any request not answered 200.
_WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"

local limit = %(limit)d
-- Before the run, wrk calls request() once on thread 1's state to check the request
-- (script_verify_request) and never sends that one: it is not counted.
local issued = -1
local post, health
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  post = wrk.format("POST", "%(path)s")
  health = wrk.format("GET", "/healthz", {}, "")
  statuses = {}
  answered = 0
end

function request()
  issued = issued + 1
  if issued <= limit then
    return post
  end
  return health
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status ~= 200 then
    answered = answered + 1
    if answered == limit then
      local f = io.open("%(done_path)s", "w")
      f:write("done")
      f:close()
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local parts = {}
  for status, n in pairs(threads[1]:get("statuses")) do
    table.insert(parts, string.format('"%%d":%%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"errors":%%d,"statuses":{%%s}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    table.concat(parts, ",")))
end
"""


@dataclass
class Ingest:
    posts: int  # POSTs wrk sent
    statuses: dict[int, int]  # of the POSTs: status -> count
    socket_errors: int
    seconds: float  # from the first POST to the moment every event was in Redis
    held: int  # ZCARD of the held index afterwards

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)


@dataclass
class Memory:
    before: int
    after: int
    clients_before: int  # mem_clients_normal: connection buffers, not data
    clients_after: int
    event_hash: float  # MEMORY USAGE, mean over a sample
    request_string: float
    request_bytes: float  # STRLEN of the request string: JSON head + "\\n" + body

    def per_event(self, held: int) -> float:
        return (self.after - self.before) / held


@dataclass
class Rate:
    count: int
    seconds: float
    cpu_s: float  # of the sender: the worker, or this process for the baseline
    wait_s: float  # the sender runnable but without a CPU
    upstream_cpu_s: float
    redis_cpu_s: float = 0.0
    steady: float = 0.0  # drain only: events/s from 10 % to 90 % delivered
    script_calls: dict[str, tuple[int, int]] = field(default_factory=dict)  # EVALSHA: calls, usec

    @property
    def rate(self) -> float:
        return self.count / self.seconds


@dataclass
class Delivery:
    requests: int  # the upstream's count of requests during the drain
    distinct: int  # distinct webhook-ids among them
    attempts: int  # entries in the events' attempt logs
    http_ms: float  # mean latency of an attempt as the worker timed it (its attempt records)


def _int(value: Any) -> int:
    return int(cast(int, value))


def _zcards(r: redis.Redis) -> dict[str, int]:
    pipe = r.pipeline(transaction=False)
    for state in STATES:
        pipe.zcard(KEYS.state_index(NAME, state))
    pipe.zcard(KEYS.queue)
    replies = pipe.execute()
    return {**dict(zip(STATES, map(_int, replies), strict=False)), "queue": _int(replies[-1])}


def _memory(r: redis.Redis) -> tuple[int, int]:
    info = cast(dict[str, Any], r.info("memory"))
    return int(info["used_memory"]), int(info.get("mem_clients_normal", 0))


def _settled_memory(r: redis.Redis, quiet_s: float = 1.0, timeout_s: float = 15.0) -> tuple[int, int]:
    """used_memory once connection buffers have shrunk back (Redis does it in its clients cron):
    the first reading whose client memory has not changed for `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    last = _memory(r)
    since = time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.1)
        now = _memory(r)
        if now[1] != last[1]:
            since = time.monotonic()
        last = now
    return last


def _admin(base: str, token: str, action: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/admin/integrations/{NAME}/{action}", method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return cast(dict[str, Any], json.loads(response.read()))


def _upstream_stats(base: str, start: int) -> tuple[int, int, list[str]]:
    """(requests the upstream has answered, webhook-ids it kept, those from the `start`-th on)."""
    with urllib.request.urlopen(f"{base}/_stats?from={start}", timeout=60) as response:
        raw = json.loads(response.read())
    return int(raw["requests"]), int(raw["recorded"]), [str(i) for i in raw["ids"]]


def ingest(
    h: Harness, url_base: str, r: redis.Redis, body: bytes, args: argparse.Namespace, problems: list[str]
) -> Ingest:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian package wrk)")
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body cannot be put in a Lua long string")
    done_path = h.directory / "wrk.done"
    script = h.directory / "post.lua"
    script.write_text(_WRK_LUA % {"body": text, "limit": args.events, "path": f"/hooks/{NAME}",
                                  "done_path": str(done_path)})
    started = time.monotonic()
    process = h.spawn(
        "wrk",
        [wrk, "-t", "1", "-c", str(args.connections), "-d", "3600s", "--timeout", "10s", "-s", str(script),
         url_base],
        stdout_to_log=False,
    )
    # wrk's main thread sleeps for all of -d: end it (SIGINT makes it print its results) once every
    # POST is answered, or once the held index has not grown for `--quiet` seconds (a lost POST).
    last, since = -1, time.monotonic()
    while True:
        if process.poll() is not None:
            break
        if done_path.exists():
            break
        held = _int(r.zcard(HELD))
        if held != last:
            last, since = held, time.monotonic()
        elif time.monotonic() - since > args.quiet:
            problems.append(f"ingest: the held index stopped growing at {held} of {args.events} events")
            break
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.decode(errors='replace')}{h.log('wrk')}")
    raw = json.loads(line.removeprefix("WRK_RESULT "))
    # The gateway answers 202 after the write: once all are answered, every event is in Redis.
    held = _int(r.zcard(HELD))
    seconds = time.monotonic() - started
    statuses = {int(k): int(v) for k, v in raw["statuses"].items() if int(k) != 200}
    result = Ingest(sum(statuses.values()), statuses, int(raw["errors"]), seconds, held)
    others = {s: n for s, n in statuses.items() if s != 202}
    if others:
        problems.append(f"ingest: answers other than 202: {others}")
    if result.socket_errors:
        problems.append(f"ingest: {result.socket_errors} socket errors/timeouts")
    if result.accepted != held:
        problems.append(f"ingest: {result.accepted} answers 202 but {held} held events")
    counts = _zcards(r)
    if counts["pending"] or counts["queue"] or counts["in_flight"]:
        problems.append(f"ingest: events not held while paused: {counts}")
    return result


def memory_breakdown(
    r: redis.Redis, ids: list[str], before: tuple[int, int], after: tuple[int, int]
) -> Memory:
    step = max(len(ids) // MEMORY_SAMPLES, 1)
    sample = ids[::step][:MEMORY_SAMPLES]
    pipe = r.pipeline(transaction=False)
    for event_id in sample:
        pipe.memory_usage(KEYS.event(event_id), samples=0)
        pipe.memory_usage(KEYS.request(event_id), samples=0)
        pipe.strlen(KEYS.request(event_id))
    replies = [_int(x) for x in pipe.execute()]
    n = len(sample)
    return Memory(
        before=before[0], after=after[0], clients_before=before[1], clients_after=after[1],
        event_hash=sum(replies[0::3]) / n, request_string=sum(replies[1::3]) / n,
        request_bytes=sum(replies[2::3]) / n,
    )


async def _serial_posts(url: str, body: bytes, count: int) -> tuple[int, list[str]]:
    """POSTs `count` times, one request at a time; returns (answers 200, failures described)."""
    ok = 0
    failures: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for k in range(count):
            headers = {"content-type": "application/json", "webhook-id": f"baseline-{k}",
                       "webhook-timestamp": str(int(time.time()))}
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        ok += 1
                    elif len(failures) < 5:
                        failures.append(f"HTTP {response.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if len(failures) < 5:
                    failures.append(f"{type(exc).__name__}: {exc}")
    return ok, failures


def baseline(url: str, body: bytes, count: int, upstream_pid: int, problems: list[str]) -> Rate:
    me = os.getpid()
    cpu, wait, upstream = time.process_time(), run_queue_seconds(me), cpu_seconds(upstream_pid)
    started = time.perf_counter()
    ok, failures = uvloop.run(_serial_posts(url, body, count))
    seconds = time.perf_counter() - started
    rate = Rate(ok, seconds, time.process_time() - cpu, run_queue_seconds(me) - wait,
                cpu_seconds(upstream_pid) - upstream)
    problems += [f"baseline: {f}" for f in failures]
    if ok != count:
        problems.append(f"baseline: {ok} of {count} requests answered 200")
    return rate


def drain(
    h: Harness, api: str, token: str, r: redis.Redis, held: int, pids: dict[str, int],
    args: argparse.Namespace, problems: list[str],
) -> Rate:
    r.config_resetstat()
    profiler = None
    if args.profile:
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        profiler = h.spawn("py-spy", [py_spy, "record", "-r", "200", "-f", "raw",
                                      "-o", str(Path(args.profile).resolve()), "-p", str(pids["worker"])])
        time.sleep(1.0)  # py-spy attaches
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wait = run_queue_seconds(pids["worker"])
    started = time.monotonic()
    answer = _admin(api, token, "resume")
    if answer.get("state") != "active":
        problems.append(f"drain: the resume answered {answer}")
    marks: dict[float, float] = {0.1: 0.0, 0.9: 0.0}
    last, since = -1, time.monotonic()
    while True:
        counts = _zcards(r)
        now = time.monotonic()
        for share in marks:
            if not marks[share] and counts["delivered"] >= share * held:
                marks[share] = now
        if counts["held"] == 0 and counts["in_flight"] == 0 and counts["pending"] == 0 \
                and counts["retrying"] == 0:
            break
        done = counts["delivered"] + counts["dead"]
        if done != last:
            last, since = done, now
        elif now - since > args.quiet:
            problems.append(f"drain: no progress for {args.quiet:.0f} s: {counts}")
            break
        time.sleep(0.01)
    seconds = time.monotonic() - started
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wait = run_queue_seconds(pids["worker"]) - wait
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        try:
            profiler.wait(timeout=60)
        except subprocess.TimeoutExpired:
            problems.append("py-spy did not end within 60 s of SIGINT")
    stats = cast(dict[str, dict[str, int]], r.info("commandstats"))
    scripts = {name.removeprefix("cmdstat_"): (int(s.get("calls", 0)), int(s.get("usec", 0)))
               for name, s in stats.items() if name in ("cmdstat_evalsha", "cmdstat_eval")}
    delivered = counts["delivered"]
    steady = 0.0
    if marks[0.1] and marks[0.9] and marks[0.9] > marks[0.1]:
        steady = (0.8 * held) / (marks[0.9] - marks[0.1])
    return Rate(delivered, seconds, after["worker"] - before["worker"], wait,
                after["upstream"] - before["upstream"], after["redis"] - before["redis"], steady, scripts)


def check_delivery(
    r: redis.Redis, upstream_base: str, recorded_before: int, requests_before: int, order: list[str],
    problems: list[str],
) -> Delivery:
    """Checks that each held event was delivered once, in order."""
    counts = _zcards(r)
    held = len(order)
    if counts["delivered"] != held or counts["dead"] or counts["held"] or counts["in_flight"] \
            or counts["retrying"] or counts["pending"]:
        problems.append(f"drain: {held} held events ended as {counts}")
    requests, _, ids = _upstream_stats(upstream_base, recorded_before)
    requests -= requests_before
    distinct = len(set(ids))
    if requests != held:
        problems.append(f"drain: the upstream got {requests} requests for {held} held events")
    if distinct != len(ids):
        problems.append(f"drain: {len(ids) - distinct} webhook-ids arrived more than once")
    if set(ids) != set(order):
        problems.append(f"drain: the upstream's webhook-ids are not the held ids "
                        f"({len(set(order) - set(ids))} missing, {len(set(ids) - set(order))} unknown)")
    elif ids != order:
        first = next(k for k, (a, b) in enumerate(zip(ids, order, strict=True)) if a != b)
        problems.append(f"drain: out of order from the {first}-th event on")
    pipe = r.pipeline(transaction=False)
    for event_id in order:
        pipe.lrange(KEYS.attempts(event_id), 0, -1)
    logs = cast(list[list[bytes]], pipe.execute())
    attempts = sum(map(len, logs))
    others = sum(1 for log in logs if len(log) != 1)
    if others:
        problems.append(f"drain: {others} events have other than one attempt")
    latencies = [float(json.loads(log[0])["latency_ms"]) for log in logs if log]
    http_ms = sum(latencies) / max(len(latencies), 1)
    return Delivery(requests, distinct, attempts, http_ms)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000, help="events to hold, then drain")
    parser.add_argument("--body-bytes", type=int, default=500)
    parser.add_argument("--connections", type=int, default=32, help="wrk connections while ingesting")
    parser.add_argument("--log-level", default="INFO", help="GATEWAY_LOG_LEVEL of the gateway processes")
    parser.add_argument("--quiet", type=float, default=30.0,
                        help="fail when the held (or delivered) count does not move for this many s")
    parser.add_argument("--profile", metavar="FILE", help="py-spy the worker during the drain into FILE")
    args = parser.parse_args()
    if args.events < 1:
        parser.error("--events must be at least 1")
    body = webhook_body(args.body_bytes)
    problems: list[str] = []

    with harness("gateway-bench-drain-") as h:
        upstream_port = free_port()
        config = CONFIG.format(name=NAME, port=upstream_port, rate=100000)
        stack = start_stack(h, config, upstream_port, args.log_level)
        server, r, api, token = stack.server, stack.client, stack.api, stack.token
        upstream_base, upstream, worker = stack.upstream_base, stack.upstream, stack.worker
        try:
            paused = _admin(api, token, "pause")
            if paused.get("state") != "paused":
                raise RuntimeError(f"the pause answered {paused}")
            mem_before = _settled_memory(r)

            print(f"ingesting {args.events} events (paused: they are held)...", file=sys.stderr, flush=True)
            got = ingest(h, api, r, body, args, problems)
            mem_after = _settled_memory(r)
            order = [x.decode() for x in cast(list[bytes], r.zrange(HELD, 0, -1))]
            memory = memory_breakdown(r, order, mem_before, mem_after)
            print(f"  {got.held} held in {got.seconds:.1f} s; "
                  f"{memory.per_event(got.held):.0f} bytes of Redis memory each", file=sys.stderr, flush=True)

            print(f"baseline: {args.events} serial POSTs with aiohttp...", file=sys.stderr, flush=True)
            requests_before, _, _ = _upstream_stats(upstream_base, 1 << 62)
            base = baseline(f"{upstream_base}/hook", body, args.events, upstream.pid, problems)
            requests_after, recorded, _ = _upstream_stats(upstream_base, 1 << 62)
            if requests_after - requests_before != args.events:
                problems.append(f"baseline: the upstream counted {requests_after - requests_before} "
                                f"requests for {args.events}")
            print(f"  {base.rate:.0f} requests/s", file=sys.stderr, flush=True)

            # The ids the upstream kept so far are the baseline's: the drain's come after them.
            print(f"draining {got.held} events...", file=sys.stderr, flush=True)
            pids = {"worker": worker.pid, "upstream": upstream.pid, "redis": server.process.pid}
            drained = drain(h, api, token, r, got.held, pids, args, problems)
            print(f"  {drained.rate:.0f} events/s", file=sys.stderr, flush=True)
            delivery = check_delivery(
                r, upstream_base, recorded, requests_after, order, problems
            )
        finally:
            r.close()
        for name, code in stack.exited():
            problems.append(f"{name} exited with {code} during the benchmark: {h.log(name)}")
        worker_log = h.log("worker")
        errors = [ln for ln in worker_log.splitlines() if " ERROR " in ln or " WARNING " in ln]
        if errors:
            problems.append(f"the worker logged {len(errors)} warnings/errors, the first: {errors[0]}")

    report(args, body, got, memory, base, drained, delivery)
    for p in problems:
        print(f"CHECK FAILED {p}")
    if not problems:
        print(f"checks: all {got.posts} POSTs answered 202 and held; all {got.held} delivered, each with one "
              "attempt; the upstream got each webhook-id once, in the held order")
    return 1 if problems else 0


def report(
    args: argparse.Namespace, body: bytes, got: Ingest, memory: Memory, base: Rate, drained: Rate,
    delivery: Delivery,
) -> None:
    held = max(got.held, 1)
    per_event = memory.per_event(held)
    beyond = per_event - len(body)
    rest = per_event - memory.event_hash - memory.request_string
    head = memory.request_bytes - len(body) - 1
    evalsha = drained.script_calls.get("evalsha", (0, 0))
    aim_rate = "met" if drained.rate >= 1000 else "MISSED"
    aim_memory = "met" if beyond <= 1024 else "MISSED"
    rows = [
        ["held events (ZCARD) / POSTs answered 202", f"{got.held} / {got.accepted}", ""],
        ["ingest while paused", f"{got.held / got.seconds:.0f} events/s", "wrk -t1 "
         f"-c{args.connections}, {got.seconds:.1f} s"],
        ["Redis memory per held event", f"{per_event:.0f} B",
         f"used_memory {memory.before / 2**20:.1f} -> {memory.after / 2**20:.1f} MiB "
         f"(client buffers {memory.clients_before / 1024:.0f} -> {memory.clients_after / 1024:.0f} KiB)"],
        ["  beyond its body", f"{beyond:.0f} B", f"aim <= 1024 B: {aim_memory}"],
        ["  event hash gw:ev:{id}", f"{memory.event_hash:.0f} B", f"MEMORY USAGE, mean of {MEMORY_SAMPLES}"],
        ["  request string gw:rq:{id}", f"{memory.request_string:.0f} B",
         f"{memory.request_bytes:.0f} bytes: {head:.0f} head + newline + {len(body)} body"],
        ["  rest: held index entry, keyspace, rounding", f"{rest:.0f} B", "the difference"],
        ["drain, one worker", f"{drained.rate:.0f} events/s",
         f"{drained.count} in {drained.seconds:.1f} s, resume to empty; aim >= 1000/s: {aim_rate}"],
        ["  10 % -> 90 % delivered", f"{drained.steady:.0f} events/s", ""],
        ["  time per event", f"{drained.seconds / max(drained.count, 1) * 1e6:.0f} us",
         f"of which the HTTP attempt {delivery.http_ms * 1000:.0f} us, as the worker timed it "
         "(attempt records; includes what its loop ran meanwhile)"],
        ["  worker CPU per event", f"{drained.cpu_s / max(drained.count, 1) * 1e6:.0f} us",
         f"CPU % worker/redis/upstream {drained.cpu_s / drained.seconds * 100:.0f}/"
         f"{drained.redis_cpu_s / drained.seconds * 100:.0f}/"
         f"{drained.upstream_cpu_s / drained.seconds * 100:.0f}; "
         f"worker wait {drained.wait_s / drained.seconds * 100:.0f} %"],
        ["  Redis scripts per event", f"{evalsha[0] / max(drained.count, 1):.2f} calls",
         f"{evalsha[1] / max(drained.count, 1):.0f} us of Redis time per event (EVALSHA)"],
        ["baseline: serial aiohttp POSTs", f"{base.rate:.0f} req/s",
         f"{base.count} in {base.seconds:.1f} s; "
         f"client CPU/req {base.cpu_s / max(base.count, 1) * 1e6:.0f} us, "
         f"upstream CPU {base.upstream_cpu_s / base.seconds * 100:.0f} %, "
         f"client wait {base.wait_s / base.seconds * 100:.0f} %"],
        ["  time per request", f"{base.seconds / max(base.count, 1) * 1e6:.0f} us", ""],
        ["drain / baseline", f"{drained.rate / base.rate:.2f}", ""],
        ["upstream requests / distinct webhook-ids", f"{delivery.requests} / {delivery.distinct}",
         f"attempts recorded {delivery.attempts}"],
    ]
    print(f"\ndrain: {args.events} events of {len(body)}-byte JSON held while paused, then drained by ONE "
          f"worker (drain_rate_per_s 100000, log level {args.log_level})")
    print_table(["measure", "value", "notes"], rows, [False, True, False])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
