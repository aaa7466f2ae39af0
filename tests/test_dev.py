"""`gateway dev`: embedded Redis with an append-only file, API, worker and the demo endpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).parent.parent


def test_dev_delivers_to_demo_endpoint_with_embedded_redis(tmp_path: Path) -> None:
    if not any((Path(p) / "redis-server").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("redis-server is not installed")
    port, echo_port = free_port(), free_port()
    config = (
        (ROOT / "config" / "gateway.toml").read_text().replace("127.0.0.1:8001", f"127.0.0.1:{echo_port}")
    )
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "gateway.toml").write_text(config)
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "GATEWAY_CONFIG"}}
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "gateway", "dev", "--port", str(port), "--echo-port", str(echo_port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _ready(url), timeout=20)
            answer = httpx.post(url + "/hooks/demo/tickets/1", json={"ticket": 1})
            assert answer.status_code == 202
            event_id = answer.json()["id"]
            wait_until(lambda: f"webhook-id={event_id}" in log.read_text(), timeout=15)
            assert "POST /echo/tickets/1" in log.read_text()
            sidebar = httpx.get(url + "/hooks/demo-sidebar/customers", params={"email": "ann+1@example.com"})
            assert (sidebar.status_code, sidebar.headers["x-gateway-cache"]) == (200, "miss")
            assert sidebar.json()["query"] == {"email": "ann+1@example.com"}
            assert sidebar.json()["webhook_id"] == sidebar.headers["x-gateway-event-id"]
            assert (tmp_path / "var").is_dir()
            assert any((tmp_path / "var").rglob("appendonly*")), "no append-only file under ./var"
        finally:
            dev.send_signal(signal.SIGINT)
            dev.wait(timeout=20)
    assert "Traceback" not in log.read_text()
    assert not (tmp_path / "var" / "redis.sock").exists(), "embedded Redis still running"


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False
