"""Delivery throughput: how fast one, then two `gateway worker` processes deliver a backlog, beside a
plain aiohttp loop sending the same requests, and Redis's work per delivered event.

    python3 benchmarks/delivery.py [--events 30000] [--concurrency 32] [--body-bytes 500]

Starts everything it needs, once per phase (so each phase starts from an empty Redis): a
redis-server of its own on a free port (no snapshots, no AOF), the upstream,
benchmarks/_upstream.py --record (counts requests, keeps each webhook-id with its arrival time), and
the real `python3 -m gateway serve`, with a config whose one integration, "bench", targets that
upstream and whose `[worker] concurrency` is `--concurrency` (32).

Each phase: with NO worker running, wrk (a separate process, one thread) POSTs `--events`
`--body-bytes` JSON webhooks to /hooks/bench, exactly that many; they wait in the pending index
(gw:st:bench:pending), which must then hold one per 202. CONFIG RESETSTAT; then the phase starts
its workers (one, then two in the second phase) and polls ZCARD gw:st:bench:delivered every 20 ms
until every event is in it, or nothing moved for `--quiet` s. Rate = events / (the moment all are
delivered - the first delivery's arrival at the upstream): the workers' start-up (imports, connecting)
is left out, and shown beside it as "from spawn".

Baseline, in the first phase before the preload: this process, on uvloop like the worker, sends
the same body `--events` times to the same upstream from ONE aiohttp ClientSession with
`--concurrency` requests in flight (the worker's concurrency), with the headers the worker sets
(content-type, webhook-id, webhook-timestamp): what the delivery's HTTP side alone costs on this
machine. Ratio = the workers' rate / the loop's. Aim of the performance issue: 0.25 or more with
one worker.

Redis commands per delivered event: the sum of `calls` over INFO commandstats after the last
delivery, minus this benchmark's own (the RESETSTAT and its ZCARD polls, counted here), divided
by the events. Redis counts the commands a Lua script runs besides the EVALSHA itself, so this is
Redis's work, not round trips; the idle API's commands (if any) are included. Aim: 12 or fewer.
The most called commands are listed per event.

Checked (exit status 1 when a check fails): every POST answered 202, the pending index held one
event per 202; afterwards every event is delivered and none is pending, retrying, in flight, held
or dead; the upstream got exactly one request per event, with each preloaded id as webhook-id once;
no process exited; the workers logged no warning or error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

if __package__ in (None, ""):  # run as `python3 benchmarks/delivery.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import uvloop

from benchmarks._common import (
    INTEGRATION,
    CountingRedis,
    Figure,
    GatewayStack,
    Harness,
    Outcome,
    cpu_seconds,
    free_port,
    gateway_config,
    gateway_options,
    harness,
    logged_warnings,
    options,
    per_event_text,
    post_exactly,
    post_like_a_worker,
    print_table,
    run_main,
    settled_memory,
    start_stack,
    start_workers,
    state_key,
    upstream_stats,
    wait_count,
    webhook_body,
    worker_name,
)

PENDING, DELIVERED = state_key("pending"), state_key("delivered")
RATIO, COMMANDS, MEMORY = 0.25, 12.0, 1024  # the performance issue's aims, for one worker
POLL_S = 0.02


@dataclass
class Loop:
    """The baseline: a plain aiohttp request loop."""

    ok: int
    seconds: float
    failures: list[str]

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


@dataclass
class Phase:
    workers: int
    events: int  # preloaded (202 answers)
    delivered: int
    seconds: float  # first arrival at the upstream -> all in the delivered index
    from_spawn_s: float  # workers spawned -> all in the delivered index
    worker_cpu_s: float  # of all its workers, from the first delivery seen on
    by_command: dict[str, int]  # Redis calls during the phase, the benchmark's own taken out
    problems: list[str] = field(default_factory=list)
    memory_per_event: float = float("nan")  # Redis used_memory per delivered event, beyond its body

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else float("nan")

    @property
    def per_event(self) -> float:
        return sum(self.by_command.values()) / self.delivered if self.delivered else float("nan")


async def _request_loop(url: str, body: bytes, count: int, concurrency: int) -> Loop:
    """`count` POSTs from `concurrency` tasks sharing one ClientSession, each task sending its next
    request as soon as its previous one is answered."""
    remaining, ok = count, 0
    failures: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def task() -> None:
            nonlocal remaining, ok
            while remaining > 0:
                remaining -= 1
                # `ok += await ...` would read ok before the await and lose the other tasks' counts.
                if await post_like_a_worker(session, url, body, f"baseline-{remaining}", failures):
                    ok += 1

        started = time.perf_counter()
        await asyncio.gather(*(task() for _ in range(concurrency)))
        return Loop(ok, time.perf_counter() - started, failures)


def baseline(url: str, body: bytes, count: int, concurrency: int) -> Loop:
    loop = uvloop.run(_request_loop(url, body, count, concurrency))
    if loop.ok != count:
        loop.failures.append(f"{loop.ok} of {count} requests answered 200")
    return loop


def preload(
    h: Harness, stack: GatewayStack, body: bytes, args: argparse.Namespace, problems: list[str]
) -> list[str]:
    """Sends the events with no worker running; returns their ids (the pending index)."""
    r = stack.client
    posted = post_exactly(
        h,
        stack.api,
        f"/hooks/{INTEGRATION}",
        body,
        args.events,
        connections=args.connections,
        progress=lambda: int(cast(int, r.zcard(PENDING))),
        quiet_s=args.quiet,
    )
    problems += posted.problems("preload")
    ids = [x.decode() for x in cast(list[bytes], r.zrange(PENDING, 0, -1))]
    if len(ids) != posted.accepted:
        problems.append(f"preload: {posted.accepted} answers 202 but {len(ids)} pending events")
    print(f"  {len(ids)} pending in {posted.seconds:.1f} s", file=sys.stderr, flush=True)
    return ids


def _workers_cpu(stack: GatewayStack) -> float:
    return sum(cpu_seconds(w.pid) for w in stack.workers if w.poll() is None)


def _wait_delivered(
    mine: CountingRedis, stack: GatewayStack, want: int, quiet_s: float, problems: list[str]
) -> tuple[int, float]:
    """Polls the delivered index until it holds `want` events, or stands still for `quiet_s`;
    returns (delivered, the workers' CPU seconds when the first delivery was seen)."""
    cpu_at_first: list[float] = []

    def first(count: int) -> None:
        if count and not cpu_at_first:
            cpu_at_first.append(_workers_cpu(stack))

    delivered, _ = wait_count(lambda: mine.zcards(DELIVERED)[0], want, quiet_s, poll_s=POLL_S, on_count=first)
    if delivered < want:
        problems.append(f"delivery: no progress for {quiet_s:g} s at {delivered} of {want} delivered")
    return delivered, (cpu_at_first or [0.0])[0]


def deliver(h: Harness, stack: GatewayStack, ids: list[str], workers: int, args: argparse.Namespace) -> Phase:
    """Starts `workers` workers on the preloaded events and times them until all are delivered."""
    problems: list[str] = []
    recorded_before = upstream_stats(stack.upstream_base).recorded
    requests_before = upstream_stats(stack.upstream_base).requests
    mine = CountingRedis(stack.client)
    mine.reset_stats()
    spawned = time.time()
    start_workers(h, stack, workers, wait=False)
    delivered, cpu_at_first = _wait_delivered(mine, stack, len(ids), args.quiet, problems)
    done = time.time()
    by_command = mine.others()
    cpu = _workers_cpu(stack) - cpu_at_first
    got = upstream_stats(stack.upstream_base, recorded_before)
    first = got.times[0] if got.times else spawned
    _check(mine, ids, got.ids, got.requests - requests_before, problems)
    return Phase(workers, len(ids), delivered, done - first, done - spawned, cpu, by_command, problems)


def _check(
    mine: CountingRedis, ids: list[str], arrived: list[str], requests: int, problems: list[str]
) -> None:
    """Every event delivered, nothing left elsewhere, each id at the upstream exactly once."""
    states = mine.states()
    others = {s: n for s, n in states.items() if s != "delivered" and n}
    if states["delivered"] != len(ids) or others:
        problems.append(f"delivery: {len(ids)} events ended as {states}")
    if requests != len(ids):
        problems.append(f"delivery: the upstream got {requests} requests for {len(ids)} events")
    distinct = set(arrived)
    if len(distinct) != len(arrived):
        problems.append(f"delivery: {len(arrived) - len(distinct)} webhook-ids arrived more than once")
    if distinct != set(ids):
        problems.append(
            f"delivery: the upstream's webhook-ids are not the preloaded ids "
            f"({len(set(ids) - distinct)} missing, {len(distinct - set(ids))} unknown)"
        )


def _workers(n: int) -> str:
    return "1 worker" if n == 1 else f"{n} workers"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def phase(
    args: argparse.Namespace, body: bytes, workers: int, with_baseline: bool
) -> tuple[Phase, Loop | None]:
    """One fresh stack: (the baseline loop,) the preload, then `workers` workers deliver it."""
    with harness("gateway-bench-delivery-") as h:
        port = free_port()
        config = gateway_config(port, concurrency=args.concurrency)
        stack = start_stack(h, config, port, args.log_level, workers=0)
        loop = None
        try:
            if with_baseline:
                _say(
                    f"delivery: baseline, {args.events} POSTs from one aiohttp session, "
                    f"{args.concurrency} in flight..."
                )
                loop = baseline(f"{stack.upstream_base}/hook", body, args.events, args.concurrency)
                _say(f"  {loop.rate:.0f} requests/s")
            _say(f"delivery: preloading {args.events} events, no worker running...")
            preload_problems: list[str] = []
            memory_before, _ = settled_memory(stack.client)
            ids = preload(h, stack, body, args, preload_problems)
            _say(f"delivery: {_workers(workers)} delivering...")
            result = deliver(h, stack, ids, workers, args)
            result.problems[:0] = preload_problems
            # What a delivered event keeps in Redis until retention removes it: its record, request,
            # attempt log and delivered-index entry (the metrics hashes do not grow with events).
            memory_after, _ = settled_memory(stack.client)
            result.memory_per_event = (memory_after - memory_before) / max(len(ids), 1) - len(body)
            _say(
                f"  {result.rate:.0f} events/s, {result.per_event:.1f} Redis commands per event, "
                f"{result.memory_per_event:.0f} B of Redis memory per delivered event beyond its body"
            )
        finally:
            stack.client.close()
        result.problems += _process_problems(h, stack)
    return result, loop


def _process_problems(h: Harness, stack: GatewayStack) -> list[str]:
    """A process that exited, a worker that logged a warning or an error."""
    out = [f"{name} exited with {code}: {h.log(name)[-2000:]}" for name, code in stack.exited()]
    for name in (worker_name(n) for n in range(len(stack.workers))):
        warnings = logged_warnings(h.log(name))
        if warnings:
            out.append(f"{name} logged {len(warnings)} warnings/errors, the first: {warnings[0]}")
    return out


def parser() -> argparse.ArgumentParser:
    return options(
        ("--events", 30_000, "events to preload, then deliver, per phase"),
        (
            "--concurrency",
            32,
            "[worker] concurrency of the config, and requests in flight of the baseline loop",
        ),
        ("--workers", "1,2", "worker processes of each phase, comma-separated"),
        ("--connections", 32, "wrk connections while preloading"),
        *gateway_options(),
        ("--quiet", 30.0, "fail when nothing moves for this many s"),
        description=__doc__,
    )


def run(args: argparse.Namespace) -> Outcome:
    """Every phase; prints the table; the figures and checks."""
    body = webhook_body(args.body_bytes)
    phases: list[Phase] = []
    base: Loop | None = None
    for n, workers in enumerate(int(x) for x in args.workers.split(",") if x.strip()):
        result, loop = phase(args, body, workers, with_baseline=n == 0)
        phases.append(result)
        base = base or loop
    assert base is not None
    report(phases, base, body, args)
    outcome = Outcome(problems=[f"baseline: {f}" for f in base.failures])
    for one in phases:
        outcome.problems += [f"delivery, {_workers(one.workers)}: {p}" for p in one.problems]
        outcome.details.append(
            f"delivery, {_workers(one.workers)}: Redis calls per delivered event by "
            f"command: {per_event_text(one.by_command, one.delivered)}"
        )
        outcome.figures += figures(one, base)
    if not outcome.problems:
        print(
            "checks: every preloaded event delivered, none left in another state; the upstream got each "
            "webhook-id exactly once"
        )
    return outcome


def figures(one: Phase, base: Loop) -> list[Figure]:
    """Rows of the suite's table: the workers' rate beside the loop's, and Redis's work per event."""
    ratio = one.rate / base.rate
    rate = Figure(
        "delivery",
        f"{_workers(one.workers)}, {one.events} events: delivered events/s",
        f"{one.rate:.0f}",
        f"aiohttp loop {base.rate:.0f}/s",
        f"{ratio:.2f}",
    )
    commands = Figure(
        "delivery", f"{_workers(one.workers)}: Redis commands per delivered event", f"{one.per_event:.1f}"
    )
    if one.workers != 1:
        return [rate, commands]
    rate = Figure(
        rate.part,
        rate.measure,
        rate.value,
        rate.baseline,
        rate.ratio,
        f"ratio >= {RATIO:.2f}",
        ratio >= RATIO,
    )
    commands = Figure(
        commands.part,
        commands.measure,
        commands.value,
        target=f"<= {COMMANDS:g}",
        met=one.per_event <= COMMANDS,
    )
    memory = Figure(
        "delivery",
        "Redis memory per delivered event beyond its body (kept until retention)",
        f"{one.memory_per_event:.0f} B",
        target=f"<= {MEMORY} B",
        met=one.memory_per_event <= MEMORY,
    )
    return [rate, commands, memory]


def report(phases: list[Phase], base: Loop, body: bytes, args: argparse.Namespace) -> None:
    rows = [
        [
            "aiohttp loop (baseline)",
            f"{base.ok}",
            f"{base.seconds:.1f}",
            f"{base.rate:.0f}",
            "-",
            "1.00",
            "-",
            "-",
        ]
    ]
    for one in phases:
        rows.append(
            [
                f"{_workers(one.workers)} (gateway)",
                f"{one.delivered}/{one.events}",
                f"{one.seconds:.1f}",
                f"{one.rate:.0f}",
                f"{one.delivered / one.from_spawn_s:.0f}",
                f"{one.rate / base.rate:.2f}",
                f"{one.worker_cpu_s / max(one.delivered, 1) * 1e6:.0f} us",
                f"{one.per_event:.1f}",
            ]
        )
    print(
        f"\ndelivery: {args.events} events of {len(body)}-byte JSON preloaded with no worker running, "
        f"then delivered to a local upstream; [worker] concurrency {args.concurrency}, log level "
        f"{args.log_level}; baseline: one aiohttp session, {args.concurrency} requests in flight"
    )
    print_table(
        [
            "sender",
            "delivered/events",
            "seconds",
            "events/s",
            "from spawn/s",
            "ratio",
            "worker CPU/event",
            "redis cmds/event",
        ],
        rows,
        [False, *[True] * 7],
    )
    print(
        "seconds and events/s: from the first arrival at the upstream to the last event in the delivered "
        "index; from spawn: from the workers' start instead; worker CPU: all workers, from the first "
        "delivery seen on; "
        "redis cmds/event: INFO commandstats (commands inside scripts included), the benchmark's own "
        "polling subtracted"
    )
    for one in phases:
        print(
            f"  {_workers(one.workers)}, redis calls per event by command: "
            + per_event_text(one.by_command, one.delivered)
        )
    for one in phases:
        print(
            f"  {_workers(one.workers)}: Redis memory per delivered event beyond its {len(body)}-byte "
            f"body: {one.memory_per_event:.0f} B "
            "(used_memory after - before the preload, per event, settled)"
        )


def main() -> int:
    p = parser()
    args = p.parse_args()
    if args.events < 1 or args.concurrency < 1:
        p.error("--events and --concurrency must be at least 1")
    try:
        counts = [int(x) for x in args.workers.split(",") if x.strip()]
        if not counts or min(counts) < 1:
            raise ValueError(args.workers)
    except ValueError:
        p.error("--workers must be positive whole numbers separated by commas")
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
