"""Bulk replay (exactly once per request, cancel, idempotency) and retention."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
import orjson
import pytest
import redis

from tests.conftest import KEYS, Gateway, InProcessGateway, event_record, integration_toml, wait_until
from tests.upstream import Reply, Upstream

AUTH = {"authorization": "Bearer test-admin-token"}


def admin(gateway: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return gateway.request(method, path, headers={**AUTH, **kwargs.pop("headers", {})}, **kwargs)


def zcard(rdb: redis.Redis, key: str) -> int:
    return int(cast(int, rdb.zcard(key)))


def post_many(gateway: Gateway, n: int) -> list[str]:
    """Posts n hooks, 32 at a time; returns their ids."""

    def one(_: int) -> str:
        answer = gateway.post("/hooks/crm")
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(one, range(n)))


def dead_events(gateway: Gateway, upstream: Upstream, rdb: redis.Redis, n: int, timeout: float) -> list[str]:
    """Starts the gateway with "crm" (one attempt, never paused), makes n events dead on a 400,
    then lets the upstream answer 200; returns their ids."""
    upstream.script([Reply(400)])
    gateway.configure(
        integration_toml("crm", upstream.url, failure_threshold=1000000, retry={"max_attempts": 1})
    ).start()
    ids = post_many(gateway, n)
    wait_until(lambda: zcard(rdb, KEYS.state_index("crm", "dead")) == n, timeout=timeout)
    upstream.script([Reply(200)])
    return ids


@pytest.mark.in_process
def test_bulk_replay_delivers_each_dead_event_once_per_request(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    ids = dead_events(gateway, upstream, rdb, 1000, timeout=60)

    key = {"Idempotency-Key": "replay-dead-crm-1"}
    started = admin(gateway, "POST", "/admin/replay", json={"integration": "crm"}, headers=key)
    assert started.status_code == 202
    job = started.json()
    assert job["matched"] == 1000 and job["status"] in {"running", "done"}
    again = admin(gateway, "POST", "/admin/replay", json={"integration": "crm"}, headers=key)
    assert again.json()["id"] == job["id"], "the same Idempotency-Key started a second replay"

    wait_until(lambda: zcard(rdb, KEYS.state_index("crm", "delivered")) == 1000, timeout=60)
    final = wait_until(
        lambda: (j := admin(gateway, "GET", f"/admin/replays/{job['id']}").json())["status"] == "done" and j,
        timeout=20,
    )
    assert final["replayed"] == 1000 and final["skipped"] == 0
    time.sleep(0.5)
    per_id = Counter(upstream.ids())
    assert set(per_id) == set(ids)
    assert set(per_id.values()) == {2}, "each event: one dead attempt and exactly one replayed delivery"


@pytest.mark.in_process
def test_cancel_stops_a_bulk_replay_and_bad_requests_are_refused(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    dead_events(gateway, upstream, rdb, 600, timeout=60)
    job = admin(gateway, "POST", "/admin/replay", json={"state": "dead"}).json()
    cancelled = admin(gateway, "POST", f"/admin/replays/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"

    def quiet() -> bool:
        # Events replayed before the cancel (a batch may be under way) are all delivered.
        busy = sum(
            zcard(rdb, KEYS.state_index("crm", state)) for state in ("pending", "in_flight", "retrying")
        )
        return (
            busy == 0
            and zcard(rdb, KEYS.state_index("crm", "delivered")) + zcard(rdb, KEYS.state_index("crm", "dead"))
            == 600
        )

    time.sleep(0.5)
    wait_until(quiet, timeout=20)
    settled = zcard(rdb, KEYS.state_index("crm", "delivered"))
    time.sleep(1.0)
    assert zcard(rdb, KEYS.state_index("crm", "delivered")) == settled < 600
    assert admin(gateway, "GET", f"/admin/replays/{job['id']}").json()["status"] == "cancelled"

    for body, field in (
        ({"state": "lost"}, "state"),
        ({"integration": "nope"}, "integration"),
        ({"since": "soon"}, "since"),
        ({"since": True}, "since"),
        ({"colour": 1}, "colour"),
        ([1], "body"),
    ):
        answer = admin(gateway, "POST", "/admin/replay", json=body)
        assert answer.status_code == 422, body
        assert answer.json()["error"] == "invalid_parameter"
        assert answer.json()["detail"].startswith(field + ": "), answer.json()
    huge = admin(
        gateway, "POST", "/admin/replay", content=b'{"state": "dead", "x": "' + b"y" * 70_000 + b'"}'
    )
    assert (huge.status_code, huge.json()["error"]) == (413, "payload_too_large")
    assert admin(gateway, "GET", "/admin/replays/nope").status_code == 404
    assert admin(gateway, "POST", "/admin/replays/nope/cancel").status_code == 404


@pytest.mark.in_process
def test_retention_removes_delivered_events_and_never_held_ones(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    # about 1.7 s; retention runs every second (more chances to trim the held event wrongly, too)
    retention = "[retention]\ndelivered_days = 0.00002\ndead_days = 0.00002\nevery_s = 1\n"
    gateway.configure(integration_toml("crm", upstream.url, probe=False))
    gateway.config_path.write_text(gateway.config_path.read_text() + retention)
    gateway.start()
    delivered = gateway.post("/hooks/crm").json()["id"]
    wait_until(lambda: event_record(rdb, delivered).get("s") == "delivered")
    assert admin(gateway, "POST", "/admin/integrations/crm/pause").status_code == 200
    held = gateway.post("/hooks/crm", b'{"keep":1}').json()["id"]

    # The delivered event's keys expire, then its index entry is trimmed.
    wait_until(
        lambda: (
            not rdb.exists(KEYS.event(delivered)) and zcard(rdb, KEYS.state_index("crm", "delivered")) == 0
        ),
        timeout=20,
    )
    assert not rdb.exists(KEYS.request(delivered)) and not rdb.exists(KEYS.attempts(delivered))
    assert admin(gateway, "GET", f"/admin/events/{delivered}").status_code == 404
    # The held one is untouched, and delivered once resumed.
    assert event_record(rdb, held)["s"] == "held"
    assert rdb.ttl(KEYS.event(held)) == -1 and rdb.ttl(KEYS.request(held)) == -1
    counts = admin(gateway, "GET", "/admin/integrations/crm").json()["counts"]
    assert counts["held"] == 1 and counts["delivered_24h"] == 0
    admin(gateway, "POST", "/admin/integrations/crm/resume")
    (got,) = [r for r in upstream.wait_for(2) if r.webhook_id == held]
    assert got.body == b'{"keep":1}'


def test_cli_bulk_replay_and_clear_errors(gateway: Gateway, upstream: Upstream, rdb: redis.Redis) -> None:
    ids = dead_events(gateway, upstream, rdb, 5, timeout=10)
    env = {**os.environ, "GATEWAY_URL": gateway.url, "GATEWAY_ADMIN_TOKEN": "test-admin-token"}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=30,
        )

    started = cli("replay", "--integration", "crm", "--state", "dead", "--json")
    assert started.returncode == 0, started.stderr
    job = orjson.loads(started.stdout)
    assert job["matched"] == 5
    wait_until(lambda: zcard(rdb, KEYS.state_index("crm", "delivered")) == 5)
    shown = cli("replay", "--show", job["id"])
    assert shown.returncode == 0 and f"bulk replay {job['id']}: done, 5 matched, 5 replayed" in shown.stdout
    assert sorted(r.webhook_id for r in upstream.received[5:]) == sorted(ids)

    unreachable = cli("integrations", GATEWAY_URL="http://127.0.0.1:9")
    assert unreachable.returncode == 1
    assert "cannot reach the gateway API at http://127.0.0.1:9" in unreachable.stderr
    refused = cli("events", GATEWAY_ADMIN_TOKEN="wrong")
    assert refused.returncode == 1 and "refused the admin token" in refused.stderr
    assert "Traceback" not in unreachable.stderr + refused.stderr
