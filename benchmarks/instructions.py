"""Ingest cost in instructions: the API's CPU instructions per accepted request (callgrind), beside
the bare Starlette app's, counted the same way.

    python3 benchmarks/instructions.py [--requests 2000] [--concurrency 32]

Why: wall-clock figures on a shared VM drift by up to 2x from one minute to the next, more than
the difference a change makes (RESULTS.md, "Before and after issues 11 and 13"). valgrind's
callgrind counts the instructions a process executes, which do not depend on what else the machine
is doing: the same build, inputs and concurrency give the same count within a fraction of a
per cent. The instruction ratio (the bare app's per request / the gateway's) is a repeatable
stand-in for the CPU ratio of benchmarks/ingest.py. It does not see cache misses or system time
(the kernel's side of a socket write), so it is not a throughput figure.

Runs, one after the other: the bare app (benchmarks/_hello.py), `gateway serve` with the
Authorization header sealed (GATEWAY_SECRET_KEY set, as in production) and `gateway serve` with
`store_credentials = "plain"`, each under `valgrind --tool=callgrind --instr-atstart=no` against a
redis-server of the benchmark's own. A client in this process posts the 500-byte webhook with an
`Authorization` header (as benchmarks/ingest.py does): `--warmup` requests uncounted, then counting
is switched on with `callgrind_control -i on`, exactly `--requests` are posted over
`--concurrency` keep-alive connections, and counting is switched off. Every answer must be 202,
and Redis must hold an event for each of the gateway's.

Needs valgrind (Debian package valgrind). About 3 minutes: under valgrind each server runs some
50 times slower, so the server, not the client, sets the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

if __package__ in (None, ""):  # run as `python3 benchmarks/instructions.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from benchmarks._common import (
    BODY_BYTES,
    Figure,
    Harness,
    Outcome,
    free_port,
    harness,
    options,
    print_table,
    run_main,
    state_key,
    wait_http,
    webhook_body,
)
from benchmarks.ingest import CREDENTIAL, servers

RATIO = 0.70  # the ingest aim, read here as the bare app's instructions per request over the gateway's


@dataclass
class Count:
    name: str
    instructions: int
    requests: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


async def _post(url: str, body: bytes, count: int, concurrency: int) -> dict[int, int]:
    """Posts exactly `count` webhooks over `concurrency` connections; statuses -> counts."""
    statuses: dict[int, int] = {}
    left = count
    headers = {"Content-Type": "application/json", **CREDENTIAL}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one_connection() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    return statuses


def _total(out: Path) -> int:
    """The instructions callgrind counted (the largest `totals:`/`summary:` line of its files)."""
    total = 0
    for path in out.parent.glob(out.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total


def count(
    h: Harness, name: str, server: list[str], env: dict[str, str] | None, args: argparse.Namespace
) -> tuple[Count, list[str]]:
    """Runs `server` (a command that takes --port) under callgrind and counts `args.requests`."""
    port = free_port()
    out = h.directory / f"{name}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    process = h.spawn(name, [*valgrind, *server, "--port", str(port)], env=env)
    wait_http(f"http://127.0.0.1:{port}/healthz", process, timeout_s=300, describe=lambda: h.log(name))
    url = f"http://127.0.0.1:{port}/hooks/bench"
    body = webhook_body(args.body_bytes)
    problems: list[str] = []
    warm = asyncio.run(_post(url, body, args.warmup, args.concurrency))
    control = ["callgrind_control", "-i"]
    subprocess.run([*control, "on", str(process.pid)], check=True, capture_output=True)
    statuses = asyncio.run(_post(url, body, args.requests, args.concurrency))
    subprocess.run([*control, "off", str(process.pid)], check=True, capture_output=True)
    process.send_signal(signal.SIGINT)  # uvicorn stops; valgrind then writes its file
    process.wait(timeout=300)
    for phase, got in (("warm-up", warm), ("counted", statuses)):
        if set(got) != {202}:
            problems.append(f"{name} {phase}: answers other than 202: {got}")
    result = Count(name, _total(out), args.requests)
    print(f"  {name:<14} {result.per_request:12,.0f} instructions/request", file=sys.stderr, flush=True)
    return result, problems


def parser() -> argparse.ArgumentParser:
    return options(
        ("--requests", 2000, "requests counted per server"),
        ("--warmup", 300, "requests before counting starts"),
        ("--concurrency", 32, "connections the client keeps busy"),
        BODY_BYTES,
        description=__doc__,
    )


def run(args: argparse.Namespace) -> Outcome:
    outcome = Outcome()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        outcome.problems.append("valgrind is not installed (Debian package valgrind)")
        return outcome
    with harness("gateway-bench-instructions-") as h:
        server, env, plain_env = servers(h)
        serve = [sys.executable, "-m", "gateway", "serve"]
        runs = [
            ("hello-world", h.python("_hello.py"), None),
            ("gateway", serve, env),
            ("gateway-plain", serve, plain_env),
        ]
        counts: list[Count] = []
        r = server.client()
        for name, command, run_env in runs:
            r.flushdb()
            result, problems = count(h, name, command, run_env, args)
            counts.append(result)
            outcome.problems += problems
            if run_env is not None:
                stored = cast(int, r.zcard(state_key("pending")))
                if stored != args.warmup + args.requests:
                    outcome.problems.append(
                        f"{name}: {stored} events in Redis for {args.warmup + args.requests} answers 202"
                    )
    base = counts[0].per_request
    rows = [[c.name, f"{c.per_request:,.0f}", f"{base / c.per_request:.2f}", f"{c.requests}"] for c in counts]
    print(
        f"\ninstructions: POST {args.body_bytes}-byte JSON, {args.requests} counted over "
        f"{args.concurrency} connections, under callgrind"
    )
    print_table(["target", "instructions/request", "ratio", "requests"], rows, [False, True, True, True])
    print("ratio: hello-world's instructions per request / this one's")
    for c in counts[1:]:
        ratio = base / c.per_request
        sealed = "sealed" if c.name == "gateway" else "in clear"
        outcome.figures.append(
            Figure(
                "instructions",
                f"ingest instructions/request, credentials {sealed}",
                f"{c.per_request:,.0f}",
                f"{base:,.0f}",
                f"{ratio:.2f}",
                f">= {RATIO:.2f}",
                ratio >= RATIO,
            )
        )
    return outcome


def main() -> int:
    return run(parser().parse_args()).exit_status()


if __name__ == "__main__":
    run_main(main)
