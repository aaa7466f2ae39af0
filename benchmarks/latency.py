"""End-to-end latency of one worker at fixed ingest rates, and Redis commands per delivered event.

    python3 benchmarks/latency.py [--rates 50,200,1000] [--seconds 10] [--body-bytes 500]

Starts everything it needs: a redis-server of its own on a free port (no snapshots, no AOF), the
upstream, benchmarks/_upstream.py --record (keeps each webhook-id with its arrival time.time()), the
real `python3 -m gateway serve` and ONE `python3 -m gateway worker`, with a temporary config whose one
integration, "bench", targets that upstream (allowed_networks = ["127.0.0.0/8"]; `[worker]
poll_delay_s` and everything else at their defaults) and a random GATEWAY_ADMIN_TOKEN.

For each rate: CONFIG RESETSTAT; then an open-loop sender in this process (aiohttp on uvloop) POSTs
a `--body-bytes` JSON webhook to /hooks/bench on a fixed schedule (the k-th at start + k/rate, each in
its own task, whatever the answers to the previous ones), for `--seconds`, and keeps the time.time()
just before each POST whose answer was 202, under the event id of the answer. When the schedule is
done it reads the backlog (ZCARD of the pending and retrying indexes); then it waits until every
accepted event is delivered (the delivered index has grown by the 202 count), or until `--grace`
seconds without progress. Then:

- latency of each event = its arrival time at the upstream - its send time: p50, p95, p99, max (the
  upstream and this process share the machine's clock);
- achieved rate = 202 answers / the sending time (first POST to last POST);
- backlog at the end of the sending: pending + retrying events left (the worker kept up if it is a
  handful, i.e. about what arrives within a latency);
- Redis commands per delivered event: the sum of `calls` over INFO commandstats after every event was
  delivered, divided by the events delivered; it includes every client's commands: the API's, the
  worker's (arq's polling of its queue, the drainer's, the heartbeats', ...), and this benchmark's
  own polling, which is counted and subtracted (the CONFIG RESETSTAT and the final INFO are not
  counted by Redis either way). Since arq and the drainer poll on timers, the idle share per event
  is larger at low rates. Redis's commandstats also count the commands a Lua script runs (besides
  the EVALSHA itself), so this is Redis's work per event, not round trips; the calls per event of the
  six most called commands are printed under the table.

Exit status 1 only when events were lost: fewer delivered than accepted after the grace period (the
table is printed anyway). Other anomalies (non-202 answers, send errors) are printed as notes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

if __package__ in (None, ""):  # run as `python3 benchmarks/latency.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import redis
import uvloop

from benchmarks._common import free_port, harness, print_table, start_stack, webhook_body
from gateway.keys import Keys

NAME = "bench"
KEYS = Keys("gw")  # the gateway's default prefix; GATEWAY_KEY_PREFIX is removed from its environment
DELIVERED = KEYS.state_index(NAME, "delivered")
PENDING = KEYS.state_index(NAME, "pending")
RETRYING = KEYS.state_index(NAME, "retrying")
DEAD = KEYS.state_index(NAME, "dead")
CONFIG = """\
[gateway]
max_body_bytes = 1048576
allowed_networks = ["127.0.0.0/8"]

[[integrations]]
name = "{name}"
target = "http://127.0.0.1:{port}/hook"
"""


@dataclass
class Sent:
    sent: int = 0  # POSTs issued
    accepted: dict[str, float] = field(default_factory=dict)  # event id -> send time (time.time())
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    seconds: float = 0.0  # from the first POST to the last one issued
    lag_max_s: float = 0.0  # how late the sender issued a POST behind its schedule, at most


@dataclass
class Run:
    rate: float
    sent: Sent
    backlog: int  # pending + retrying when the sending ended
    delivered: int  # events delivered during this run
    dead: int
    drain_s: float  # from the end of the sending to the last delivery
    latencies_ms: list[float]
    missing: int  # accepted ids the upstream never got
    commands: int  # Redis commands, without this benchmark's own
    by_command: dict[str, int]  # calls per command, this benchmark's own included


class Counter:
    """A Redis client whose commands are counted, so that they can be taken out of commandstats."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.commands = 0

    def zcards(self, *keys: str) -> list[int]:
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(key)
        self.commands += len(keys)
        return [int(cast(int, x)) for x in pipe.execute()]


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, out: Sent
) -> None:
    sent_at = time.time()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            raw = await response.read()
            out.statuses[response.status] = out.statuses.get(response.status, 0) + 1
            if response.status == 202:
                out.accepted[str(json.loads(raw)["id"])] = sent_at
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        out.error_count += 1
        if len(out.errors) < 5:
            out.errors.append(f"{type(exc).__name__}: {exc}")


async def _send(url: str, body: bytes, rate: float, seconds: float) -> Sent:
    """Open loop: the k-th POST starts at start + k / rate, each in a task of its own."""
    out = Sent()
    count = max(int(rate * seconds), 1)
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        start = loop.time() + 0.05
        first = last = 0.0
        for k in range(count):
            due = start + k / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            out.lag_max_s = max(out.lag_max_s, now - due)
            if k == 0:
                first = now
            last = now
            task = asyncio.create_task(_post(session, url, body, out))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            out.sent += 1
        out.seconds = max(last - first, 1 / rate) if count > 1 else 1 / rate
        if tasks:
            await asyncio.gather(*tasks)
    return out


def _upstream_since(base: str, start: int) -> tuple[int, list[str], list[float]]:
    """(ids the upstream kept so far, those from the `start`-th on, their arrival times)."""
    with urllib.request.urlopen(f"{base}/_stats?from={start}", timeout=60) as response:
        raw = json.loads(response.read())
    return int(raw["recorded"]), [str(i) for i in raw["ids"]], [float(t) for t in raw["times"]]


def _commandstats(r: redis.Redis) -> dict[str, int]:
    """Command name -> calls since the last CONFIG RESETSTAT."""
    stats = cast(dict[str, dict[str, Any]], r.info("commandstats"))
    return {name.removeprefix("cmdstat_"): int(s.get("calls", 0)) for name, s in stats.items()}


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return float("nan")
    rank = max(int(-(-p * len(values) // 100)), 1)  # ceil(p/100 * n), at least 1
    return values[min(rank, len(values)) - 1]


def run_rate(
    r: redis.Redis, api: str, upstream_base: str, body: bytes, rate: float, args: argparse.Namespace
) -> Run:
    recorded_before, _, _ = _upstream_since(upstream_base, 1 << 62)
    mine = Counter(r)
    delivered_before, dead_before = mine.zcards(DELIVERED, DEAD)
    r.config_resetstat()
    mine.commands = 0

    sent = uvloop.run(_send(f"{api}/hooks/{NAME}", body, rate, args.seconds))
    ended = time.monotonic()
    pending, retrying = mine.zcards(PENDING, RETRYING)

    want = len(sent.accepted)
    last_count, since = -1, time.monotonic()
    last_progress = ended
    while True:
        delivered, dead = mine.zcards(DELIVERED, DEAD)
        delivered -= delivered_before
        dead -= dead_before
        now = time.monotonic()
        if delivered + dead != last_count:
            last_count, since, last_progress = delivered + dead, now, now
        if delivered + dead >= want or now - since > args.grace:
            break
        time.sleep(0.05)
    by_command = _commandstats(r)
    commands = sum(by_command.values()) - mine.commands

    _, ids, times = _upstream_since(upstream_base, recorded_before)
    arrivals: dict[str, float] = {}
    for event_id, at in zip(ids, times, strict=True):
        arrivals.setdefault(event_id, at)  # the first attempt that reached the upstream
    latencies = sorted((arrivals[i] - t) * 1000 for i, t in sent.accepted.items() if i in arrivals)
    missing = sum(1 for i in sent.accepted if i not in arrivals)
    return Run(rate, sent, pending + retrying, delivered, dead, last_progress - ended, latencies,
               missing, commands, by_command)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="50,200,1000", help="events/s to send, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to send at each rate")
    parser.add_argument("--body-bytes", type=int, default=500)
    parser.add_argument("--grace", type=float, default=30.0,
                        help="after the sending, wait this long without progress for deliveries")
    parser.add_argument("--log-level", default="INFO", help="GATEWAY_LOG_LEVEL of the gateway processes")
    args = parser.parse_args()
    try:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
    except ValueError:
        parser.error("--rates must be numbers separated by commas")
    if not rates or any(x <= 0 for x in rates):
        parser.error("--rates must be positive")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    body = webhook_body(args.body_bytes)
    runs: list[Run] = []
    notes: list[str] = []

    with harness("gateway-bench-latency-") as h:
        upstream_port = free_port()
        stack = start_stack(h, CONFIG.format(name=NAME, port=upstream_port), upstream_port, args.log_level)
        r, api, upstream_base = stack.client, stack.api, stack.upstream_base
        try:
            for rate in rates:
                print(f"sending {rate:g} events/s for {args.seconds:g} s...", file=sys.stderr, flush=True)
                run = run_rate(r, api, upstream_base, body, rate, args)
                runs.append(run)
                print(f"  {len(run.sent.accepted)} accepted, {run.delivered} delivered, "
                      f"p50 {percentile(run.latencies_ms, 50):.1f} ms", file=sys.stderr, flush=True)
        finally:
            r.close()
        for name, code in stack.exited():
            notes.append(f"{name} exited with {code} during the benchmark: {h.log(name)}")

    lost = report(runs, body, args, notes)
    for note in notes:
        print(f"NOTE {note}")
    return 1 if lost else 0


def report(runs: list[Run], body: bytes, args: argparse.Namespace, notes: list[str]) -> bool:
    rows: list[list[str]] = []
    lost = False
    for run in runs:
        accepted = len(run.sent.accepted)
        lat = run.latencies_ms
        if run.delivered < accepted:
            lost = True
            notes.append(f"rate {run.rate:g}: LOST {accepted - run.delivered} events: {accepted} accepted, "
                         f"{run.delivered} delivered, {run.dead} dead after {args.grace:g} s without "
                         f"progress; {run.missing} never reached the upstream")
        others = {s: n for s, n in run.sent.statuses.items() if s != 202}
        if others:
            notes.append(f"rate {run.rate:g}: answers other than 202: {others}")
        if run.sent.error_count:
            notes.append(f"rate {run.rate:g}: {run.sent.error_count} send errors, e.g. {run.sent.errors}")
        if run.sent.lag_max_s > 0.05:
            notes.append(f"rate {run.rate:g}: the sender fell up to {run.sent.lag_max_s * 1000:.0f} ms "
                         "behind its schedule")
        per_event = run.commands / run.delivered if run.delivered else float("nan")
        grew = "yes" if run.backlog > max(run.rate * 0.1, 10) else "no"
        rows.append([
            f"{run.rate:g}", f"{accepted / run.sent.seconds:.0f}", f"{accepted}/{run.delivered}",
            f"{percentile(lat, 50):.1f}", f"{percentile(lat, 95):.1f}", f"{percentile(lat, 99):.1f}",
            f"{lat[-1] if lat else float('nan'):.1f}", f"{run.backlog} ({grew})", f"{run.drain_s:.2f}",
            f"{per_event:.1f}",
        ])
    print(f"\nlatency: {len(body)}-byte JSON webhooks sent open-loop for {args.seconds:g} s per rate through "
          "`gateway serve` to ONE `gateway worker` (default poll_delay_s) and a local upstream; "
          "latency = upstream arrival - send time")
    print_table(
        ["rate/s", "achieved/s", "accepted/delivered", "p50 ms", "p95 ms", "p99 ms", "max ms",
         "backlog at end (grew?)", "tail s", "redis cmds/event"],
        rows, [True] * 10,
    )
    print("backlog: pending + retrying when the sending ended ('grew' when > 10 % of a second's events, "
          "min 10); tail: from the end of the sending to the last delivery; redis cmds/event: every "
          "client's commands (API, arq, drainer, heartbeats), those run inside Lua scripts included, "
          "over the run / events delivered, the benchmark's own polling subtracted")
    for run in runs:
        if run.delivered:
            top = sorted(run.by_command.items(), key=lambda kv: -kv[1])[:6]
            print(f"  rate {run.rate:g}, redis calls per event by command: "
                  + ", ".join(f"{name} {n / run.delivered:.1f}" for name, n in top))
    return lost


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
