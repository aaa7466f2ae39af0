"""The event store: every read and write of event state in Redis goes through here.

Each state change is one Lua script from `gateway.keys`, so it is atomic, and each hot path is a
fixed number of round trips for a whole batch: ingress writes the events of concurrent requests in
one call, a worker takes the due events in one call and records the attempts that end together in
one call (`Batcher`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT

from gateway import keys, redis_url
from gateway.delivery import NOT_SENT, Result
from gateway.errors import StoreUnavailable
from gateway.events import AttemptRecord, EventState, now_ms
from gateway.settings import Integration

log = logging.getLogger("gateway.store")
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_MS = 10_000  # a worker silent for longer is not counted as live


def redis_client(url: str, *, timeout_s: float = 2.0, max_connections: int = 64) -> Redis:
    """One pool per process; short socket timeouts so an unreachable Redis fails fast."""
    client: Redis = redis_url.client(
        url,
        socket_connect_timeout=min(timeout_s, 1.0),
        socket_timeout=timeout_s,
        max_connections=max_connections,
        health_check_interval=30,
    )
    return client


# Upper bounds (s) of the attempt latency histogram; "+Inf" is implied.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def latency_fields(record: AttemptRecord) -> tuple[str, str]:
    """The FINISH arguments that feed the latency histogram: bucket index and seconds."""
    if record["status"] is None and record["error"] in NOT_SENT:
        return "", ""
    seconds = record["latency_ms"] / 1000
    return str(bisect.bisect_left(LATENCY_BUCKETS, seconds)), f"{seconds:.6f}"


@dataclass(frozen=True, slots=True)
class NewEvent:
    event_id: str
    integration: str
    idempotency_key: str
    request_blob: bytes


class Count(StrEnum):
    """What an attempt counts for in its integration's consecutive failures (the scripts' codes)."""

    SUCCESS = "S"  # resets the count
    FAILURE = "F"  # adds one
    NEITHER = "-"  # sent nothing (a lost worker, a pause) or an alert sink's


@dataclass(frozen=True, slots=True)
class Health:
    """What an attempt says about its integration's health, and the limits that apply."""

    code: Count
    threshold: int = 1 << 30
    last_error: str = ""
    cooldown_s: float = 30.0


NOT_COUNTED = Health(Count.NEITHER)


def health_of(integration: Integration | None, result: Result) -> Health:
    """What an attempt's result says about its integration: a success, a failure that counts
    towards the pause, or nothing (an alert sink, or an attempt that sent nothing)."""
    if integration is None or integration.internal or result.error in NOT_SENT:
        return NOT_COUNTED
    if result.ok:
        return Health(Count.SUCCESS)
    error = f"HTTP {result.status}" if result.status is not None else f"{result.error}: {result.detail}"
    return Health(Count.FAILURE, integration.failure_threshold, error, integration.probe_cooldown_s)


STATE_OF = {s.value.encode(): s for s in EventState}  # a lookup: EventState(...) is slow


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs twice as much
class Finished:
    state: EventState
    consecutive_failures: int
    paused: bool
    signals: tuple[str, ...]

    @classmethod
    def parse(cls, got: Any) -> Finished | None:
        if not got:
            return None
        signals = tuple(x.decode() for x in got[4:])
        return cls(STATE_OF[got[1]], int(got[2]), got[3] == 1, signals)


@dataclass(frozen=True, slots=True)
class Lock:
    """A lock in Redis: its key, who holds it, and how long it lasts unless renewed."""

    key: str
    owner: str
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class Claimed:
    """A due attempt taken by a worker: in flight under its lease."""

    event_id: str
    attempt: int
    integration: str
    received_ms: int
    request_blob: bytes
    due_ms: int = 0  # when it came due: the claim's wait is measured from here


@dataclass(frozen=True, slots=True)
class Finish:
    """How attempt n of an event ended, and what follows: one item of FINISH_MANY."""

    event_id: str
    attempt: int
    outcome: EventState  # delivered, dead or retrying
    record: AttemptRecord
    health: Health
    due_ms: int = 0  # when a retry is due
    only_if_lease_expired: bool = False  # the reconciler: never finish a live attempt
    retry_state: EventState = EventState.RETRYING  # HELD: a drained event keeps its place
    waited_s: float | None = None  # from due to claim (None: not claimed from the schedule)
    hold_until_ms: int = 0  # the endpoint asked the whole integration to wait until then
    hold_reason: str = ""

    def item(self) -> list[str | int | float]:
        return [
            self.event_id,
            str(self.attempt),
            self.outcome.value,
            str(self.due_ms),
            "1" if self.only_if_lease_expired else "0",
            self.health.code,
            self.health.threshold,
            self.health.last_error[:200],
            self.health.cooldown_s,
            self.retry_state.value,
            *latency_fields(self.record),
            "" if self.waited_s is None else str(bisect.bisect_left(LATENCY_BUCKETS, self.waited_s)),
            "" if self.waited_s is None else f"{self.waited_s:.6f}",
            str(self.hold_until_ms),
            self.hold_reason,
        ]


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs twice as much
class Proxied:
    """A request answered in proxy mode, as the log keeps it: one item of PROXIED."""

    event_id: str
    integration: str
    state: EventState  # delivered or dead (answered), retrying (a write queued for the workers)
    attempt: int  # the event's attempt number: the next one for a queued write
    request_blob: bytes
    record: AttemptRecord
    health: Health
    cache: str  # miss, hit or stale: how the answer was served
    answer_s: float  # from the request to its answer
    called: bool = True  # this request made the upstream call (not a hit, nor one that shared a call)
    due_ms: int = 0  # when a queued write is due
    copy: bytes = b""  # the upstream's 2xx answer, kept as the request's last good one
    request_key: str = ""
    copy_ms: int = 0  # how long the copy is kept
    max_cache_bytes: int = 0

    def item(self) -> list[str | int | float]:
        bucket, seconds = latency_fields(self.record) if self.called else ("", "")
        return [
            self.event_id,
            self.integration,
            self.state.value,
            str(self.attempt),
            str(self.due_ms),
            self.health.code,
            self.health.threshold,
            self.health.last_error[:200],
            self.health.cooldown_s,
            bucket,
            seconds,
            self.cache,
            str(bisect.bisect_left(LATENCY_BUCKETS, self.answer_s)),
            f"{self.answer_s:.6f}",
            self.request_key,
            self.copy_ms,
            self.max_cache_bytes,
        ]


# The states whose events are counted whole (delivered ones pile up until retention: they are
# counted over a window, or by the attempt counters).
COUNTED_STATES = (
    EventState.PENDING,
    EventState.IN_FLIGHT,
    EventState.RETRYING,
    EventState.HELD,
    EventState.DEAD,
)

# The event hash's fields an event summary shows: state, attempt, integration, received, updated.
SUMMARY_FIELDS = [b"s", b"n", b"i", b"t", b"d"]


def _summary(
    event_id: str, state: bytes, attempt: bytes, integration: bytes, received: bytes, updated: bytes
) -> dict[str, Any]:
    return {
        "id": event_id,
        "integration": integration.decode(),
        "state": state.decode(),
        "attempt": int(attempt),
        "received_ms": int(float(received)),  # the score's fraction orders one ms's arrivals
        "updated_ms": int(float(updated)),
    }


class Script:
    """A script of keys.py, called as the prelude expects: the layout's fixed key names in KEYS
    (keys.LUA_NAMES' order), then the call's own arguments, the prefix first."""

    def __init__(self, redis: Redis, source: str, layout: keys.Keys) -> None:
        self._script = redis.register_script(source)
        self._keys = [getattr(layout, name) for _, name in keys.LUA_NAMES]

    async def __call__(self, args: Sequence[EncodableT]) -> Any:
        return await self._script(keys=self._keys, args=args)


class Store:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.keys = keys.Keys(prefix)
        self._accept = Script(redis, keys.ACCEPT, self.keys)
        self._claim_due = Script(redis, keys.CLAIM_DUE, self.keys)
        self._finish_many = Script(redis, keys.FINISH_MANY, self.keys)
        self._take_held = Script(redis, keys.TAKE_HELD, self.keys)
        self._return_held = Script(redis, keys.RETURN_HELD, self.keys)
        self._set_state = Script(redis, keys.SET_STATE, self.keys)
        self._replay = Script(redis, keys.REPLAY, self.keys)
        self._trim = Script(redis, keys.TRIM, self.keys)
        self._unlock = redis.register_script(keys.UNLOCK)
        self._proxied = Script(redis, keys.PROXIED, self.keys)
        self._migrate_due = Script(redis, keys.MIGRATE_DUE, self.keys)
        self._attention = Script(redis, keys.ATTENTION, self.keys)
        self._proxy_view = Script(redis, keys.PROXY_VIEW, self.keys)
        self._copies = Script(redis, keys.COPIES, self.keys)

    async def durability(self) -> list[str]:
        """What about this Redis could lose accepted events: an evicting maxmemory-policy, or no
        append-only file. Empty when all is well or when Redis does not say (a lost connection, a
        managed Redis that refuses CONFIG)."""
        try:
            memory = await self.redis.info("memory")
            persistence = await self.redis.info("persistence")
        except (RedisError, OSError):
            return []
        found = []
        policy = memory.get("maxmemory_policy")
        if policy and policy != "noeviction":
            found.append(
                f"Redis has maxmemory-policy {policy}: when its memory is full it deletes keys, accepted"
                " events among them; set maxmemory-policy noeviction (then a full Redis refuses"
                " new events with 503 instead)"
            )
        if not persistence.get("aof_enabled"):
            try:
                save = (await self.redis.config_get("save")).get("save")
            except (RedisError, OSError):
                save = None
            if save == "":
                found.append(
                    "Redis keeps nothing on disk (no append-only file, no snapshots): a restart loses"
                    " every event; set appendonly yes (appendfsync everysec or always)"
                )
            else:
                found.append(
                    "Redis has no append-only file: a crash loses the events accepted since its last"
                    " snapshot; set appendonly yes (appendfsync everysec or always)"
                )
        return found

    async def accept(self, events: Sequence[NewEvent], idempotency_ttl_s: int) -> list[tuple[str, bool]]:
        """Persist events, due now; returns (id, is_repeat) for each."""
        lengths: list[int] = []
        parts: list[bytes] = []
        for e in events:
            fields = (e.event_id.encode(), e.integration.encode(), e.idempotency_key.encode(), e.request_blob)
            parts += fields
            lengths += map(len, fields)
        args: list[bytes | str | int] = [
            self.keys.prefix,
            now_ms(),
            idempotency_ttl_s * 1000,
            len(events),
            ",".join(map(str, lengths)),
            b"".join(parts),
        ]
        flat = await self._accept(args=args)
        return [(flat[i].decode(), flat[i + 1] == 1) for i in range(0, len(flat), 2)]

    async def claim_due(self, limit: int, policies: bytes, default: bytes) -> tuple[list[Claimed], int]:
        """Up to `limit` due attempts, now in flight, shared between the integrations that have
        some, within each one's limits; and the earliest ms at which more may be due (0: nothing
        is scheduled). `policies` is a JSON object of integration -> [lease ms, max in flight,
        rate per s (0: none), burst, 1 if ordered]; `default` that list for any other. An attempt
        counts against max_in_flight until it is recorded."""
        flat = await self._claim_due(args=[self.keys.prefix, now_ms(), limit, policies, default])
        claimed = [
            Claimed(
                flat[i].decode(),
                int(flat[i + 1]),
                flat[i + 2].decode(),
                int(float(flat[i + 3])),
                flat[i + 5],
                int(float(flat[i + 4])),
            )
            for i in range(1, len(flat), 6)
        ]
        return claimed, math.ceil(float(flat[0]))

    async def migrate_due(self) -> int:
        """Moves a schedule from before per-integration schedules into them; returns how many."""
        return int(await self._migrate_due(args=[self.keys.prefix]))

    async def wait_for_bell(self, timeout_s: float) -> bool:
        """Waits until a script rings the bell (something became due sooner), at most `timeout_s`."""
        # Redis takes a fractional timeout (redis-py's annotation says int); 0 would block forever.
        got = await self.redis.blpop([self.keys.bell], timeout=max(0.001, timeout_s))  # type: ignore[arg-type, misc]
        return got is not None

    async def ring(self) -> None:
        """Rings the bell: an idle worker wakes and looks for due attempts."""
        await self.redis.rpush(self.keys.bell, 1)  # type: ignore[misc]

    async def scheduled(self, integrations: Sequence[str]) -> int:
        """Attempts scheduled (due now or later) over these integrations."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in integrations:
                pipe.zcard(self.keys.due(name))
            return sum(await pipe.execute())

    async def finish_many(self, items: Sequence[Finish]) -> list[Finished | None]:
        """Records attempts and moves their events on, in one atomic script; None for an attempt
        that was no longer in flight (nothing changed for it)."""
        if not items:
            return []
        args: list[str | int | bytes] = [
            self.keys.prefix,
            now_ms(),
            orjson.dumps([i.item() for i in items]),
            *(orjson.dumps(i.record) for i in items),
        ]
        return [Finished.parse(got) for got in await self._finish_many(args=args)]

    async def proxied(self, items: Sequence[Proxied]) -> list[Finished]:
        """Logs answered proxy requests and queues failed writes, in one atomic script."""
        if not items:
            return []
        values = [v for i in items for v in (i.request_blob, orjson.dumps(i.record), i.copy)]
        args: list[str | int | bytes] = [
            self.keys.prefix,
            now_ms(),
            orjson.dumps([i.item() for i in items]),
            ",".join([str(len(v)) for v in values]),
            b"".join(values),
        ]
        return [cast(Finished, Finished.parse(got)) for got in await self._proxied(args=args)]

    async def proxy_views(self, requests: Sequence[tuple[str, str]]) -> list[tuple[bool, bytes | None]]:
        """For each (integration, request key or ""): whether the integration is paused, and the
        request's copy, for many requests in one round trip."""
        args: list[str] = [self.keys.prefix]
        for integration, key in requests:
            args += (integration, key)
        flat = await self._proxy_view(args=args)
        return [(flat[i] == 1, flat[i + 1] or None) for i in range(0, len(flat), 2)]

    async def copies(self, integrations: Sequence[str]) -> list[tuple[int, int]]:
        """(copies, bytes) kept for each proxy integration."""
        if not integrations:
            return []
        got = await self._copies(args=[self.keys.prefix, now_ms(), *integrations])
        return [(int(n), int(b)) for n, b in got]

    async def probe_request(self, integration: str) -> bytes | None:
        """The last proxied request that failed: what a probe sends when no event is held."""
        blob: bytes | None = await self.redis.get(self.keys.probe_request(integration))
        return blob

    async def take_held(
        self, integration: str, count: int, lease_ms: int, *, probe: bool
    ) -> list[tuple[str, int, int, bytes]]:
        """The oldest held events, moved to in_flight: (id, attempt, received ms, request blob)."""
        flat = await self._take_held(
            args=[self.keys.prefix, integration, count, now_ms(), lease_ms, "1" if probe else "0"]
        )
        return [
            (flat[i].decode(), int(flat[i + 1]), int(float(flat[i + 2])), flat[i + 3])
            for i in range(0, len(flat), 4)
        ]

    async def return_held(self, integration: str, taken: Sequence[tuple[str, int]]) -> None:
        if taken:
            args: list[str | int] = [self.keys.prefix, integration]
            for event_id, attempt in taken:
                args += (event_id, attempt)
            await self._return_held(args=args)

    async def set_state(self, integration: str, action: str, *, manual: bool) -> tuple[str, int]:
        """Pauses or resumes an integration; returns (state before, held events)."""
        before, held = await self._set_state(
            args=[self.keys.prefix, integration, now_ms(), action, "1" if manual else "0"]
        )
        return before.decode(), int(held)

    async def health(self, integration: str) -> dict[str, Any]:
        """The integration's health hash, decoded, with the number of held events."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.integration(integration))
            pipe.zcard(self.keys.state_index(integration, EventState.HELD))
            fields, held = await pipe.execute()
        out: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
        out["held"] = int(held)
        return out

    async def probe_failed(self, integration: str, cooldown_s: float) -> None:
        await self.redis.hset(  # type: ignore[misc]
            self.keys.integration(integration),
            mapping={"cooldown_s": cooldown_s, "probe_ms": now_ms() + int(cooldown_s * 1000)},
        )

    async def expired_leases(self, limit: int = 100) -> list[str]:
        ids = await self.redis.zrangebyscore(self.keys.lease, "-inf", now_ms(), start=0, num=limit)
        return [i.decode() for i in ids]

    async def leased(self) -> int:
        """Attempts in flight under a lease, across every worker (expired or not)."""
        return int(await self.redis.zcard(self.keys.lease))

    async def meta(self, event_id: str) -> tuple[str, int, str, int] | None:
        """(state, attempt, integration, received ms) of an event, or None."""
        fields: list[bytes | None] = await self.redis.hmget(  # type: ignore[misc]
            self.keys.event(event_id), ["s", "n", "i", "t"]
        )
        s, n, i, t = fields
        if s is None or n is None or i is None or t is None:
            return None
        return s.decode(), int(n), i.decode(), int(float(t))

    async def event(self, event_id: str) -> dict[str, Any] | None:
        """The event's record, its request blob and its attempts, or None when it does not exist."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.event(event_id))
            pipe.get(self.keys.request(event_id))
            pipe.lrange(self.keys.attempts(event_id), 0, -1)
            fields, blob, attempts = await pipe.execute()
        if not fields:
            return None
        summary = _summary(event_id, *(fields[f] for f in SUMMARY_FIELDS))
        return summary | {"request_blob": blob, "attempts": [orjson.loads(a) for a in attempts]}

    async def replay(self, event_id: str, attempt: int, integration: str, reason: str) -> str | None:
        """Sends a delivered or dead event again; returns its new state, or None if it was neither.
        The attempt log shows the replay (outcome "replay", `reason` as its detail)."""
        record = AttemptRecord(
            n=attempt + 1,
            at_ms=now_ms(),
            latency_ms=0.0,
            status=None,
            error=None,
            detail=reason,
            outcome="replay",
            body="",
        )
        got = await self._replay(args=[self.keys.prefix, event_id, attempt, now_ms(), orjson.dumps(record)])
        return got.decode() if got else None

    async def list_events(
        self,
        integrations: Sequence[str],
        states: Sequence[str],
        since_ms: int | None,
        until_ms: int | None,
        limit: int,
        cursor: tuple[float, str] | None,
    ) -> tuple[list[dict[str, Any]], tuple[float, str] | None]:
        """Events newest first from the state indexes, one page: (items, cursor of the next page).

        A page starts strictly after its cursor (received score, id), so events that arrive while
        an operator pages (they are newer) never shift, repeat or hide the older ones.
        """
        low = "-inf" if since_ms is None else since_ms
        # `until` takes its whole millisecond: scores carry a fraction that orders its arrivals
        end = None if until_ms is None else until_ms + 1
        high = "+inf" if end is None else f"({end}"
        keys = [self.keys.state_index(i, s) for i in integrations for s in states]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                if cursor is None or (end is not None and cursor[0] >= end):
                    pipe.zrevrangebyscore(key, high, low, start=0, num=limit + 1, withscores=True)
                else:
                    top = cursor[0]
                    pipe.zrevrangebyscore(key, top, top, withscores=True)
                    pipe.zrevrangebyscore(key, f"({top!r}", low, start=0, num=limit + 1, withscores=True)
            replies = await pipe.execute()
        found: list[tuple[float, str]] = []
        for reply in replies:
            found += [(score, member.decode()) for member, score in reply]
        if cursor is not None:
            found = [(sc, i) for sc, i in found if sc < cursor[0] or (sc == cursor[0] and i < cursor[1])]
        found.sort(reverse=True)
        page = found[:limit]
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, event_id in page:
                pipe.hmget(self.keys.event(event_id), SUMMARY_FIELDS)
            details = await pipe.execute()
        # An event removed by retention since the index was read has no fields left.
        items = [
            _summary(event_id, *fields)
            for (_, event_id), fields in zip(page, details, strict=True)
            if fields[0] is not None
        ]
        next_cursor = page[-1] if len(found) > limit else None
        return items, next_cursor

    async def trim(self, integration: str, state: EventState, cutoff_ms: int, limit: int = 500) -> int:
        """Retention: deletes up to `limit` events of a terminal state that ended before the cutoff."""
        key = self.keys.state_index(integration, state)
        return int(await self._trim(args=[self.keys.prefix, key, state.value, cutoff_ms, limit]))

    async def counts(self, integration: str, now: int) -> dict[str, int]:
        """Events of an integration by state (delivered: in the last 24 hours)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for state in COUNTED_STATES:
                pipe.zcard(self.keys.state_index(integration, state))
            pipe.zcount(self.keys.state_index(integration, EventState.DELIVERED), now - 86_400_000, "+inf")
            *counted, delivered = await pipe.execute()
        return {state.value: n for state, n in zip(COUNTED_STATES, counted, strict=True)} | {
            "delivered_24h": delivered
        }

    def drain_lock(self, integration: str, owner: str, ttl_ms: int) -> Lock:
        """One worker drains an integration's held events at a time."""
        return Lock(self.keys.drain_lock(integration), owner, ttl_ms)

    def replay_lock(self, replay_id: str, owner: str, ttl_ms: int) -> Lock:
        """One worker runs a bulk replay at a time."""
        return Lock(self.keys.replay_lock(replay_id), owner, ttl_ms)

    async def lock(self, lock: Lock) -> bool:
        """Takes a lock that expires after its ttl (kept by `renew` while its work goes on)."""
        return bool(await self.redis.set(lock.key, lock.owner, nx=True, px=lock.ttl_ms))

    async def unlock(self, lock: Lock) -> None:
        """Releases a lock if its owner still holds it."""
        await self._unlock(keys=[lock.key], args=[lock.owner])

    async def attention(self) -> list[tuple[str, bool, bool, int, bool]]:
        """The integrations the drainer must look at: (name, paused, paused by hand, next probe ms,
        draining)."""
        if not await self.redis.scard(self.keys.attention):  # type: ignore[misc]
            return []  # the usual answer, for one command instead of a script call
        got = await self._attention(args=[self.keys.prefix])
        return [
            (name.decode(), state == b"paused", manual == b"1", int(probe), draining == b"1")
            for name, state, manual, probe, draining in got
        ]

    # Metrics (the scripts count most of them as they change state)

    async def count(self, metric: str, counts: Mapping[str, int]) -> None:
        """Adds to a metric hash's fields (a process's own counts: alerts, refusals)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for field, n in counts.items():
                pipe.hincrby(self.keys.metric(metric), field, n)
            await pipe.execute()

    async def metrics(self, hashes: Sequence[str], integrations: Sequence[str]) -> list[Any]:
        """What a scrape shows, in one round trip: the metric hashes, the live workers, and per
        integration its events by counted state, its oldest pending event, and its health."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in hashes:
                pipe.hgetall(self.keys.metric(name))
            pipe.zcount(self.keys.workers, now_ms() - HEARTBEAT_TTL_MS, "+inf")
            for integration in integrations:
                for state in COUNTED_STATES:
                    pipe.zcard(self.keys.state_index(integration, state))
                pipe.zrange(self.keys.state_index(integration, EventState.PENDING), 0, 0, withscores=True)
                pipe.hmget(self.keys.integration(integration), ["state", "fails", "wait_until"])
            replies: list[Any] = await pipe.execute()
        return replies

    async def minutes(self, now: int, count: int) -> list[dict[str, int]]:
        """The dashboard's per-minute figures (P:mm) of the last `count` minutes, oldest first:
        per minute, field (integration|d{bucket}, integration|f{bucket}) -> attempts."""
        last = now // 60_000
        async with self.redis.pipeline(transaction=False) as pipe:
            for minute in range(last - count + 1, last + 1):
                pipe.hgetall(self.keys.minute(str(minute)))
            replies: list[dict[bytes, bytes]] = await pipe.execute()
        return [{k.decode(): int(v) for k, v in reply.items()} for reply in replies]

    # Locks (a drain, a bulk replay: one worker at a time)

    async def renew(self, lock: Lock) -> None:
        await self.redis.pexpire(lock.key, lock.ttl_ms)

    # Bulk replays

    async def claim_replay_key(self, key: str, replay_id: str, ttl_s: int) -> str | None:
        """Takes an Idempotency-Key for a new bulk replay; None when taken, else the id of the
        replay that already holds it ("" if it went away meanwhile)."""
        if await self.redis.set(self.keys.replay_idempotency(key), replay_id, nx=True, ex=ttl_s):
            return None
        first: bytes | None = await self.redis.get(self.keys.replay_idempotency(key))
        return first.decode() if first else ""

    async def matching(
        self, integrations: Sequence[str], state: EventState, since_ms: int | None, until_ms: int | None
    ) -> list[bytes]:
        """The ids of the events in a state received within the bounds, from the state indexes."""
        low = "-inf" if since_ms is None else since_ms
        high = "+inf" if until_ms is None else until_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in integrations:
                pipe.zrangebyscore(self.keys.state_index(name, state), low, high)
            return [event_id for ids in await pipe.execute() for event_id in ids]

    async def create_replay(
        self, replay_id: str, ids: Sequence[bytes], job: Mapping[str, Any], keep_s: int
    ) -> None:
        """Writes a bulk replay and the ids it will replay; one with none is done at once."""
        key = self.keys.replay(replay_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            for k in range(0, len(ids), 1000):
                pipe.rpush(self.keys.replay_ids(replay_id), *ids[k : k + 1000])
            pipe.hset(key, mapping=dict(job))
            if ids:
                pipe.sadd(self.keys.running_replays, replay_id)
            else:
                pipe.expire(key, keep_s)
            await pipe.execute()

    async def replay_job(self, replay_id: str) -> dict[str, bytes] | None:
        fields = await self.redis.hgetall(self.keys.replay(replay_id))  # type: ignore[misc]
        return {k.decode(): v for k, v in fields.items()} if fields else None

    async def end_replay(self, replay_id: str, status: str, keep_s: int) -> None:
        """Marks a bulk replay done or cancelled, forgets its ids, and keeps its record keep_s."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.replay(replay_id), "status", status)
            pipe.srem(self.keys.running_replays, replay_id)
            pipe.delete(self.keys.replay_ids(replay_id))
            pipe.expire(self.keys.replay(replay_id), keep_s)
            await pipe.execute()

    async def running_replays(self) -> list[str]:
        return [raw.decode() for raw in await self.redis.smembers(self.keys.running_replays)]  # type: ignore[misc]

    async def next_replay_ids(self, replay_id: str, count: int) -> list[str] | None:
        """The next ids of a running bulk replay (empty: none left), or None when it is no longer
        running (it leaves the running set)."""
        status = await self.redis.hget(self.keys.replay(replay_id), "status")  # type: ignore[misc]
        if status != b"running":
            await self.redis.srem(self.keys.running_replays, replay_id)  # type: ignore[misc]
            return None
        ids = await self.redis.lpop(self.keys.replay_ids(replay_id), count)  # type: ignore[misc]
        return [raw.decode() for raw in ids or []]

    async def replay_progress(self, replay_id: str, replayed: int, skipped: int, lock: Lock) -> None:
        """Counts a batch of a bulk replay, and renews the replay's lock."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.keys.replay(replay_id), "replayed", replayed)
            pipe.hincrby(self.keys.replay(replay_id), "skipped", skipped)
            pipe.pexpire(lock.key, lock.ttl_ms)
            await pipe.execute()

    async def forget_worker(self, worker_id: str) -> None:
        await self.redis.zrem(self.keys.workers, worker_id)

    async def beat(self, worker_id: str, *, forget_silent: bool = False) -> None:
        """A worker's heartbeat; with `forget_silent`, entries silent for an hour are dropped too."""
        now = now_ms()
        if not forget_silent:
            await self.redis.zadd(self.keys.workers, {worker_id: now})
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers, {worker_id: now})
            pipe.zremrangebyscore(self.keys.workers, "-inf", now - 3_600_000)
            await pipe.execute()

    async def live_workers(self) -> int:
        return int(await self.redis.zcount(self.keys.workers, now_ms() - HEARTBEAT_TTL_MS, "+inf"))


async def every(interval_s: float, name: str, step: Callable[[], Awaitable[object]]) -> None:
    """Runs `step` every `interval_s` until cancelled; a Redis outage is logged and waited out, so
    one lost connection never ends a worker's loop."""
    while True:
        try:
            await step()
        except (RedisError, OSError) as exc:
            log.warning("%s: Redis unavailable (%s); trying again", name, exc)
        await asyncio.sleep(interval_s)


T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Sends the items of concurrent callers to Redis in one script call.

    Up to `max_in_flight` calls run at once (two: while Redis runs one, the next is being sent);
    the items that arrive meanwhile wait and go together in the next call. Under load a call holds
    about half the items in flight; an idle process still sends each item at once, or, with
    `linger_s`, after waiting that long for others to join it (for callers that do not wait on the
    answer to reply to anyone, fewer and larger calls cost Redis less). A call that
    fails or takes longer than `timeout_s` fails every caller of its batch with `error(exc)`, so
    no caller hangs and none is told its item was written when it was not.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[list[R]]],
        timeout_s: float,
        error: Callable[[Exception], Exception],
        max_batch: int = 512,
        max_in_flight: int = 2,
        linger_s: float = 0.0,
    ) -> None:
        self._write = write
        self._linger_s = linger_s
        self._timeout_s = timeout_s
        self._error = error
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def flush(self) -> None:
        """Waits until every item submitted so far is written (or has failed)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            if self._linger_s:
                await asyncio.sleep(self._linger_s)
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    async with asyncio.timeout(self._timeout_s):
                        results = await self._write([item for item, _ in batch])
                except (RedisError, OSError, TimeoutError) as exc:
                    error = self._error(exc)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._in_flight -= 1


def _unavailable(exc: Exception) -> Exception:
    return StoreUnavailable(f"Redis did not accept the event: {type(exc).__name__}")


class IngestBatcher(Batcher[NewEvent, tuple[str, bool]]):
    """The API's writes of accepted events: a failed write answers 503, never a 202."""

    def __init__(
        self,
        store: Store,
        idempotency_ttl_s: int,
        timeout_s: float,
        max_batch: int = 512,
        max_in_flight: int = 2,
    ) -> None:
        async def write(events: list[NewEvent]) -> list[tuple[str, bool]]:
            return await store.accept(events, idempotency_ttl_s)

        super().__init__(write, timeout_s, _unavailable, max_batch, max_in_flight)
