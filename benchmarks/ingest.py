"""Ingest throughput of the real `gateway serve`, beside a bare Starlette app served the same way.

    python3 benchmarks/ingest.py [--seconds 10] [--connections 32] [--rounds 3]

Starts everything it needs: a redis-server of its own on a free port (no snapshots, no AOF), the
real `python3 -m gateway serve` (REDIS_URL at that Redis, GATEWAY_CONFIG at a temporary config with
one integration, "bench"; no worker runs, so this measures ingest only) and the baseline,
benchmarks/_hello.py: one Starlette Route that reads the body and answers 202 with a small JSON
body, on uvicorn with the settings of `gateway serve` (uvloop, httptools, no access log, one
process). Both answer POST /hooks/bench.

Load: wrk, a separate process, POSTs a 500-byte JSON webhook (Content-Type: application/json, and
an `Authorization: Bearer ...` header, as a helpdesk sends its API key) over
`--connections` keep-alive connections (default 32) for `--seconds`, after a `--warmup` run. wrk
uses ONE thread by default: the server under test is a single Python process and is the bottleneck
at a few thousand requests/s, which one wrk thread (C, epoll) drives while using a small fraction of
a core (see the "CPU %" column); on a 2-core machine a second wrk thread would only compete for
the cores the server and redis-server need. Each round runs the baseline then the gateway, back to
back; the ratio is the median over `--rounds` rounds of the per-round ratio, so the machine's drift
between rounds (large on a shared VM) cancels out instead of biasing one target.

Checked while measuring: wrk counts the responses of each status (a Lua `response` hook), which
must all be 202 (any other status or socket error fails the benchmark); after each gateway run,
once the gateway is idle, Redis must hold every event that got a 202 (ZCARD of the pending state
index), plus at most one per connection that the gateway accepted while wrk was stopping.
Exit status 1 when a check fails.

Columns besides requests/s and wrk's latencies: CPU/req is the CPU time the server process used per
request (less sensitive to a busy machine than requests/s); CPU % is of one core over the measured
runs, for the server, redis-server and wrk; "srv CPU wait %" is the time the server was runnable but
had no CPU (Linux schedstat): high values mean the machine, not the server, limited the figure;
"batch: events, Redis us" are the gateway's IngestBatcher writes (EVALSHA calls, from Redis's
INFO commandstats) and the time Redis spent in each.

Two gateways are measured: "gateway" as it runs by default, sealing the Authorization header with
AES-GCM before it is stored (GATEWAY_SECRET_KEY set), and "gateway-plain" with
`store_credentials = "plain"`, which stores it in clear: the cost of sealing, side by side.

Aim of the issues: the gateway at 0.70 or more of the bare app's requests/s, with sealing on.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

if __package__ in (None, ""):  # run as `python3 benchmarks/ingest.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from benchmarks._common import (
    BODY_BYTES,
    Figure,
    Harness,
    Outcome,
    RedisServer,
    WrkResult,
    cpu_seconds,
    free_port,
    gateway_env,
    harness,
    median,
    options,
    other_answers,
    print_table,
    run_main,
    run_queue_seconds,
    run_wrk,
    start_redis,
    state_key,
    wait_http,
    webhook_body,
    write_wrk_script,
)

PENDING = state_key("pending")
RATIO = 0.70  # the aim: the gateway's accepted events/s over the bare app's
CONFIG = """\
[gateway]
max_body_bytes = 1048576

[[integrations]]
name = "bench"
target = "http://127.0.0.1:9/"
"""
PLAIN = CONFIG.replace("[gateway]\n", '[gateway]\nstore_credentials = "plain"\n')
CREDENTIAL = {"Authorization": "Bearer 3c1f0d9e8b7a6f5e4d3c2b1a0f9e8d7c"}


@dataclass
class Run:
    wrk: WrkResult
    server_cpu_s: float
    server_wait_s: float  # runnable but waiting for a CPU
    redis_cpu_s: float
    stored: int | None = None  # gateway only: events in Redis after the run
    batches: int = 0  # gateway only: EVALSHA calls (IngestBatcher writes) during the run
    batches_us: int = 0  # gateway only: time Redis spent in them


@dataclass
class Target:
    name: str
    url: str
    pid: int
    stores_events: bool
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _zcard(r: redis.Redis, key: str) -> int:
    return int(cast(int, r.zcard(key)))


def _settle(r: redis.Redis, quiet_s: float = 0.3, timeout_s: float = 15.0) -> int:
    """ZCARD of the due zset once it has not changed for `quiet_s` (the gateway is idle)."""
    deadline = time.monotonic() + timeout_s
    last = _zcard(r, PENDING)
    since = time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway kept writing events after wrk had stopped")
        time.sleep(0.05)
        now = _zcard(r, PENDING)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _check_statuses(target: Target, result: WrkResult, phase: str) -> None:
    target.problems += other_answers(phase, result.statuses, 202)
    if result.socket_errors:
        target.problems.append(f"{phase}: {result.socket_errors} socket errors/timeouts")
    if result.count(202) == 0:
        target.problems.append(f"{phase}: no 202 answers at all")


def measure(
    h: Harness, target: Target, script: Path, r: redis.Redis, redis_pid: int, args: argparse.Namespace
) -> None:
    if target.stores_events:
        _settle(r)
        r.flushdb()
    warm = run_wrk(
        h, target.url, script, seconds=args.warmup, connections=args.connections, threads=args.threads
    )
    _check_statuses(target, warm, "warm-up")
    if target.stores_events:
        _settle(r)
        r.flushdb()
        r.config_resetstat()
    server_before, redis_before = cpu_seconds(target.pid), cpu_seconds(redis_pid)
    wait_before = run_queue_seconds(target.pid)
    result = run_wrk(
        h, target.url, script, seconds=args.seconds, connections=args.connections, threads=args.threads
    )
    run = Run(
        result,
        cpu_seconds(target.pid) - server_before,
        run_queue_seconds(target.pid) - wait_before,
        cpu_seconds(redis_pid) - redis_before,
    )
    _check_statuses(target, result, f"run {len(target.runs) + 1}")
    if target.stores_events:
        run.stored = _settle(r)
        evalsha = cast(dict[str, dict[str, int]], r.info("commandstats")).get("cmdstat_evalsha", {})
        run.batches, run.batches_us = int(evalsha.get("calls", 0)), int(evalsha.get("usec", 0))
        accepted = result.count(202)
        if run.stored < accepted:
            target.problems.append(
                f"run {len(target.runs) + 1}: {accepted} answers 202 but only {run.stored} events in Redis"
            )
        if run.stored > accepted + args.connections:
            target.problems.append(
                f"run {len(target.runs) + 1}: {run.stored} events in Redis for "
                f"{accepted} answers 202 over {args.connections} connections"
            )
    target.runs.append(run)
    extra = f", {run.stored} events in Redis" if run.stored is not None else ""
    print(
        f"  {target.name:<12} {result.rate:9.0f} req/s  p50 {result.p50_ms:.2f} ms  "
        f"p99 {result.p99_ms:.2f} ms{extra}",
        file=sys.stderr,
        flush=True,
    )


def report(targets: list[Target], args: argparse.Namespace) -> None:
    base_runs = targets[0].runs
    base_cpu = sum(run.server_cpu_s for run in base_runs) / sum(run.wrk.requests for run in base_runs)
    rows = []
    for t in targets:
        rates = [run.wrk.rate for run in t.runs]
        requests = sum(run.wrk.requests for run in t.runs)
        seconds = sum(run.wrk.seconds for run in t.runs)
        not_2xx = sum(run.wrk.not_2xx() for run in t.runs)
        errors = sum(run.wrk.socket_errors for run in t.runs)
        server_cpu = sum(run.server_cpu_s for run in t.runs)
        server_wait = sum(run.server_wait_s for run in t.runs)
        redis_cpu = sum(run.redis_cpu_s for run in t.runs)
        wrk_cpu = sum(run.wrk.cpu_s for run in t.runs)
        if t.stores_events:
            stored = sum(run.stored or 0 for run in t.runs)
            accepted = sum(run.wrk.count(202) for run in t.runs)
            stored_cell = f"{stored}/{accepted}"
            batches = max(sum(run.batches for run in t.runs), 1)
            batch_cell = f"{stored / batches:.1f}, {sum(run.batches_us for run in t.runs) / batches:.0f}"
        else:
            stored_cell = batch_cell = "-"
        rows.append(
            [
                t.name,
                f"{median(rates):.0f}",
                " ".join(f"{x:.0f}" for x in rates),
                f"{median([run.wrk.p50_ms for run in t.runs]):.2f}",
                f"{median([run.wrk.p99_ms for run in t.runs]):.2f}",
                f"{not_2xx}",
                f"{errors}",
                f"{server_cpu / requests * 1e6:.0f} us",
                "/".join(f"{cpu / seconds * 100:.0f}" for cpu in (server_cpu, redis_cpu, wrk_cpu)),
                f"{server_wait / seconds * 100:.0f}",
                stored_cell,
                batch_cell,
                f"{round_ratio(t, targets[0]):.2f}",
                f"{base_cpu / (server_cpu / requests):.2f}",
            ]
        )
    print(
        f"\ningest: POST {len(webhook_body(args.body_bytes))}-byte JSON, wrk -t{args.threads} "
        f"-c{args.connections}, {args.seconds:.0f} s per run after {args.warmup:.0f} s warm-up, "
        f"{args.rounds} rounds (medians)"
    )
    print_table(
        [
            "target",
            "req/s",
            "each run",
            "p50 ms",
            "p99 ms",
            "non-2xx",
            "sock err",
            "CPU/req",
            "CPU % srv/redis/wrk",
            "srv CPU wait %",
            "stored/202s",
            "batch: events, Redis us",
            "ratio",
            "CPU ratio",
        ],
        rows,
        [False, *[True] * 13],
    )
    print(
        f"ratio: median over rounds of req/s / {targets[0].name} req/s in the same round; "
        f"CPU ratio: {targets[0].name} CPU per request / this one's;\n"
        "stored/202s: events in Redis / 202 answers; "
        "batch: events per IngestBatcher script call (EVALSHA) and Redis time per call; "
        "sums over the measured runs"
    )


def parser() -> argparse.ArgumentParser:
    return options(
        ("--seconds", 5, "length of each measured run"),
        ("--warmup", 2, "length of the warm-up before each run"),
        ("--connections", 32, "wrk connections (concurrent requests)"),
        ("--threads", 1, "wrk threads (see above for why 1)"),
        ("--rounds", 5, "rounds of (baseline, gateway)"),
        BODY_BYTES,
        description=__doc__,
    )


def servers(h: Harness) -> tuple[RedisServer, dict[str, str], dict[str, str]]:
    """A redis-server of the run's own and the environments of the two gateways: credentials
    sealed (the default) and in clear (`store_credentials = "plain"`)."""
    server = start_redis(h)
    config, plain = h.directory / "gateway.toml", h.directory / "plain.toml"
    config.write_text(CONFIG)
    plain.write_text(PLAIN)
    env = gateway_env(server.url, config, "WARNING")
    return server, env, {**env, "GATEWAY_CONFIG": str(plain)}


def run(args: argparse.Namespace) -> Outcome:
    """Rounds of (bare app, gateway) under wrk; prints the table; the figure and checks."""
    with harness("gateway-bench-ingest-") as h:
        server, env, plain_env = servers(h)

        gateway_port, plain_port, hello_port = free_port(), free_port(), free_port()
        serve = [sys.executable, "-m", "gateway", "serve", "--port"]
        gateway = h.spawn("gateway", [*serve, str(gateway_port)], env=env)
        gateway_plain = h.spawn("gateway-plain", [*serve, str(plain_port)], env=plain_env)
        hello = h.spawn("hello", [*h.python("_hello.py"), "--port", str(hello_port)])
        for name, process, port in (
            ("gateway", gateway, gateway_port),
            ("gateway-plain", gateway_plain, plain_port),
            ("hello", hello, hello_port),
        ):
            wait_http(
                f"http://127.0.0.1:{port}/healthz",
                process,
                expect=200,
                describe=functools.partial(h.log, name),
            )

        script = write_wrk_script(h.directory / "post.lua", webhook_body(args.body_bytes), headers=CREDENTIAL)
        targets = [
            Target("hello-world", f"http://127.0.0.1:{hello_port}/hooks/bench", hello.pid, False),
            Target("gateway", f"http://127.0.0.1:{gateway_port}/hooks/bench", gateway.pid, True),
            Target("gateway-plain", f"http://127.0.0.1:{plain_port}/hooks/bench", gateway_plain.pid, True),
        ]
        r = server.client()
        try:
            for n in range(args.rounds):
                print(f"ingest: round {n + 1}/{args.rounds}", file=sys.stderr, flush=True)
                for target in targets:
                    measure(h, target, script, r, server.process.pid, args)
        finally:
            r.close()
        for name, process in (("gateway", gateway), ("gateway-plain", gateway_plain), ("hello", hello)):
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode} during the benchmark: {h.log(name)}"
                )

    report(targets, args)
    outcome = Outcome(problems=[f"ingest {t.name}: {p}" for t in targets for p in t.problems])
    if not outcome.problems:
        print("checks: every response was 202, no socket errors; Redis held an event for every 202")
    outcome.figures.append(figure(targets[1], targets[0]))
    outcome.figures.append(figure(targets[2], targets[0], "credentials in clear"))
    return outcome


def figure(gateway: Target, base: Target, how: str = "credentials sealed") -> Figure:
    """The suite's row: the gateway's accepted events/s beside the bare app's."""
    ratio = round_ratio(gateway, base)
    rate = median([x.wrk.rate for x in gateway.runs])
    return Figure(
        "ingest",
        f"accepted events/s, `gateway serve`, {how}",
        f"{rate:.0f}",
        f"bare Starlette {median([x.wrk.rate for x in base.runs]):.0f}/s",
        f"{ratio:.2f}",
        f"ratio >= {RATIO:.2f}",
        ratio >= RATIO,
    )


def round_ratio(target: Target, base: Target) -> float:
    """The median over rounds of the per-round ratio of requests/s: each round measures both back to
    back, so it is far steadier than a ratio of medians on a machine whose speed drifts."""
    return median([a.wrk.rate / b.wrk.rate for a, b in zip(target.runs, base.runs, strict=True)])


def main() -> int:
    return run(parser().parse_args()).exit_status()


if __name__ == "__main__":
    run_main(main)
