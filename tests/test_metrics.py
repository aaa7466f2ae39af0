"""/metrics: cluster-wide figures from Redis, checked with prometheus_client's own parser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, InProcessGateway, RedisServer, integration_toml, wait_until
from tests.upstream import Reply, Upstream


def scrape(gateway: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = gateway.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.in_process
def test_metrics_equal_what_happened_across_two_workers(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    upstream.responder = lambda r: Reply(400 if r.path_qs.startswith("/bad") else 200)
    gateway.configure(
        integration_toml("crm", upstream.url + "/crm", retry={"backoff_base_s": 0.05, "backoff_max_s": 0.1}),
        integration_toml("bad", upstream.url + "/bad", retry={"max_attempts": 1}),
    ).start(workers=2)
    for _ in range(20):
        assert gateway.post("/hooks/crm").status_code == 202
    for _ in range(3):
        assert gateway.post("/hooks/bad").status_code == 202
    assert gateway.post("/hooks/nope").status_code == 404
    assert gateway.post("/hooks/nope").status_code == 404

    def settled() -> Any:
        s = scrape(gateway)
        done = value(s, "gateway_attempts_total", integration="crm", outcome="delivered") == 20
        dead = value(s, "gateway_attempts_total", integration="bad", outcome="dead") == 3
        refused = s.get(("gateway_inbound_refused_total", (("reason", "404"),))) == 2
        return done and dead and refused and s

    s = wait_until(settled, timeout=20)
    assert value(s, "gateway_events_accepted_total", integration="crm", mode="relay") == 20
    assert value(s, "gateway_events_accepted_total", integration="bad", mode="relay") == 3
    assert value(s, "gateway_attempts_total", integration="crm", outcome="retrying") == 0
    assert value(s, "gateway_attempt_duration_seconds_count", integration="crm") == 20
    assert value(s, "gateway_attempt_duration_seconds_bucket", integration="crm", le="+Inf") == 20
    # each attempt taken off the schedule counts its wait from due to claim
    assert value(s, "gateway_schedule_wait_seconds_count", integration="crm") == 20
    assert 0 <= value(s, "gateway_schedule_wait_seconds_sum", integration="crm") < 20
    assert value(s, "gateway_max_in_flight", integration="crm") == 32
    assert value(s, "gateway_integration_waiting_seconds", integration="crm") == 0
    assert 0 < value(s, "gateway_attempt_duration_seconds_sum", integration="crm") < 20
    assert value(s, "gateway_events", integration="crm", state="pending") == 0
    assert value(s, "gateway_events", integration="bad", state="dead") == 3
    assert value(s, "gateway_consecutive_failures", integration="bad") == 3
    assert value(s, "gateway_consecutive_failures", integration="crm") == 0
    assert value(s, "gateway_integration_paused", integration="crm") == 0
    assert value(s, "gateway_oldest_pending_age_seconds", integration="crm") == 0
    logs = gateway.log("worker0.log") + gateway.log("worker1.log")
    assert "(crm)" in gateway.log("worker0.log") and "(crm)" in gateway.log("worker1.log"), logs[-2000:]


@pytest.mark.in_process
def test_a_scrape_costs_the_same_commands_whatever_the_number_of_events(
    tmp_path: Path, upstream: Upstream
) -> None:
    # A server of its own: INFO commandstats counts every client's commands, other tests' too.
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    gateway = InProcessGateway(tmp_path, server.url)
    client = redis.Redis.from_url(server.url)
    try:
        _same_commands_per_scrape(gateway, upstream, client)
    finally:
        client.close()
        gateway.stop()
        server.stop()


def _same_commands_per_scrape(gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis) -> None:
    gateway.configure(integration_toml("crm", upstream.url), integration_toml("erp", upstream.url))
    gateway.start_api()  # no worker: the scrape is the only thing talking to Redis

    def commands_per_scrape() -> int:
        scrape(gateway)
        before = cast(dict[str, Any], rdb.info("commandstats"))
        scrape(gateway)
        after = cast(dict[str, Any], rdb.info("commandstats"))
        total = 0
        for name, stats in after.items():
            total += stats["calls"] - before.get(name, {"calls": 0})["calls"]
        return total - 1  # the INFO that read `before`

    for _ in range(5):
        gateway.post("/hooks/crm")
    few = commands_per_scrape()
    for _ in range(300):
        gateway.post("/hooks/crm")
    many = commands_per_scrape()
    assert few == many
    assert value(scrape(gateway), "gateway_events", integration="crm", state="pending") == 305


def test_promtool_accepts_the_exposition(gateway: Gateway, upstream: Upstream, rdb: redis.Redis) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    gateway.configure(integration_toml("crm", upstream.url)).start()
    gateway.post("/hooks/crm")
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
