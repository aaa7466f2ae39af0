"""Memory under a steady load: RSS of `gateway serve` and of one `gateway worker` over a long run at
a fixed rate. A leak (a cache, a list of ids, a task per event that never ends) shows as growth.

    python3 benchmarks/soak.py [--minutes 10] [--rate 200] [--warmup 30] [--sample-s 5]

Starts everything it needs: a redis-server of its own on a free port (no snapshots, no AOF), the
upstream, benchmarks/_upstream.py --record, the real `python3 -m gateway serve` and ONE
`python3 -m gateway worker`, with a config whose one integration, "bench", targets that upstream.

An open-loop sender in this process (aiohttp on uvloop; the k-th POST at start + k / rate, whatever
the answers) POSTs a `--body-bytes` JSON webhook to /hooks/bench at `--rate` for `--minutes`. Every
`--sample-s` seconds it reads VmRSS (/proc/PID/status) of the API and of the worker (each with its
child processes, if it has any) and the backlog (pending + retrying events).

Reported per process: RSS at the start (the first sample after `--warmup` s, once imports, pools
and caches have filled) and at the end of the sending, the growth between them, and the slope of a
least-squares line through every sample after the warm-up (MiB per minute: a steady leak shows there
even when the end reading happens to be low). The baseline is the start reading. Aim of the
performance issue: no growth, taken as growth <= 5 % of the start or <= 4 MiB, whichever is larger.
The backlog at the end and at its largest shows that the worker kept up (a worker that falls behind
holds more events in memory for a reason that is not a leak).

Checked (exit status 1 when a check fails): after the sending, every accepted event is delivered
(waiting up to `--grace` s without progress), and each reached the upstream; no process exited.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 benchmarks/soak.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop

from benchmarks._common import (
    INTEGRATION,
    CountingRedis,
    Figure,
    GatewayStack,
    Outcome,
    Sent,
    free_port,
    gateway_config,
    gateway_options,
    harness,
    options,
    print_table,
    rss_bytes,
    run_main,
    send_open_loop,
    start_stack,
    state_key,
    upstream_stats,
    wait_count,
    webhook_body,
)

MIB = 1 << 20
GROWTH_SHARE, GROWTH_BYTES = 0.05, 4 * MIB  # "no growth": within 5 % or 4 MiB, whichever is larger


@dataclass(frozen=True)
class Sample:
    at_s: float  # since the sending started
    rss: dict[str, int]  # process name -> bytes
    backlog: int  # pending + retrying


@dataclass(frozen=True)
class Growth:
    """One process's RSS over the samples after the warm-up."""

    name: str
    start: int
    end: int
    slope_mib_per_min: float

    @property
    def growth(self) -> int:
        return self.end - self.start

    @property
    def flat(self) -> bool:
        return self.growth <= max(self.start * GROWTH_SHARE, GROWTH_BYTES)


def _sample(pids: dict[str, int], mine: CountingRedis, started: float) -> Sample:
    pending, retrying = mine.zcards(state_key("pending"), state_key("retrying"))
    return Sample(
        time.monotonic() - started, {name: rss_bytes(pid) for name, pid in pids.items()}, pending + retrying
    )


async def _sampler(pids: dict[str, int], mine: CountingRedis, every_s: float, out: list[Sample]) -> None:
    """A sample every `every_s` s until cancelled (the reads take well under a millisecond)."""
    started = time.monotonic()
    while True:
        out.append(_sample(pids, mine, started))
        await asyncio.sleep(every_s)


async def _load(stack: GatewayStack, body: bytes, args: argparse.Namespace, samples: list[Sample]) -> Sent:
    """The sending, with the sampler beside it; a last sample when the sending ends."""
    pids = {"api": stack.gateway.pid, "worker": stack.worker.pid}
    mine = CountingRedis(stack.client)
    started = time.monotonic()
    sampler = asyncio.create_task(_sampler(pids, mine, args.sample_s, samples))
    try:
        sent = await send_open_loop(f"{stack.api}/hooks/{INTEGRATION}", body, args.rate, args.minutes * 60)
    finally:
        sampler.cancel()
    samples.append(_sample(pids, mine, started))
    return sent


def growth(name: str, samples: list[Sample], warmup_s: float) -> Growth:
    after = [s for s in samples if s.at_s >= warmup_s] or samples[-1:]
    minutes = [s.at_s / 60 for s in after]
    mib = [s.rss[name] / MIB for s in after]
    slope = statistics.linear_regression(minutes, mib).slope if len(set(minutes)) > 1 else 0.0
    return Growth(name, after[0].rss[name], after[-1].rss[name], slope)


def parser() -> argparse.ArgumentParser:
    return options(
        ("--minutes", 10.0, "how long to send"),
        ("--rate", 200.0, "events/s"),
        ("--warmup", 30.0, "seconds before the start reading"),
        ("--sample-s", 5.0, "seconds between samples"),
        *gateway_options(grace=True),
        description=__doc__,
    )


def run(args: argparse.Namespace) -> Outcome:
    """The soak; prints its table; the figures and checks."""
    body = webhook_body(args.body_bytes)
    samples: list[Sample] = []
    outcome = Outcome()
    with harness("gateway-bench-soak-") as h:
        port = free_port()
        stack = start_stack(h, gateway_config(port), port, args.log_level)
        try:
            print(
                f"soak: {args.rate:g} events/s for {args.minutes:g} min, RSS every {args.sample_s:g} s...",
                file=sys.stderr,
                flush=True,
            )
            recorded_before = upstream_stats(stack.upstream_base).recorded
            sent = uvloop.run(_load(stack, body, args, samples))
            delivered = _check_delivered(stack, sent, recorded_before, args.grace, outcome)
        finally:
            stack.client.close()
        outcome.problems += [
            f"soak: {name} exited with {code}: {h.log(name)[-2000:]}" for name, code in stack.exited()
        ]
    outcome.notes += sent.notes("soak")
    growths = [growth(name, samples, args.warmup) for name in ("api", "worker")]
    report(growths, samples, sent, delivered, args)
    outcome.figures += [figure(g, args) for g in growths]
    return outcome


def _check_delivered(
    stack: GatewayStack, sent: Sent, recorded_before: int, grace: float, outcome: Outcome
) -> int:
    """Waits for the accepted events to be delivered; every one must reach the upstream."""
    mine = CountingRedis(stack.client)
    want = len(sent.accepted)
    delivered, _ = wait_count(lambda: mine.zcards(state_key("delivered"))[0], want, grace)
    arrived = set(upstream_stats(stack.upstream_base, recorded_before).ids)
    missing = sum(1 for event_id in sent.accepted if event_id not in arrived)
    if delivered < want or missing:
        outcome.problems.append(
            f"soak: {want} accepted, {delivered} delivered after {grace:g} s without "
            f"progress; {missing} never reached the upstream"
        )
    return delivered


def figure(g: Growth, args: argparse.Namespace) -> Figure:
    """The suite's row: RSS at the end beside the start reading."""
    return Figure(
        "soak",
        f"RSS of the {g.name}, {args.rate:g}/s for {args.minutes:g} min: end (growth, slope)",
        f"{g.end / MIB:.1f} MiB ({g.growth / MIB:+.1f} MiB, {g.slope_mib_per_min:+.2f} MiB/min)",
        f"start (after {args.warmup:g} s) {g.start / MIB:.1f} MiB",
        f"{g.end / max(g.start, 1):.3f}",
        f"growth <= {GROWTH_SHARE:.0%} or {GROWTH_BYTES // MIB} MiB",
        g.flat,
    )


def report(
    growths: list[Growth], samples: list[Sample], sent: Sent, delivered: int, args: argparse.Namespace
) -> None:
    rows = [
        [
            g.name,
            f"{g.start / MIB:.1f}",
            f"{g.end / MIB:.1f}",
            f"{g.growth / MIB:+.1f}",
            f"{g.growth / max(g.start, 1) * 100:+.1f}",
            f"{g.slope_mib_per_min:+.3f}",
            "yes" if g.flat else "NO",
        ]
        for g in growths
    ]
    print(
        f"\nsoak: {args.rate:g} events/s for {args.minutes:g} min through `gateway serve` and ONE "
        f"`gateway worker`; {len(sent.accepted)} accepted, {delivered} delivered; {len(samples)} samples, "
        f"backlog at the end {samples[-1].backlog}, at most {max(s.backlog for s in samples)}"
    )
    print_table(
        [
            "process",
            f"RSS MiB at {args.warmup:g} s",
            "at end",
            "growth MiB",
            "growth %",
            "slope MiB/min",
            "flat?",
        ],
        rows,
        [False, *[True] * 6],
    )
    print(
        f"flat: growth <= {GROWTH_SHARE:.0%} of the start or {GROWTH_BYTES // MIB} MiB; slope: least "
        "squares over the samples after the warm-up; RSS: VmRSS of the process and its children"
    )


def main() -> int:
    p = parser()
    args = p.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.sample_s <= 0 or args.warmup < 0:
        p.error("--minutes, --rate and --sample-s must be positive, --warmup not negative")
    if args.warmup >= args.minutes * 60:
        p.error("--warmup must be shorter than the run")
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
