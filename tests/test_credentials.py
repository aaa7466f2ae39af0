"""Credentials at rest (issue 13, item 6): what the helpdesk sends as a credential is sealed with
AES-GCM in Redis, opened only to be sent; a header that a configured one replaces is not kept at
all; secrets echoed in answers and secrets inside target URLs are never shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from gateway.dev import dev_secret_key
from gateway.errors import ConfigError
from gateway.events import StoredRequest
from gateway.keys import Keys
from gateway.sealing import CREDENTIAL_HEADERS, PREFIX, AtRest, Sealer, Unsealable, open_headers
from gateway.settings import REDACTED, parse_config
from tests.conftest import (
    TEST_SECRET_KEY,
    Gateway,
    InProcessGateway,
    event_record,
    integration_toml,
    wait_until,
)
from tests.upstream import Received, Reply, Upstream

KEYS = Keys("gw")
AUTH = {"authorization": "Bearer test-admin-token"}
HELPDESK = {
    "authorization": "Bearer helpdesk-credential-1234",
    "cookie": "session=helpdesk-cookie-5678",
    "x-shop-token": "helpdesk-shop-token-9012",
    "x-api-key": "helpdesk-api-key-replaced",
    "x-plain": "an ordinary header",
}
CONFIGURED_KEY = "configured-api-key-3456"
QUERY_KEY = "query-key-from-env-7890"
PASSWORD = "userinfo-password-2468"


def everything_in_redis(rdb: redis.Redis) -> bytes:
    """Every value of every key in the test database, as bytes: where a credential could sit."""
    out = []
    for raw in cast(list[bytes], rdb.keys("*")):
        key = raw.decode()
        kind = cast(bytes, rdb.type(key))
        if kind == b"string":
            out.append(cast(bytes, rdb.get(key)))
        elif kind == b"hash":
            out += [k + v for k, v in cast(dict[bytes, bytes], rdb.hgetall(key)).items()]
        elif kind == b"list":
            out += cast(list[bytes], rdb.lrange(key, 0, -1))
        elif kind == b"zset":
            out += [m for m, _ in cast(list[tuple[bytes, float]], rdb.zrange(key, 0, -1, withscores=True))]
        elif kind == b"set":
            out += list(cast(set[bytes], rdb.smembers(key)))
        elif kind == b"stream":
            out += [repr(e).encode() for e in cast(list[Any], rdb.xrange(key))]
    return b"\n".join(out)


def admin(gateway: Gateway, path: str) -> Any:
    response = gateway.get(path, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def crm(upstream: Upstream, **fields: Any) -> str:
    return integration_toml(
        "crm",
        upstream.url + "/api?key=${CRM_QUERY_KEY}",
        headers={"X-Api-Key": "${CRM_API_KEY}"},
        retry={"max_attempts": 1},
        **fields,
    )


def configure(gateway: Gateway, *integrations: str, gateway_section: str = "") -> Gateway:
    gateway.extra_env.update(CRM_API_KEY=CONFIGURED_KEY, CRM_QUERY_KEY=QUERY_KEY)
    section = 'credential_headers = ["X-Shop-Token"]\n' + gateway_section
    return gateway.configure(*integrations, gateway=section)


@pytest.mark.in_process
def test_credentials_are_sealed_in_redis_sent_in_clear_and_never_shown(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    configure(gateway, crm(upstream)).start_api()
    event_id = gateway.post(
        "/hooks/crm/tickets?email=a%2B1%40example.com", b'{"n":1}', headers=HELPDESK
    ).json()["id"]

    # At rest, before any worker runs: no credential in clear anywhere in Redis; the replaced
    # X-Api-Key not at all (not even sealed); the ordinary header as it came.
    stored = everything_in_redis(rdb)
    for secret in ("helpdesk-credential-1234", "helpdesk-cookie-5678", "helpdesk-shop-token-9012"):
        assert secret.encode() not in stored
    assert b"helpdesk-api-key-replaced" not in stored and b"x-api-key" not in stored
    assert b"an ordinary header" in stored
    assert stored.count(PREFIX.encode()) == 3  # authorization, cookie, x-shop-token

    gateway.start_worker()
    wait_until(lambda: len(upstream.received) == 1)
    sent = upstream.received[0]
    assert sent.headers["authorization"] == HELPDESK["authorization"]
    assert sent.headers["cookie"] == HELPDESK["cookie"]
    assert sent.headers["x-shop-token"] == HELPDESK["x-shop-token"]
    assert sent.headers["x-api-key"] == CONFIGURED_KEY
    assert sent.path_qs == f"/api/tickets?key={QUERY_KEY}&email=a%2B1%40example.com"

    wait_until(lambda: event_record(rdb, event_id)["s"] == "delivered")
    shown = admin(gateway, f"/admin/events/{event_id}")
    headers = dict(shown["request"]["headers"])
    assert headers["authorization"] == headers["cookie"] == headers["x-shop-token"] == REDACTED
    assert headers["x-plain"] == "an ordinary header"
    assert shown["request"]["url"] == f"{upstream.url}/api/tickets?key={REDACTED}&email=a%2B1%40example.com"
    listed = admin(gateway, "/admin/integrations/crm")
    assert listed["target"] == f"{upstream.url}/api?key={REDACTED}"


@pytest.mark.in_process
def test_an_echoed_secret_is_scrubbed_from_the_attempt_log(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway

    def echo(received: Received) -> Reply:
        body = f"denied: key {received.headers['x-api-key']} for {received.path_qs}".encode()
        return Reply(403, body=body)

    upstream.responder = echo
    configure(gateway, crm(upstream, inbound_token="inbound-token-1357")).start()
    response = gateway.post("/hooks/crm", b"{}", headers={"x-gateway-token": "inbound-token-1357"})
    event_id = response.json()["id"]
    wait_until(lambda: event_record(rdb, event_id)["s"] == "dead")

    (attempt,) = event_record(rdb, event_id)["attempts"]
    assert attempt["status"] == 403
    assert CONFIGURED_KEY not in attempt["body"] and QUERY_KEY not in attempt["body"]
    assert attempt["body"] == f"denied: key {REDACTED} for /api?key={REDACTED}"
    assert b"inbound-token-1357" not in everything_in_redis(rdb)


@pytest.mark.in_process
def test_rotation_opens_old_events_and_a_dropped_key_ends_them_as_sealed(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    configure(gateway, crm(upstream)).start_api()
    first = gateway.post("/hooks/crm", b"{}", headers=HELPDESK).json()["id"]

    new_key = Sealer.new_key()
    gateway.extra_env["GATEWAY_SECRET_KEY"] = f"{new_key},{TEST_SECRET_KEY}"  # rotated: new one first
    worker = gateway.start_worker()
    wait_until(lambda: event_record(rdb, first)["s"] == "delivered")
    assert upstream.received[0].headers["authorization"] == HELPDESK["authorization"]
    worker.terminate()
    worker.wait(timeout=10)

    second = gateway.post("/hooks/crm", b"{}", headers=HELPDESK).json()["id"]  # sealed with the old key
    gateway.extra_env["GATEWAY_SECRET_KEY"] = new_key  # the old key dropped too soon
    gateway.start_worker()
    wait_until(lambda: event_record(rdb, second)["s"] == "dead")
    (attempt,) = event_record(rdb, second)["attempts"]
    assert attempt["error"] == "sealed" and "no longer has" in attempt["detail"]
    assert len(upstream.received) == 1  # nothing was sent without its credentials


def run_gateway(tmp_path: Path, command: str, config: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.toml"
    path.write_text(config)
    full = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full.update(GATEWAY_CONFIG=str(path), GATEWAY_ADMIN_TOKEN="t", REDIS_URL="redis://127.0.0.1:1/0", **env)
    args = [sys.executable, "-m", "gateway", command] + (["--port", "0"] if command == "serve" else [])
    return subprocess.run(args, env=full, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_serve_and_worker_refuse_to_store_credentials_in_clear_unless_told(
    tmp_path: Path, command: str
) -> None:
    config = integration_toml("crm", "http://127.0.0.1:9/")
    done = run_gateway(tmp_path, command, config)
    assert done.returncode == 2
    assert "GATEWAY_SECRET_KEY is not set" in done.stderr and 'store_credentials = "plain"' in done.stderr
    assert "Traceback" not in done.stderr

    bad = run_gateway(tmp_path, command, config, GATEWAY_SECRET_KEY="too-short")
    assert bad.returncode == 2
    assert "GATEWAY_SECRET_KEY" in bad.stderr and "32 bytes" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.in_process
@pytest.mark.parametrize("with_key", [False, True], ids=["no-key", "key-set"])
def test_plain_on_purpose_keeps_them_in_clear(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis, with_key: bool
) -> None:
    """ "plain" stores credentials in clear, with or without GATEWAY_SECRET_KEY (which the workers
    still use to open events sealed before)."""
    gateway = in_process_gateway
    if not with_key:
        del gateway.extra_env["GATEWAY_SECRET_KEY"]
    configure(gateway, crm(upstream), gateway_section='store_credentials = "plain"\n').start()
    event_id = gateway.post("/hooks/crm", b"{}", headers=HELPDESK).json()["id"]
    wait_until(lambda: event_record(rdb, event_id)["s"] == "delivered")
    assert b"helpdesk-credential-1234" in everything_in_redis(rdb)
    assert upstream.received[0].headers["authorization"] == HELPDESK["authorization"]


def test_the_api_reuses_the_sealed_form_of_a_credential_only_for_the_same_value() -> None:
    """AtRest keeps sealed credentials for reuse (a helpdesk sends the same one every time): the
    same header and value give the same sealed form; another value or header a fresh nonce."""
    sealer = Sealer.from_text(Sealer.new_key())
    at_rest = AtRest(sealer, CREDENTIAL_HEADERS)

    def stored(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return StoredRequest.unpack(at_rest.pack(StoredRequest("POST", "http://h/", headers, b"{}"))).headers

    first = stored([("authorization", "Bearer one"), ("x-api-key", "Bearer one"), ("accept", "*/*")])
    again = stored([("authorization", "Bearer one")])
    other = stored([("authorization", "Bearer two")])
    assert first[0] == again[0] and first[0][1].startswith(PREFIX)
    assert len({first[0][1], first[1][1], other[0][1]}) == 3  # another header, another value
    assert first[2] == ("accept", "*/*")
    assert open_headers(sealer, first + other) == [
        ("authorization", "Bearer one"),
        ("x-api-key", "Bearer one"),
        ("accept", "*/*"),
        ("authorization", "Bearer two"),
    ]


def test_a_sealed_value_opens_only_with_its_key_and_under_its_own_header_name() -> None:
    old, new = Sealer.new_key(), Sealer.new_key()
    sealed = Sealer.from_text(old).seal("Authorization", "Bearer abc")
    assert sealed.startswith(PREFIX) and "abc" not in sealed
    assert Sealer.from_text(f"{new},{old}").open("authorization", sealed) == "Bearer abc"
    assert Sealer.from_text(new).seal("x", "v") != Sealer.from_text(new).seal("x", "v")  # fresh nonce
    with pytest.raises(Unsealable, match="no longer has"):
        Sealer.from_text(new).open("authorization", sealed)
    with pytest.raises(Unsealable, match="does not open"):
        Sealer.from_text(old).open("cookie", sealed)  # moved to another header
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(Unsealable, match="does not open"):
        Sealer.from_text(old).open("authorization", tampered)
    assert Sealer.from_text(old).open("x-plain", "not sealed") == "not sealed"


@pytest.mark.parametrize("text", ["", "abc", "a" * 43 + "!", f"{TEST_SECRET_KEY},short"])
def test_a_malformed_key_is_refused_with_its_position(text: str) -> None:
    with pytest.raises(ConfigError, match="32 bytes in base64url"):
        Sealer.from_text(text)


def test_only_values_in_a_targets_query_are_redacted_as_url_secrets() -> None:
    config = parse_config(
        integration_toml(
            "crm",
            "http://${HOST}/v1/${PATH}?key=${KEY}&plain=yes",
            headers={"Authorization": "Basic ${BASIC}"},
        )
        + integration_toml("pw", f"http://ann:{PASSWORD}@127.0.0.1/x"),
        "test.toml",
        {"HOST": "crm.example", "PATH": "orders", "KEY": "k3y/with+chars", "BASIC": "YW5uOnB3"},
    )
    crm, pw = config.integrations
    url = crm.redact(crm.upstream_url("tickets", "q=1"))
    assert url == f"http://crm.example/v1/orders/tickets?key={REDACTED}&plain=yes&q=1"
    assert crm.redact("echo k3y%2Fwith%2Bchars and YW5uOnB3") == f"echo {REDACTED} and {REDACTED}"
    assert pw.redact(str(pw.target)) == f"http://ann:{REDACTED}@127.0.0.1/x"
    with pytest.raises(ConfigError, match="credential_headers"):
        parse_config('[gateway]\ncredential_headers = ["bad name"]\n', "test.toml", {})


def test_dev_keeps_one_key_for_its_var_folder(tmp_path: Path) -> None:
    key = dev_secret_key(tmp_path)
    assert dev_secret_key(tmp_path) == key
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    assert Sealer.from_text(key).open("a", Sealer.from_text(key).seal("a", "v")) == "v"
