"""Proxy mode against the real processes, real Redis and a real upstream: the helpdesk gets the
upstream's own answer, or the last good one when the upstream fails, or a clear 502/504; identical
concurrent reads share one call; a failed write is queued and delivered later with the same
webhook-id; a paused integration is not called at all; every proxied request is in the log."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from tests.conftest import Gateway, InProcessGateway, RedisServer, event_record, integration_toml, wait_until
from tests.upstream import Reply, Upstream

TOKEN = "test-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FAST_RETRY = {"backoff_base_s": 0.05, "backoff_max_s": 0.1, "max_attempts": 5}


def proxy_toml(name: str, target: str, **fields: Any) -> str:
    return integration_toml(name, target, mode="proxy", **fields)


def admin(gw: Gateway, path: str, method: str = "GET", **params: Any) -> Any:
    response = gw.request(method, "/admin" + path, headers=AUTH, params=params)
    assert response.status_code < 300, response.text
    return response.json()


def events(gw: Gateway, n: int, integration: str = "crm") -> list[dict[str, Any]]:
    """The integration's events once the log holds `n` of them (it is written after the answers)."""
    items = wait_until(
        lambda: (got := admin(gw, "/events", integration=integration)["items"]) and len(got) >= n and got
    )
    return [admin(gw, f"/events/{e['id']}") for e in cast(list[dict[str, Any]], items)]


def copies(gw: Gateway, n: int, integration: str = "crm") -> None:
    """Waits until `n` last good answers are kept."""
    wait_until(lambda: admin(gw, f"/integrations/{integration}")["cache"]["copies"] == n)


def get(gw: Gateway, path: str, **kwargs: Any) -> httpx.Response:
    return gw.get(path, **kwargs)


def test_passes_status_headers_and_body_through(gateway: Gateway, upstream: Upstream) -> None:
    gateway.configure(proxy_toml("crm", upstream.url + "/api", headers={"Authorization": "Bearer k"})).start(
        0
    )
    upstream.script(
        [Reply(201, {"x-upstream": "yes", "content-type": "application/json"}, b'{"name":"Ann"}')]
    )
    answer = get(gateway, "/hooks/crm/users?email=a%2Bb%40c.d", headers={"x-custom": "kept"})
    assert answer.status_code == 201
    assert answer.content == b'{"name":"Ann"}'
    assert answer.headers["x-upstream"] == "yes"
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-gateway-cache"] == "miss"
    event_id = answer.headers["x-gateway-event-id"]
    (got,) = upstream.received
    assert (got.method, got.path_qs) == ("GET", "/api/users?email=a%2Bb%40c.d")
    assert got.headers["x-custom"] == "kept"
    assert got.headers["authorization"] == "Bearer k"
    assert got.headers["webhook-id"] == event_id
    assert got.headers["webhook-timestamp"].isdigit()

    upstream.script([Reply(404, {"content-type": "text/plain"}, b"no such user")])
    missing = get(gateway, "/hooks/crm/users?email=nobody")
    assert (missing.status_code, missing.content, missing.headers["x-gateway-cache"]) == (
        404,
        b"no such user",
        "miss",
    )

    upstream.script([Reply(200, body=b'{"saved":true}')])
    written = httpx.put(gateway.url + "/hooks/crm/notes/7", content=b'{"note":"hi"}', timeout=10)
    assert (written.status_code, written.content) == (200, b'{"saved":true}')
    assert (upstream.received[-1].method, upstream.received[-1].body) == ("PUT", b'{"note":"hi"}')

    logged = {e["id"]: e for e in events(gateway, 3)}
    first = logged[event_id]
    assert first["state"] == "delivered"
    assert first["request"]["url"] == upstream.url + "/api/users?email=a%2Bb%40c.d"
    assert [(a["status"], a["answered"], a["outcome"]) for a in first["attempts"]] == [
        (201, "fresh", "delivered")
    ]
    assert sorted((e["state"], e["attempts"][0]["status"]) for e in logged.values()) == [
        ("dead", 404),
        ("delivered", 200),
        ("delivered", 201),
    ]

    upstream.script([Reply(200, body=b'{"name":"Ann"}')])
    head = httpx.head(gateway.url + "/hooks/crm/users?id=1", timeout=10)
    assert (head.status_code, head.headers["content-length"], head.content) == (200, "14", b"")
    assert upstream.received[-1].method == "HEAD"


def test_last_good_answer_when_the_upstream_fails_else_502_or_504(
    gateway: Gateway, upstream: Upstream
) -> None:
    gateway.configure(proxy_toml("crm", upstream.url, timeout_s=0.5)).start(0)
    good = get(gateway, "/hooks/crm/users?id=1")
    assert (good.status_code, good.headers["x-gateway-cache"]) == (200, "miss")
    copies(gateway, 1)

    upstream.script([Reply(500, body=b"boom")])
    stale = get(gateway, "/hooks/crm/users?id=1")
    assert (stale.status_code, stale.content, stale.headers["x-gateway-cache"]) == (
        200,
        good.content,
        "stale",
    )
    assert stale.headers["age"].isdigit()
    assert stale.headers["x-gateway-event-id"] != good.headers["x-gateway-event-id"]
    bad = get(gateway, "/hooks/crm/users?id=2")
    assert bad.status_code == 502
    assert bad.json()["error"] == "bad_gateway" and "HTTP 500" in bad.json()["detail"]
    assert bad.headers["x-gateway-cache"] == "miss" and bad.headers["x-gateway-event-id"]

    upstream.script([Reply(200, delay_s=3)])
    started = time.monotonic()
    late = get(gateway, "/hooks/crm/users?id=2")
    assert late.status_code == 504 and late.json()["error"] == "upstream_timeout"
    assert time.monotonic() - started < 2.5  # the integration's deadline (0.5 s), not the upstream's 3 s
    assert get(gateway, "/hooks/crm/users?id=1").headers["x-gateway-cache"] == "stale"

    upstream.stop()  # refused connections
    down = get(gateway, "/hooks/crm/users?id=1")
    assert (down.status_code, down.content, down.headers["x-gateway-cache"]) == (200, good.content, "stale")
    assert get(gateway, "/hooks/crm/users?id=2").status_code == 502

    answered = sorted(a["answered"] for e in events(gateway, 7) for a in e["attempts"])
    assert answered == ["error", "error", "error", "fresh", "stale", "stale", "stale"]
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "event", stale.headers["x-gateway-event-id"]],
        env=gateway.env | {"GATEWAY_URL": gateway.url},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "ANSWERED" in out.stdout and "stale" in out.stdout and "500" in out.stdout
    status = subprocess.run(
        [sys.executable, "-m", "gateway", "status"],
        env=gateway.env | {"GATEWAY_URL": gateway.url},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    assert "COPIES" in status.stdout and "proxy" in status.stdout


def test_identical_concurrent_reads_share_one_upstream_call(gateway: Gateway, upstream: Upstream) -> None:
    gateway.configure(proxy_toml("crm", upstream.url)).start(0)
    upstream.script([Reply(200, body=b'{"customer":1}', delay_s=0.5)])

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:
            return await asyncio.gather(*(client.get(gateway.url + "/hooks/crm/c?id=1") for _ in range(30)))

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * 30
    assert {a.content for a in answers} == {b'{"customer":1}'}
    assert upstream.count() == 1
    ids = {a.headers["x-gateway-event-id"] for a in answers}
    assert len(ids) == 30
    leader = upstream.received[0].webhook_id
    logged = events(gateway, 30)
    shared = [e for e in logged if e["id"] != leader]
    assert len(shared) == 29
    assert all(
        e["attempts"][0]["detail"].startswith(f"shared the upstream call of event {leader}") for e in shared
    )
    metrics = httpx.get(gateway.url + "/metrics", timeout=5).text
    assert 'gateway_attempts_total{integration="crm",outcome="delivered"} 1.0' in metrics
    assert 'gateway_proxy_answers_total{cache="miss",integration="crm"} 30.0' in metrics


def test_integrations_with_one_target_never_share_a_call(gateway: Gateway, upstream: Upstream) -> None:
    """Each integration sends its own credentials, so identical reads of two integrations with the
    same target make two calls."""
    gateway.configure(
        proxy_toml("a", upstream.url, headers={"Authorization": "Bearer A"}),
        proxy_toml("b", upstream.url, headers={"Authorization": "Bearer B"}),
    ).start(0)
    upstream.script([Reply(200, body=b"{}", delay_s=0.3)])

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(*(client.get(f"{gateway.url}/hooks/{n}/x?id=1") for n in "ab"))

    assert [a.status_code for a in asyncio.run(both())] == [200, 200]
    assert sorted(r.headers["authorization"] for r in upstream.received) == ["Bearer A", "Bearer B"]


@pytest.mark.in_process
def test_fresh_copies_answer_without_a_call_and_vary_by_header(
    in_process_gateway: InProcessGateway, upstream: Upstream
) -> None:
    gateway = in_process_gateway
    gateway.configure(
        proxy_toml("crm", upstream.url, proxy={"fresh_ttl_s": 60, "vary_headers": ["X-Account"]})
    )
    gateway.start(0)
    first = get(gateway, "/hooks/crm/users?id=1", headers={"x-account": "a"})
    assert first.headers["x-gateway-cache"] == "miss"
    copies(gateway, 1)
    hit = get(gateway, "/hooks/crm/users?id=1", headers={"x-account": "a"})
    assert (hit.status_code, hit.content, hit.headers["x-gateway-cache"]) == (200, first.content, "hit")
    assert hit.headers["age"].isdigit()
    assert upstream.count() == 1
    other = get(gateway, "/hooks/crm/users?id=1", headers={"x-account": "b"})
    assert other.headers["x-gateway-cache"] == "miss"
    assert upstream.count() == 2
    # a write is never answered from a copy while its endpoint answers: it must reach the endpoint
    copies(gateway, 2)
    assert gateway.post("/hooks/crm/notes", b'{"n":1}').headers["x-gateway-cache"] == "miss"
    copies(gateway, 3)
    assert gateway.post("/hooks/crm/notes", b'{"n":1}').headers["x-gateway-cache"] == "miss"
    assert upstream.count() == 4
    logged = {e["id"]: e for e in events(gateway, 5)}
    assert logged[hit.headers["x-gateway-event-id"]]["attempts"][0]["answered"] == "hit"
    metrics = gateway.get("/metrics").text
    assert 'gateway_proxy_answers_total{cache="hit",integration="crm"} 1.0' in metrics


@pytest.mark.in_process
def test_failed_write_is_queued_and_delivered_with_the_same_webhook_id(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    gateway.configure(proxy_toml("crm", upstream.url, retry=FAST_RETRY)).start(1)
    upstream.script([503, 200])
    queued = gateway.post("/hooks/crm/tickets/9/notes", b'{"note":"call back"}')
    assert queued.status_code == 202
    assert queued.headers["x-gateway-queued"] == "true"
    event_id = queued.json()["id"]
    assert queued.headers["x-gateway-event-id"] == event_id
    first, second = upstream.wait_for(2)
    assert [first.webhook_id, second.webhook_id] == [event_id, event_id]
    assert first.body == second.body == b'{"note":"call back"}'
    record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "delivered" and r)
    assert [(a["n"], a["status"], a.get("answered")) for a in record["attempts"]] == [
        (1, 503, "queued"),
        (2, 200, None),
    ]

    # With a last good answer for the same write, the helpdesk gets it, and the write is queued too.
    upstream.script([200])
    assert (
        gateway.post("/hooks/crm/tickets/9/notes", b'{"note":"again"}').headers["x-gateway-cache"] == "miss"
    )
    copies(gateway, 1)
    upstream.script([500, 200])
    again = gateway.post("/hooks/crm/tickets/9/notes", b'{"note":"again"}')
    assert (again.status_code, again.headers["x-gateway-cache"], again.headers["x-gateway-queued"]) == (
        200,
        "stale",
        "true",
    )
    retried = upstream.wait_for(5)[-1]
    assert retried.webhook_id == again.headers["x-gateway-event-id"]
    wait_until(lambda: event_record(rdb, again.headers["x-gateway-event-id"])["s"] == "delivered")


@pytest.mark.in_process
def test_paused_integration_is_not_called(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    gateway.configure(proxy_toml("crm", upstream.url, retry=FAST_RETRY)).start(1)
    good = get(gateway, "/hooks/crm/users?id=1")
    copies(gateway, 1)
    assert admin(gateway, "/integrations/crm/pause", "POST")["state"] == "paused"

    stale = get(gateway, "/hooks/crm/users?id=1")
    assert (stale.status_code, stale.content, stale.headers["x-gateway-cache"]) == (
        200,
        good.content,
        "stale",
    )
    refused = get(gateway, "/hooks/crm/users?id=2")
    assert (refused.status_code, refused.json()["error"]) == (503, "paused")
    held = gateway.post("/hooks/crm/notes", b'{"n":1}')
    assert (held.status_code, held.headers["x-gateway-queued"]) == (202, "true")
    event_id = held.json()["id"]
    assert event_record(rdb, event_id)["s"] == "held"
    time.sleep(0.5)  # a worker polls every 10 ms: it would have sent the write by now
    assert upstream.count() == 1

    admin(gateway, "/integrations/crm/resume", "POST")
    (_, sent) = upstream.wait_for(2)
    assert (sent.method, sent.webhook_id, sent.body) == ("POST", event_id, b'{"n":1}')
    wait_until(lambda: event_record(rdb, event_id)["s"] == "delivered")


def test_failures_pause_the_integration_and_a_probe_resumes_it(gateway: Gateway, upstream: Upstream) -> None:
    gateway.configure(
        proxy_toml(
            "crm",
            upstream.url,
            failure_threshold=3,
            probe_cooldown_s=0.3,
            probe_cooldown_max_s=0.3,
            proxy={"stale_ttl_s": 0},  # no copy is kept, so no failure is answered from one
        )
    ).start(1)
    upstream.script([500, 500, 200])
    assert [get(gateway, "/hooks/crm/u").status_code for _ in range(3)] == [502, 502, 200]
    wait_until(lambda: admin(gateway, "/integrations/crm")["last_success_ms"])
    assert admin(gateway, "/integrations/crm")["consecutive_failures"] == 0  # a success resets the count

    upstream.script([500])
    assert [get(gateway, "/hooks/crm/u").status_code for _ in range(3)] == [502] * 3
    paused = wait_until(lambda: (i := admin(gateway, "/integrations/crm"))["state"] == "paused" and i)
    assert (paused["paused_by"], paused["consecutive_failures"]) == ("failures", 3)
    assert "alert integration.paused" in wait_until(
        lambda: "integration.paused" in gateway.log("api.log") and gateway.log("api.log")
    )

    upstream.script([200])  # the endpoint is back: the probe sends the last failed request
    wait_until(lambda: admin(gateway, "/integrations/crm")["state"] == "active", timeout=10)
    probe = upstream.received[-1]
    assert (probe.method, probe.path_qs) == ("GET", "/u")
    assert get(gateway, "/hooks/crm/u").headers["x-gateway-cache"] == "miss"


@pytest.mark.in_process
def test_oversized_and_endless_answers_end_in_time(
    in_process_gateway: InProcessGateway, upstream: Upstream
) -> None:
    gateway = in_process_gateway
    gateway.configure(
        proxy_toml("tiny", upstream.url, timeout_s=1, proxy={"max_response_bytes": 4096}),
        proxy_toml("crm", upstream.url, timeout_s=1),
    ).start(0)
    upstream.script([Reply(200, body=b"x" * 100_000)])
    big = get(gateway, "/hooks/tiny/big")
    assert big.status_code == 502 and "max_response_bytes" in big.json()["detail"]
    upstream.script([Reply(200, endless=True)])
    chunked = get(gateway, "/hooks/tiny/endless")  # no content-length: cut once past the limit
    assert chunked.status_code == 502 and "max_response_bytes" in chunked.json()["detail"]
    started = time.monotonic()
    endless = get(gateway, "/hooks/crm/endless")
    assert endless.status_code == 504
    assert time.monotonic() - started < 3  # the deadline is timeout_s (1 s) for the whole answer


@pytest.mark.in_process
def test_refusals_are_the_relays_and_store_nothing(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    gateway.configure(
        proxy_toml("crm", upstream.url, inbound_token="t0ken"), gateway="max_body_bytes = 1000"
    ).start(0)
    assert get(gateway, "/hooks/crm/users").status_code == 401
    assert get(gateway, "/hooks/nope/users").status_code == 404
    assert gateway.post("/hooks/crm/x?token=t0ken", b"x" * 2000).status_code == 413
    ok = get(gateway, "/hooks/crm/users?token=t0ken&id=1")
    assert ok.status_code == 200
    assert upstream.count() == 1 and upstream.received[0].path_qs == "/users?id=1"
    assert len(events(gateway, 1)) == 1


def test_reads_are_answered_while_redis_is_down_and_writes_are_refused(
    tmp_path: Path, upstream: Upstream
) -> None:
    """The answer of a read needs no Redis; a write that failed upstream is kept in Redis or the
    helpdesk is told it was not (503), never a 2xx for a write kept nowhere."""
    server = RedisServer(tmp_path).start()
    gw = Gateway(tmp_path, server.url)
    try:
        gw.configure(proxy_toml("crm", upstream.url), gateway="store_timeout_s = 0.3").start(0)
        assert get(gw, "/hooks/crm/users?id=1").headers["x-gateway-cache"] == "miss"
        server.kill()
        upstream.script([Reply(200, body=b'{"still":"here"}')])
        read = get(gw, "/hooks/crm/users?id=2")
        assert (read.status_code, read.content, read.headers["x-gateway-cache"]) == (
            200,
            b'{"still":"here"}',
            "miss",
        )
        upstream.script([500])
        write = gw.post("/hooks/crm/notes", b'{"n":1}')
        assert (write.status_code, write.json()["error"]) == (503, "unavailable")
        assert write.headers["x-gateway-event-id"]
        assert "Traceback" not in gw.log("api.log")
    finally:
        gw.stop()
        server.stop()


def test_a_stopping_api_answers_its_open_requests_and_logs_them(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.script([Reply(200, body=b'{"slow":true}', delay_s=1.0)])
    gateway.extra_env["GATEWAY_ADMIN_TOKEN"] = TOKEN
    gateway.configure(proxy_toml("crm", upstream.url), gateway="shutdown_grace_s = 20").start_api()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(get, gateway, "/hooks/crm/customers")
        upstream.wait_for(1)
        assert gateway.api is not None
        gateway.api.send_signal(signal.SIGTERM)
        answer = pending.result(timeout=15)
    assert (answer.status_code, answer.json()) == (200, {"slow": True})
    # uvicorn ends by re-raising the signal it handled, so a process manager sees a SIGTERM exit.
    assert gateway.api.wait(timeout=15) in (0, -signal.SIGTERM)
    assert "Traceback" not in gateway.log("api.log")
    # The request's log item was written before the process ended.
    assert event_record(rdb, answer.headers["x-gateway-event-id"])["s"] == "delivered"
    with pytest.raises(httpx.ConnectError):
        get(gateway, "/healthz")
