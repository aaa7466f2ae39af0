"""Normal ingest beside an attack on the API: slow clients and huge headers (issue 13, item 2).

    python3 benchmarks/attack.py [--rate 300] [--seconds 15] [--slow 1100]

Starts a redis-server of its own and the real `gateway serve` (no worker: this is about ingest)
with its open-files limit set to 1,024, soft and hard (`ulimit -n 1024`), the limit under which
1,100 half-open connections used to leave the helpdesk's next request reset. Then, twice, a helpdesk
POSTs a 500-byte webhook open-loop at `--rate` for `--seconds`: first alone (the baseline), then
while another process (this file with `--attacker`) attacks:

- `--slow` connections that each send a request head one byte a second and never finish it
  (slowloris); when the gateway closes one, it opens another at once;
- one connection after another that sends a 64 MiB header (each ends when the gateway refuses it).

Measured: the helpdesk's answer times (p50, p99, max) in both runs and their ratio, its answers
other than 202 and its send errors (there must be none), the gateway's open file descriptors at
the height of the attack, and what the attacker saw (connections opened, closed by the gateway,
408 and 431 answers). Aim: p99 under attack at most twice the baseline's, every answer a 202.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 benchmarks/attack.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    Figure,
    Outcome,
    Sent,
    cpu_seconds,
    free_port,
    gateway_env,
    harness,
    options,
    percentile,
    print_table,
    run_main,
    send_open_loop,
    start_redis,
    wait_http,
    webhook_body,
)

P99_RATIO = 2.0
CONFIG = """\
[[integrations]]
name = "bench"
target = "http://127.0.0.1:9/"
"""
BIG_HEADER = 64 * 1024 * 1024


# --- The attacker (a process of its own) --------------------------------------------------------


class Seen:
    def __init__(self) -> None:
        self.opened = self.closed_by_gateway = self.refused_connect = 0
        self.answers: dict[str, int] = {}

    def answer(self, data: bytes) -> None:
        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "none"
        self.answers[status] = self.answers.get(status, 0) + 1


async def _connect(
    port: int, seen: Seen, stop: asyncio.Event, pause_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A new connection to the gateway, tried again after `pause_s` while it is refused; None once
    the attack stops."""
    while not stop.is_set():
        try:
            connection = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            seen.refused_connect += 1
            await asyncio.sleep(pause_s)
            continue
        seen.opened += 1
        return connection
    return None


async def _slow_client(port: int, seen: Seen, stop: asyncio.Event) -> None:
    head = b"POST /hooks/bench HTTP/1.1\r\nhost: gw\r\nx-slow: " + b"a" * 100_000
    while (connection := await _connect(port, seen, stop, 0.5)) is not None:
        reader, writer = connection
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                    seen.closed_by_gateway += 1
                    seen.answer(data)
                    break
                if stop.is_set():
                    break
        except OSError:
            seen.closed_by_gateway += 1
        finally:
            writer.close()


async def _big_header(port: int, seen: Seen, stop: asyncio.Event) -> None:
    chunk = b"a" * 65536
    while (connection := await _connect(port, seen, stop, 0.2)) is not None:
        reader, writer = connection
        try:
            writer.write(b"POST /hooks/bench HTTP/1.1\r\nhost: gw\r\nx-big: ")
            for _ in range(BIG_HEADER // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            data = await asyncio.wait_for(reader.read(4096), 10)
            seen.answer(data)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
        with contextlib.suppress(OSError):
            data = await asyncio.wait_for(reader.read(4096), 1)
            if data:
                seen.answer(data)
        await asyncio.sleep(0.2)


async def attack(port: int, slow: int, out: Path) -> None:
    seen = Seen()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(_slow_client(port, seen, stop)) for _ in range(slow)]
    tasks.append(asyncio.create_task(_big_header(port, seen, stop)))
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(out.write_text, json.dumps(vars(seen)))


# --- The benchmark ------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def summary(sent: Sent) -> tuple[float, float, float]:
    times = sorted(sent.answer_ms)
    return percentile(times, 50), percentile(times, 99), times[-1] if times else float("nan")


def run(args: argparse.Namespace) -> Outcome:
    outcome = Outcome()
    with harness("gateway-bench-attack-") as h:
        server = start_redis(h)
        config = h.directory / "gateway.toml"
        config.write_text(CONFIG)
        env = gateway_env(server.url, config, "WARNING")
        port = free_port()
        serve = f"ulimit -n 1024 && exec {sys.executable} -m gateway serve --port {port}"
        gateway = h.spawn("gateway", ["sh", "-c", serve], env=env)
        wait_http(f"http://127.0.0.1:{port}/healthz", gateway, expect=200, describe=lambda: h.log("gateway"))
        url = f"http://127.0.0.1:{port}/hooks/bench"
        body = webhook_body(500)

        print("attack: baseline, no attack", file=sys.stderr, flush=True)
        alone = asyncio.run(send_open_loop(url, body, args.rate, args.seconds))
        report_file = h.directory / "attacker.json"
        attacker = h.spawn(
            "attacker",
            [
                *h.python("attack.py"),
                "--attacker",
                "--port",
                str(port),
                "--slow",
                str(args.slow),
                "--out",
                str(report_file),
            ],
        )
        time.sleep(args.ramp)
        print(f"attack: {args.slow} slow connections and 64 MiB headers", file=sys.stderr, flush=True)
        fds_before = open_fds(gateway.pid)
        cpu_before = cpu_seconds(gateway.pid), cpu_seconds(attacker.pid), time.monotonic()
        attacked = asyncio.run(send_open_loop(url, body, args.rate, args.seconds))
        fds_after = open_fds(gateway.pid)
        elapsed = time.monotonic() - cpu_before[2]
        gateway_cpu = (cpu_seconds(gateway.pid) - cpu_before[0]) / elapsed * 100
        attacker_cpu = (cpu_seconds(attacker.pid) - cpu_before[1]) / elapsed * 100
        attacker.send_signal(signal.SIGTERM)
        attacker.wait(timeout=30)
        seen = json.loads(report_file.read_text()) if report_file.exists() else {}
        if gateway.poll() is not None:
            outcome.problems.append(f"the gateway exited during the attack: {h.log('gateway')[-2000:]}")

    rows = []
    for name, sent in (("alone", alone), ("under attack", attacked)):
        p50, p99, worst = summary(sent)
        others = {s: n for s, n in sent.statuses.items() if s != 202}
        rows.append(
            [
                name,
                f"{sent.sent}",
                f"{p50:.2f}",
                f"{p99:.2f}",
                f"{worst:.1f}",
                str(others or "-"),
                str(sent.error_count),
            ]
        )
        outcome.problems += [
            f"attack, {name}: {note}" for note in sent.notes("helpdesk") if "behind" not in note
        ]
    print(f"\nattack: helpdesk POSTs at {args.rate:g}/s for {args.seconds:g} s, alone and under attack")
    print_table(
        ["run", "sent", "p50 ms", "p99 ms", "max ms", "non-202", "send errors"], rows, [False, *[True] * 6]
    )
    print(
        f"attacker: {args.slow} slow connections + 64 MiB headers; gateway fds {fds_before} -> {fds_after} "
        f"(limit 1024); CPU % of one core under attack: gateway {gateway_cpu:.0f}, attacker "
        f"{attacker_cpu:.0f}; attacker saw {seen}"
    )
    base_p99, attacked_p99 = summary(alone)[1], summary(attacked)[1]
    ratio = attacked_p99 / base_p99
    outcome.figures.append(
        Figure(
            "attack",
            f"p99 of ingest at {args.rate:g}/s under {args.slow} slow connections + 64 MiB headers",
            f"{attacked_p99:.1f} ms",
            f"alone {base_p99:.1f} ms",
            f"{ratio:.2f}",
            f"ratio <= {P99_RATIO:g}, all 202",
            ratio <= P99_RATIO and not outcome.problems,
        )
    )
    return outcome


def parser() -> argparse.ArgumentParser:
    return options(
        ("--rate", 300.0, "the helpdesk's POSTs per second"),
        ("--seconds", 15.0, "length of each run"),
        ("--slow", 1100, "slow connections of the attacker"),
        ("--ramp", 3.0, "seconds the attack runs before measuring"),
        ("--attacker", False, argparse.SUPPRESS),
        ("--port", None, argparse.SUPPRESS, {"type": int}),
        ("--out", None, argparse.SUPPRESS, {"type": Path}),
        description=__doc__,
    )


def main() -> int:
    args = parser().parse_args()
    if args.attacker:
        asyncio.run(attack(args.port, args.slow, args.out))
        return 0
    return run(args).exit_status()


if __name__ == "__main__":
    run_main(main)
