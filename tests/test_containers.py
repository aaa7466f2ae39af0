"""The Dockerfile and docker-compose.yml, checked without a Docker engine (none runs here): the
stages, user, health check and commands of the image; the services, commands, ports and Redis
settings of the compose file; its config passes check-config; the commands they run exist."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from dockerfile_parse import DockerfileParser

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_the_image_builds_wheels_then_runs_slim_as_a_user_with_a_health_check() -> None:
    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    froms = instructions(parser, "FROM")
    assert len(froms) == 2 and froms[0].endswith(" AS build"), froms
    assert all(f.split()[0].endswith("-slim") for f in froms)
    runs = instructions(parser, "RUN")
    assert any(r.startswith("pip wheel") for r in runs)
    assert any("--no-index" in r and "--find-links=/wheels" in r for r in runs)
    assert "--from=build /wheels /wheels" in instructions(parser, "COPY")
    (user,) = instructions(parser, "USER")
    assert user not in ("root", "0")
    assert any("useradd" in r and user in r.split() for r in runs), "the USER is created"
    (health,) = instructions(parser, "HEALTHCHECK")
    assert "/healthz" in health and "--interval=" in health
    (cmd,) = instructions(parser, "CMD")
    assert cmd.startswith('["gateway", "serve"') and '"0.0.0.0"' in cmd
    assert parser.envs["GATEWAY_CONFIG"] == "/etc/gateway/gateway.toml"
    assert "config /etc/gateway" in instructions(parser, "COPY")


def test_compose_runs_redis_one_api_two_workers_and_the_demo() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker", "demo"}
    redis_command = services["redis"]["command"]
    for flag, value in (("--appendonly", "yes"), ("--maxmemory-policy", "noeviction")):
        assert redis_command[redis_command.index(flag) + 1] == value
    assert redis_command[redis_command.index("--appendfsync") + 1] in ("always", "everysec")
    assert services["api"]["command"][:2] == ["gateway", "serve"]
    assert services["api"]["ports"] == ["8000:8000"]
    assert services["worker"]["command"] == ["gateway", "worker"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["worker"]["healthcheck"] == {"disable": True}  # it serves no HTTP
    assert services["demo"]["command"][:2] == ["gateway", "demo-endpoint"]
    for name in ("api", "worker"):
        service = services[name]
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["build"] == "."


def test_the_compose_config_passes_check_config() -> None:
    services = compose()["services"]
    mount = services["api"]["volumes"][0]
    source, target, _ = mount.split(":")
    assert services["api"]["environment"]["GATEWAY_CONFIG"] == target
    env = {**os.environ, "GATEWAY_CONFIG": str(ROOT / source), "REDIS_URL": "redis://redis:6379/0"}
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"], env=env, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr
    text = (ROOT / source).read_text()
    assert "http://demo:8001/echo" in text
    subnet = compose()["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert f'allowed_networks = ["{subnet}"]' in text


def test_the_demo_endpoint_command_serves_what_the_health_check_asks() -> None:
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo-endpoint", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/echo"
        wait_until(lambda: _answers(url), timeout=15)
        answer = httpx.post(url + "/tickets/1?x=1", json={"ticket": 1})
        assert answer.status_code == 200 and answer.json()["query"] == {"x": "1"}
        check = compose()["services"]["demo"]["healthcheck"]["test"]
        assert check[0] == "CMD"
        probe = [sys.executable if a == "python3" else a for a in check[1:]]
        probe = [a.replace(":8001/", f":{port}/") for a in probe]
        assert subprocess.run(probe, timeout=10).returncode == 0, shlex.join(probe)
    finally:
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=10)
    assert b"Traceback" not in stderr


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False
