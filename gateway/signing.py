"""Standard Webhooks signatures (https://www.standardwebhooks.com/), made for deliveries and
checked on inbound requests, and the generic HMAC signatures other helpdesks send (Zendesk: base64
HMAC-SHA256 of a timestamp header and the body; Help Scout: base64 HMAC-SHA1 of the body).

`webhook-signature` is `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one entry per secret,
separated by spaces, so a receiver keeps working while secrets rotate. The HMACs are the standard
library's; the comparisons are constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import time
from collections.abc import Mapping

PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_...` secret; raises ValueError with a readable reason."""
    if not secret.startswith(PREFIX):
        raise ValueError("a signing secret must start with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("a signing secret must be 'whsec_' followed by base64") from None
    if len(key) < 16:
        raise ValueError("a signing secret must hold at least 16 bytes")
    return key


def sign(keys: list[bytes], event_id: str, timestamp: int, body: bytes) -> str:
    message = f"{event_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode() for key in keys
    )


class BadSignature(Exception):
    """An inbound request whose signature does not verify; the message says why, for its 401."""


def _timestamp(value: str | None, header: str) -> float:
    """Seconds since the epoch from a timestamp header: integer seconds (Standard Webhooks) or
    ISO 8601 (Zendesk's `2024-05-01T12:00:00Z`)."""
    if not value:
        raise BadSignature(f"the {header} header is missing")
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise BadSignature(f"the {header} header is not a timestamp") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _fresh(at: float, now: float, tolerance_s: float, header: str) -> None:
    if abs(now - at) > tolerance_s:
        raise BadSignature(f"the {header} timestamp is more than {tolerance_s:g} s from now")


def verify_standard(
    keys: list[bytes], headers: Mapping[str, str], body: bytes, tolerance_s: float, now: float | None = None
) -> None:
    """Raises BadSignature unless one of the `v1,` signatures of `webhook-signature` is the
    HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}` under one of `keys`."""
    event_id = headers.get("webhook-id")
    if not event_id:
        raise BadSignature("the webhook-id header is missing")
    stamp = headers.get("webhook-timestamp")
    _fresh(
        _timestamp(stamp, "webhook-timestamp"),
        time.time() if now is None else now,
        tolerance_s,
        "webhook-timestamp",
    )
    given = [s.partition(",")[2] for s in headers.get("webhook-signature", "").split() if s.startswith("v1,")]
    if not given:
        raise BadSignature("the webhook-signature header has no v1 signature")
    message = f"{event_id}.{stamp}.".encode() + body
    for key in keys:
        expected = base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()
        if any(hmac.compare_digest(expected, g) for g in given):
            return
    raise BadSignature("the webhook-signature does not match the body")


def verify_hmac(
    keys: list[bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    header: str,
    algorithm: str,
    encoding: str,
    prefix: str = "",
    timestamp_header: str | None = None,
    tolerance_s: float = 300,
    now: float | None = None,
) -> None:
    """Raises BadSignature unless `header` holds `prefix` + the HMAC (hex or base64) of the body,
    or of the timestamp header's value followed by the body (Zendesk), under one of `keys`."""
    signature = headers.get(header.lower())
    if not signature:
        raise BadSignature(f"the {header} header is missing")
    message = body
    if timestamp_header is not None:
        stamp = headers.get(timestamp_header.lower())
        _fresh(
            _timestamp(stamp, timestamp_header),
            time.time() if now is None else now,
            tolerance_s,
            timestamp_header,
        )
        message = (stamp or "").encode() + body
    given = signature.strip()
    if prefix:
        if not given.startswith(prefix):
            raise BadSignature(f"the {header} header does not start with {prefix!r}")
        given = given[len(prefix) :]
    for key in keys:
        digest = hmac.new(key, message, algorithm).digest()
        if encoding == "hex":
            if hmac.compare_digest(digest.hex(), given.lower()):
                return
        elif hmac.compare_digest(base64.b64encode(digest).decode(), given):
            return
    raise BadSignature(f"the {header} signature does not match the body")
