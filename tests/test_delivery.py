"""Delivery: retry classification, backoff, Retry-After, the SSRF guard and signatures."""

from __future__ import annotations

import gzip
import random
import time
from email.utils import formatdate

import pytest
import redis

from gateway.delivery import ErrorKind, Result, Verdict, backoff_s, decide, parse_retry_after
from gateway.settings import RetryPolicy
from gateway.signing import decode_secret, sign
from tests.conftest import (
    KEYS,
    InProcessGateway,
    event_record,
    free_port,
    integration_toml,
    wait_until,
)
from tests.upstream import Reply, Upstream

FAST_RETRY = {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "max_attempts": 5}
POLICY = RetryPolicy(max_attempts=5, backoff_base_s=1, backoff_max_s=60, max_age_s=3600)


def result(
    status: int | None = None, error: ErrorKind | None = None, retry_after: float | None = None
) -> Result:
    return Result(status, error, "", 1.0, b"", retry_after)


@pytest.mark.parametrize(
    ("status", "error", "verdict"),
    [
        (200, None, Verdict.DELIVERED),
        (204, None, Verdict.DELIVERED),
        (500, ErrorKind.HTTP, Verdict.RETRY),
        (503, ErrorKind.HTTP, Verdict.RETRY),
        (408, ErrorKind.HTTP, Verdict.RETRY),
        (429, ErrorKind.HTTP, Verdict.RETRY),
        (400, ErrorKind.HTTP, Verdict.DEAD),
        (404, ErrorKind.HTTP, Verdict.DEAD),
        (301, ErrorKind.HTTP, Verdict.DEAD),
        (None, ErrorKind.TIMEOUT, Verdict.RETRY),
        (None, ErrorKind.CONNECT, Verdict.RETRY),
        (None, ErrorKind.DNS, Verdict.RETRY),
        (None, ErrorKind.BLOCKED, Verdict.DEAD),
        (None, ErrorKind.INVALID_URL, Verdict.DEAD),
    ],
)
def test_classification(status: int | None, error: ErrorKind | None, verdict: Verdict) -> None:
    assert decide(result(status, error), POLICY, attempt=1, age_s=0)[0] is verdict


def test_attempts_and_age_end_in_dead() -> None:
    assert decide(result(500, ErrorKind.HTTP), POLICY, attempt=4, age_s=0)[0] is Verdict.RETRY
    assert decide(result(500, ErrorKind.HTTP), POLICY, attempt=5, age_s=0)[0] is Verdict.DEAD
    assert decide(result(500, ErrorKind.HTTP), POLICY, attempt=1, age_s=3599.9)[0] is Verdict.DEAD


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (40, 60)]:
        waits = [backoff_s(POLICY, attempt, rng) for _ in range(200)]
        assert ceiling / 2 <= min(waits) and max(waits) <= ceiling
        assert max(waits) - min(waits) > ceiling / 4  # jittered, not fixed


def test_retry_after_is_honoured_and_clamped() -> None:
    assert decide(result(429, ErrorKind.HTTP, 7), POLICY, 1, 0) == (Verdict.RETRY, 7)
    assert decide(result(503, ErrorKind.HTTP, 3600), POLICY, 1, 0) == (Verdict.RETRY, 60)
    assert parse_retry_after("120") == 120
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_standard_webhooks_signature_vector() -> None:
    # The example of the Standard Webhooks specification.
    key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign([key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.in_process
def test_timeout_is_retried(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    upstream.script([Reply(delay_s=1.5), Reply(200)])
    gateway.configure(integration_toml("crm", upstream.url, timeout_s=0.3, retry=FAST_RETRY)).start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "delivered" and r)
    assert [(a["error"], a["outcome"]) for a in record["attempts"]] == [
        ("timeout", "retrying"),
        (None, "delivered"),
    ]
    assert record["attempts"][0]["latency_ms"] < 1500


@pytest.mark.in_process
def test_connection_refused_is_retried_until_endpoint_is_up(
    in_process_gateway: InProcessGateway, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    port = free_port()
    retry = {"backoff_base_s": 0.2, "backoff_max_s": 0.4, "max_attempts": 50}
    gateway.configure(integration_toml("crm", f"http://127.0.0.1:{port}/in", retry=retry)).start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    wait_until(lambda: len(event_record(rdb, event_id)["attempts"]) >= 2)
    late = Upstream(port).start()
    try:
        (got,) = late.wait_for(1)
        assert got.webhook_id == event_id and got.path_qs == "/in"
        record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "delivered" and r)
        assert {a["error"] for a in record["attempts"][:-1]} == {"connect"}
    finally:
        late.stop()


@pytest.mark.in_process
def test_429_retry_after_is_honoured(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    upstream.script([(429, {"Retry-After": "1"}), 200])
    retry = {"backoff_base_s": 0.01, "backoff_max_s": 30, "max_attempts": 5}
    gateway.configure(integration_toml("crm", upstream.url, retry=retry)).start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    first, second = upstream.wait_for(2, timeout=15)
    assert second.at - first.at >= 0.9
    record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "delivered" and r)
    assert record["attempts"][0]["status"] == 429
    assert record["attempts"][0]["retry_in_s"] == 1


@pytest.mark.in_process
def test_loopback_target_is_blocked_without_allowed_networks(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    gateway.configure(integration_toml("crm", upstream.url))
    text = gateway.config_path.read_text().replace(
        'allowed_networks = ["127.0.0.0/8"]', "allowed_networks = []"
    )
    gateway.config_path.write_text(text)
    gateway.start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    record = wait_until(lambda: (r := event_record(rdb, event_id))["s"] == "dead" and r)
    assert record["attempts"][0]["error"] == "blocked"
    assert upstream.count() == 0


@pytest.mark.in_process
def test_signed_delivery_verifies(in_process_gateway: InProcessGateway, upstream: Upstream) -> None:
    gateway = in_process_gateway
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    old = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUE="
    gateway.configure(integration_toml("crm", upstream.url, signing_secrets=[secret, old])).start()
    event_id = gateway.post("/hooks/crm", b'{"ticket":1}').json()["id"]
    (got,) = upstream.wait_for(1)
    timestamp = int(got.headers["webhook-timestamp"])
    expected = sign([decode_secret(secret), decode_secret(old)], event_id, timestamp, b'{"ticket":1}')
    assert got.headers["webhook-signature"] == expected
    assert len(expected.split(" ")) == 2


@pytest.mark.in_process
def test_a_2xx_is_delivered_whatever_the_encoding_of_its_body(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    json_gz = gzip.compress(b'{"ok":"compressed"}')
    upstream.script(
        [
            Reply(200, headers={"content-encoding": "br"}, body=b"\x8b\x02\x80not really brotli"),
            Reply(200, headers={"content-encoding": "gzip"}, body=b"\x1f\x8b broken gzip"),
            Reply(200, headers={"content-encoding": "zstd"}, body=b"(\xb5/\xfd zstd-ish"),
            Reply(200, headers={"content-encoding": "gzip"}, body=json_gz),
        ]
    )
    gateway.configure(integration_toml("crm", upstream.url, retry=FAST_RETRY)).start()
    # The helpdesk asks for encodings the worker could not decode; the endpoint is not told so.
    helpdesk = {"accept-encoding": "br, zstd"}
    ids = [gateway.post("/hooks/crm", b"{}", headers=helpdesk).json()["id"] for _ in range(4)]
    wait_until(lambda: rdb.zcard(KEYS.state_index("crm", "delivered")) == 4)
    assert upstream.count() == 4, "each event was sent once"
    assert {r.headers["accept-encoding"] for r in upstream.received} == {"gzip, deflate"}
    records = [event_record(rdb, i) for i in ids]
    assert [len(r["attempts"]) for r in records] == [1, 1, 1, 1]
    bodies = sorted(r["attempts"][0]["body"] for r in records)
    assert '{"ok":"compressed"}' in bodies
    assert any(b.startswith("[") and "br-encoded body, not shown" in b for b in bodies)
    assert any("zstd-encoded body, not shown" in b for b in bodies)
    assert any("gzip-encoded body, not shown" in b for b in bodies)
