"""The benchmark suite: every benchmark in one command, and one table where each figure stands beside
its baseline measured in the same run and its target.

    python3 -m benchmarks [--only PART,PART...] [--quick] [--write]

  PART: ingest, instructions, delivery, latency, idle, fairness, drain, proxy, attack, soak, ui, chaos

Each part starts what it needs and stops it before the next part starts: its own redis-server on a
free port (never 127.0.0.1:6379), the real `gateway serve` and `gateway worker` processes, the
upstream benchmarks/_upstream.py, and its load from another process (wrk, or an aiohttp sender in
this process, separate from the gateway's). The parts, each also runnable alone:

  ingest    benchmarks/ingest.py    accepted events/s of `gateway serve` / a bare Starlette app
  instructions benchmarks/instructions.py
                                    the API's instructions per accepted request under callgrind /
                                    the bare app's (repeatable where requests/s drift)
  delivery  benchmarks/delivery.py  delivered events/s of 1 and 2 workers / a plain aiohttp loop;
                                    Redis commands per delivered event
  latency   benchmarks/latency.py   end-to-end p50/p95/p99 at 50, 200 (20 s each) and 1000 events/s
                                    (60 s), backlog, Redis commands per delivered event
  idle      benchmarks/idle.py      Redis commands/s of one idle worker (no traffic) / the API alone;
                                    by loop (MONITOR)
  fairness  benchmarks/fairness.py  a healthy integration's latency at 50 events/s beside one whose
                                    endpoint hangs with 400 events / alone (two workers); the hanging
                                    endpoint's most requests at once
  drain     benchmarks/drain.py     drain of 100,000 held events / a serial aiohttp loop; Redis
                                    memory per held event beyond its body
  proxy     benchmarks/proxy.py     proxy mode: latency added to a GET at 100 and 500/s (15 s each)
                                    / straight to the upstream; GETs/s on a miss / a bare aiohttp
                                    proxy, on a hit / a bare Starlette app
  attack    benchmarks/attack.py    p99 of the helpdesk's POSTs at 300/s under 1,100 slow connections
                                    and 64 MiB headers / alone (the API under `ulimit -n 1024`)
  soak      benchmarks/soak.py      RSS of the API and of a worker over 10 min at 200 events/s
  ui        benchmarks/ui.py        server time of the dashboard's pages with 100,000 events / the
                                    admin API's JSON of the same data
  chaos     benchmarks/chaos.py     5 min of load on a flapping endpoint while workers, the API and
                                    Redis are SIGKILLed and restarted: acknowledged / delivered /
                                    dead, lost (must be 0), duplicates, faults injected by kind
                                    (`python3 benchmarks/chaos.py --minutes 10` alone: the long run)

The full run took about 22 minutes before chaos, which adds about 6; `--quick` (small counts,
short durations, a 1-minute soak and chaos run) takes about 4 and is a smoke test of the whole
suite, not a measurement. Each part prints its own detailed table as it ends; the suite's table
comes last, then a machine line (collected from this machine: CPU model, vCPUs, RAM, kernel,
Python, Redis and wrk versions). `--write` also puts both in benchmarks/RESULTS.md, under
"## Suite (`python3 -m benchmarks`)", replacing that section and keeping the rest of the file.

The machine's speed drifts (a shared VM), so figures are ratios against a baseline of the same run
wherever one exists, and a target that is missed is reported (MISSED), never a failure. The exit
status is 1 only when a correctness check fails (an event lost or delivered twice, an error answer,
a process that died) or a part could not run.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import (
    attack,
    chaos,
    delivery,
    drain,
    fairness,
    idle,
    ingest,
    instructions,
    latency,
    proxy,
    soak,
    ui,
)
from benchmarks._common import BENCHMARKS, Figure, Outcome, format_table, options, run_main


@dataclass(frozen=True)
class Part:
    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], Outcome]
    full: list[str]  # the part's own command-line options in a full run
    quick: list[str]  # ... and under --quick


PARTS: dict[str, Part] = {
    "ingest": Part(ingest.parser, ingest.run, [], ["--rounds", "1", "--seconds", "2", "--warmup", "1"]),
    "instructions": Part(instructions.parser, instructions.run, [], ["--requests", "200", "--warmup", "50"]),
    "delivery": Part(delivery.parser, delivery.run, ["--events", "30000"], ["--events", "2000"]),
    "latency": Part(
        latency.parser,
        latency.run,
        ["--rates", "50:20,200:20,1000:60"],
        ["--rates", "50:5,200:5,1000:5", "--grace", "20"],
    ),
    "idle": Part(
        idle.parser,
        idle.run,
        [],
        ["--api-seconds", "2", "--settle", "2", "--seconds", "5", "--monitor-seconds", "3"],
    ),
    "fairness": Part(fairness.parser, fairness.run, [], ["--seconds", "3", "--warmup", "1", "--grace", "20"]),
    "drain": Part(drain.parser, drain.run, ["--events", "100000"], ["--events", "2000"]),
    "proxy": Part(
        proxy.parser,
        proxy.run,
        [],
        ["--rate-seconds", "3", "--rounds", "1", "--seconds", "2", "--warmup", "1"],
    ),
    "attack": Part(attack.parser, attack.run, [], ["--seconds", "3", "--slow", "300", "--ramp", "1"]),
    "soak": Part(soak.parser, soak.run, ["--minutes", "10"], ["--minutes", "1"]),
    "ui": Part(ui.parser, ui.run, [], ["--events", "5000", "--requests", "30", "--warmup", "3"]),
    "chaos": Part(chaos.parser, chaos.run, ["--minutes", "5"], ["--minutes", "1", "--fault-every-s", "2"]),
}
RESULTS = BENCHMARKS / "RESULTS.md"
SECTION = "## Suite (`python3 -m benchmarks`)"


def run_part(name: str, quick: bool) -> Outcome:
    """One part with the suite's options; a part that cannot run becomes a failed check, so that
    the others still run and the table shows what was measured."""
    part = PARTS[name]
    argv = part.quick if quick else part.full
    print(f"\n=== {name}: benchmarks/{name}.py {' '.join(argv)}", file=sys.stderr, flush=True)
    try:
        return part.run(part.parser().parse_args(argv))
    except Exception as exc:  # reported, and the exit status says it
        traceback.print_exc()
        return Outcome(problems=[f"{name} could not run: {type(exc).__name__}: {exc}"])


def _command_version(args: list[str], pattern: str) -> str:
    """The version a command prints, or 'not found' (wrk -v exits 1 after printing it)."""
    if shutil.which(args[0]) is None:
        return "not found"
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=10)
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "unknown"


def machine() -> str:
    """CPU model, vCPUs, RAM, kernel and the versions that the figures depend on, read here."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    ram = f"{int(meminfo.group(1)) / 2**20:.1f} GiB RAM" if meminfo else "RAM unknown"
    redis = _command_version(["redis-server", "--version"], r"v=(\S+)")
    wrk = _command_version(["wrk", "-v"], r"wrk (?:debian/)?([0-9.]+)")
    return (
        f"{model.group(1).strip() if model else platform.processor() or 'CPU unknown'}, "
        f"{os.cpu_count()} vCPU, {ram}, Linux {platform.release()}, Python {platform.python_version()}, "
        f"Redis {redis}, wrk {wrk}"
    )


def revision() -> str:
    """The commit measured, and whether gateway/ differs from it (figures of uncommitted code)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=BENCHMARKS.parent, capture_output=True, text=True, check=False, timeout=10
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "not a git checkout"
    dirty = git("status", "--porcelain", "--", "gateway")
    return f"{head}{' + uncommitted changes to gateway/' if dirty else ''}"


def table(figures: list[Figure]) -> str:
    rows = [
        [
            f.part,
            f.measure,
            f.value,
            f.baseline,
            f.ratio,
            f.target,
            "" if f.met is None else "met" if f.met else "MISSED",
        ]
        for f in figures
    ]
    return format_table(
        ["part", "measure", "value", "baseline (same run)", "ratio", "target", "aim"],
        rows,
        [False, False, True, False, True, False, False],
    )


def summary(outcomes: dict[str, Outcome], header: str) -> str:
    """The suite's text: a header, the table, the details (Redis calls by command...), the notes and
    failed checks."""
    figures = [f for o in outcomes.values() for f in o.figures]
    lines = [header, "", table(figures) if figures else "(no figures)", ""]
    lines += [f"  {d}" for o in outcomes.values() for d in o.details]
    lines += [f"NOTE {n}" for o in outcomes.values() for n in o.notes]
    lines += [f"CHECK FAILED {p}" for o in outcomes.values() for p in o.problems]
    if not any(o.problems for o in outcomes.values()):
        lines.append("checks: every part's correctness checks passed (see each part's own report)")
    return "\n".join(lines)


def write_results(text: str, command: str, quick: bool) -> None:
    """Replaces the suite's section of RESULTS.md (or adds it before the first other section)."""
    caution = (
        "\n\nA `--quick` run: a smoke test with small counts and short durations, not a measurement."
        if quick
        else ""
    )
    section = f"{SECTION}\n\n`{command}`{caution}\n\n```\n{text}\n```\n"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    starts = [k for k, ln in enumerate(lines) if ln.startswith("## ")]
    mine = next((k for k in starts if lines[k].rstrip("\n") == SECTION), None)
    if mine is None:
        at = starts[0] if starts else len(lines)
        new = [*lines[:at], section, "\n", *lines[at:]]
    else:
        end = next((k for k in starts if k > mine), len(lines))
        new = [*lines[:mine], section, *(["\n", *lines[end:]] if end < len(lines) else [])]
    RESULTS.write_text("".join(new))


def parser() -> argparse.ArgumentParser:
    return options(
        ("--only", ",".join(PARTS), "parts to run, comma-separated (default: all)"),
        ("--quick", False, "a short smoke run of every part (~2 min)"),
        ("--write", False, "also write the table to benchmarks/RESULTS.md"),
        prog="python3 -m benchmarks",
        description=__doc__,
    )


def main() -> int:
    p = parser()
    args = p.parse_args()
    chosen = {x.strip() for x in args.only.split(",") if x.strip()}
    if not chosen or chosen - PARTS.keys():
        p.error(f"--only takes some of {', '.join(PARTS)}")
    started = time.monotonic()
    outcomes = {name: run_part(name, args.quick) for name in PARTS if name in chosen}
    command = " ".join(["python3 -m benchmarks", *sys.argv[1:]])
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"{command}: {when}, {(time.monotonic() - started) / 60:.1f} min, gateway at {revision()}\n"
        f"Machine: {machine()}"
    )
    text = summary(outcomes, header)
    print(f"\n{text}")
    if args.write:
        write_results(text, command, args.quick)
        print(f"written to {RESULTS.relative_to(BENCHMARKS.parent)}", file=sys.stderr)
    return 1 if any(o.problems for o in outcomes.values()) else 0


if __name__ == "__main__":
    run_main(main)
