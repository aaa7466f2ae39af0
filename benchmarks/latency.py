"""End-to-end latency of one worker at fixed ingest rates, and Redis commands per delivered event.

    python3 benchmarks/latency.py [--rates 50,200,1000:60] [--seconds 10] [--body-bytes 500]

`--rates` lists events/s, each optionally with its own duration in seconds after a colon (the
others send for `--seconds`): `50:20,200:20,1000:60` is what `python3 -m benchmarks` runs.

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
- the time to the 202 answer (p50, p99): what the helpdesk waits, the ingest's share of the latency,
  shown beside it as its baseline in the suite's table;
- backlog at the end of the sending: pending + retrying events left (the worker kept up if it is a
  handful, i.e. about what arrives within a latency);
- Redis commands per delivered event: the sum of `calls` over INFO commandstats after every event was
  delivered, divided by the events delivered; it includes every client's commands: the API's, the
  worker's (its polling, the heartbeats', ...), and this benchmark's
  own polling, which is counted and subtracted (so are the CONFIG RESETSTAT, which Redis counts in
  the fresh stats, and earlier INFO calls). Since workers poll on timers, the idle share per event
  is larger at low rates. Redis's commandstats also count the commands a Lua script runs (besides
  the EVALSHA itself), so this is Redis's work per event, not round trips; the calls per event of the
  six most called commands are printed under the table.

Targets (the suite's table says MISSED when one is not reached; no target fails the run): at 200
events/s, end to end p50 <= 3 ms and p99 <= 10 ms (the HTTP ingress included); at 50 and at 200
events/s, 12 Redis commands or fewer per delivered event; at 1,000 events/s, a backlog that does not
grow. What an idle worker costs Redis alone is benchmarks/idle.py's figure.

Exit status 1 only when events were lost: fewer delivered than accepted after the grace period (the
table is printed anyway). Other anomalies (non-202 answers, send errors) are printed as notes.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 benchmarks/latency.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
import uvloop

from benchmarks._common import (
    INTEGRATION,
    CountingRedis,
    Figure,
    Outcome,
    Sent,
    free_port,
    gateway_config,
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
    webhook_body,
)

DELIVERED, DEAD = state_key("delivered"), state_key("dead")
PENDING, RETRYING = state_key("pending"), state_key("retrying")
P50_MS, P99_MS, AT_RATE = 3.0, 10.0, 200.0  # the scheduling issue's targets at 200 events/s
SUSTAINED_RATE = 1000.0  # the performance issue's: a backlog that does not grow at 1,000 events/s
COMMANDS, COMMANDS_AT = 12.0, (50.0, 200.0)  # Redis commands per delivered event at these rates, at most


@dataclass
class Run:
    rate: float
    seconds: float  # how long it was asked to send
    sent: Sent
    backlog: int  # pending + retrying when the sending ended
    delivered: int  # events delivered during this run
    dead: int
    drain_s: float  # from the end of the sending to the last delivery
    latencies_ms: list[float]
    missing: int  # accepted ids the upstream never got
    by_command: dict[str, int]  # Redis calls per command, without this benchmark's own

    @property
    def commands(self) -> int:
        return sum(self.by_command.values())

    @property
    def per_event(self) -> float:
        return self.commands / self.delivered if self.delivered else float("nan")

    @property
    def grew(self) -> bool:
        """The backlog grew: more left at the end than a tenth of a second's events (min 10)."""
        return self.backlog > max(self.rate * 0.1, 10)


def run_rate(
    r: redis.Redis, api: str, upstream_base: str, body: bytes, rate: float, seconds: float, grace: float
) -> Run:
    recorded_before = upstream_stats(upstream_base).recorded
    mine = CountingRedis(r)
    before = mine.zcards(DELIVERED, DEAD)
    mine.reset_stats()

    sent = uvloop.run(send_open_loop(f"{api}/hooks/{INTEGRATION}", body, rate, seconds))
    ended = time.monotonic()
    pending, retrying = mine.zcards(PENDING, RETRYING)
    _, last_progress = wait_count(
        lambda: sum(mine.zcards(DELIVERED, DEAD)) - sum(before), len(sent.accepted), grace
    )
    delivered, dead = (now - then for now, then in zip(mine.zcards(DELIVERED, DEAD), before, strict=True))
    by_command = mine.others()

    got = upstream_stats(upstream_base, recorded_before)
    arrivals: dict[str, float] = {}
    for event_id, at in zip(got.ids, got.times, strict=True):
        arrivals.setdefault(event_id, at)  # the first attempt that reached the upstream
    latencies = sorted((arrivals[i] - t) * 1000 for i, t in sent.accepted.items() if i in arrivals)
    missing = sum(1 for i in sent.accepted if i not in arrivals)
    return Run(
        rate,
        seconds,
        sent,
        pending + retrying,
        delivered,
        dead,
        max(last_progress - ended, 0.0),
        latencies,
        missing,
        by_command,
    )


def parse_rates(text: str, default_seconds: float) -> list[tuple[float, float]]:
    """`50,200:20` -> [(50, default_seconds), (200, 20)]; ValueError when not positive numbers."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        rate, _, seconds = item.partition(":")
        pair = (float(rate), float(seconds) if seconds else default_seconds)
        if pair[0] <= 0 or pair[1] <= 0:
            raise ValueError(item)
        out.append(pair)
    if not out:
        raise ValueError(text)
    return out


def parser() -> argparse.ArgumentParser:
    return options(
        ("--rates", "50,200,1000", "events/s to send, comma-separated, each optionally RATE:SECONDS"),
        ("--seconds", 10.0, "how long to send at a rate without its own"),
        *gateway_options(grace=True),
        description=__doc__,
    )


def run(args: argparse.Namespace) -> Outcome:
    """Sends at each rate through one stack, prints the table; the figures and checks."""
    rates = parse_rates(args.rates, args.seconds)
    body = webhook_body(args.body_bytes)
    runs: list[Run] = []
    outcome = Outcome()
    with harness("gateway-bench-latency-") as h:
        upstream_port = free_port()
        stack = start_stack(h, gateway_config(upstream_port), upstream_port, args.log_level)
        try:
            for rate, seconds in rates:
                print(f"latency: sending {rate:g} events/s for {seconds:g} s...", file=sys.stderr, flush=True)
                one = run_rate(stack.client, stack.api, stack.upstream_base, body, rate, seconds, args.grace)
                runs.append(one)
                print(
                    f"  {len(one.sent.accepted)} accepted, {one.delivered} delivered, "
                    f"p50 {percentile(one.latencies_ms, 50):.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            stack.client.close()
        for name, code in stack.exited():
            outcome.problems.append(f"{name} exited with {code} during the benchmark: {h.log(name)}")
    report(runs, body)
    for one in runs:
        _check(one, args.grace, outcome)
        outcome.figures += figures(one)
    return outcome


def _check(one: Run, grace: float, outcome: Outcome) -> None:
    accepted = len(one.sent.accepted)
    if one.delivered < accepted:
        outcome.problems.append(
            f"latency {one.rate:g}/s: LOST {accepted - one.delivered} events: {accepted} accepted, "
            f"{one.delivered} delivered, {one.dead} dead after {grace:g} s without progress; "
            f"{one.missing} never reached the upstream"
        )
    outcome.notes += one.sent.notes(f"latency {one.rate:g}/s")
    if one.delivered:
        outcome.details.append(
            f"latency {one.rate:g}/s: Redis calls per delivered event by command: "
            + per_event_text(one.by_command, one.delivered)
        )


def figures(one: Run) -> list[Figure]:
    """Rows of the suite's table: latency beside the 202 answer's, the backlog, Redis's work."""
    lat, answers = one.latencies_ms, sorted(one.sent.answer_ms)
    at = f"{one.rate:g}/s for {one.seconds:g} s"
    latency = Figure(
        "latency",
        f"{at}: end to end p50 / p95 / p99 ms",
        f"{percentile(lat, 50):.1f} / {percentile(lat, 95):.1f} / {percentile(lat, 99):.1f}",
        f"202 answer p50 / p99: {percentile(answers, 50):.1f} / {percentile(answers, 99):.1f}",
    )
    if one.rate == AT_RATE:
        latency = Figure(
            latency.part,
            latency.measure,
            latency.value,
            latency.baseline,
            "-",
            f"p50 <= {P50_MS:g}, p99 <= {P99_MS:g}",
            percentile(lat, 50) <= P50_MS and percentile(lat, 99) <= P99_MS,
        )
    achieved = len(one.sent.accepted) / one.sent.seconds
    backlog = Figure(
        "latency",
        f"{at}: backlog at end of sending (grew?)",
        f"{one.backlog} ({'yes' if one.grew else 'no'})",
        f"achieved {achieved:.0f}/s",
    )
    if one.rate == SUSTAINED_RATE:
        backlog = Figure(
            backlog.part, backlog.measure, backlog.value, backlog.baseline, "-", "does not grow", not one.grew
        )
    commands = Figure("latency", f"{at}: Redis commands per delivered event", f"{one.per_event:.1f}")
    if one.rate in COMMANDS_AT:
        commands = Figure(
            commands.part,
            commands.measure,
            commands.value,
            commands.baseline,
            "-",
            f"<= {COMMANDS:g}",
            one.per_event <= COMMANDS,
        )
    return [latency, backlog, commands]


def report(runs: list[Run], body: bytes) -> None:
    rows: list[list[str]] = []
    for one in runs:
        accepted = len(one.sent.accepted)
        lat = one.latencies_ms
        rows.append(
            [
                f"{one.rate:g}",
                f"{one.seconds:g}",
                f"{accepted / one.sent.seconds:.0f}",
                f"{accepted}/{one.delivered}",
                f"{percentile(lat, 50):.1f}",
                f"{percentile(lat, 95):.1f}",
                f"{percentile(lat, 99):.1f}",
                f"{lat[-1] if lat else float('nan'):.1f}",
                f"{one.backlog} ({'yes' if one.grew else 'no'})",
                f"{one.drain_s:.2f}",
                f"{one.per_event:.1f}",
            ]
        )
    print(
        f"\nlatency: {len(body)}-byte JSON webhooks sent open-loop through `gateway serve` to ONE "
        "`gateway worker` and a local upstream; latency = upstream arrival - send time"
    )
    print_table(
        [
            "rate/s",
            "seconds",
            "achieved/s",
            "accepted/delivered",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "backlog at end (grew?)",
            "tail s",
            "redis cmds/event",
        ],
        rows,
        [True] * 11,
    )
    print(
        "backlog: pending + retrying when the sending ended ('grew' when > 10 % of a second's events, "
        "min 10); tail: from the end of the sending to the last delivery; redis cmds/event: every "
        "client's commands (API, worker), those run inside Lua scripts included, over the run / "
        "events delivered, the benchmark's own polling subtracted"
    )
    for one in runs:
        if one.delivered:
            print(
                f"  rate {one.rate:g}, redis calls per event by command: "
                + per_event_text(one.by_command, one.delivered)
            )


def main() -> int:
    p = parser()
    args = p.parse_args()
    try:
        parse_rates(args.rates, args.seconds)
    except ValueError:
        p.error("--rates must be positive numbers (RATE or RATE:SECONDS) separated by commas")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
