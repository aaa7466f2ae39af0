"""What both benchmarks share: free ports, child processes that are always ended, a redis-server of
the benchmark's own, wrk runs with machine-readable results, and CPU accounting.

Cleanup: every child is started through `Harness.spawn`, in its own session (so a Ctrl-C in the
terminal reaches only the benchmark, which then ends its children in order) and with a parent-death
signal (so a child never outlives a benchmark that was killed with SIGKILL). `harness()` turns
SIGTERM and SIGHUP into SystemExit, ends every child (SIGTERM, then SIGKILL after a grace period)
and removes its temporary directory, whatever way the `with` block is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, cast

import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def webhook_body(size: int = 500) -> bytes:
    """A helpdesk-like JSON webhook of exactly `size` bytes."""
    event = {
        "event": "ticket.updated",
        "id": "evt_01J9Z8Q6R4M2XK7T3B5N0C1D2E",
        "created_at": "2024-10-08T14:32:11Z",
        "ticket": {
            "id": 48213,
            "subject": "Cannot log in after password reset",
            "status": "open",
            "priority": "high",
            "requester": {"id": 9911, "email": "jane.doe@example.com", "name": "Jane Doe"},
            "tags": ["login", "password", "web"],
        },
        "note": "",
    }
    short = len(json.dumps(event, separators=(",", ":")).encode())
    if short > size:
        raise ValueError(f"a body of {size} bytes is too small for the sample event ({short} bytes)")
    event["note"] = "x" * (size - short)
    body = json.dumps(event, separators=(",", ":")).encode()
    assert len(body) == size
    return body


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" of comm: field 3 (state) is fields[0], so utime (14) and stime (15) are [11], [12].
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def run_queue_seconds(pid: int) -> float:
    """Time the threads of a process have spent runnable but waiting for a CPU (Linux schedstat):
    how much a busy machine held the process back."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def _die_with_parent(parent: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class Harness:
    """A temporary directory and every child process of one benchmark run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: list[IO[bytes]] = []

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout_to_log: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Start a child; its stderr (and stdout unless asked for) goes to `{name}.log` here."""
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        process = subprocess.Popen(
            list(args),
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log if stdout_to_log else subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self._children.append((name, process))
        return process

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def python(self, script: str) -> list[str]:
        """The command line that runs a script of this folder with this interpreter."""
        return [sys.executable, str(BENCHMARKS / script)]

    def close(self, grace_s: float = 8.0) -> None:
        """End every child still running, newest first: SIGTERM, then SIGKILL after `grace_s`."""
        running = [p for _, p in reversed(self._children) if p.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for _, process in self._children:
            if process.stdout is not None:
                process.stdout.close()
        for log in self._logs:
            log.close()
        self._children.clear()
        self._logs.clear()


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def harness(prefix: str) -> Iterator[Harness]:
    """A Harness whose children are ended and whose directory is removed when the block is left,
    also on Ctrl-C (KeyboardInterrupt), SIGTERM or SIGHUP (SystemExit) and on errors."""
    previous = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    h = Harness(directory)
    try:
        yield h
    finally:
        # A second Ctrl-C or SIGTERM during cleanup must not leave children behind: ignore them until
        # it is done.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            h.close()
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, interrupt)
            for s, handler in previous.items():
                signal.signal(s, handler)


def wait_http(
    url: str, process: subprocess.Popen[bytes], *, timeout_s: float = 20.0, expect: int | None = None,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Wait until `url` answers GET (with status `expect`, or any status); fail if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before it served {url}\n"
                               + describe())
        status: int | None = None
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError):
            status = None
        if status is not None and (expect is None or status == expect):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer{f' {expect}' if expect else ''} within {timeout_s} s "
                               f"(last status: {status})\n" + describe())
        time.sleep(0.05)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)


def start_redis(h: Harness) -> RedisServer:
    """A redis-server of the benchmark's own on a free port: no RDB snapshots, no AOF."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    data = h.directory / "redis"
    data.mkdir()
    process = h.spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                                "--save", "", "--appendonly", "no", "--protected-mode", "no"])
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}: {h.log('redis')}")
            try:
                if client.ping():
                    break
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 10 s")
            time.sleep(0.05)
    finally:
        client.close()
    return RedisServer(port, process)


# wrk: every response is counted by status in each thread; done() prints one JSON line.
_WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      merged[status] = (merged[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(merged) do
    table.insert(parts, string.format('"%%d":%%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"timeout":%%d,"p50_us":%%d,"p99_us":%%d,"mean_us":%%.1f,"statuses":{%%s}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, table.concat(parts, ",")))
end
"""


@dataclass
class GatewayStack:
    """A redis-server, the recording upstream, `gateway serve` and one `gateway worker`."""

    server: RedisServer
    client: redis.Redis
    api: str
    upstream_base: str
    token: str
    upstream: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit status) of each process of the stack that is no longer running."""
        processes = (("gateway", self.gateway), ("worker", self.worker), ("upstream", self.upstream))
        return [(name, code) for name, p in processes if (code := p.poll()) is not None]


def start_stack(h: Harness, config_text: str, upstream_port: int, log_level: str) -> GatewayStack:
    """Starts the stack with `config_text` (its integrations target the upstream on `upstream_port`)
    and returns once the API is ready and the worker polls Redis. The caller closes `client`."""
    server = start_redis(h)
    gateway_port = free_port()
    config = h.directory / "gateway.toml"
    config.write_text(config_text)
    token = secrets.token_urlsafe(24)
    api = f"http://127.0.0.1:{gateway_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(REDIS_URL=server.url, GATEWAY_CONFIG=str(config), GATEWAY_ADMIN_TOKEN=token,
               GATEWAY_LOG_LEVEL=log_level, GATEWAY_URL=api)
    upstream_base = f"http://127.0.0.1:{upstream_port}"
    upstream = h.spawn("upstream", [*h.python("_upstream.py"), "--port", str(upstream_port), "--record"])
    serve = [sys.executable, "-m", "gateway", "serve", "--port", str(gateway_port)]
    gateway = h.spawn("gateway", serve, env=env)
    worker = h.spawn("worker", [sys.executable, "-m", "gateway", "worker"], env=env)
    wait_http(f"{upstream_base}/_stats", upstream, expect=200, describe=lambda: h.log("upstream"))
    wait_http(f"{api}/readyz", gateway, expect=200, describe=lambda: h.log("gateway"))
    client = server.client()
    _wait_worker(client, worker, lambda: h.log("worker"))
    return GatewayStack(server, client, api, upstream_base, token, upstream, gateway, worker)


def _wait_worker(r: redis.Redis, worker: subprocess.Popen[bytes], describe: Callable[[], str]) -> None:
    """Until the worker's drainer polls Redis (an HMGET of the integration every 50 ms)."""
    deadline = time.monotonic() + 30
    while True:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}\n{describe()}")
        stats = cast(dict[str, dict[str, int]], r.info("commandstats"))
        if stats.get("cmdstat_hmget", {}).get("calls", 0) > 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not poll Redis within 30 s\n{describe()}")
        time.sleep(0.05)


def write_wrk_script(path: Path, body: bytes) -> Path:
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body cannot be put in a Lua long string")
    path.write_text(_WRK_LUA % {"body": text})
    return path


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    socket_errors: int  # connect + read + write + timeout
    statuses: dict[int, int]
    cpu_s: float  # CPU time wrk itself used

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def not_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    def count(self, status: int) -> int:
        return self.statuses.get(status, 0)


def run_wrk(
    h: Harness, url: str, script: Path, *, seconds: float, connections: int, threads: int
) -> WrkResult:
    """One wrk run, waited for here (its CPU time is measured from RUSAGE_CHILDREN)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian package wrk)")

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = h.spawn(
        "wrk",
        [wrk, "--latency", "-t", str(threads), "-c", str(connections), "-d", f"{max(int(seconds), 1)}s",
         "--timeout", "10s", "-s", str(script), url],
        stdout_to_log=False,
    )
    out, _ = process.communicate(timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(
            f"wrk failed with {process.returncode}: {out.decode(errors='replace')}{h.log('wrk')}"
        )
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.decode(errors='replace')}{h.log('wrk')}")
    raw = json.loads(line.removeprefix("WRK_RESULT "))
    return WrkResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        statuses={int(k): v for k, v in raw["statuses"].items()},
        cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> None:
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = zip(cells, widths, right, strict=True)
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in padded)

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
