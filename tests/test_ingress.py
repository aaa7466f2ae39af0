"""Ingress: what the helpdesk gets back, and that refused requests change nothing in Redis."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import redis

from gateway.events import StoredRequest
from tests.conftest import KEYS, Gateway, InProcessGateway, integration_toml, stored_keys, wait_until
from tests.upstream import Upstream


def test_idempotency_key_returns_first_id_and_delivers_once(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway.configure(integration_toml("crm", upstream.url)).start()
    first = gateway.post("/hooks/crm", b'{"n":1}', headers={"Idempotency-Key": "ticket-7-created"})
    again = gateway.post("/hooks/crm", b'{"n":1}', headers={"Idempotency-Key": "ticket-7-created"})
    other = gateway.post("/hooks/crm", b'{"n":1}', headers={"Idempotency-Key": "ticket-8-created"})
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    upstream.wait_for(2)
    # A third copy, sent after the first was delivered, is still recognised.
    late = gateway.post("/hooks/crm", b'{"n":1}', headers={"Idempotency-Key": "ticket-7-created"})
    assert late.json()["id"] == first.json()["id"]
    wait_until(lambda: rdb.zcard(KEYS.state_index("crm", "delivered")) == 2)
    assert sorted(upstream.ids()) == sorted([first.json()["id"], other.json()["id"]])

    # Long keys are compared whole: two that share their first 200 characters are two events.
    common = "ticket-9:" + "x" * 250
    long_a = gateway.post("/hooks/crm", b"{}", headers={"Idempotency-Key": common + "-created"})
    long_b = gateway.post("/hooks/crm", b"{}", headers={"Idempotency-Key": common + "-updated"})
    long_a_again = gateway.post("/hooks/crm", b"{}", headers={"Idempotency-Key": common + "-created"})
    assert long_a.json()["id"] != long_b.json()["id"] == long_b.json()["id"]
    assert long_a_again.json()["id"] == long_a.json()["id"]
    assert "idempotent-replayed" not in long_b.headers
    wait_until(lambda: rdb.zcard(KEYS.state_index("crm", "delivered")) == 4)


def test_webhook_id_from_helpdesk_deduplicates_within_one_batch(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway.configure(integration_toml("crm", upstream.url)).start()

    async def burst() -> list[str]:
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            answers = await asyncio.gather(
                *[
                    client.post("/hooks/crm", content=b"{}", headers={"webhook-id": "msg_1"})
                    for _ in range(20)
                ]
            )
        return [a.json()["id"] for a in answers]

    ids = asyncio.run(burst())
    assert len(set(ids)) == 1
    upstream.wait_for(1)
    wait_until(lambda: rdb.zcard(KEYS.state_index("crm", "delivered")) == 1)
    assert upstream.count() == 1
    assert upstream.received[0].webhook_id == ids[0]


@pytest.mark.in_process
def test_unknown_integration_is_404_and_writes_nothing(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway.configure(integration_toml("crm", upstream.url)).start_api()
    before = stored_keys(rdb)
    response = gateway.post("/hooks/nope/x", b"{}")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "no integration is named 'nope'"}
    assert stored_keys(rdb) == before


@pytest.mark.in_process
def test_body_over_limit_is_413_and_writes_nothing(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    gateway.configure(integration_toml("crm", upstream.url), gateway="max_body_bytes = 1000\n").start()
    before = stored_keys(rdb)
    too_big = gateway.post("/hooks/crm", b"x" * 1001)
    assert too_big.status_code == 413
    assert too_big.json()["error"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(11):
            yield b"y" * 100

    chunked = gateway.client.post("/hooks/crm", content=chunks())  # no content-length: counted as read
    assert chunked.status_code == 413
    assert stored_keys(rdb) == before
    assert gateway.post("/hooks/crm", b"x" * 1000).status_code == 202
    (got,) = upstream.wait_for(1)
    assert got.body == b"x" * 1000


@pytest.mark.in_process
def test_inbound_token_required_and_not_passed_on(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    gateway.extra_env["CRM_TOKEN"] = "t0ken"
    gateway.configure(integration_toml("crm", upstream.url, inbound_token="${CRM_TOKEN}")).start()
    before = stored_keys(rdb)
    for answer in (
        gateway.post("/hooks/crm"),
        gateway.post("/hooks/crm", headers={"x-gateway-token": "wrong"}),
        gateway.post("/hooks/crm?token=wrong"),
    ):
        assert answer.status_code == 401
        assert answer.json()["error"] == "unauthorized"
    assert stored_keys(rdb) == before
    assert gateway.post("/hooks/crm/a", headers={"x-gateway-token": "t0ken"}).status_code == 202
    assert gateway.post("/hooks/crm/b?token=t0ken&keep=1").status_code == 202
    # The rest of the query goes on byte for byte: `;`, raw %FF, bare flags and + untouched.
    odd = "/hooks/crm/c?a=1;b=2&token=t0ken&flag&c=%FF&d=x+y&e=%20"
    assert gateway.post(odd).status_code == 202
    got = sorted(upstream.wait_for(3), key=lambda r: r.path_qs)
    assert [r.path_qs for r in got] == ["/a", "/b?keep=1", "/c?a=1;b=2&flag&c=%FF&d=x+y&e=%20"]
    assert all("x-gateway-token" not in r.headers for r in got)


@pytest.mark.in_process
def test_health_endpoints(in_process_gateway: InProcessGateway, upstream: Upstream) -> None:
    client = in_process_gateway.configure(integration_toml("crm", upstream.url)).start().client
    assert client.get("/healthz").json() == {"status": "ok"}
    # The worker's first heartbeat may come after the API answers: wait for a 200, not for any JSON.
    ready = wait_until(lambda: (r := client.get("/readyz")).status_code == 200 and r)
    assert ready.json() == {"status": "ok", "workers": 1}
    missing = client.get("/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


def _raw(gateway: Gateway, target: str, method: str = "POST") -> tuple[int, bytes]:
    """Sends with the request target exactly as given (HTTP clients resolve dot segments first)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        request = f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode() + b"{}")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_dot_segments_after_the_name_are_refused_and_the_stored_url_is_the_sent_one(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway.configure(integration_toml("crm", upstream.url + "/api/v1")).start()
    for target in (
        "/hooks/crm/../../admin",
        "/hooks/crm/%2e%2e/%2e%2e/admin",
        "/hooks/crm/.%2e/admin",
        "/hooks/crm/%2E%2E%2Fadmin",
        "/hooks/crm/a/..%2f..%2f..%2fadmin",
        "/hooks/crm/a/..%5cadmin",
        "/hooks/crm/./x",
        "/hooks/crm/x/..",
    ):
        status, body = _raw(gateway, target)
        assert status == 400, target
        assert orjson.loads(body)["error"] == "bad_request", target
    assert stored_keys(rdb) == set(), "a refused request stored nothing"

    status, body = _raw(gateway, "/hooks/crm/a..b/c.d/.well-known?q=%2E%2E")
    assert status == 202
    event_id = orjson.loads(body)["id"]
    (got,) = upstream.wait_for(1)
    assert got.path_qs == "/api/v1/a..b/c.d/.well-known?q=%2E%2E"
    wait_until(lambda: rdb.zcard(KEYS.state_index("crm", "delivered")) == 1)
    blob = rdb.get(KEYS.request(event_id))
    assert isinstance(blob, bytes) and StoredRequest.unpack(blob).url == upstream.url + got.path_qs


def test_methods_other_than_a_helpdesks_store_nothing(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway.configure(
        integration_toml("crm", upstream.url), integration_toml("cors", upstream.url, forward_options=True)
    ).start()
    before = stored_keys(rdb)
    for method in ("TRACE", "CONNECT"):
        status, body = _raw(gateway, "/hooks/crm/x", method)
        assert (status, orjson.loads(body)["error"]) == (405, "method_not_allowed"), method
    preflight = httpx.options(gateway.url + "/hooks/crm/x", headers={"origin": "https://app.example"})
    assert preflight.status_code == 204 and "POST" in preflight.headers["allow"]
    assert "access-control-allow-origin" not in preflight.headers
    assert stored_keys(rdb) == before
    assert upstream.count() == 0
    # An integration that asks for them gets its OPTIONS relayed.
    assert httpx.options(gateway.url + "/hooks/cors/x").status_code == 202
    (got,) = upstream.wait_for(1)
    assert got.method == "OPTIONS"


def test_header_bytes_go_upstream_unchanged(gateway: Gateway, upstream: Upstream) -> None:
    gateway.configure(integration_toml("crm", upstream.url)).start()
    request = (
        b"POST /hooks/crm HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
        + "X-Customer: Zoë Ångström 名前\r\n".encode()
        + b"\r\n{}"
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 202")
    (got,) = upstream.wait_for(1)
    assert got.headers["x-customer"] == "Zoë Ångström 名前"


def test_a_client_that_hangs_up_is_counted_apart_from_a_redis_outage(
    gateway: Gateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway.configure(integration_toml("crm", upstream.url)).start()
    before = stored_keys(rdb)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /hooks/crm HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{partial")
        time.sleep(0.2)
    metric = 'gateway_inbound_refused_total{reason="client_closed"} 1.0'
    wait_until(lambda: metric in httpx.get(gateway.url + "/metrics").text, timeout=10)
    assert 'reason="503"' not in httpx.get(gateway.url + "/metrics").text
    assert stored_keys(rdb) == before
