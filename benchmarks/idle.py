"""Redis commands of an idle worker: the stack with one worker and no traffic at all.

    python3 benchmarks/idle.py [--settle 5] [--seconds 20] [--api-seconds 10] [--monitor-seconds 10]

Starts everything it needs: a redis-server of its own on a free port (no snapshots, no AOF), the
upstream (benchmarks/_upstream.py --record, never called here), the real `python3 -m gateway serve`
with the benchmarks' config (one integration, "bench", everything else at the gateway's defaults)
and, later, ONE `python3 -m gateway worker`.

1. The API alone, no worker: CONFIG RESETSTAT, `--api-seconds` of nothing, then INFO commandstats:
   the API's own idle commands per second, the baseline.
2. Then one worker is started; once its heartbeat is in Redis it is left `--settle` s (its start-up
   work, arq's first cron run, the first idle waits), then CONFIG RESETSTAT, `--seconds` of nothing,
   INFO commandstats: every client's commands per second (the API's and the worker's), by command.
   The worker's share is that total less the API's rate of step 1. Redis counts the commands a Lua
   script runs besides the EVALSHA itself, so this is Redis's work, not round trips; this
   benchmark's own calls (the RESETSTAT and the INFO) are taken out. Aim: 5 commands/s or fewer.
3. Which loop costs what: MONITOR for `--monitor-seconds` (after the count, so that it does not
   weigh on it). Each command is put down to its process (the client's port, looked up among the
   sockets of the API and the worker in /proc) and to the loop that sends it, by command and key:
   the pump (CLAIM_DUE, whose commands run inside the script, and the BLPOP on the bell), the
   drainer (SCARD of the integrations that need it, the ATTENTION script when there are any), the
   replay runner (SMEMBERS of the running replays), the reconciler (expired leases), the
   heartbeat, arq (its queue, its cron job, its health check). A command inside a script belongs
   to the EVALSHA before it (MONITOR lists a script's commands right after its call).

Exit status 1 only when a process of the stack exits during the run.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 benchmarks/idle.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from benchmarks._common import (
    KEY_PREFIX,
    LOG_LEVEL,
    CountingRedis,
    Figure,
    Outcome,
    free_port,
    gateway_config,
    harness,
    logged_warnings,
    options,
    print_table,
    run_main,
    start_stack,
    start_workers,
)

AIM = 5.0  # Redis commands per second of an idle worker, at most
RETENTION = "arq: retention cron job (every [retention] every_s, 60 s: enqueue, run, TRIM scripts)"


@dataclass
class Monitored:
    """What MONITOR saw: commands (a script's own included) and calls (round trips' commands, a
    script counting once), per (process, loop, command)."""

    seconds: float
    commands: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)  # (process, loop)


@dataclass
class Idle:
    api_seconds: float
    api_by_command: dict[str, int]
    seconds: float
    by_command: dict[str, int]  # every client's, with the worker running
    monitored: Monitored

    @property
    def api_rate(self) -> float:
        return sum(self.api_by_command.values()) / self.api_seconds

    @property
    def total_rate(self) -> float:
        return sum(self.by_command.values()) / self.seconds

    @property
    def worker_rate(self) -> float:
        return max(self.total_rate - self.api_rate, 0.0)


def count(r: redis.Redis, seconds: float) -> tuple[dict[str, int], float]:
    """Every client's commands over `seconds` of nothing (this benchmark's own taken out)."""
    mine = CountingRedis(r)
    mine.reset_stats()
    started = time.monotonic()
    time.sleep(seconds)
    by_command = mine.others()
    return by_command, time.monotonic() - started


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out


def port_owners(pids: dict[str, int]) -> dict[int, str]:
    """Local TCP port -> the name of the process (among `pids`) whose socket it is."""
    by_inode = {inode: name for name, pid in pids.items() for inode in _socket_inodes(pid)}
    owners = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                inode = int(cols[9])
                if inode in by_inode:
                    owners[int(cols[1].rsplit(":", 1)[1], 16)] = by_inode[inode]
    return owners


def loop_of(command: str, args: list[str], script: str | None) -> str:
    """The worker's or API's loop that sends this command (`script`: the first key a script touched,
    for the commands inside one)."""
    key = args[0] if args else ""
    p = KEY_PREFIX
    if command in ("evalsha", "eval") or script is not None:
        if script == f"{p}:ready":
            return "pump: CLAIM_DUE script"
        if script == f"{p}:attention":
            return "drainer (every 1 s)"
        if script is not None and script.startswith(f"{p}:st:") and script.endswith(("delivered", "dead")):
            return RETENTION
        return f"script ({script})"
    if command == "blpop" and key == f"{p}:bell":
        return "pump: BLPOP on the bell"
    if key == f"{p}:attention":
        return "drainer (every 1 s)"
    if key == f"{p}:replays":
        return "replay runner (every 2 s)"
    if key == f"{p}:lease":
        return "reconciler (every reconcile_interval_s, 1 s)"
    if key == f"{p}:workers":
        return "heartbeat (every 2 s)"
    if command == "zrangebyscore" and key == f"{p}:queue":
        return "arq: queue poll (every poll_delay, 2 s)"
    # arq's job transactions (the gateway's idle loops pipeline without MULTI)
    if key.startswith(("arq:", f"{p}:queue")) or command in ("multi", "exec", "watch"):
        return RETENTION
    return f"other ({command} {key})"


_LINE = re.compile(r"^[\d.]+ \[\d+ ([^\]]+)\] (.*)$")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


def monitor(port: int, seconds: float, pids: dict[str, int]) -> Monitored:
    """MONITOR for `seconds`; each command put down to its process (of `pids`; "other" for any other
    client) and loop."""
    out = Monitored(seconds)
    owners = port_owners(pids)

    def owner(client_port: int) -> str:
        if client_port not in owners:  # a connection opened since: look again, once
            owners.update(port_owners(pids))
            owners.setdefault(client_port, "other")
        return owners[client_port]

    # an idle worker may be silent for seconds (its heartbeat comes every 2 s): a read that times out
    # makes redis-py drop the connection, so the timeout is longer than any silence
    r = redis.Redis(port=port, socket_timeout=10)
    # the commands inside a script come right after its EVALSHA: they are held until the next call
    group: list[tuple[str, list[str]]] = []
    caller = ""

    def close_group() -> None:
        if not group:
            return
        first_key = next((a[0] for c, a in group[1:] if a), None)
        loop = loop_of(group[0][0], group[0][1], first_key if len(group) > 1 else None)
        out.calls[(caller, loop)] += 1
        for command, _ in group:
            out.commands[(caller, loop, command)] += 1
        group.clear()

    connection = r.connection_pool.get_connection()
    try:
        connection.send_command("MONITOR")
        connection.read_response()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                raw = connection.read_response()
            except redis.TimeoutError:
                break
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            found = _LINE.match(text)
            if found is None:
                continue
            client, rest = found.groups()
            parts = [a.replace('\\"', '"') for a in _ARG.findall(rest)]
            if not parts:
                continue
            command, args = parts[0].lower(), parts[1:]
            if client == "lua":
                group.append((command, args))
                continue
            close_group()
            port_text = client.rsplit(":", 1)[-1]
            caller = owner(int(port_text)) if port_text.isdigit() else client
            group.append((command, args))
        close_group()
    finally:
        connection.disconnect()
        r.close()
    return out


def measure(args: argparse.Namespace, outcome: Outcome) -> Idle:
    with harness("gateway-bench-idle-") as h:
        upstream_port = free_port()
        stack = start_stack(h, gateway_config(upstream_port), upstream_port, args.log_level, workers=0)
        try:
            print(f"idle: the API alone for {args.api_seconds:g} s...", file=sys.stderr, flush=True)
            api_by_command, api_seconds = count(stack.client, args.api_seconds)
            start_workers(h, stack, 1)
            print(
                f"idle: one worker, settling {args.settle:g} s, then counting {args.seconds:g} s...",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(args.settle)
            by_command, seconds = count(stack.client, args.seconds)
            pids = {"api": stack.gateway.pid, "worker": stack.worker.pid}
            print(f"idle: MONITOR for {args.monitor_seconds:g} s...", file=sys.stderr, flush=True)
            monitored = monitor(stack.server.port, args.monitor_seconds, pids)
        finally:
            stack.client.close()
        for name, code in stack.exited():
            outcome.problems.append(f"idle: {name} exited with {code}: {h.log(name)[-2000:]}")
        warnings = logged_warnings(h.log("worker"))
        if warnings:
            outcome.notes.append(f"idle: the worker logged {len(warnings)} warnings, e.g. {warnings[:2]}")
    return Idle(api_seconds, api_by_command, seconds, by_command, monitored)


def _rates(by_command: dict[str, int], seconds: float) -> str:
    ranked = sorted(by_command.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {n / seconds:.1f}" for name, n in ranked) or "none"


def loops(m: Monitored) -> list[tuple[str, str, float, float, str]]:
    """(process, loop, commands/s, calls/s, commands/s by command), the costliest first."""
    by_loop: dict[tuple[str, str], Counter[str]] = {}
    for (process, loop, command), n in m.commands.items():
        by_loop.setdefault((process, loop), Counter())[command] += n
    rows = []
    for (process, loop), commands in by_loop.items():
        detail = ", ".join(f"{c} {n / m.seconds:.1f}" for c, n in commands.most_common())
        rows.append(
            (process, loop, sum(commands.values()) / m.seconds, m.calls[(process, loop)] / m.seconds, detail)
        )
    return sorted(rows, key=lambda row: -row[2])


def report(one: Idle) -> None:
    print(
        "\nidle: one `gateway worker` and `gateway serve`, no traffic; Redis commands per second "
        "(INFO commandstats, every client, the commands inside scripts included)"
    )
    print_table(
        ["window", "seconds", "commands/s", "by command (per s)"],
        [
            [
                "API alone, no worker",
                f"{one.api_seconds:.1f}",
                f"{one.api_rate:.1f}",
                _rates(one.api_by_command, one.api_seconds),
            ],
            [
                "API + 1 worker",
                f"{one.seconds:.1f}",
                f"{one.total_rate:.1f}",
                _rates(one.by_command, one.seconds),
            ],
            ["the worker's share", "", f"{one.worker_rate:.1f}", f"aim <= {AIM:g}"],
        ],
        [False, True, True, False],
    )
    print(
        f"\nby loop (MONITOR, {one.monitored.seconds:g} s after the count; a script's commands with its call)"
    )
    print_table(
        ["process", "loop", "commands/s", "calls/s", "commands/s by command"],
        [[p, loop, f"{c:.1f}", f"{k:.1f}", d] for p, loop, c, k, d in loops(one.monitored)],
        [False, False, True, True, False],
    )


def run(args: argparse.Namespace) -> Outcome:
    outcome = Outcome()
    one = measure(args, outcome)
    report(one)
    outcome.figures.append(
        Figure(
            "idle",
            "1 worker, no traffic: Redis commands/s (the worker's; API + worker)",
            f"{one.worker_rate:.1f} ({one.total_rate:.1f})",
            f"API alone, no worker: {one.api_rate:.1f}/s",
            "-",
            f"<= {AIM:g}",
            one.worker_rate <= AIM,
        )
    )
    outcome.details.append(
        "idle, 1 worker: Redis commands/s by command (API + worker): " + _rates(one.by_command, one.seconds)
    )
    outcome.details += [
        f"idle, by loop: {p} {loop}: {c:.1f} commands/s ({k:.1f} calls/s): {d}"
        for p, loop, c, k, d in loops(one.monitored)
    ]
    return outcome


def parser() -> argparse.ArgumentParser:
    return options(
        ("--api-seconds", 10.0, "count the API alone this long"),
        ("--settle", 5.0, "after the worker is up, wait this long"),
        ("--seconds", 20.0, "then count every client's commands this long"),
        ("--monitor-seconds", 10.0, "then MONITOR this long (the loops)"),
        LOG_LEVEL,
        description=__doc__,
    )


def main() -> int:
    p = parser()
    args = p.parse_args()
    if min(args.api_seconds, args.seconds, args.monitor_seconds) <= 0 or args.settle < 0:
        p.error("the durations must be positive")
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
