"""Failures of the real processes: a worker, the API or Redis killed, Redis unreachable or hung,
an endpoint slower than its timeout. Each test checks that no acknowledged event is lost
(invariant 3), that the gateway answers clearly instead of hanging, and that a slow endpoint never
gets two concurrent deliveries of one event (invariant 5)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from aiohttp import web

from tests.conftest import Gateway, RedisServer, event_record, free_port, integration_toml, wait_until
from tests.upstream import Received, Reply, Upstream

FAST_RETRY = {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "max_attempts": 5}


def attempts_of(rdb: redis.Redis, event_id: str, state: str) -> list[tuple[int, int | None, str | None, str]]:
    """(n, status, error, outcome) of each attempt, once the event has reached `state`."""
    record = wait_until(lambda: (r := event_record(rdb, event_id)).get("s") == state and r, timeout=20)
    return [(a["n"], a["status"], a["error"], a["outcome"]) for a in record["attempts"]]


def test_worker_killed_mid_delivery_is_delivered_again_with_same_id(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    hold = threading.Event()
    upstream.script([Reply(hold=hold), Reply(200)])
    gateway.configure(integration_toml("crm", upstream.url, timeout_s=2, retry=FAST_RETRY))
    first = gateway.start_worker()
    gateway.start_api()
    try:
        event_id = gateway.post("/hooks/crm", b'{"ticket":1}').json()["id"]
        upstream.wait_for(1)
        assert event_record(rdb, event_id)["s"] == "in_flight"
        first.send_signal(signal.SIGKILL)
        first.wait()
        gateway.start_worker()

        got = upstream.wait_for(2, timeout=20)
        assert [r.webhook_id for r in got] == [event_id, event_id]
        assert got[1].body == got[0].body == b'{"ticket":1}'
        assert attempts_of(rdb, event_id, "delivered") == [
            (1, None, "lease_expired", "retrying"),
            (2, 200, None, "delivered"),
        ]
    finally:
        hold.set()


def holding_endpoint(
    gateway: Gateway, upstream: Upstream, grace_s: float
) -> tuple[threading.Event, subprocess.Popen[bytes]]:
    """An endpoint that holds its first request until the event is set (then answers 200), one
    worker with `shutdown_grace_s`, the API; the event and the worker."""
    hold = threading.Event()
    upstream.script([Reply(hold=hold), Reply(200)])
    gateway.configure(
        integration_toml("crm", upstream.url, timeout_s=60, retry=FAST_RETRY),
        worker=f"shutdown_grace_s = {grace_s}",
    )
    worker = gateway.start_worker()
    gateway.start_api()
    return hold, worker


def test_worker_stopped_by_sigterm_hands_its_attempt_back(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    # A lease far longer than the test: only the hand-back can bring the event back in time. The
    # grace ends long before the endpoint answers.
    hold, first = holding_endpoint(gateway, upstream, grace_s=0.3)
    try:
        event_id = gateway.post("/hooks/crm").json()["id"]
        upstream.wait_for(1)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
        record = event_record(rdb, event_id)
        assert record["s"] == "retrying"
        assert [(a["error"], a["outcome"]) for a in record["attempts"]] == [("worker_stopped", "retrying")]
        assert "handing back 1 attempts still in flight" in gateway.log("worker0.log")
        gateway.start_worker()
        got = upstream.wait_for(2, timeout=15)
        assert [r.webhook_id for r in got] == [event_id, event_id]
        assert attempts_of(rdb, event_id, "delivered")[-1] == (2, 200, None, "delivered")
    finally:
        hold.set()


def test_worker_stopped_by_sigterm_lets_attempts_end_within_the_grace_and_takes_no_more(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    hold, worker = holding_endpoint(gateway, upstream, grace_s=30)
    try:
        first = gateway.post("/hooks/crm").json()["id"]
        upstream.wait_for(1)
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: "get 30 s to end" in gateway.log("worker0.log"))
        second = gateway.post("/hooks/crm").json()["id"]  # accepted, and left for another worker
        time.sleep(0.3)
        assert worker.poll() is None, "the worker left before its attempt ended"
        hold.set()
        assert worker.wait(timeout=15) == 0
        assert attempts_of(rdb, first, "delivered") == [(1, 200, None, "delivered")]
        assert event_record(rdb, second)["s"] == "pending" and upstream.count() == 1
        assert "handing back" not in gateway.log("worker0.log")
    finally:
        hold.set()


async def _post_all(
    url: str, count: int, concurrency: int, kill_after: int, kill: threading.Event
) -> list[str]:
    """Posts `count` hooks; once `kill_after` of them are acknowledged, sets `kill` and keeps going."""
    acked: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, n: int) -> None:
        async with gate:
            try:
                response = await client.post(url, content=b'{"n":%d}' % n)
            except httpx.HTTPError:
                return
        if response.status_code == 202:
            acked.append(response.json()["id"])
            if len(acked) == kill_after:
                kill.set()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        await asyncio.gather(*(one(client, n) for n in range(count)))
    return acked


def test_api_killed_after_acks_loses_no_acknowledged_event(gateway: Gateway, upstream: Upstream) -> None:
    gateway.configure(integration_toml("crm", upstream.url, retry=FAST_RETRY)).start_api()
    api = gateway.api
    assert api is not None
    kill = threading.Event()

    def killer() -> None:
        if kill.wait(30):
            api.send_signal(signal.SIGKILL)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        # The API dies with requests still in flight: some are answered, some are not.
        acked = asyncio.run(_post_all(gateway.url + "/hooks/crm", 300, 64, kill_after=200, kill=kill))
    finally:
        kill.set()
        thread.join()
    api.wait()
    assert api.returncode == -signal.SIGKILL
    assert len(acked) >= 200
    assert len(set(acked)) == len(acked)

    gateway.start_worker()
    wait_until(lambda: set(acked) <= set(upstream.ids()), timeout=30)


@dataclass
class Load:
    """What a sender saw: the ids acknowledged with 202 (and when), and the other answers."""

    acked: list[tuple[float, str]] = field(default_factory=list)
    unavailable: list[float] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def send(self, url: str) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(url, content=b'{"ticket":7}')
                except httpx.HTTPError as exc:
                    self.other.append(repr(exc))
                    continue
                if response.status_code == 202:
                    self.acked.append((time.monotonic(), response.json()["id"]))
                elif response.status_code == 503 and response.json()["error"] == "unavailable":
                    self.unavailable.append(time.monotonic())
                else:
                    self.other.append(f"{response.status_code} {response.text}")


def test_redis_killed_and_restarted_under_load_loses_no_acknowledged_event(
    tmp_path: Path, upstream: Upstream
) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    gw = Gateway(tmp_path, server.url)
    load = Load()
    senders = [threading.Thread(target=load.send, args=(gw.url + "/hooks/crm",)) for _ in range(2)]
    try:
        gw.configure(integration_toml("crm", upstream.url, timeout_s=2, retry=FAST_RETRY)).start()
        for sender in senders:
            sender.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        server.kill()
        time.sleep(0.7)
        server.start()  # same port, same directory: Redis reloads its append-only file
        restarted_at = time.monotonic()
        time.sleep(1.0)
        load.stop.set()
        for sender in senders:
            sender.join()

        assert load.other == []
        assert load.unavailable, "the outage was never seen by the senders"
        assert any(t < killed_at for t, _ in load.acked)
        assert any(t > restarted_at for t, _ in load.acked)
        acked = {event_id for _, event_id in load.acked}
        wait_until(lambda: acked <= set(upstream.ids()), timeout=40)
        assert all(p.poll() is None for p in gw.workers), "a worker exited instead of waiting for Redis"
    finally:
        load.stop.set()
        for sender in senders:
            if sender.is_alive():
                sender.join()
        gw.stop()
        server.stop()


def test_worker_stops_on_sigterm_while_redis_is_down(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    gw = Gateway(tmp_path, server.url)
    try:
        gw.configure(integration_toml("crm", upstream.url))
        worker = gw.start_worker()
        wait_until(lambda: "worker ready" in gw.log("worker0.log"), timeout=15)
        server.kill()
        wait_until(lambda: "worker: Redis unavailable" in gw.log("worker0.log"), timeout=15)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0, gw.log("worker0.log")
    finally:
        gw.stop()
        server.stop()


def test_unreachable_redis_gives_503_not_a_hang(tmp_path: Path, upstream: Upstream) -> None:
    gw = Gateway(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    try:
        gw.configure(integration_toml("crm", upstream.url)).start_api()
        started = time.monotonic()
        response = gw.post("/hooks/crm", b'{"ticket":1}')
        assert time.monotonic() - started < 3
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert response.headers["content-type"].startswith("application/json")

        ready = httpx.get(gw.url + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["error"] == "unavailable"
        assert httpx.get(gw.url + "/healthz", timeout=10).status_code == 200
        assert upstream.count() == 0
    finally:
        gw.stop()


def test_hung_redis_gives_503_then_recovers(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    assert server.process is not None
    process = server.process
    gw = Gateway(tmp_path, server.url)
    stopped = False
    try:
        gw.configure(integration_toml("crm", upstream.url, retry=FAST_RETRY)).start()
        before = gw.post("/hooks/crm").json()["id"]
        wait_until(lambda: before in upstream.ids())

        process.send_signal(signal.SIGSTOP)
        stopped = True
        answers: list[tuple[float, int, str]] = []

        def post() -> None:
            started = time.monotonic()
            try:
                response = gw.post("/hooks/crm", b'{"during":"hang"}')
            except httpx.HTTPError as exc:
                answers.append((time.monotonic() - started, 0, repr(exc)))
            else:
                answers.append((time.monotonic() - started, response.status_code, response.text))

        posters = [threading.Thread(target=post) for _ in range(3)]
        for poster in posters:
            poster.start()
        for poster in posters:
            poster.join()
        assert len(answers) == 3
        for elapsed, status, text in answers:
            assert status == 503, text
            assert '"unavailable"' in text
            assert elapsed < 5
        assert httpx.get(gw.url + "/readyz", timeout=10).status_code == 503

        process.send_signal(signal.SIGCONT)
        stopped = False
        after = gw.post("/hooks/crm", b'{"after":"hang"}')
        assert after.status_code == 202
        wait_until(lambda: after.json()["id"] in upstream.ids(), timeout=20)
        wait_until(lambda: httpx.get(gw.url + "/readyz", timeout=10).status_code == 200)
    finally:
        if stopped:
            process.send_signal(signal.SIGCONT)
        gw.stop()
        server.stop()


class WatchedUpstream(Upstream):
    """An endpoint that never answers within `hold_s`. When a request arrives, it counts the earlier
    requests with the same webhook-id whose connection the gateway still holds open: any is a
    second concurrent delivery of that event."""

    def __init__(self, hold_s: float) -> None:
        super().__init__()
        self.hold_s = hold_s
        self.requests: dict[str, list[web.Request]] = {}
        self.overlaps: list[tuple[str, int]] = []

    def still_open(self) -> int:
        with self._lock:
            return sum(_is_open(r) for rs in self.requests.values() for r in rs)

    async def _handle(self, request: web.Request) -> web.Response:
        webhook_id = request.headers.get("webhook-id", "")
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = Received(request.method, request.path_qs, headers, await request.read(), time.monotonic())
        with self._lock:
            self.received.append(record)
            earlier = self.requests.setdefault(webhook_id, [])
            still_open = sum(_is_open(r) for r in earlier)
            if still_open:
                self.overlaps.append((webhook_id, still_open))
            earlier.append(request)
        deadline = record.at + self.hold_s
        # aiohttp 3.x has no event for a client that went away while its handler runs: poll.
        while time.monotonic() < deadline and _is_open(request):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return web.Response(status=200)


def _is_open(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def test_slow_endpoint_never_gets_two_concurrent_deliveries(gateway: Gateway, rdb: redis.Redis) -> None:
    endpoint = WatchedUpstream(hold_s=4)
    endpoint.start()
    try:
        retry = FAST_RETRY | {"max_attempts": 3}
        gateway.configure(integration_toml("crm", endpoint.url, timeout_s=1, retry=retry)).start(workers=2)
        ids = [gateway.post("/hooks/crm", b'{"n":%d}' % n).json()["id"] for n in range(3)]
        logs = {event_id: attempts_of(rdb, event_id, "dead") for event_id in ids}
        wait_until(lambda: not endpoint.still_open())
        assert endpoint.overlaps == []
        assert sorted(endpoint.ids()) == sorted(ids * 3)
        timeouts = [
            (1, None, "timeout", "retrying"),
            (2, None, "timeout", "retrying"),
            (3, None, "timeout", "dead"),
        ]
        assert logs == {event_id: timeouts for event_id in ids}
    finally:
        endpoint.stop()
