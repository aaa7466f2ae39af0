"""Sending one attempt upstream, and what its result means.

The hot path uses aiohttp directly: measured here at 32 connections (benchmarks/http_clients.py),
it served several times the requests per second of httpx, with either of httpx's transports.
`map_client_error` is the one place where client errors become error kinds, and `decide` the one
place where an attempt's result becomes delivered, retry or dead.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import socket
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway import signing
from gateway.errors import BlockedTarget
from gateway.settings import Integration, RetryPolicy

SNIPPET_BYTES = 2048
RETRYABLE_STATUS = frozenset({408, 429})


class ErrorKind(StrEnum):
    TIMEOUT = "timeout"
    CONNECT = "connect"
    DNS = "dns"
    TLS = "tls"
    NETWORK = "network"
    BLOCKED = "blocked"
    INVALID_URL = "invalid_url"
    HTTP = "http_status"
    LEASE_EXPIRED = "lease_expired"
    WORKER_STOPPED = "worker_stopped"
    UNKNOWN_INTEGRATION = "unknown_integration"
    TOO_LARGE = "too_large"
    PAUSED = "paused"
    SEALED = "sealed"  # its credential headers do not open with the keys given: nothing sent


# Attempts that sent nothing (the worker sending them was lost or stopped, or the config no longer
# has the integration): they say nothing about the endpoint and have no latency.
NOT_SENT = frozenset(
    {
        ErrorKind.LEASE_EXPIRED,
        ErrorKind.WORKER_STOPPED,
        ErrorKind.UNKNOWN_INTEGRATION,
        ErrorKind.PAUSED,
        ErrorKind.SEALED,
    }
)

# Errors a later attempt cannot fix.
FINAL_ERRORS = frozenset({ErrorKind.BLOCKED, ErrorKind.INVALID_URL, ErrorKind.TOO_LARGE, ErrorKind.SEALED})


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs twice as much
class Result:
    status: int | None
    error: ErrorKind | None
    detail: str
    latency_ms: float
    body: bytes = b""
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        if self.status is not None:
            return self.status in RETRYABLE_STATUS or self.status >= 500
        return self.error not in FINAL_ERRORS


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


def backoff_s(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with equal jitter: the wait after attempt n lies in [d/2, d]."""
    ceiling = min(policy.backoff_max_s, policy.backoff_base_s * 2.0 ** min(attempt - 1, 62))
    jitter = rng.uniform(0, ceiling / 2) if rng is not None else random.uniform(0, ceiling / 2)
    return ceiling / 2 + jitter


def decide(result: Result, policy: RetryPolicy, attempt: int, age_s: float) -> tuple[Verdict, float]:
    """The verdict on attempt n and, for a retry, the wait in seconds before the next one."""
    if result.ok:
        return Verdict.DELIVERED, 0.0
    if not result.retryable or attempt >= policy.max_attempts:
        return Verdict.DEAD, 0.0
    if result.retry_after_s is not None:
        wait = min(max(result.retry_after_s, 0.0), policy.backoff_max_s)
    else:
        wait = backoff_s(policy, attempt)
    if age_s + wait > policy.max_age_s:
        return Verdict.DEAD, 0.0
    return Verdict.RETRY, wait


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def upstream_headers(
    kept: list[tuple[str, str]],
    integration: Integration,
    event_id: str,
    body: bytes,
    *,
    accept_encoding: str | None = None,
) -> list[tuple[str, str]]:
    """The helpdesk's headers, the configured ones over them, then the Standard Webhooks ones.
    `accept_encoding` replaces the helpdesk's Accept-Encoding (a worker asks only for what it can
    read; the proxy passes the helpdesk's on, with the answer's encoding untouched)."""
    configured = {name.lower(): value.get_secret_value() for name, value in integration.headers.items()}
    if accept_encoding is not None and "accept-encoding" not in configured:
        configured["accept-encoding"] = accept_encoding
    headers = [(k, v) for k, v in kept if k.lower() not in configured]
    headers += [(name, value) for name, value in configured.items()]
    timestamp = int(time.time())
    headers += [("webhook-id", event_id), ("webhook-timestamp", str(timestamp))]
    if integration.signing_secrets:
        keys = [signing.decode_secret(s.get_secret_value()) for s in integration.signing_secrets]
        headers.append(("webhook-signature", signing.sign(keys, event_id, timestamp, body)))
    return headers


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: where the IPv4 sits varies; refused
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (:: and ::1 excepted)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...] | None:
    """The IPv4 addresses an IPv6 address carries and reaches: IPv4-mapped, IPv4-compatible,
    NAT64 (64:ff9b::/96), 6to4 (2002::/16), Teredo (its server and its client); None for others."""
    if ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo
    if ip in NAT64 or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)
    return None


class AddressPolicy:
    """The SSRF guard: only public addresses, plus the networks the config allows."""

    def __init__(self, allowed: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._allowed = list(allowed)
        self._literal: dict[str, bool] = {}  # host -> allowed, for targets given as addresses

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return self._allows(ip)

    def _allows(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(ip in net for net in self._allowed):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = embedded_ipv4(ip)
            if embedded is not None:
                # The IPv4 address inside decides: 64:ff9b::7f00:1 is loopback by another name
                # (Python calls the NAT64, 6to4 and IPv4-compatible forms global).
                return all(self._allows(v4) for v4 in embedded)
            if ip in LOCAL_NAT64:
                return False
        return ip.is_global

    def check_literal(self, host: str) -> None:
        """Refuses a target given as an IP address the policy does not allow (names are checked
        when they are resolved). A worker sends to few hosts, so each answer is kept."""
        allowed = self._literal.get(host)
        if allowed is None:
            try:
                ipaddress.ip_address(host.strip("[]"))
                allowed = self.allows(host.strip("[]"))
            except ValueError:
                allowed = True  # a name: the resolver checks its addresses
            if len(self._literal) < 1024:
                self._literal[host] = allowed
        if not allowed:
            raise BlockedTarget(f"{host} is not an allowed address")


class GuardedResolver(AbstractResolver):
    def __init__(self, policy: AddressPolicy) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if self._policy.allows(r["host"])]
        if not kept:
            raise BlockedTarget(f"{host} resolves only to addresses the gateway may not call")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def map_client_error(exc: BaseException) -> tuple[ErrorKind, str]:
    if isinstance(exc, BlockedTarget):
        return ErrorKind.BLOCKED, str(exc)
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return ErrorKind.TIMEOUT, "no complete answer within the integration's timeout"
    if isinstance(exc, aiohttp.InvalidURL):
        return ErrorKind.INVALID_URL, f"invalid URL: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ErrorKind.DNS, str(exc)
    if isinstance(exc, aiohttp.ClientSSLError):
        return ErrorKind.TLS, str(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.__cause__
        if isinstance(cause, BlockedTarget):
            return ErrorKind.BLOCKED, str(cause)
        return ErrorKind.CONNECT, str(exc)
    return ErrorKind.NETWORK, f"{type(exc).__name__}: {exc}"


class Sender:
    """One shared HTTP client per worker process."""

    def __init__(self, policy: AddressPolicy, max_connections: int) -> None:
        self._policy = policy
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            resolver=GuardedResolver(self._policy),
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The verdict is the status line's: the body is read raw (2 KiB at most, for the
            # attempt log), so an encoding aiohttp cannot decode never turns a 2xx into an error.
            auto_decompress=False,
            skip_auto_headers=("Content-Type",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes, timeout_s: float
    ) -> Result:
        assert self._session is not None, "Sender.start() was not awaited"
        started = time.perf_counter()
        try:
            # Parsed once, here: aiohttp takes the parsed URL as it is.
            target = URL(url, encoded=True)
            self._policy.check_literal(target.host or "")
            # One deadline for the whole exchange (connect, send, headers, body): the lease and
            # the job timeout are set above it, so a slow endpoint never gets a second copy.
            async with asyncio.timeout(timeout_s):
                async with self._session.request(
                    method, target, headers=headers, data=body or None, allow_redirects=False
                ) as response:
                    raw = await response.content.read(SNIPPET_BYTES)
                    status = response.status
                    snippet = readable_snippet(raw, response.headers.get("Content-Encoding", ""))
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, OSError, TimeoutError, BlockedTarget, ValueError) as exc:
            kind, detail = map_client_error(exc)
            return Result(None, kind, detail, _ms_since(started))
        latency = _ms_since(started)
        detail = "" if 200 <= status < 300 else f"HTTP {status}"
        return Result(
            status, None if 200 <= status < 300 else ErrorKind.HTTP, detail, latency, snippet, retry_after
        )


ACCEPT_ENCODING = "gzip, deflate"  # what readable_snippet decodes


def readable_snippet(raw: bytes, encoding: str) -> bytes:
    """The start of an answer's body for the attempt log: as sent, or decoded when it is gzip or
    deflate (as much as the first bytes give), or a note when it cannot be read."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:  # wbits 47: a gzip or zlib header, detected; a cut-off stream gives what it has
            return zlib.decompressobj(47).decompress(raw, SNIPPET_BYTES)
        except zlib.error:
            pass
    return f"[{len(raw)} bytes of a {encoding or 'unknown'}-encoded body, not shown]".encode()


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
