"""`gateway dev`: embedded Redis (or Valkey) with an append-only file, API, worker and the demo
endpoint, from the config/gateway.toml that ships, on the ports given."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).parent.parent


def _dev(tmp_path: Path, port: int, echo_port: int, out: IO[bytes], *, path: str) -> subprocess.Popen[bytes]:
    env = {
        k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "GATEWAY_CONFIG", "GATEWAY_DEMO_PORT"}
    }
    env["PATH"] = path
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "dev", "--port", str(port), "--echo-port", str(echo_port)],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("server", ["redis-server", "valkey"])
def test_dev_delivers_to_demo_endpoint_with_embedded_server(tmp_path: Path, server: str) -> None:
    if server == "redis-server" and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on this machine: the valkey case covers it")
    # The valkey case runs with a PATH that has no redis-server, as on a machine without one.
    path = os.environ["PATH"] if server == "redis-server" else str(tmp_path / "empty-bin")
    (tmp_path / "empty-bin").mkdir()
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "gateway.toml", tmp_path / "config" / "gateway.toml")
    port, echo_port = free_port(), free_port()  # not 8001: --echo-port must reach the demo's target
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        dev = _dev(tmp_path, port, echo_port, out, path=path)
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
            server_log = (tmp_path / "var" / "redis.log").read_text()
            assert ("Valkey" in server_log) == (server == "valkey"), server_log[-500:]

            # A second `gateway dev` in the same folder says so and starts nothing.
            second = subprocess.run(
                [sys.executable, "-m", "gateway", "dev", "--port", str(free_port())],
                cwd=tmp_path,
                env={**os.environ, "PATH": path},
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert second.returncode == 2, second.stderr
            assert f"another gateway dev (pid {dev.pid}) is running in" in second.stderr
            assert "Traceback" not in second.stderr
            assert _ready(url), "the first gateway dev was disturbed"
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
