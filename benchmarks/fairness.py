"""Fairness: a healthy integration's delivery latency alone, then beside an integration whose
endpoint hangs with a backlog.

    python3 benchmarks/fairness.py [--rate 50] [--seconds 15] [--backlog 400] [--hang-s 60]

Starts everything it needs: a redis-server of its own on a free port (no snapshots, no AOF), two
upstreams, the real `python3 -m gateway serve` and TWO `python3 -m gateway worker` processes, with a
config of two integrations and everything else at the gateway's defaults (so `max_in_flight` 32,
`timeout_s` 10 s, `[worker] concurrency` 100):

- "healthy" targets benchmarks/_upstream.py --record, which answers at once and keeps each
  webhook-id with its arrival time;
- "hanging" targets benchmarks/_upstream.py --hang-s 60, whose every request waits 60 s (longer than
  the integration's timeout, so the gateway gives up on each) or until the gateway closes the
  connection; it counts the requests waiting at once.

After a `--warmup` s of healthy events (connections opened; not counted):

1. alone: an open-loop sender in this process POSTs `--rate` events/s to /hooks/healthy for
   `--seconds`, then waits until every accepted event is delivered (the delivered index of
   "healthy"), or `--grace` s without progress. Latency of each event: its arrival time at the
   healthy upstream - its send time, as benchmarks/latency.py measures it (HTTP ingress included).
2. `--backlog` events are POSTed to /hooks/hanging (32 at a time), and the benchmark waits until the
   hanging upstream has `max_in_flight` requests waiting (at most 10 s);
3. beside: the same sending as 1, while the hanging integration holds its slots; its first attempts
   time out after 10 s, within this window, and the next ones are claimed.

Figures: healthy p50 / p99 / max beside the hanging backlog, with the same alone as the baseline;
aims: p50 and p99 beside within 1.5x of alone, and the worst under 0.5 s. The hanging upstream's
most requests at once over the whole run: it should be exactly the default `max_in_flight`, 32,
across the two workers. The Redis commands per delivered healthy event, alone and beside, are
listed by command (every client's commands, those inside scripts included, this benchmark's own
taken out).

Exit status 1 when a check fails: a healthy event lost (accepted but not delivered after the grace
period), a backlog POST not answered 202, a process that exited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

if __package__ in (None, ""):  # run as `python3 benchmarks/fairness.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import redis
import uvloop

from benchmarks._common import (
    KEY_PREFIX,
    WORKERS_KEY,
    CountingRedis,
    Figure,
    Outcome,
    Sent,
    free_port,
    gateway_options,
    harness,
    options,
    per_event_text,
    percentile,
    print_table,
    run_main,
    send_open_loop,
    start_stack,
    state_key,
    upstream_stats,
    wait_count,
    wait_http,
    webhook_body,
)

HEALTHY, HANGING = "healthy", "hanging"
MAX_IN_FLIGHT = 32  # the gateway's default max_in_flight
RATIO, WORST_MS = 1.5, 500.0  # the aims: beside within 1.5x of alone, the worst under 0.5 s
WORKERS = 2


def config(healthy_port: int, hanging_port: int) -> str:
    return f"""\
[gateway]
max_body_bytes = 1048576
allowed_networks = ["127.0.0.0/8"]

[[integrations]]
name = "{HEALTHY}"
target = "http://127.0.0.1:{healthy_port}/hook"

[[integrations]]
name = "{HANGING}"
target = "http://127.0.0.1:{hanging_port}/hook"
"""


@dataclass
class Window:
    """The healthy integration's sending at a fixed rate, and what came of it."""

    name: str
    sent: Sent
    delivered: int
    latencies_ms: list[float]  # sorted
    missing: int  # accepted ids the healthy upstream never got
    by_command: dict[str, int]  # Redis calls during the window, this benchmark's own taken out

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    @property
    def worst(self) -> float:
        return self.latencies_ms[-1] if self.latencies_ms else float("nan")

    @property
    def per_event(self) -> float:
        return sum(self.by_command.values()) / self.delivered if self.delivered else float("nan")

    def text(self) -> str:
        return f"{self.p(50):.1f} / {self.p(99):.1f} / {self.worst:.1f}"


def window(
    name: str, r: redis.Redis, api: str, upstream_base: str, body: bytes, args: argparse.Namespace
) -> Window:
    """Sends healthy events open-loop at `--rate` for `--seconds`; waits for their delivery."""
    delivered_key = state_key("delivered", HEALTHY)
    recorded_before = upstream_stats(upstream_base).recorded
    mine = CountingRedis(r)
    before = mine.zcards(delivered_key)[0]
    mine.reset_stats()
    sent = uvloop.run(send_open_loop(f"{api}/hooks/{HEALTHY}", body, args.rate, args.seconds))
    wait_count(lambda: mine.zcards(delivered_key)[0] - before, len(sent.accepted), args.grace)
    delivered = mine.zcards(delivered_key)[0] - before
    by_command = mine.others()
    got = upstream_stats(upstream_base, recorded_before)
    arrivals: dict[str, float] = {}
    for event_id, at in zip(got.ids, got.times, strict=True):
        arrivals.setdefault(event_id, at)
    latencies = sorted((arrivals[i] - t) * 1000 for i, t in sent.accepted.items() if i in arrivals)
    missing = sum(1 for i in sent.accepted if i not in arrivals)
    return Window(name, sent, delivered, latencies, missing, by_command)


async def _post_backlog(url: str, body: bytes, count: int) -> dict[int | str, int]:
    """`count` POSTs, 32 at a time; answers by status (or exception name)."""
    answers: dict[int | str, int] = {}
    limit = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one() -> None:
            async with limit:
                try:
                    async with session.post(
                        url, data=body, headers={"content-type": "application/json"}
                    ) as r:
                        await r.read()
                        answers[r.status] = answers.get(r.status, 0) + 1
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    answers[type(exc).__name__] = answers.get(type(exc).__name__, 0) + 1

        await asyncio.gather(*(one() for _ in range(count)))
    return answers


def hanging_stats(base: str) -> dict[str, int]:
    """The hanging upstream's counts: requests, active (waiting now), max_active."""
    with urllib.request.urlopen(f"{base}/_stats", timeout=10) as response:
        return {k: int(v) for k, v in json.loads(response.read()).items()}


def _wait_until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@dataclass
class Result:
    alone: Window
    beside: Window
    backlog: int  # events posted to the hanging integration
    backlog_answers: dict[int | str, int]
    backlog_s: float  # posting the backlog took
    filled_s: float | None  # from the end of the posting until the hanging upstream had 32 waiting
    hanging: dict[str, int]  # the hanging upstream's counts at the end
    hanging_state: dict[str, str]  # the hanging integration's hash at the end (state, fails, capped)
    hanging_indexes: dict[str, int]  # its state indexes at the end


def measure(args: argparse.Namespace, outcome: Outcome) -> Result:
    body = webhook_body(args.body_bytes)
    with harness("gateway-bench-fairness-") as h:
        healthy_port, hanging_port = free_port(), free_port()
        hanging_base = f"http://127.0.0.1:{hanging_port}"
        hanging_up = h.spawn(
            "hanging-upstream",
            [*h.python("_upstream.py"), "--port", str(hanging_port), "--hang-s", f"{args.hang_s:g}"],
        )
        wait_http(
            f"{hanging_base}/_stats", hanging_up, expect=200, describe=lambda: h.log("hanging-upstream")
        )
        stack = start_stack(
            h, config(healthy_port, hanging_port), healthy_port, args.log_level, workers=WORKERS
        )
        r = stack.client

        def healthy(name: str, label: str) -> Window:
            """A measured window of healthy sending, its progress and percentiles on stderr."""
            print(
                f"fairness: healthy {label}, {args.rate:g}/s for {args.seconds:g} s...",
                file=sys.stderr,
                flush=True,
            )
            got = window(name, r, stack.api, stack.upstream_base, body, args)
            print(f"  p50 / p99 / max ms: {got.text()}", file=sys.stderr, flush=True)
            return got

        try:
            if not _wait_until(lambda: int(cast(int, r.zcard(WORKERS_KEY))) >= WORKERS, 30):
                outcome.problems.append(f"fairness: fewer than {WORKERS} worker heartbeats within 30 s")
            print(f"fairness: warm-up, {args.rate:g}/s for {args.warmup:g} s...", file=sys.stderr, flush=True)
            warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup})
            window("warm-up", r, stack.api, stack.upstream_base, body, warm)
            alone = healthy("alone", "alone")

            print(f"fairness: {args.backlog} events to {HANGING}...", file=sys.stderr, flush=True)
            started = time.monotonic()
            answers = uvloop.run(_post_backlog(f"{stack.api}/hooks/{HANGING}", body, args.backlog))
            posted = time.monotonic()
            filled = _wait_until(lambda: hanging_stats(hanging_base)["active"] >= MAX_IN_FLIGHT, 10)
            filled_s = time.monotonic() - posted if filled else None

            beside = healthy("beside", "beside it")

            hanging = hanging_stats(hanging_base)
            raw = cast(dict[bytes, bytes], r.hgetall(f"{KEY_PREFIX}:int:{HANGING}"))
            state = {k.decode(): v.decode() for k, v in raw.items() if k in (b"state", b"fails", b"capped")}
            indexes = {
                s: int(cast(int, r.zcard(state_key(s, HANGING))))
                for s in ("pending", "retrying", "in_flight", "held")
            }
        finally:
            r.close()
        for name, code in stack.exited():
            outcome.problems.append(f"fairness: {name} exited with {code}: {h.log(name)[-2000:]}")
        if hanging_up.poll() is not None:
            outcome.problems.append(f"fairness: the hanging upstream exited with {hanging_up.returncode}")
    return Result(alone, beside, args.backlog, answers, posted - started, filled_s, hanging, state, indexes)


def check(result: Result, args: argparse.Namespace, outcome: Outcome) -> None:
    for w in (result.alone, result.beside):
        accepted = len(w.sent.accepted)
        if w.delivered < accepted or w.missing:
            outcome.problems.append(
                f"fairness {w.name}: LOST {accepted - w.delivered} healthy events: {accepted} accepted, "
                f"{w.delivered} delivered after {args.grace:g} s without progress; {w.missing} never reached "
                "the upstream"
            )
        outcome.notes += w.sent.notes(f"fairness {w.name}")
    others = {s: n for s, n in result.backlog_answers.items() if s != 202}
    if others or result.backlog_answers.get(202, 0) != args.backlog:
        outcome.problems.append(
            f"fairness: the {args.backlog} backlog POSTs were answered {result.backlog_answers}"
        )
    if result.filled_s is None:
        outcome.notes.append(
            f"fairness: the hanging upstream never had {MAX_IN_FLIGHT} requests waiting within 10 s"
        )
    if result.hanging_state.get("state") == "paused":
        outcome.notes.append(
            "fairness: the hanging integration was paused by the end (its failures reached the threshold)"
        )


def figures(result: Result) -> list[Figure]:
    alone, beside = result.alone, result.beside
    r50, r99 = beside.p(50) / alone.p(50), beside.p(99) / alone.p(99)
    most = result.hanging.get("max_active", -1)
    return [
        Figure(
            "fairness",
            f"healthy beside {HANGING} ({result.backlog} events): p50 / p99 / max ms",
            beside.text(),
            f"alone: {alone.text()}",
            f"{r50:.2f} / {r99:.2f}",
            f"p50, p99 <= {RATIO:g}x alone",
            r50 <= RATIO and r99 <= RATIO,
        ),
        Figure(
            "fairness",
            "healthy beside it: worst latency ms",
            f"{beside.worst:.1f}",
            f"alone: {alone.worst:.1f}",
            "-",
            f"< {WORST_MS:g}",
            beside.worst < WORST_MS,
        ),
        Figure(
            "fairness",
            f"{HANGING} upstream: most requests at once (2 workers)",
            str(most),
            f"max_in_flight {MAX_IN_FLIGHT}",
            "-",
            f"= {MAX_IN_FLIGHT}",
            most == MAX_IN_FLIGHT,
        ),
    ]


def report(result: Result, args: argparse.Namespace) -> None:
    rows = []
    for w in (result.alone, result.beside):
        accepted = len(w.sent.accepted)
        rows.append(
            [
                w.name,
                f"{accepted / w.sent.seconds:.0f}",
                f"{accepted}/{w.delivered}",
                f"{w.p(50):.1f}",
                f"{w.p(95):.1f}",
                f"{w.p(99):.1f}",
                f"{w.worst:.1f}",
                f"{w.per_event:.1f}",
            ]
        )
    print(
        f"\nfairness: {len(webhook_body(args.body_bytes))}-byte webhooks to {HEALTHY} at {args.rate:g}/s for "
        f"{args.seconds:g} s, alone, then beside {args.backlog} events of {HANGING} (its upstream waits "
        f"{args.hang_s:g} s, its timeout_s is 10); {WORKERS} workers, default settings"
    )
    print_table(
        [
            "healthy",
            "achieved/s",
            "accepted/delivered",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "redis cmds/event",
        ],
        rows,
        [False, *[True] * 7],
    )
    filled = f"{result.filled_s:.2f} s" if result.filled_s is not None else "never (10 s)"
    print(
        f"{HANGING}: backlog posted in {result.backlog_s:.2f} s, answers {result.backlog_answers}; "
        f"{MAX_IN_FLIGHT} waiting at its upstream {filled} later; its upstream at the end: {result.hanging}; "
        f"its hash: {result.hanging_state}; its indexes: {result.hanging_indexes}"
    )
    for w in (result.alone, result.beside):
        if w.delivered:
            by_command = per_event_text(w.by_command, w.delivered)
            print(f"  {w.name}: Redis calls per delivered healthy event by command: {by_command}")


def run(args: argparse.Namespace) -> Outcome:
    outcome = Outcome()
    result = measure(args, outcome)
    report(result, args)
    check(result, args, outcome)
    outcome.figures += figures(result)
    for w in (result.alone, result.beside):
        if w.delivered:
            outcome.details.append(
                f"fairness {w.name}: Redis calls per delivered healthy event by command: "
                + per_event_text(w.by_command, w.delivered)
            )
    outcome.details.append(
        f"fairness: {HANGING} at the end: upstream {result.hanging}, hash {result.hanging_state}, "
        f"indexes {result.hanging_indexes}"
    )
    return outcome


def parser() -> argparse.ArgumentParser:
    return options(
        ("--rate", 50.0, "healthy events/s"),
        ("--seconds", 15.0, "healthy sending, alone and beside"),
        ("--warmup", 2.0, "healthy sending before, not counted"),
        ("--backlog", 400, "events posted to the hanging integration"),
        ("--hang-s", 60.0, "how long the hanging upstream waits"),
        *gateway_options(grace=True),
        description=__doc__,
    )


def main() -> int:
    p = parser()
    args = p.parse_args()
    if min(args.rate, args.seconds, args.warmup, args.hang_s) <= 0 or args.backlog < 1:
        p.error("the rate, durations and backlog must be positive")
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
