"""Proxy mode: the helpdesk gets the upstream's own answer, or the last good one, and no write is lost.

A helpdesk stores the JSON answer of an HTTP integration on the customer and builds its sidebar
from it, so a relay's `202 {"id"}` is no use there. In proxy mode the API forwards the request at
once, within the integration's `timeout_s`, and answers with the upstream's status, headers and
body (`x-gateway-cache: miss`). Each 2xx answer is kept in Redis under its request key; when the
upstream fails (timeout, refused, reset, 5xx, 429), that copy answers instead (`stale`, with
`Age`), so the helpdesk never counts a failure; within `fresh_ttl_s` the copy answers without any
call (`hit`). A write that fails is stored, before the answer, as a relay event that the workers
deliver with retries under the same `webhook-id`.

What it costs the answer: one pipelined read (is the integration paused; the copy, when fresh hits
are on) before the call. The log (an event per request, its attempt, the copy, health and metric
counts) is written after the answer, in batches (`PROXIED`), except a queued write, which is
stored before its answer. Identical concurrent reads in one process share one upstream call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson
from redis.exceptions import RedisError
from yarl import URL

from gateway.alerts import Alerts
from gateway.delivery import (
    SNIPPET_BYTES,
    AddressPolicy,
    ErrorKind,
    GuardedResolver,
    Result,
    Verdict,
    decide,
    map_client_error,
    parse_retry_after,
    upstream_headers,
)
from gateway.errors import (
    BadGateway,
    BlockedTarget,
    GatewayTimeout,
    HTTPError,
    IntegrationPaused,
    ServiceUnavailable,
    StoreUnavailable,
    error_json,
)
from gateway.events import Answered, AttemptRecord, EventState, StoredRequest, new_event_id, now_ms
from gateway.sealing import AtRest
from gateway.settings import Config, Integration
from gateway.store import NOT_COUNTED, Batcher, Finished, Proxied, Store, health_of

log = logging.getLogger("gateway.proxy")

READS = frozenset({"GET", "HEAD"})
# Not passed back to the helpdesk: hop-by-hop headers (RFC 9110 7.6.1), the length (set again for
# the body as sent), the gateway's own, and the two that uvicorn writes on every answer.
DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"x-gateway-cache",
        b"x-gateway-event-id",
        b"x-gateway-queued",
        b"date",
        b"server",
    }
)
FRESH_MEMORY_BYTES = 32 * 1024 * 1024  # fresh copies kept in each API process
# How long a process trusts what it read of an integration's pause before calling its endpoint
# without reading it again: a pause set through another API process stops this one's calls within
# this time (one through this process, or by a failure this process logged, at once). Reading it
# for every call cost a tenth of the API's CPU on misses.
PAUSE_TTL_S = 0.05
LOG_LINGER_S = 0.005  # a log item waits this long for others to share its script call
LOG_TIMEOUT_S = 10.0
CLOSE_FLUSH_S = 2.0  # a stopping API waits this long for the log still waiting (Redis may be gone)
LOG_BATCH = 512
LOG_BATCH_BYTES = 4 * 1024 * 1024  # of requests and copies in one script call
MAX_WAITING_BYTES = 64 * 1024 * 1024  # log items kept while Redis is unavailable
MAX_CONNECTIONS = 256

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs twice as much
class Answer:
    status: int
    headers: Headers  # without content-length, which goes with the body
    body: bytes
    length: int | None = None  # the content-length of a HEAD answer (its body is not sent)


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs twice as much
class Called:
    """The upstream's answer to one call (status, headers and body are empty when it failed)."""

    result: Result
    headers: Headers
    body: bytes
    event_id: str  # the request that made the call (its webhook-id)
    length: int | None = None  # the upstream's content-length


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs twice as much
class Copy:
    """A kept 2xx answer: the request's last good one."""

    status: int
    headers: Headers
    body: bytes
    stored_ms: int

    def pack(self) -> bytes:
        head = {"s": self.status, "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers]}
        return orjson.dumps(head | {"t": self.stored_ms}) + b"\n" + self.body

    @classmethod
    def unpack(cls, blob: bytes) -> Copy:
        head, _, body = blob.partition(b"\n")
        meta = orjson.loads(head)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["h"]]
        return cls(meta["s"], headers, body, meta["t"])

    def age_s(self, now: int) -> int:
        return max(0, (now - self.stored_ms) // 1000)


class LogWriter:
    """Writes the log items of answered requests in the background, in batches: one writer at a
    time, which takes everything waiting when it starts a call (so a busy process writes large
    batches), and no task or future per item (they cost more than the item's share of the call).
    Without Redis, items wait up to `MAX_WAITING_BYTES` (their requests and copies), then the
    oldest are dropped with a warning: the answers were given; only their log is lost."""

    def __init__(self, store: Store, alerts: Alerts, note_pause: Callable[[str, bool], None]) -> None:
        self._store = store
        self._alerts = alerts
        self._note_pause = note_pause
        self._waiting: list[Proxied] = []
        self._bytes = 0  # of the requests and copies waiting
        self._writer: asyncio.Task[None] | None = None
        self._dropped = 0

    def add(self, item: Proxied) -> None:
        self._waiting.append(item)
        self._bytes += _size(item)
        if self._bytes > MAX_WAITING_BYTES:
            # Redis has been away for long: drop the oldest half, keep the newest
            k = 0
            while self._bytes > MAX_WAITING_BYTES // 2:
                self._bytes -= _size(self._waiting[k])
                k += 1
            del self._waiting[:k]
            self._dropped += k
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def flush(self, timeout_s: float) -> None:
        """Waits until everything waiting is written; gives up after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._writer is not None:
                    await asyncio.shield(self._writer)
        if self._writer is not None:
            self._writer.cancel()
            log.warning("proxy log: %d items not written at shutdown", len(self._waiting))

    async def _write(self) -> None:
        try:
            await asyncio.sleep(LOG_LINGER_S)
            while self._waiting:
                # at most LOG_BATCH items and LOG_BATCH_BYTES (a copy may be a MiB), at least one
                n, size = 0, 0
                while n < min(LOG_BATCH, len(self._waiting)) and (n == 0 or size < LOG_BATCH_BYTES):
                    size += _size(self._waiting[n])
                    n += 1
                batch, self._waiting = self._waiting[:n], self._waiting[n:]
                self._bytes -= size
                try:
                    async with asyncio.timeout(LOG_TIMEOUT_S):
                        results = await self._store.proxied(batch)
                except (RedisError, OSError, TimeoutError) as exc:
                    log.warning(
                        "proxy log: %d items not written: %s: %s", len(batch), type(exc).__name__, exc
                    )
                    self._waiting[:0] = batch
                    self._bytes += sum(map(_size, batch))
                    await asyncio.sleep(1.0)
                    continue
                if self._dropped:
                    log.warning(
                        "proxy log: Redis was unavailable; the log of %d answers is lost", self._dropped
                    )
                    self._dropped = 0
                for item, finished in zip(batch, results, strict=True):
                    self._note_pause(item.integration, finished.paused)
                    if finished.signals:
                        await self._alerts.crossed(item.integration, finished, item.health.last_error)
        finally:
            self._writer = None


class FreshCopies:
    """Copies within their `fresh_ttl_s`, kept in the API process too, so that a hit needs no
    Redis read: any copy younger than `fresh_ttl_s` may answer, by definition. Bounded in bytes;
    the oldest inserted go first."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._copies: OrderedDict[tuple[str, str], tuple[Copy, int]] = OrderedDict()

    def get(self, integration: str, key: str, stored_after_ms: int) -> Copy | None:
        found = self._copies.get((integration, key))
        if found is None:
            return None
        if found[0].stored_ms <= stored_after_ms:
            self._drop((integration, key))
            return None
        return found[0]

    def put(self, integration: str, key: str, copy: Copy) -> None:
        size = len(copy.body) + 256
        if size > self._max_bytes // 16:
            return
        self._drop((integration, key))
        self._copies[(integration, key)] = (copy, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._copies)))

    def _drop(self, key: tuple[str, str]) -> None:
        found = self._copies.pop(key, None)
        if found is not None:
            self._bytes -= found[1]


class TooLarge(Exception):
    """The upstream's answer is larger than the integration's `max_response_bytes`."""


def request_key(request: StoredRequest, vary: list[str]) -> str:
    """What identifies a request for its copy and for sharing a call: method, URL with its query,
    the `vary_headers`, and the body of a write."""
    digest = hashlib.sha256(request.method.encode() + b"\0" + request.url.encode("latin-1") + b"\0")
    if vary:
        values = dict((k.lower(), v) for k, v in request.headers if k.lower() in vary)
        for name in vary:
            digest.update(name.encode() + b"=" + values.get(name, "").encode("latin-1") + b"\0")
    if request.method not in READS:
        digest.update(hashlib.sha256(request.body).digest())
    return digest.hexdigest()[:32]


def falls_back(result: Result) -> bool:
    """A failure that the last good answer (or, for a write, a later delivery) stands in for."""
    if result.status is not None:
        return result.status == 429 or result.status >= 500
    return result.error is not None and result.retryable


class Proxy:
    """Answers the requests of proxy integrations; one per API process."""

    def __init__(self, config: Config, store: Store, alerts: Alerts, at_rest: AtRest) -> None:
        self._at_rest = at_rest
        self._store = store
        self._alerts = alerts
        self._policy = AddressPolicy(config.gateway.allowed_networks)
        self._store_timeout_s = config.gateway.store_timeout_s
        self._session: aiohttp.ClientSession | None = None
        # (integration, request key) -> the call in flight: two integrations with the same target
        # send different credentials, so they never share a call
        self._calls: dict[tuple[str, str], _Shared] = {}
        self._logger = LogWriter(store, alerts, self.note_pause)
        self._queuer: Batcher[Proxied, Finished] = Batcher(store.proxied, self._store_timeout_s, _unstored)
        self._viewer: Batcher[tuple[str, str], tuple[bool, bytes | None]] = Batcher(
            store.proxy_views, self._store_timeout_s, _unstored
        )
        self._fresh = FreshCopies(FRESH_MEMORY_BYTES)
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._warned = 0.0
        self._pauses: dict[str, tuple[bool, float]] = {}  # integration -> (paused, read at)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS, limit_per_host=0, resolver=GuardedResolver(self._policy), ttl_dns_cache=10
        )
        # The body goes back as the upstream encoded it (with its content-encoding), so nothing is
        # decoded, and no encoding is asked for that the helpdesk did not ask for.
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Content-Type", "Accept-Encoding"),
        )

    async def close(self) -> None:
        await self._logger.flush(CLOSE_FLUSH_S)
        if self._session is not None:
            await self._session.close()

    async def answer(self, integration: Integration, request: StoredRequest) -> tuple[Answer, Proxied | None]:
        """The answer to the helpdesk, and the log item to write after it (None: already written)."""
        started_ms = now_ms()
        policy = integration.proxy
        r = _Request(integration, request, new_event_id(started_ms), time.perf_counter(), started_ms)
        r.key = request_key(request, policy.vary_headers)
        # A write is never answered without its call: a copy stands in for a write only after the
        # call failed (and the write is queued).
        fresh_ms = policy.fresh_ttl_s * 1000 if request.method in READS else 0
        if fresh_ms:
            copy = self._fresh.get(integration.name, r.key, started_ms - fresh_ms)
            if copy is not None:
                return self._hit(r, copy)
        known = None if fresh_ms else self._known_pause(integration.name)
        if known is None:
            paused, copy = await self._view(integration.name, r.key if fresh_ms else "")
        else:
            paused, copy = known, None
        if copy is not None and started_ms - copy.stored_ms < fresh_ms:
            self._fresh.put(integration.name, r.key, copy)
            return self._hit(r, copy)
        if paused:
            result = Result(None, ErrorKind.PAUSED, "the integration is paused: nothing was sent", 0.0)
            return await self._failed(r, Called(result, [], b"", r.event_id), copy)
        called = await self._call(r)
        result = called.result
        if falls_back(result):
            return await self._failed(r, called, copy)
        if result.status is None:  # an error no copy stands in for (blocked, too large)
            return self._error(r, called, BadGateway)
        kept = b""
        if result.ok and policy.keep_ms and request.method != "HEAD" and called.event_id == r.event_id:
            fresh = Copy(result.status, called.headers, called.body, started_ms)
            kept = fresh.pack()
            if fresh_ms:
                self._fresh.put(integration.name, r.key, fresh)
        headers = [*called.headers, *_marks("miss", r.event_id)]
        length = called.length if request.method == "HEAD" else None
        answer = Answer(result.status, headers, called.body, length)
        return answer, self._item(r, called, "fresh", "miss", copy=kept)

    def log_later(self, item: Proxied) -> None:
        """Writes a log item in the background, with others; the answer never waits for it."""
        self._logger.add(item)

    async def _view(self, name: str, key: str) -> tuple[bool, Copy | None]:
        """Whether the integration is paused, and the request's copy when a key is given; the
        reads of concurrent requests share one round trip. Without Redis the endpoint is still
        called: its answer needs no Redis."""
        try:
            paused, blob = await self._viewer.submit((name, key))
        except StoreUnavailable as exc:
            if time.monotonic() - self._warned > 1.0:  # one line a second, not one per request
                self._warned = time.monotonic()
                log.warning("proxy %s: %s; calling the upstream", name, exc)
            return False, None
        self.note_pause(name, paused)
        return paused, Copy.unpack(blob) if blob else None

    def _known_pause(self, name: str) -> bool | None:
        """Whether the integration is paused, as read (or learnt from a log write) in the last
        PAUSE_TTL_S; None when that is older."""
        known = self._pauses.get(name)
        if known is None or time.monotonic() - known[1] > PAUSE_TTL_S:
            return None
        return known[0]

    def note_pause(self, name: str, paused: bool) -> None:
        self._pauses[name] = (paused, time.monotonic())

    def forget_pause(self, name: str) -> None:
        """An operator paused or resumed it through this process: read it again."""
        self._pauses.pop(name, None)

    async def _call(self, r: _Request) -> Called:
        """The upstream's answer; a read shares the call of an identical one already in flight
        (the answer then names the event that made the call)."""
        if r.request.method not in READS:
            return await self._send(r)
        key = (r.integration.name, r.key)
        shared = self._calls.get(key)
        if shared is not None:
            if shared.future is None:  # the first to share it: most calls are shared by none
                shared.future = asyncio.get_running_loop().create_future()
            return await asyncio.shield(shared.future)
        call = self._calls[key] = _Shared()
        try:
            called = await self._send(r)
        except BaseException:
            if call.future is not None:
                stopped = Result(None, ErrorKind.NETWORK, "the call this request shared was cancelled", 0.0)
                call.future.set_result(Called(stopped, [], b"", r.event_id))
            raise
        finally:
            del self._calls[key]
        if call.future is not None:
            call.future.set_result(called)
        return called

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    async def _send(self, r: _Request) -> Called:
        assert self._session is not None, "Proxy.start() was not awaited"
        integration, request = r.integration, r.request
        headers = upstream_headers(request.headers, integration, r.event_id, request.body)
        limit = integration.proxy.max_response_bytes
        started = time.perf_counter()
        try:
            target = URL(request.url, encoded=True)
            self._policy.check_literal(target.host or "")
            # aiohttp's total timeout is the one deadline of the whole exchange, body included (an
            # asyncio.timeout around it cost 5 % of the API's CPU per request).
            async with self._session.request(
                request.method,
                target,
                headers=headers,
                data=request.body or None,
                allow_redirects=False,
                timeout=self._timeout(integration.timeout_s),
            ) as response:
                if response.content_length is not None and response.content_length > limit:
                    raise TooLarge
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise TooLarge
                status = response.status
                length = response.content_length
                kept = [(k, v) for k, v in response.raw_headers if k.lower() not in DROPPED]
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except TooLarge:
            detail = f"the answer is larger than max_response_bytes ({limit})"
            return Called(Result(None, ErrorKind.TOO_LARGE, detail, _ms_since(started)), [], b"", r.event_id)
        except (aiohttp.ClientError, OSError, TimeoutError, BlockedTarget, ValueError) as exc:
            kind, detail = map_client_error(exc)
            return Called(Result(None, kind, detail, _ms_since(started)), [], b"", r.event_id)
        ok = 200 <= status < 300
        result = Result(
            status,
            None if ok else ErrorKind.HTTP,
            "" if ok else f"HTTP {status}",
            _ms_since(started),
            bytes(body[:SNIPPET_BYTES]),
            retry_after,
        )
        return Called(result, kept, bytes(body), r.event_id, length)

    async def _failed(self, r: _Request, called: Called, copy: Copy | None) -> tuple[Answer, Proxied | None]:
        """The upstream failed, or was not called (paused): a write is queued; the answer is the
        last good one, or 202 for a queued write, or an error."""
        policy = r.integration.proxy
        if policy.stale_ttl_s and copy is None:
            _, copy = await self._view(r.integration.name, r.key)
        now = now_ms()
        if copy is not None and not (0 <= now - copy.stored_ms <= policy.stale_ttl_s * 1000):
            copy = None
        queued = False
        if r.request.method not in READS and policy.queue_on_failure:
            queued = await self._queue(r, called, copy)
        if copy is not None:
            headers = [*copy.headers, *_marks("stale", r.event_id), (b"age", str(copy.age_s(now)).encode())]
            if queued:
                headers.append((b"x-gateway-queued", b"true"))
                return Answer(copy.status, headers, copy.body), None
            return Answer(copy.status, headers, copy.body), self._item(r, called, "stale", "stale")
        if queued:
            body = b'{"id":"' + r.event_id.encode() + b'"}'
            headers = [
                (b"content-type", b"application/json"),
                *_marks("miss", r.event_id),
                (b"x-gateway-queued", b"true"),
            ]
            return Answer(202, headers, body), None
        if called.result.error is ErrorKind.PAUSED:
            error: type[HTTPError] = IntegrationPaused
        elif called.result.error is ErrorKind.TIMEOUT:
            error = GatewayTimeout
        else:
            error = BadGateway
        return self._error(r, called, error)

    async def _queue(self, r: _Request, called: Called, copy: Copy | None) -> bool:
        """Stores a failed write for the workers, before the answer; False when its retry budget
        allows no later attempt."""
        result = called.result
        paused = result.error is ErrorKind.PAUSED
        verdict, wait_s = decide(result, r.integration.retry, 1, 0.0)
        if verdict is not Verdict.RETRY and not paused:
            return False
        item = self._item(
            r,
            called,
            "queued",
            "stale" if copy is not None else "miss",
            EventState.HELD if paused else EventState.RETRYING,
            due_ms=now_ms() + int(wait_s * 1000),
        )
        try:
            finished = await self._queuer.submit(item)
        except StoreUnavailable as exc:
            marks = tuple(_marks("miss", r.event_id))
            raise ServiceUnavailable(
                f"the write failed upstream and could not be queued ({exc})", marks
            ) from None
        self.note_pause(r.integration.name, finished.paused)
        await self._alerts.crossed(r.integration.name, finished, item.health.last_error)
        return True

    def _hit(self, r: _Request, copy: Copy) -> tuple[Answer, Proxied]:
        age = copy.age_s(r.started_ms)
        headers = [*copy.headers, *_marks("hit", r.event_id), (b"age", str(age).encode())]
        called = Called(Result(None, None, f"answered from the copy, {age} s old", 0.0), [], b"", r.event_id)
        return Answer(copy.status, headers, copy.body), self._item(
            r, called, "hit", "hit", EventState.DELIVERED
        )

    def _error(self, r: _Request, called: Called, error: type[HTTPError]) -> tuple[Answer, Proxied]:
        result = called.result
        what = f"HTTP {result.status}" if result.status is not None else f"{result.error}: {result.detail}"
        detail = f"the upstream failed ({what}) and no earlier answer is kept"
        if result.error is ErrorKind.PAUSED:
            detail = "the integration is paused and no earlier answer is kept"
        body = error_json(error.code, detail)
        headers = [(b"content-type", b"application/json"), *_marks("miss", r.event_id)]
        return Answer(error.status_code, headers, body), self._item(r, called, "error", "miss")

    def _item(
        self,
        r: _Request,
        called: Called,
        answered: Answered,
        cache: str,
        state: EventState | None = None,
        *,
        copy: bytes = b"",
        due_ms: int = 0,
    ) -> Proxied:
        """The log item of a request: its event, its one attempt, what it says about health."""
        result = called.result
        # A request that shared another's call, or was answered without one, counts no attempt.
        own = called.event_id == r.event_id and (result.status is not None or result.error is not None)
        if state is None:
            state = EventState.DELIVERED if result.ok else EventState.DEAD
        detail = result.detail
        if called.event_id != r.event_id:
            detail = f"shared the upstream call of event {called.event_id}" + (
                f": {detail}" if detail else ""
            )
        record = AttemptRecord(
            n=1,
            at_ms=r.started_ms,
            latency_ms=result.latency_ms if own else 0.0,
            status=result.status,
            error=result.error.value if result.error else None,
            detail=detail,
            outcome=state.value,
            body=r.integration.redact(result.body.decode("utf-8", "replace")),
            answered=answered,
        )
        return Proxied(
            r.event_id,
            r.integration.name,
            state,
            2 if state in (EventState.RETRYING, EventState.HELD) and own else 1,
            self._at_rest.pack(r.request),
            record,
            health_of(r.integration, result) if own else NOT_COUNTED,
            cache,
            time.perf_counter() - r.started,
            called=own and result.error is not ErrorKind.PAUSED,
            due_ms=due_ms,
            copy=copy,
            request_key=r.key,
            copy_ms=r.integration.proxy.keep_ms,
            max_cache_bytes=r.integration.proxy.max_cache_bytes,
        )


@dataclass(slots=True)
class _Shared:
    """A read's call in flight, and the future of those who share it (made by the first of them)."""

    future: asyncio.Future[Called] | None = None


@dataclass(slots=True)
class _Request:
    """One proxied request on its way: what it is, its event id, and when it came."""

    integration: Integration
    request: StoredRequest
    event_id: str
    started: float  # perf_counter
    started_ms: int
    key: str = ""


def _size(item: Proxied) -> int:
    return len(item.request_blob) + len(item.copy) + 512


def _marks(cache: str, event_id: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-gateway-cache", cache.encode()), (b"x-gateway-event-id", event_id.encode())]


def _unstored(exc: Exception) -> Exception:
    return StoreUnavailable(f"Redis did not take the write: {type(exc).__name__}")


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
