"""Readiness with worker heartbeats, JSON log lines, and `gateway status`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import pytest
import redis

from tests.conftest import Gateway, InProcessGateway, event_record, integration_toml, wait_until
from tests.upstream import Upstream


@pytest.mark.in_process
def test_readyz_needs_a_live_worker(in_process_gateway: InProcessGateway, upstream: Upstream) -> None:
    gateway = in_process_gateway
    gateway.configure(integration_toml("crm", upstream.url)).start_api()
    not_ready = gateway.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json() == {
        "error": "unavailable",
        "detail": "no worker has sent a heartbeat in the last 10 s",
    }
    worker = gateway.start_worker()
    assert wait_until(lambda: gateway.get("/readyz").json().get("workers")) == 1
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=15)
    # A worker that stops says so at once; it does not wait for its heartbeat to go stale.
    assert gateway.get("/readyz").status_code == 503
    assert gateway.get("/healthz").status_code == 200


@pytest.mark.in_process
def test_log_lines_are_json_with_event_fields(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    gateway.configure(integration_toml("crm", upstream.url)).start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    wait_until(lambda: event_record(rdb, event_id).get("s") == "delivered")
    wait_until(lambda: event_id in gateway.log("worker0.log"))
    lines = [orjson.loads(line) for line in gateway.log("worker0.log").splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    (attempt,) = [line for line in lines if line.get("event_id") == event_id]
    assert attempt["integration"] == "crm" and attempt["attempt"] == 1
    assert attempt["status"] == 200 and attempt["outcome"] == "delivered" and attempt["level"] == "info"
    assert attempt["latency_ms"] >= 0


def test_status_command(gateway: Gateway, upstream: Upstream, rdb: redis.Redis) -> None:
    gateway.configure(integration_toml("crm", upstream.url)).start()
    event_id = gateway.post("/hooks/crm").json()["id"]
    wait_until(lambda: event_record(rdb, event_id).get("s") == "delivered")
    env = {**os.environ, "GATEWAY_URL": gateway.url, "GATEWAY_ADMIN_TOKEN": "test-admin-token"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "status", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    data = wait_until(lambda: (d := orjson.loads(run("--json").stdout))["workers_live"] == 1 and d)
    assert data["integrations"][0]["counts"]["delivered_24h"] == 1
    table = run()
    assert table.returncode == 0
    assert "live workers: 1" in table.stdout and "crm" in table.stdout
