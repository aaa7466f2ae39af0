"""What the benchmarks share: free ports, child processes that are always ended, a redis-server of
the benchmark's own, the gateway stack, wrk runs with machine-readable results, an open-loop sender,
Redis command counts, CPU and memory accounting, and the `Figure` rows of the suite's table
(`python3 -m benchmarks`).

Cleanup: every child is started through `Harness.spawn`, in its own session (so a Ctrl-C in the
terminal reaches only the benchmark, which then ends its children in order) and with a parent-death
signal (so a child never outlives a benchmark that was killed with SIGKILL). `harness()` turns
SIGTERM and SIGHUP into SystemExit, ends every child (SIGTERM, then SIGKILL after a grace period)
and removes its temporary directory, whatever way the `with` block is left.
"""

from __future__ import annotations

import argparse
import asyncio
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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Self, cast

import aiohttp
import redis
from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
KEY_PREFIX = "gw"  # the gateway's default; GATEWAY_KEY_PREFIX is removed from its environment
INTEGRATION = "bench"  # the one integration of the benchmarks' configs
WORKERS_KEY = f"{KEY_PREFIX}:workers"  # worker id -> last heartbeat ms
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
    return padded_json(event, size, "a body", "event")


def padded_json(sample: dict[str, Any], size: int, what: str, sample_name: str) -> bytes:
    """`sample` as compact JSON of exactly `size` bytes, its "note" filled with x; a ValueError when
    the sample alone is longer ("`what` of `size` bytes is too small for the sample `sample_name`")."""
    short = len(json.dumps(sample, separators=(",", ":")).encode())
    if short > size:
        raise ValueError(f"{what} of {size} bytes is too small for the sample {sample_name} ({short} bytes)")
    sample["note"] = "x" * (size - short)
    body = json.dumps(sample, separators=(",", ":")).encode()
    assert len(body) == size
    return body


async def post_like_a_worker(
    session: aiohttp.ClientSession, url: str, body: bytes, webhook_id: str, failures: list[str]
) -> bool:
    """One POST with the headers a worker's delivery carries, as the plain aiohttp baselines send
    it; True on a 200, else the failure is noted in `failures` (the first five)."""
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(time.time())),
    }
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            if response.status == 200:
                return True
            if len(failures) < 5:
                failures.append(f"HTTP {response.status}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if len(failures) < 5:
            failures.append(f"{type(exc).__name__}: {exc}")
    return False


def gateway_env(redis_url: str, config: Path, log_level: str, **extra: str) -> dict[str, str]:
    """The environment of the gateway's processes: this one's, less any GATEWAY_ setting of the
    shell, plus Redis, the config, a fresh secret key (credential headers sealed, as in production)
    and an admin token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        REDIS_URL=redis_url,
        GATEWAY_CONFIG=str(config),
        GATEWAY_LOG_LEVEL=log_level,
        GATEWAY_ADMIN_TOKEN="bench",
        GATEWAY_SECRET_KEY=secrets.token_urlsafe(32),
    )
    env.update(extra)
    return env


Option = tuple[str, Any, str | None] | tuple[str, Any, str | None, dict[str, Any]]
"""One command-line option of `options`: (flag, default, help), plus add_argument's other keywords
(type, metavar...) where the default does not say them."""

BODY_BYTES: Option = ("--body-bytes", 500, None)
LOG_LEVEL: Option = ("--log-level", "INFO", "GATEWAY_LOG_LEVEL of the gateway processes")
GRACE: Option = ("--grace", 30.0, "after the sending, wait this long without progress for deliveries")


def options(*specs: Option, description: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser: the options in order, `description` (its module docstring) as written
    above them. An int or float default gives the option its type; a bool default makes a flag
    (False: set by --x; True: turned off by --no-x)."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, default, help_text, *more in specs:
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif isinstance(default, int | float):
            kwargs["type"] = type(default)
        for extra in more:
            kwargs.update(extra)
        p.add_argument(flag, **kwargs)
    return p


def gateway_options(*, grace: bool = False) -> tuple[Option, ...]:
    """The options of every benchmark that runs the gateway: the webhook's size, the gateway's log
    level and, for those that wait for deliveries after sending, how long without progress."""
    return (BODY_BYTES, GRACE, LOG_LEVEL) if grace else (BODY_BYTES, LOG_LEVEL)


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
    url: str,
    process: subprocess.Popen[bytes],
    *,
    timeout_s: float = 20.0,
    expect: int | None = None,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Wait until `url` answers GET (with status `expect`, or any status); fail if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args!r} exited with {process.returncode} before it served {url}\n" + describe()
            )
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
            raise RuntimeError(
                f"{url} did not answer{f' {expect}' if expect else ''} within {timeout_s} s "
                f"(last status: {status})\n" + describe()
            )
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
    process = h.spawn(
        "redis",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    )
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


# wrk: every response is counted by status in each thread, and, when asked, the answers whose body is
# not the expected one and the answers by the value of one header; done() prints one JSON line.
_WRK_LUA = """
wrk.method = "%(method)s"
%(request_body)s
local expected = %(expected)s
local header = %(header)s
local path, cycle, counter = %(path)s, %(cycle)d, -1

if path ~= nil then
  function request()
    counter = (counter + 1) %% cycle
    return wrk.format(nil, (string.gsub(path, "{n}", tostring(counter))))
  end
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  mismatched = 0
  seen = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if expected ~= nil and body ~= expected then
    mismatched = mismatched + 1
  end
  if header ~= nil then
    local value = "(none)"
    for name, v in pairs(headers) do
      if string.lower(name) == header then
        value = string.gsub(v, '[^%%w%%-_.:/ ]', '?')
        break
      end
    end
    seen[value] = (seen[value] or 0) + 1
  end
end

local function merge(name)
  local merged = {}
  for _, thread in ipairs(threads) do
    for k, n in pairs(thread:get(name)) do
      merged[k] = (merged[k] or 0) + n
    end
  end
  return merged
end

function done(summary, latency, requests)
  local parts, values, wrong = {}, {}, 0
  for status, n in pairs(merge("statuses")) do
    table.insert(parts, string.format('"%%d":%%d', status, n))
  end
  for value, n in pairs(merge("seen")) do
    table.insert(values, string.format('"%%s":%%d', value, n))
  end
  for _, thread in ipairs(threads) do
    wrong = wrong + thread:get("mismatched")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"timeout":%%d,"p50_us":%%d,"p99_us":%%d,"mean_us":%%.1f,"statuses":{%%s},' ..
    '"mismatched":%%d,"seen":{%%s}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, table.concat(parts, ","),
    wrong, table.concat(values, ",")))
end
"""


@dataclass
class GatewayStack:
    """A redis-server, the recording upstream, `gateway serve` and the `gateway worker`s started."""

    server: RedisServer
    client: redis.Redis
    api: str
    upstream_base: str
    token: str
    env: dict[str, str]  # of the gateway processes: workers started later get the same
    upstream: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def worker(self) -> subprocess.Popen[bytes]:
        """The first worker (the benchmarks that run one)."""
        return self.workers[0]

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit status) of each process of the stack that is no longer running."""
        processes = [("gateway", self.gateway), ("upstream", self.upstream)]
        processes += [(worker_name(n), w) for n, w in enumerate(self.workers)]
        return [(name, code) for name, p in processes if (code := p.poll()) is not None]


def gateway_config(
    upstream_port: int, *, drain_rate_per_s: int | None = None, concurrency: int | None = None
) -> str:
    """The benchmarks' config: one integration, INTEGRATION, delivering to the local upstream
    (loopback allowed by the SSRF guard); everything not given at the gateway's defaults."""
    text = """\
[gateway]
max_body_bytes = 1048576
allowed_networks = ["127.0.0.0/8"]
"""
    if concurrency is not None:
        text += f"\n[worker]\nconcurrency = {concurrency}\n"
    text += f"""
[[integrations]]
name = "{INTEGRATION}"
target = "http://127.0.0.1:{upstream_port}/hook"
"""
    if drain_rate_per_s is not None:
        text += f"drain_rate_per_s = {drain_rate_per_s}\n"
    return text


def start_stack(
    h: Harness,
    config_text: str,
    upstream_port: int,
    log_level: str,
    *,
    workers: int = 1,
    upstream_args: Sequence[str] = (),
) -> GatewayStack:
    """Starts the stack with `config_text` (its integrations target the upstream on `upstream_port`,
    started with `--record` and `upstream_args`) and returns once the API is up and, when `workers`
    > 0, ready (/readyz wants a worker's heartbeat). The caller closes `client`."""
    server = start_redis(h)
    gateway_port = free_port()
    config = h.directory / "gateway.toml"
    config.write_text(config_text)
    token = secrets.token_urlsafe(24)
    api = f"http://127.0.0.1:{gateway_port}"
    env = gateway_env(server.url, config, log_level, GATEWAY_ADMIN_TOKEN=token, GATEWAY_URL=api)
    upstream_base = f"http://127.0.0.1:{upstream_port}"
    upstream = h.spawn(
        "upstream", [*h.python("_upstream.py"), "--port", str(upstream_port), "--record", *upstream_args]
    )
    serve = [sys.executable, "-m", "gateway", "serve", "--port", str(gateway_port)]
    gateway = h.spawn("gateway", serve, env=env)
    stack = GatewayStack(server, server.client(), api, upstream_base, token, env, upstream, gateway)
    try:
        wait_http(f"{upstream_base}/_stats", upstream, expect=200, describe=lambda: h.log("upstream"))
        wait_http(f"{api}/healthz", gateway, expect=200, describe=lambda: h.log("gateway"))
        if workers:
            start_workers(h, stack, workers)
            wait_http(f"{api}/readyz", gateway, expect=200, describe=lambda: h.log("gateway"))
    except BaseException:
        stack.client.close()
        raise
    return stack


def worker_name(n: int) -> str:
    """The log name of the n-th worker started (from 0): worker, worker2, worker3..."""
    return "worker" if n == 0 else f"worker{n + 1}"


def start_workers(h: Harness, stack: GatewayStack, count: int, *, wait: bool = True) -> None:
    """Starts `count` more `gateway worker` processes; with `wait`, returns once a worker's
    heartbeat is in Redis (the worker is up and talks to Redis)."""
    for _ in range(count):
        name = worker_name(len(stack.workers))
        stack.workers.append(h.spawn(name, [sys.executable, "-m", "gateway", "worker"], env=stack.env))
    if wait:
        _wait_worker(stack.client, stack.workers, lambda: h.log("worker"))


def _wait_worker(
    r: redis.Redis, workers: Sequence[subprocess.Popen[bytes]], describe: Callable[[], str]
) -> None:
    """Until the heartbeat zset has a member. The worker's other Redis traffic is its own business
    (it changes with its internals); the heartbeat is part of the gateway's contract (/readyz)."""
    deadline = time.monotonic() + 30
    while True:
        for worker in workers:
            if worker.poll() is not None:
                raise RuntimeError(f"a worker exited with {worker.returncode}\n{describe()}")
        if int(cast(int, r.zcard(WORKERS_KEY))) > 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no worker heartbeat in {WORKERS_KEY} within 30 s\n{describe()}")
        time.sleep(0.05)


def _lua_long_string(data: bytes) -> str:
    text = data.decode()
    if "]==]" in text:
        raise ValueError("the text cannot be put in a Lua long string")
    return f"[==[{text}]==]"


def write_wrk_script(
    path: Path,
    body: bytes | None,
    *,
    method: str = "POST",
    expect_body: bytes | None = None,
    count_header: str | None = None,
    request_path: str | None = None,
    cycle: int = 1,
    headers: dict[str, str] | None = None,
) -> Path:
    """The script of `run_wrk`: `method` requests to the URL given to wrk, with `body` as JSON when
    one is given (a GET has none). With `request_path`, to that path instead, where "{n}" stands for
    a counter that runs through 0 .. `cycle` - 1 over and over (so that requests in flight together
    differ). With `expect_body`, the answers whose body differs are counted (WrkResult.mismatched);
    with `count_header`, the answers by that header's value (WrkResult.seen, "(none)" when absent).
    `headers` are sent with every request."""
    if cycle < 1:
        raise ValueError("cycle must be at least 1")
    request_body = "".join(
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in (headers or {}).items()
    )
    if body is not None:
        request_body += (
            f'wrk.body = {_lua_long_string(body)}\nwrk.headers["Content-Type"] = "application/json"'
        )
    path.write_text(
        _WRK_LUA
        % {
            "method": method,
            "request_body": request_body,
            "expected": "nil" if expect_body is None else _lua_long_string(expect_body),
            "header": "nil" if count_header is None else json.dumps(count_header.lower()),
            "path": "nil" if request_path is None else json.dumps(request_path),
            "cycle": cycle,
        }
    )
    return path


def other_answers(what: str, statuses: dict[int, int], expected: int) -> list[str]:
    """A problem line for the answers (status -> count) other than the `expected` status, if any."""
    others = {s: n for s, n in statuses.items() if s != expected}
    return [f"{what}: answers other than {expected}: {others}"] if others else []


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    socket_errors: int  # connect + read + write + timeout
    statuses: dict[int, int]
    cpu_s: float  # CPU time wrk itself used
    mismatched: int = 0  # answers whose body was not the expected one (write_wrk_script's expect_body)
    seen: dict[str, int] = field(default_factory=dict)  # value of the counted header -> answers

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
        [
            wrk,
            "--latency",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(int(seconds), 1)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
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
        mismatched=int(raw.get("mismatched", 0)),
        seen={str(k): int(v) for k, v in raw.get("seen", {}).items()},
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell (right-aligned where `right`), a rule under the headers."""
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = zip(cells, widths, right, strict=True)
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in padded).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> None:
    print(format_table(headers, rows, right))


# --- Redis keys the benchmarks read: the state indexes, part of the gateway's admin contract -------

STATES = ("held", "in_flight", "pending", "retrying", "delivered", "dead")


def state_key(state: str, integration: str = INTEGRATION) -> str:
    """The state index zset of `integration` (event id -> received ms)."""
    return f"{KEY_PREFIX}:st:{integration}:{state}"


class CountingRedis:
    """A Redis client whose own commands are counted, so that they can be taken out of INFO
    commandstats: what is left is the gateway's work (Redis counts the commands a Lua script runs
    too, so this is Redis's work, not round trips)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.own: dict[str, int] = {}

    def _count(self, command: str, n: int = 1) -> None:
        self.own[command] = self.own.get(command, 0) + n

    def reset_stats(self) -> None:
        """CONFIG RESETSTAT; Redis counts that call itself in the fresh stats."""
        self.r.config_resetstat()
        self.own = {"config|resetstat": 1}

    def zcards(self, *keys: str) -> list[int]:
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(key)
        self._count("zcard", len(keys))
        return [int(cast(int, x)) for x in pipe.execute()]

    def states(self) -> dict[str, int]:
        """ZCARD of every state index of INTEGRATION."""
        return dict(zip(STATES, self.zcards(*(state_key(s) for s in STATES)), strict=True))

    def others(self) -> dict[str, int]:
        """Calls per command since the last reset_stats, this client's own taken out (the INFO
        that reads them is counted by Redis only after it has answered)."""
        stats = cast(dict[str, dict[str, Any]], self.r.info("commandstats"))
        calls = {name.removeprefix("cmdstat_"): int(s.get("calls", 0)) for name, s in stats.items()}
        for command, n in self.own.items():
            calls[command] = calls.get(command, 0) - n
        self._count("info")
        return {name: n for name, n in calls.items() if n > 0}


def wait_count(
    read: Callable[[], int],
    want: int,
    quiet_s: float,
    *,
    poll_s: float = 0.05,
    on_count: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """Polls `read()` until it reaches `want` or has not moved for `quiet_s`; returns (the last count,
    time.monotonic() of its last change). How the benchmarks wait for deliveries: a deadline would
    fail a slow but progressing gateway, and no deadline would hang on a stuck one."""
    last, changed = -1, time.monotonic()
    while True:
        count = read()
        now = time.monotonic()
        if on_count is not None:
            on_count(count)
        if count != last:
            last, changed = count, now
        if count >= want or now - changed > quiet_s:
            return count, changed
        time.sleep(poll_s)


def per_event_text(by_command: dict[str, int], events: int, top: int = 6) -> str:
    """'zadd 3.0, hset 2.0, ...': the most called commands, in calls per event."""
    ranked = sorted(by_command.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {n / max(events, 1):.1f}" for name, n in ranked)


# Warnings a benchmark causes on purpose: its Redis keeps nothing on disk (start_redis), and the
# gateway says so at start-up, as it should in production.
EXPECTED_WARNINGS = ("Redis keeps nothing on disk",)


def logged_warnings(log: str) -> list[str]:
    """The warning and error lines of a gateway log, in either format (JSON, the default, says
    "level":"warning"; console says WARNING), and any traceback; EXPECTED_WARNINGS left out."""
    return [
        ln
        for ln in log.splitlines()
        if not any(expected in ln for expected in EXPECTED_WARNINGS)
        and any(
            mark in ln
            for mark in (
                '"level":"warning"',
                '"level":"error"',
                '"level":"critical"',
                " WARNING ",
                " ERROR ",
                " CRITICAL ",
                "Traceback",
            )
        )
    ]


# --- An aiohttp app served in a thread of this process ----------------------------------------------


class ServedInThread:
    """An aiohttp app on a loopback port, served by an event loop in a thread of its own: the tests'
    upstream, the fake helpdesk API, the chaos run's flapping endpoint. Subclasses give `app()`;
    `port` 0 takes a free one."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    def stop(self) -> None:
        if self._loop.is_closed():  # stopped already (e.g. a test took the endpoint down)
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        # Handlers still waiting (a reply that hangs) would be destroyed pending with the loop.
        asyncio.run_coroutine_threadsafe(_cancel_others(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- The recording upstream (benchmarks/_upstream.py --record) ---------------------------------------


@dataclass(frozen=True)
class UpstreamStats:
    requests: int  # requests answered so far (its /_stats requests not included)
    recorded: int  # webhook-ids kept so far
    ids: list[str]  # those from the asked index on, in arrival order
    times: list[float]  # their arrival times, time.time()


def upstream_stats(base: str, start: int = 1 << 62) -> UpstreamStats:
    """What the upstream got from its `start`-th webhook-id on (by default: the counts only)."""
    with urllib.request.urlopen(f"{base}/_stats?from={start}", timeout=60) as response:
        raw = json.loads(response.read())
    return UpstreamStats(
        int(raw["requests"]),
        int(raw["recorded"]),
        [str(i) for i in raw["ids"]],
        [float(t) for t in raw["times"]],
    )


# --- Exactly N POSTs with wrk ------------------------------------------------------------------------

# One wrk thread sends exactly `limit` POSTs, then only GET /healthz (which stores nothing) until
# every POST is answered; then it stops, and writes `done_path` so that the benchmark ends wrk (whose
# main thread would otherwise sleep for all of -d). A POST is any request not answered 200.
_EXACT_LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"

local limit = %(limit)d
-- Before the run, wrk calls request() once on thread 1's state to check the request
-- (script_verify_request) and never sends that one: it is not counted.
local issued = -1
local post, health
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  post = wrk.format("POST", "%(path)s")
  health = wrk.format("GET", "/healthz", {}, "")
  statuses = {}
  answered = 0
end

function request()
  issued = issued + 1
  if issued <= limit then
    return post
  end
  return health
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status ~= 200 then
    answered = answered + 1
    if answered == limit then
      local f = io.open("%(done_path)s", "w")
      f:write("done")
      f:close()
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local parts = {}
  for status, n in pairs(threads[1]:get("statuses")) do
    table.insert(parts, string.format('"%%d":%%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"errors":%%d,"statuses":{%%s}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    table.concat(parts, ",")))
end
"""


@dataclass(frozen=True)
class Posted:
    statuses: dict[int, int]  # of the POSTs: status -> count
    socket_errors: int
    seconds: float  # from the start of wrk to the last answer (or the stall)
    stalled_at: int | None  # the progress count that stopped moving, when it did

    @property
    def posts(self) -> int:
        return sum(self.statuses.values())

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)

    def problems(self, what: str) -> list[str]:
        out = other_answers(what, self.statuses, 202)
        if self.socket_errors:
            out.append(f"{what}: {self.socket_errors} socket errors/timeouts")
        if self.stalled_at is not None:
            out.append(f"{what}: the events stored stopped growing at {self.stalled_at}")
        return out


def post_exactly(
    h: Harness,
    base_url: str,
    path: str,
    body: bytes,
    count: int,
    *,
    connections: int,
    progress: Callable[[], int],
    quiet_s: float,
) -> Posted:
    """wrk (one thread, `connections` keep-alive connections) POSTs `body` to `path` exactly `count`
    times: how the benchmarks preload events fast, from a separate process. `progress` (e.g. a
    ZCARD) tells whether the events still arrive: wrk is stopped if it stands still for `quiet_s`."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian package wrk)")
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body cannot be put in a Lua long string")
    done_path = h.directory / "wrk.done"
    done_path.unlink(missing_ok=True)
    script = h.directory / "exact.lua"
    script.write_text(_EXACT_LUA % {"body": text, "limit": count, "path": path, "done_path": str(done_path)})
    started = time.monotonic()
    process = h.spawn(
        "wrk",
        [
            wrk,
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            "3600s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            base_url,
        ],
        stdout_to_log=False,
    )
    stalled_at = _wait_done(process, done_path, progress, quiet_s)
    seconds = time.monotonic() - started
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # wrk prints its results on SIGINT
    out, _ = process.communicate(timeout=60)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.decode(errors='replace')}{h.log('wrk')}")
    raw = json.loads(line.removeprefix("WRK_RESULT "))
    statuses = {int(k): int(v) for k, v in raw["statuses"].items() if int(k) != 200}
    return Posted(statuses, int(raw["errors"]), seconds, stalled_at)


def _wait_done(
    process: subprocess.Popen[bytes], done_path: Path, progress: Callable[[], int], quiet_s: float
) -> int | None:
    """Until wrk has every answer (or exited); the progress count if it stood still for `quiet_s`."""
    last, since = -1, time.monotonic()
    while process.poll() is None and not done_path.exists():
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return now
        time.sleep(0.05)
    return None


# --- An open-loop sender: a helpdesk sending at a fixed rate, whatever the answers -------------------


@dataclass
class Sent:
    sent: int = 0  # POSTs issued
    accepted: dict[str, float] = field(default_factory=dict)  # event id -> send time (time.time())
    answer_ms: list[float] = field(default_factory=list)  # send -> 202 answer, of each accepted
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    seconds: float = 0.0  # from the first POST to the last one issued
    lag_max_s: float = 0.0  # how late the sender issued a POST behind its schedule, at most

    def notes(self, what: str) -> list[str]:
        """Anomalies worth a line: answers other than 202, send errors, a sender behind schedule."""
        out = other_answers(what, self.statuses, 202)
        if self.error_count:
            out.append(f"{what}: {self.error_count} send errors, e.g. {self.errors}")
        if self.lag_max_s > 0.05:
            out.append(f"{what}: the sender fell up to {self.lag_max_s * 1000:.0f} ms behind its schedule")
        return out


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, out: Sent) -> None:
    sent_at = time.time()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            raw = await response.read()
            out.statuses[response.status] = out.statuses.get(response.status, 0) + 1
            if response.status == 202:
                out.accepted[str(json.loads(raw)["id"])] = sent_at
                out.answer_ms.append((time.time() - sent_at) * 1000)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        out.error_count += 1
        if len(out.errors) < 5:
            out.errors.append(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Schedule:
    """How an open-loop run went: requests issued, the time from the first to the last one issued,
    and how late the sender issued one behind its schedule, at most."""

    sent: int
    seconds: float
    lag_max_s: float


async def open_loop(
    rate: float, seconds: float, one: Callable[[aiohttp.ClientSession, int], Coroutine[Any, Any, None]]
) -> Schedule:
    """Open loop: the k-th request, `one(session, k)`, starts at start + k / rate, each in a task of its
    own, so a slow answer delays no later request (a closed loop would hide latency by sending
    less). Returns once every request is answered."""
    count = max(int(rate * seconds), 1)
    lag_max = first = last = 0.0
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        start = loop.time() + 0.05
        for k in range(count):
            due = start + k / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            lag_max = max(lag_max, now - due)
            if k == 0:
                first = now
            last = now
            task = asyncio.create_task(one(session, k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return Schedule(count, max(last - first, 1 / rate) if count > 1 else 1 / rate, lag_max)


async def send_open_loop(url: str, body: bytes, rate: float, seconds: float) -> Sent:
    """POSTs `body` to `url` open-loop (see `open_loop`), keeping the event id of each 202."""
    out = Sent()
    schedule = await open_loop(rate, seconds, lambda session, k: _post(session, url, body, out))
    out.sent, out.seconds, out.lag_max_s = schedule.sent, schedule.seconds, schedule.lag_max_s
    return out


@dataclass
class Fetched:
    """What an open-loop run of GETs got (`fetch_open_loop`)."""

    sent: int = 0  # GETs issued
    answer_ms: list[float] = field(default_factory=list)  # send -> whole answer, of each right one
    statuses: dict[int, int] = field(default_factory=dict)
    mismatched: int = 0  # 200 answers whose body was not the expected one
    seen: dict[str, int] = field(default_factory=dict)  # value of the counted header -> answers
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    seconds: float = 0.0  # from the first GET to the last one issued
    lag_max_s: float = 0.0  # how late the sender issued a GET behind its schedule, at most

    @property
    def right(self) -> int:
        """Answers 200 with the expected body."""
        return len(self.answer_ms)

    def problems(self, what: str) -> list[str]:
        """Wrong answers: statuses other than 200, other bodies, send errors, no right answer."""
        out = other_answers(what, self.statuses, 200)
        if self.mismatched:
            out.append(f"{what}: {self.mismatched} answers 200 with another body than the expected one")
        if self.error_count:
            out.append(f"{what}: {self.error_count} send errors, e.g. {self.errors}")
        if not self.right:
            out.append(f"{what}: no right answer at all")
        return out

    def notes(self, what: str) -> list[str]:
        """A sender behind its schedule."""
        if self.lag_max_s > 0.05:
            return [f"{what}: the sender fell up to {self.lag_max_s * 1000:.0f} ms behind its schedule"]
        return []


async def _get(
    session: aiohttp.ClientSession, url: str, expect_body: bytes, count_header: str | None, out: Fetched
) -> None:
    sent_at = time.perf_counter()
    try:
        async with session.get(url) as response:
            raw = await response.read()
            took_ms = (time.perf_counter() - sent_at) * 1000
            out.statuses[response.status] = out.statuses.get(response.status, 0) + 1
            if count_header is not None:
                value = response.headers.get(count_header, "(none)")
                out.seen[value] = out.seen.get(value, 0) + 1
            if response.status == 200:
                if raw == expect_body:
                    out.answer_ms.append(took_ms)
                else:
                    out.mismatched += 1
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        out.error_count += 1
        if len(out.errors) < 5:
            out.errors.append(f"{type(exc).__name__}: {exc}")


async def fetch_open_loop(
    urls: Sequence[str], rate: float, seconds: float, *, expect_body: bytes, count_header: str | None = None
) -> Fetched:
    """GETs `urls` in turn, over and over, open-loop (see `open_loop`): the time to each whole answer
    that is 200 with `expect_body`; the other answers counted, and the answers by the value of
    `count_header`."""
    out = Fetched()
    schedule = await open_loop(
        rate, seconds, lambda session, k: _get(session, urls[k % len(urls)], expect_body, count_header, out)
    )
    out.sent, out.seconds, out.lag_max_s = schedule.sent, schedule.seconds, schedule.lag_max_s
    return out


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return float("nan")
    rank = max(int(-(-p * len(values) // 100)), 1)  # ceil(p/100 * n), at least 1
    return values[min(rank, len(values)) - 1]


# --- Memory of a process -----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (this kernel has no /proc/PID/task/TID/children: scan /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and of its descendants (a server that forks is measured whole)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
            todo += _children(current)
    return total


# --- The suite's table -------------------------------------------------------------------------------


def redis_memory(r: redis.Redis) -> tuple[int, int]:
    """(used_memory, memory of normal clients' buffers)."""
    info = cast(dict[str, Any], r.info("memory"))
    return int(info["used_memory"]), int(info.get("mem_clients_normal", 0))


def settled_memory(r: redis.Redis, quiet_s: float = 1.0, timeout_s: float = 15.0) -> tuple[int, int]:
    """used_memory once connection buffers have shrunk back (Redis does it in its clients cron):
    the first reading whose client memory has not changed for `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    last = redis_memory(r)
    since = time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.1)
        now = redis_memory(r)
        if now[1] != last[1]:
            since = time.monotonic()
        last = now
    return last


@dataclass(frozen=True)
class Figure:
    """One row of the suite's table: a figure beside its baseline measured in the same run and its
    target. `met` is None where there is no target; the suite reports it but never fails on it (a
    figure on a shared machine is not a test)."""

    part: str
    measure: str
    value: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None


@dataclass
class Outcome:
    """What one benchmark gives the suite: its figures, failed correctness checks (lost or
    duplicated events, errors: exit status 1), notes (anomalies that fail nothing) and details (lines
    of its own report that the suite repeats under its table, such as Redis calls by command)."""

    figures: list[Figure] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def exit_status(self) -> int:
        """Prints the notes and failed checks, as a benchmark run alone ends; 1 if a check failed."""
        for note in self.notes:
            print(f"NOTE {note}")
        for problem in self.problems:
            print(f"CHECK FAILED {problem}")
        return 1 if self.problems else 0


def run_main(main: Callable[[], int]) -> None:
    """How each benchmark run alone ends: its exit status, or 130 after a Ctrl-C (its children are
    ended by `harness` on the way out)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: everything the benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
