"""The relay end to end: real Redis, a real upstream, the real worker; the happy path through the real
API process too, the rest through the API run in process."""

from __future__ import annotations

import pytest
import redis

from tests.conftest import Gateway, InProcessGateway, event_record, integration_toml, wait_until
from tests.upstream import Reply, Upstream

FAST_RETRY = {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "max_attempts": 5}


def test_happy_path_relays_request_unchanged(gateway: Gateway, upstream: Upstream, rdb: redis.Redis) -> None:
    gateway.configure(
        integration_toml("crm", upstream.url + "/api/tickets", headers={"Authorization": "Bearer s3cret"})
    ).start()
    body = bytes(range(256)) * 4
    response = gateway.post(
        "/hooks/crm/42/messages?a=1&b=two%20words",
        body,
        headers={"content-type": "application/octet-stream", "x-custom": "kept", "connection": "keep-alive"},
    )
    assert response.status_code == 202
    event_id = response.json()["id"]
    (got,) = upstream.wait_for(1)
    assert got.method == "POST"
    assert got.path_qs == "/api/tickets/42/messages?a=1&b=two%20words"
    assert got.body == body
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["x-custom"] == "kept"
    assert got.headers["authorization"] == "Bearer s3cret"
    assert got.headers["webhook-id"] == event_id
    assert got.headers["webhook-timestamp"].isdigit()
    assert got.headers["host"] == f"127.0.0.1:{upstream.port}"
    record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "delivered" and r)
    assert [a["status"] for a in record["attempts"]] == [200]
    assert record["attempts"][0]["outcome"] == "delivered"


@pytest.mark.in_process
def test_other_methods_and_empty_body(in_process_gateway: InProcessGateway, upstream: Upstream) -> None:
    gateway = in_process_gateway
    gateway.configure(integration_toml("crm", upstream.url)).start()
    put = gateway.request("PUT", "/hooks/crm/x", content=b"abc", headers={"content-type": "text/plain"})
    assert put.status_code == 202
    assert gateway.request("DELETE", "/hooks/crm/y?z=1").status_code == 202
    got = sorted(upstream.wait_for(2), key=lambda r: r.method)
    assert [(r.method, r.path_qs, r.body) for r in got] == [("DELETE", "/y?z=1", b""), ("PUT", "/x", b"abc")]
    assert got[1].headers["content-type"] == "text/plain"
    assert "content-type" not in got[0].headers


@pytest.mark.in_process
def test_retries_500_until_success_with_same_webhook_id(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    upstream.script([500, 502, 200])
    gateway.configure(integration_toml("crm", upstream.url, retry=FAST_RETRY)).start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    upstream.wait_for(3)
    assert upstream.ids() == [event_id] * 3
    record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "delivered" and r)
    assert [(a["n"], a["status"], a["outcome"]) for a in record["attempts"]] == [
        (1, 500, "retrying"),
        (2, 502, "retrying"),
        (3, 200, "delivered"),
    ]


@pytest.mark.in_process
def test_400_is_dead_after_one_attempt(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    upstream.script([Reply(400, body=b'{"error":"bad ticket"}')])
    gateway.configure(integration_toml("crm", upstream.url, retry=FAST_RETRY)).start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "dead" and r)
    assert [(a["status"], a["error"], a["body"]) for a in record["attempts"]] == [
        (400, "http_status", '{"error":"bad ticket"}')
    ]
    assert upstream.count() == 1


@pytest.mark.in_process
def test_exhausted_attempts_go_dead(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    upstream.script([503])
    gateway.configure(integration_toml("crm", upstream.url, retry=FAST_RETRY | {"max_attempts": 3})).start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "dead" and r)
    assert [(a["status"], a["outcome"]) for a in record["attempts"]] == [
        (503, "retrying"),
        (503, "retrying"),
        (503, "dead"),
    ]
    assert upstream.count() == 3
