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
held index holds as many events as 202 answers, and none is pending or in flight; after the
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
    INTEGRATION,
    KEY_PREFIX,
    CountingRedis,
    Figure,
    Harness,
    Outcome,
    cpu_seconds,
    free_port,
    gateway_config,
    gateway_options,
    harness,
    logged_warnings,
    options,
    post_exactly,
    post_like_a_worker,
    print_table,
    run_main,
    run_queue_seconds,
    settled_memory,
    start_stack,
    state_key,
    upstream_stats,
    webhook_body,
)
from gateway.keys import Keys

NAME = INTEGRATION
KEYS = Keys(KEY_PREFIX)  # event and request keys, for the memory breakdown and the attempt logs
HELD = state_key("held")
MEMORY_SAMPLES = 200
DRAIN_RATE, BEYOND_BODY_BYTES = 1000.0, 1024  # the integration-health issue's aims


@dataclass
class Ingest:
    posts: int  # POSTs wrk sent
    accepted: int  # of them answered 202
    seconds: float  # from the first POST to the moment every event was in Redis
    held: int  # ZCARD of the held index afterwards


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
    return CountingRedis(r).states()


def _admin(base: str, token: str, action: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/admin/integrations/{NAME}/{action}",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return cast(dict[str, Any], json.loads(response.read()))


def ingest(
    h: Harness, url_base: str, r: redis.Redis, body: bytes, args: argparse.Namespace, problems: list[str]
) -> Ingest:
    posted = post_exactly(
        h,
        url_base,
        f"/hooks/{NAME}",
        body,
        args.events,
        connections=args.connections,
        progress=lambda: _int(r.zcard(HELD)),
        quiet_s=args.quiet,
    )
    # The gateway answers 202 after the write: once all are answered, every event is in Redis.
    held = _int(r.zcard(HELD))
    problems += posted.problems("ingest")
    if posted.accepted != held:
        problems.append(f"ingest: {posted.accepted} answers 202 but {held} held events")
    counts = _zcards(r)
    if counts["pending"] or counts["in_flight"]:
        problems.append(f"ingest: events not held while paused: {counts}")
    return Ingest(posted.posts, posted.accepted, posted.seconds, held)


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
        before=before[0],
        after=after[0],
        clients_before=before[1],
        clients_after=after[1],
        event_hash=sum(replies[0::3]) / n,
        request_string=sum(replies[1::3]) / n,
        request_bytes=sum(replies[2::3]) / n,
    )


async def _serial_posts(url: str, body: bytes, count: int) -> tuple[int, list[str]]:
    """POSTs `count` times, one request at a time; returns (answers 200, failures described)."""
    ok = 0
    failures: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for k in range(count):
            if await post_like_a_worker(session, url, body, f"baseline-{k}", failures):
                ok += 1
    return ok, failures


def baseline(url: str, body: bytes, count: int, upstream_pid: int, problems: list[str]) -> Rate:
    me = os.getpid()
    cpu, wait, upstream = time.process_time(), run_queue_seconds(me), cpu_seconds(upstream_pid)
    started = time.perf_counter()
    ok, failures = uvloop.run(_serial_posts(url, body, count))
    seconds = time.perf_counter() - started
    rate = Rate(
        ok,
        seconds,
        time.process_time() - cpu,
        run_queue_seconds(me) - wait,
        cpu_seconds(upstream_pid) - upstream,
    )
    problems += [f"baseline: {f}" for f in failures]
    if ok != count:
        problems.append(f"baseline: {ok} of {count} requests answered 200")
    return rate


def drain(
    h: Harness,
    api: str,
    token: str,
    r: redis.Redis,
    held: int,
    pids: dict[str, int],
    args: argparse.Namespace,
    problems: list[str],
) -> Rate:
    r.config_resetstat()
    profiler = None
    if args.profile:
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        profiler = h.spawn(
            "py-spy",
            [
                py_spy,
                "record",
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(Path(args.profile).resolve()),
                "-p",
                str(pids["worker"]),
            ],
        )
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
        if (
            counts["held"] == 0
            and counts["in_flight"] == 0
            and counts["pending"] == 0
            and counts["retrying"] == 0
        ):
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
    scripts = {
        name.removeprefix("cmdstat_"): (int(s.get("calls", 0)), int(s.get("usec", 0)))
        for name, s in stats.items()
        if name in ("cmdstat_evalsha", "cmdstat_eval")
    }
    delivered = counts["delivered"]
    steady = 0.0
    if marks[0.1] and marks[0.9] and marks[0.9] > marks[0.1]:
        steady = (0.8 * held) / (marks[0.9] - marks[0.1])
    return Rate(
        delivered,
        seconds,
        after["worker"] - before["worker"],
        wait,
        after["upstream"] - before["upstream"],
        after["redis"] - before["redis"],
        steady,
        scripts,
    )


def check_delivery(
    r: redis.Redis,
    upstream_base: str,
    recorded_before: int,
    requests_before: int,
    order: list[str],
    problems: list[str],
) -> Delivery:
    """Checks that each held event was delivered once, in order."""
    counts = _zcards(r)
    held = len(order)
    if (
        counts["delivered"] != held
        or counts["dead"]
        or counts["held"]
        or counts["in_flight"]
        or counts["retrying"]
        or counts["pending"]
    ):
        problems.append(f"drain: {held} held events ended as {counts}")
    got = upstream_stats(upstream_base, recorded_before)
    requests, ids = got.requests - requests_before, got.ids
    distinct = len(set(ids))
    if requests != held:
        problems.append(f"drain: the upstream got {requests} requests for {held} held events")
    if distinct != len(ids):
        problems.append(f"drain: {len(ids) - distinct} webhook-ids arrived more than once")
    if set(ids) != set(order):
        problems.append(
            f"drain: the upstream's webhook-ids are not the held ids "
            f"({len(set(order) - set(ids))} missing, {len(set(ids) - set(order))} unknown)"
        )
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


@dataclass
class Measured:
    got: Ingest
    memory: Memory
    base: Rate
    drained: Rate
    delivery: Delivery


def parser() -> argparse.ArgumentParser:
    return options(
        ("--events", 100_000, "events to hold, then drain"),
        ("--connections", 32, "wrk connections while ingesting"),
        *gateway_options(),
        ("--quiet", 30.0, "fail when the held (or delivered) count does not move for this many s"),
        ("--profile", None, "py-spy the worker during the drain into FILE", {"metavar": "FILE"}),
        description=__doc__,
    )


def measure(h: Harness, args: argparse.Namespace, body: bytes, problems: list[str]) -> Measured:
    """Hold, measure memory, run the baseline, drain, check: on one stack."""
    upstream_port = free_port()
    config = gateway_config(upstream_port, drain_rate_per_s=100000)
    stack = start_stack(h, config, upstream_port, args.log_level)
    server, r, api, token = stack.server, stack.client, stack.api, stack.token
    upstream_base, upstream, worker = stack.upstream_base, stack.upstream, stack.worker
    try:
        paused = _admin(api, token, "pause")
        if paused.get("state") != "paused":
            raise RuntimeError(f"the pause answered {paused}")
        mem_before = settled_memory(r)

        print(f"drain: ingesting {args.events} events (paused: held)...", file=sys.stderr, flush=True)
        got = ingest(h, api, r, body, args, problems)
        mem_after = settled_memory(r)
        order = [x.decode() for x in cast(list[bytes], r.zrange(HELD, 0, -1))]
        memory = memory_breakdown(r, order, mem_before, mem_after)
        print(
            f"  {got.held} held in {got.seconds:.1f} s; "
            f"{memory.per_event(got.held):.0f} bytes of Redis memory each",
            file=sys.stderr,
            flush=True,
        )

        print(f"drain: baseline, {args.events} serial POSTs with aiohttp...", file=sys.stderr, flush=True)
        requests_before = upstream_stats(upstream_base).requests
        base = baseline(f"{upstream_base}/hook", body, args.events, upstream.pid, problems)
        after = upstream_stats(upstream_base)
        if after.requests - requests_before != args.events:
            problems.append(
                f"baseline: the upstream counted {after.requests - requests_before} "
                f"requests for {args.events}"
            )
        print(f"  {base.rate:.0f} requests/s", file=sys.stderr, flush=True)

        # The ids the upstream kept so far are the baseline's: the drain's come after them.
        print(f"drain: draining {got.held} events...", file=sys.stderr, flush=True)
        pids = {"worker": worker.pid, "upstream": upstream.pid, "redis": server.process.pid}
        drained = drain(h, api, token, r, got.held, pids, args, problems)
        print(f"  {drained.rate:.0f} events/s", file=sys.stderr, flush=True)
        delivery = check_delivery(r, upstream_base, after.recorded, after.requests, order, problems)
    finally:
        r.close()
    for name, code in stack.exited():
        problems.append(f"{name} exited with {code} during the benchmark: {h.log(name)}")
    errors = logged_warnings(h.log("worker"))
    if errors:
        problems.append(f"the worker logged {len(errors)} warnings/errors, the first: {errors[0]}")
    return Measured(got, memory, base, drained, delivery)


def run(args: argparse.Namespace) -> Outcome:
    """The whole benchmark: prints its table; the figures and checks."""
    body = webhook_body(args.body_bytes)
    outcome = Outcome()
    with harness("gateway-bench-drain-") as h:
        m = measure(h, args, body, outcome.problems)
    report(args, body, m.got, m.memory, m.base, m.drained, m.delivery)
    if not outcome.problems:
        print(
            f"checks: all {m.got.posts} POSTs answered 202 and held; all {m.got.held} delivered, each with "
            "one attempt; the upstream got each webhook-id once, in the held order"
        )
    outcome.figures = figures(m, body)
    return outcome


def figures(m: Measured, body: bytes) -> list[Figure]:
    """Rows of the suite's table: the drain beside a serial aiohttp loop, memory beside the body."""
    held = max(m.got.held, 1)
    per_event = m.memory.per_event(held)
    beyond = per_event - len(body)
    return [
        Figure(
            "drain",
            f"drain of {m.got.held} held events, 1 worker: events/s",
            f"{m.drained.rate:.0f}",
            f"serial aiohttp loop {m.base.rate:.0f}/s",
            f"{m.drained.rate / m.base.rate:.2f}",
            f">= {DRAIN_RATE:.0f}/s",
            m.drained.rate >= DRAIN_RATE,
        ),
        Figure(
            "drain",
            "Redis memory per held event beyond its body",
            f"{beyond:.0f} B",
            f"body {len(body)} B (total {per_event:.0f} B)",
            f"{per_event / len(body):.2f}",
            f"<= {BEYOND_BODY_BYTES} B",
            beyond <= BEYOND_BODY_BYTES,
        ),
    ]


def main() -> int:
    p = parser()
    args = p.parse_args()
    if args.events < 1:
        p.error("--events must be at least 1")
    return run(args).exit_status()


def report(
    args: argparse.Namespace,
    body: bytes,
    got: Ingest,
    memory: Memory,
    base: Rate,
    drained: Rate,
    delivery: Delivery,
) -> None:
    held = max(got.held, 1)
    per_event = memory.per_event(held)
    beyond = per_event - len(body)
    rest = per_event - memory.event_hash - memory.request_string
    head = memory.request_bytes - len(body) - 1
    evalsha = drained.script_calls.get("evalsha", (0, 0))
    aim_rate = "met" if drained.rate >= DRAIN_RATE else "MISSED"
    aim_memory = "met" if beyond <= BEYOND_BODY_BYTES else "MISSED"
    rows = [
        ["held events (ZCARD) / POSTs answered 202", f"{got.held} / {got.accepted}", ""],
        [
            "ingest while paused",
            f"{got.held / got.seconds:.0f} events/s",
            f"wrk -t1 -c{args.connections}, {got.seconds:.1f} s",
        ],
        [
            "Redis memory per held event",
            f"{per_event:.0f} B",
            f"used_memory {memory.before / 2**20:.1f} -> {memory.after / 2**20:.1f} MiB "
            f"(client buffers {memory.clients_before / 1024:.0f} -> {memory.clients_after / 1024:.0f} KiB)",
        ],
        ["  beyond its body", f"{beyond:.0f} B", f"aim <= 1024 B: {aim_memory}"],
        ["  event hash gw:ev:{id}", f"{memory.event_hash:.0f} B", f"MEMORY USAGE, mean of {MEMORY_SAMPLES}"],
        [
            "  request string gw:rq:{id}",
            f"{memory.request_string:.0f} B",
            f"{memory.request_bytes:.0f} bytes: {head:.0f} head + newline + {len(body)} body",
        ],
        ["  rest: held index entry, keyspace, rounding", f"{rest:.0f} B", "the difference"],
        [
            "drain, one worker",
            f"{drained.rate:.0f} events/s",
            f"{drained.count} in {drained.seconds:.1f} s, resume to empty; aim >= 1000/s: {aim_rate}",
        ],
        ["  10 % -> 90 % delivered", f"{drained.steady:.0f} events/s", ""],
        [
            "  time per event",
            f"{drained.seconds / max(drained.count, 1) * 1e6:.0f} us",
            f"of which the HTTP attempt {delivery.http_ms * 1000:.0f} us, as the worker timed it "
            "(attempt records; includes what its loop ran meanwhile)",
        ],
        [
            "  worker CPU per event",
            f"{drained.cpu_s / max(drained.count, 1) * 1e6:.0f} us",
            f"CPU % worker/redis/upstream {drained.cpu_s / drained.seconds * 100:.0f}/"
            f"{drained.redis_cpu_s / drained.seconds * 100:.0f}/"
            f"{drained.upstream_cpu_s / drained.seconds * 100:.0f}; "
            f"worker wait {drained.wait_s / drained.seconds * 100:.0f} %",
        ],
        [
            "  Redis scripts per event",
            f"{evalsha[0] / max(drained.count, 1):.2f} calls",
            f"{evalsha[1] / max(drained.count, 1):.0f} us of Redis time per event (EVALSHA)",
        ],
        [
            "baseline: serial aiohttp POSTs",
            f"{base.rate:.0f} req/s",
            f"{base.count} in {base.seconds:.1f} s; "
            f"client CPU/req {base.cpu_s / max(base.count, 1) * 1e6:.0f} us, "
            f"upstream CPU {base.upstream_cpu_s / base.seconds * 100:.0f} %, "
            f"client wait {base.wait_s / base.seconds * 100:.0f} %",
        ],
        ["  time per request", f"{base.seconds / max(base.count, 1) * 1e6:.0f} us", ""],
        ["drain / baseline", f"{drained.rate / base.rate:.2f}", ""],
        [
            "upstream requests / distinct webhook-ids",
            f"{delivery.requests} / {delivery.distinct}",
            f"attempts recorded {delivery.attempts}",
        ],
    ]
    print(
        f"\ndrain: {args.events} events of {len(body)}-byte JSON held while paused, then drained by ONE "
        f"worker (drain_rate_per_s 100000, log level {args.log_level})"
    )
    print_table(["measure", "value", "notes"], rows, [False, True, False])


if __name__ == "__main__":
    run_main(main)
