"""Credentials at rest: the helpdesk's credential headers are sealed (AES-GCM) before they are
written to Redis, and opened only by the worker that sends them.

Redis and its append-only file hold events for days; a header such as `Authorization` in them is
a credential in clear on disk and in every backup. With `GATEWAY_SECRET_KEY` set, each such value
is stored as `gwenc:1:<key id>:<nonce + ciphertext>` (base64url), bound to its header name (the
associated data), so a value cannot be moved to another header. The key id (the first 8 hex digits
of the key's SHA-256) says which key opens it: several keys may be given, comma-separated, and the
first one seals, so a key is rotated by putting a new one first and dropping the old one once no
event sealed with it remains (at most `[retention]` days later).

AES-GCM comes from the `cryptography` package (OpenSSL underneath); nothing here is our own crypto.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import re
from collections.abc import Iterable
from operator import itemgetter

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import ConfigError
from gateway.events import StoredRequest

ENV = "GATEWAY_SECRET_KEY"
PREFIX = "gwenc:1:"
# Credentials a helpdesk sends: sealed at rest, never shown (`[gateway] credential_headers` adds).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
NONCE_BYTES = 12
SEALED_KEPT = 1024  # sealed credentials kept for reuse by the API (see AtRest)


class Unsealable(Exception):
    """A sealed value that no configured key opens (its key was dropped, or it was altered)."""


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


class Sealer:
    """Seals and opens header values with the keys of GATEWAY_SECRET_KEY (the first one seals)."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._ids = [key_id(k) for k in keys]
        self._ciphers = {i: AESGCM(k) for i, k in zip(self._ids, keys, strict=True)}
        self._sealing = self._ids[0]
        self._seal_prefix = f"{PREFIX}{self._sealing}:"

    @classmethod
    def from_text(cls, text: str) -> Sealer:
        """Keys as GATEWAY_SECRET_KEY gives them: base64url, 32 bytes each, comma-separated."""
        keys = []
        for n, part in enumerate(p.strip() for p in text.split(",")):
            try:
                key = _b64decode(part) if re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", part) else b""
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != 32:
                raise ConfigError(
                    ENV,
                    "",
                    f"key {n + 1} is not 32 bytes in base64url; make one with "
                    "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`",
                )
            keys.append(key)
        return cls(keys)

    @staticmethod
    def new_key() -> str:
        return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()

    def seal(self, name: str, value: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self._sealing].encrypt(nonce, value.encode(), name.lower().encode())
        return self._seal_prefix + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()

    def open(self, name: str, value: str) -> str:
        if not value.startswith(PREFIX):
            return value  # stored in clear (before sealing was on, or store_credentials = "plain")
        kid, _, blob = value[len(PREFIX) :].partition(":")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise Unsealable(f"the {name} header was sealed with key {kid}, which {ENV} no longer has")
        try:
            raw = _b64decode(blob)
            return cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], name.lower().encode()).decode()
        except (InvalidTag, binascii.Error, ValueError, UnicodeDecodeError):
            raise Unsealable(f"the {name} header's sealed value does not open with key {kid}") from None

    def open_headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(k, self.open(k, v)) for k, v in headers]


def open_headers(sealer: Sealer | None, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers with their sealed values opened; Unsealable when one cannot be."""
    if not any(v.startswith(PREFIX) for _, v in headers):
        return headers
    if sealer is None:
        raise Unsealable(f"the event's credential headers are sealed and {ENV} is not set")
    return sealer.open_headers(headers)


class AtRest:
    """How a request is packed for Redis: its credential headers sealed, or in clear when the
    config says store_credentials = "plain" (then no sealer is given).

    A helpdesk sends the same credential on every request of an integration, and sealing one
    (AES-GCM with a fresh nonce, base64url) cost about a tenth of the API's CPU per event. So the
    sealed form of the last SEALED_KEPT (header, value) pairs is kept and reused: equal values then
    have equal sealed forms in Redis (which tells only that two events carried the same credential),
    and a nonce is never reused for a different value, which is what AES-GCM forbids."""

    def __init__(self, sealer: Sealer | None, names: frozenset[str]) -> None:
        self._names = names
        self._seal = functools.lru_cache(maxsize=SEALED_KEPT)(sealer.seal) if sealer else None

    def pack(self, request: StoredRequest) -> bytes:
        # Header names arrive in lower case (ASGI), so the common case is one set lookup a header.
        seal, names = self._seal, self._names
        if seal is None or names.isdisjoint(map(itemgetter(0), request.headers)):
            return request.pack()
        return request.pack([(k, seal(k, v)) if k in names else (k, v) for k, v in request.headers])
