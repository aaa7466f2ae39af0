"""Inbound signatures (issue 13, item 7): an integration may ask its helpdesk to sign each
request, Standard Webhooks style or with a generic HMAC (Zendesk, Help Scout); a request that does
not verify is answered 401 JSON and nothing is stored."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from gateway.errors import ConfigError
from gateway.settings import parse_config
from gateway.signing import BadSignature, verify_hmac, verify_standard
from tests.conftest import InProcessGateway, integration_toml, stored_keys, wait_until
from tests.upstream import Upstream

# The Standard Webhooks specification's own example (its libraries test against it).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_HEADERS = {
    "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "webhook-timestamp": "1614265330",
    "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
}
SPEC_BODY = b'{"test": 2432232314}'
SPEC_KEY = base64.b64decode(SPEC_SECRET.removeprefix("whsec_"))
ZENDESK_SECRET = "dGhpcyBpcyBhIHplbmRlc2sgc2lnbmluZyBzZWNyZXQ"


def test_standard_webhooks_example_of_the_specification_verifies() -> None:
    verify_standard([SPEC_KEY], SPEC_HEADERS, SPEC_BODY, 300, now=1614265330 + 10)
    rotated = {
        **SPEC_HEADERS,
        "webhook-signature": "v1,bm90IHRoaXMgb25l " + SPEC_HEADERS["webhook-signature"],
    }
    verify_standard([b"another key of 24 bytes!", SPEC_KEY], rotated, SPEC_BODY, 300, now=1614265330)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"body": b'{"test": 2432232315}'}, "does not match"),
        ({"now": 1614265330 + 301}, "more than 300 s"),
        ({"now": 1614265330 - 301}, "more than 300 s"),
        ({"webhook-id": "msg_other"}, "does not match"),
        ({"webhook-timestamp": "soon"}, "not a timestamp"),
        ({"webhook-signature": "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}, "no v1 signature"),
        ({"webhook-id": ""}, "webhook-id header is missing"),
    ],
)
def test_standard_webhooks_refuses_what_was_not_signed(change: dict[str, Any], why: str) -> None:
    body, now = change.pop("body", SPEC_BODY), change.pop("now", 1614265330)
    with pytest.raises(BadSignature, match=why):
        verify_standard([SPEC_KEY], {**SPEC_HEADERS, **change}, body, 300, now=now)


def zendesk_headers(body: bytes, at: datetime, secret: str = ZENDESK_SECRET) -> dict[str, str]:
    """As Zendesk documents it: base64(HMAC-SHA256(secret, timestamp + body))."""
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).digest()
    return {
        "x-zendesk-webhook-signature": base64.b64encode(digest).decode(),
        "x-zendesk-webhook-signature-timestamp": stamp,
    }


def test_generic_hmac_verifies_zendesk_and_help_scout_signatures() -> None:
    body = b'{"ticket": {"id": 35436}}'
    at = datetime.now(UTC)
    verify_hmac(
        [ZENDESK_SECRET.encode()],
        zendesk_headers(body, at),
        body,
        header="X-Zendesk-Webhook-Signature",
        algorithm="sha256",
        encoding="base64",
        timestamp_header="X-Zendesk-Webhook-Signature-Timestamp",
    )
    help_scout = base64.b64encode(hmac.new(b"hs-secret", body, hashlib.sha1).digest()).decode()
    verify_hmac(
        [b"hs-secret"],
        {"x-helpscout-signature": help_scout},
        body,
        header="X-HelpScout-Signature",
        algorithm="sha1",
        encoding="base64",
    )
    github = "sha256=" + hmac.new(b"gh", body, hashlib.sha256).hexdigest()
    as_github = functools.partial(
        verify_hmac, header="X-Hub-Signature-256", algorithm="sha256", encoding="hex", prefix="sha256="
    )
    as_github([b"gh"], {"x-hub-signature-256": github}, body)
    with pytest.raises(BadSignature, match="does not match"):
        as_github([b"gh"], {"x-hub-signature-256": github}, body + b" ")
    with pytest.raises(BadSignature, match="more than 300 s"):
        verify_hmac(
            [ZENDESK_SECRET.encode()],
            zendesk_headers(body, datetime.fromtimestamp(time.time() - 600, UTC)),
            body,
            header="X-Zendesk-Webhook-Signature",
            algorithm="sha256",
            encoding="base64",
            timestamp_header="X-Zendesk-Webhook-Signature-Timestamp",
        )


ZENDESK = {
    "scheme": "hmac",
    "secrets": ["${ZENDESK_SECRET}"],
    "header": "X-Zendesk-Webhook-Signature",
    "algorithm": "sha256",
    "encoding": "base64",
    "signed": "timestamp+body",
    "timestamp_header": "X-Zendesk-Webhook-Signature-Timestamp",
}


def signed_toml(name: str, target: str, signature: dict[str, Any], **fields: Any) -> str:
    lines = ["[integrations.inbound_signature]"]
    for key, value in signature.items():
        rendered = f'"{value}"' if isinstance(value, str) else "[" + ", ".join(f'"{v}"' for v in value) + "]"
        lines.append(f"{key} = {rendered}")
    return integration_toml(name, target, **fields) + "\n".join(lines) + "\n"


@pytest.mark.in_process
def test_signed_requests_are_relayed_and_unsigned_ones_refused_with_nothing_stored(
    in_process_gateway: InProcessGateway, upstream: Upstream, rdb: redis.Redis
) -> None:
    gateway = in_process_gateway
    gateway.extra_env["ZENDESK_SECRET"] = ZENDESK_SECRET
    gateway.configure(
        signed_toml("zendesk", upstream.url, ZENDESK),
        signed_toml("svix", upstream.url, {"scheme": "standard-webhooks", "secrets": [SPEC_SECRET]}),
        signed_toml("sidebar", upstream.url, ZENDESK, mode="proxy"),
    ).start_api()
    body = b'{"ticket": {"id": 35436}}'
    before = stored_keys(rdb)

    refused = [
        gateway.post("/hooks/zendesk", body),
        gateway.post("/hooks/zendesk", body + b" ", headers=zendesk_headers(body, datetime.now(UTC))),
        gateway.post("/hooks/zendesk", body, headers=zendesk_headers(body, datetime.now(UTC), "wrong")),
        gateway.post("/hooks/svix", SPEC_BODY, headers=SPEC_HEADERS),  # signed in 2021: too old
        gateway.post("/hooks/sidebar", body),  # proxy mode: nothing is called either
    ]
    for response in refused:
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "unauthorized"
        assert "signature" in response.json()["detail"]
    assert stored_keys(rdb) - before == set()  # (the refusal counters are not state)
    assert upstream.received == []

    accepted = gateway.post("/hooks/zendesk", body, headers=zendesk_headers(body, datetime.now(UTC)))
    assert accepted.status_code == 202
    now = str(int(time.time()))
    message = f"msg_1.{now}.".encode() + SPEC_BODY
    signature = "v1," + base64.b64encode(hmac.new(SPEC_KEY, message, hashlib.sha256).digest()).decode()
    svix = gateway.post(
        "/hooks/svix",
        SPEC_BODY,
        headers={"webhook-id": "msg_1", "webhook-timestamp": now, "webhook-signature": signature},
    )
    assert svix.status_code == 202
    proxied = gateway.post("/hooks/sidebar", body, headers=zendesk_headers(body, datetime.now(UTC)))
    assert proxied.status_code == 200
    gateway.start_worker()
    wait_until(lambda: len(upstream.received) == 3)
    assert {r.body for r in upstream.received} == {body, SPEC_BODY}


@pytest.mark.parametrize(
    ("signature", "complaint"),
    [
        ({"scheme": "hmac", "secrets": ["s"]}, "needs header"),
        ({"scheme": "hmac", "secrets": ["s"], "header": "X-Sig", "signed": "timestamp+body"}, "go together"),
        ({"scheme": "hmac", "secrets": ["s"], "header": "bad header"}, "not a valid HTTP header name"),
        ({"scheme": "hmac", "secrets": [], "header": "X-Sig"}, "at least 1"),
        ({"scheme": "standard-webhooks", "secrets": ["whsec_x"]}, "base64"),
        ({"scheme": "standard-webhooks", "secrets": [SPEC_SECRET], "header": "X-Sig"}, "takes only secrets"),
        ({"scheme": "hmac", "secrets": ["s"], "header": "X-Sig", "encoding": "base32"}, "hex"),
    ],
)
def test_a_bad_inbound_signature_section_is_refused_with_its_reason(
    signature: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint) as raised:
        parse_config(signed_toml("crm", "http://127.0.0.1:9/", signature), "test.toml", {})
    assert "inbound_signature" in str(raised.value)
